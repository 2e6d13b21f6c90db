"""data.decode=gpu: JPEGs decoded in batches on the training device instead of in the loader workers.

Workers read each file's bytes and its header and draw the sample's plan exactly as the cpu path
does (data/decode.py: same seeded RNG draws, from the stored size), then pass on the bytes and the
plan. In the main process, as the training loop takes a batch, `DecodeStage` decodes its JPEGs
with one `torchvision.io.decode_jpeg(list, device=...)` call (nvjpeg on CUDA), cuts, resizes
(antialiased), flips, jitters and normalises each on the device, and returns the list the cpu
path's loader yields, e.g. (images, labels, index, bad), with the images already on the device.

Fallbacks, all to the cpu path under the same plan, so every sample keeps the crop decode=cpu
gives it: a file that is not a plain JPEG (PNG, CMYK, a JPEG cut short, a header PIL cannot read)
is decoded by the worker itself; a JPEG that `decode_jpeg` still rejects is redone in the main
process from its dataset key, (epoch, index), which also applies data.bad_images to it. On the CPU
device the output equals decode=cpu's with decode_draft=false exactly (same libjpeg-turbo decode,
same resize and arithmetic); on CUDA nvjpeg's IDCT and a float resize differ by rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from .decode import DecodeTransform, Plan, is_plain_jpeg, place
from .loader import build_loader
from .sources import EncodedImage


@dataclass
class Deferred:
    """A JPEG left for the device stage: its bytes, its plan, and the dataset key to redo it on the CPU."""

    data: bytes
    plan: Plan
    key: object = None


class DeferJpegs:
    """Worker-side transform: a device-decodable JPEG becomes `Deferred`; anything else is decoded
    here by the cpu transform under the same plan (the plan is drawn once, before the choice)."""

    decodes_itself = True

    def __init__(self, cpu: DecodeTransform):
        self.cpu = cpu

    def __call__(self, image: EncodedImage | Image.Image):
        if not isinstance(image, EncodedImage):
            return self.cpu(image)
        header = image.open()
        plan = self.cpu.plan(*header.size)
        if is_plain_jpeg(header, image.data):
            return Deferred(image.data, plan)
        return self.cpu.render(image, header, plan)


class KeyedRows(Dataset):
    """`rows[key]` with the key written into a deferred image, so the stage can redo that row."""

    def __init__(self, rows: Dataset):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key):
        row = self.rows[key]
        if isinstance(row[0], Deferred):
            row[0].key = key
        return row


@dataclass
class EncodedBatch:
    """The images of one batch as workers leave them: deferred JPEGs end to end in one uint8 tensor
    (one shared-memory block), and the images the workers decoded themselves."""

    size: int
    data: torch.Tensor
    ends: list[int] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)
    keys: list = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    decoded: torch.Tensor | None = None
    decoded_positions: list[int] = field(default_factory=list)

    @classmethod
    def pack(cls, images: list) -> EncodedBatch:
        deferred = [(i, x) for i, x in enumerate(images) if isinstance(x, Deferred)]
        data = torch.empty(sum(len(x.data) for _, x in deferred), dtype=torch.uint8)
        flat, ends, end = data.numpy(), [], 0
        for _, x in deferred:
            flat[end:end + len(x.data)] = np.frombuffer(x.data, dtype=np.uint8)
            end += len(x.data)
            ends.append(end)
        done = [i for i, x in enumerate(images) if not isinstance(x, Deferred)]
        decoded = torch.stack([images[i] for i in done]) if done else None
        return cls(len(images), data, ends, [x.plan for _, x in deferred], [x.key for _, x in deferred],
                   [i for i, _ in deferred], decoded, done)

    def jpegs(self) -> list[torch.Tensor]:
        starts = [0] + self.ends[:-1]
        return [self.data[a:b] for a, b in zip(starts, self.ends)]


def collate_encoded(rows: list) -> list:
    """Rows (image or Deferred, *columns) -> [EncodedBatch, *collated columns]."""
    images = [row[0] for row in rows]
    return [EncodedBatch.pack(images), *default_collate([tuple(row[1:]) for row in rows])]


class DecodeStage:
    """Main-process stage: [EncodedBatch, *columns] -> [images on `device`, *columns].

    `fallback` is the cpu-path dataset under the same keys (EpochSeededDataset or FlaggedDataset):
    a JPEG the device decoder rejects is redone from it, bad-image policy included.
    """

    def __init__(self, transform: DecodeTransform, device: torch.device | str, fallback: Dataset):
        self.transform, self.device, self.fallback = transform, torch.device(device), fallback

    def __call__(self, batch: list) -> list:
        encoded, *columns = batch
        size = self.transform.image_size
        images = torch.empty((encoded.size, 3, size, size), dtype=torch.float32, device=self.device)
        placed, plans, positions = [], [], []
        for k, pixels in enumerate(self.decode(encoded.jpegs())):
            plan, position = encoded.plans[k], encoded.positions[k]
            if pixels is None or tuple(pixels.shape) != (3, *plan.image_hw):
                self._redo(encoded.keys[k], position, images, columns)
                continue
            placed.append(place(pixels, plan))
            plans.append(plan)
            positions.append(position)
        if placed:
            images[positions] = self.transform.finish(torch.stack(placed), plans)
        if encoded.decoded is not None:
            images[encoded.decoded_positions] = encoded.decoded.to(self.device, non_blocking=True)
        return [images, *columns]

    def decode(self, jpegs: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """uint8 (3, H, W) RGB per JPEG on the device, None where the decoder rejects it.

        One batched call; if it fails, one call per JPEG finds the ones it rejects.
        """
        if not jpegs:
            return []
        try:
            return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
        except (RuntimeError, ValueError):
            return [self._decode_one(jpeg) for jpeg in jpegs]

    def _decode_one(self, jpeg: torch.Tensor) -> torch.Tensor | None:
        try:
            return decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=self.device)
        except (RuntimeError, ValueError):
            return None

    def _redo(self, key, position: int, images: torch.Tensor, columns: list) -> None:
        """Row `position` from the cpu path: its image, and its label and bad flag (a substitute's under skip)."""
        image, *rest = self.fallback[key]
        images[position] = image.to(self.device)
        for column, value in zip(columns, rest):
            column[position] = value


class DecodedLoader:
    """A DataLoader whose batches pass through `stage` in this process as they are taken."""

    def __init__(self, loader: DataLoader, stage: DecodeStage):
        self.loader, self.stage = loader, stage

    def __iter__(self):
        return map(self.stage, self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # batch_size, dataset, sampler... as the DataLoader has them
        if name in ("loader", "stage"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def _deferring(rows: Dataset) -> KeyedRows:
    """`rows` (EpochSeededDataset or FlaggedDataset) over a copy of its source whose transform defers JPEGs."""
    source = copy.copy(rows.dataset)
    source.transform = DeferJpegs(source.transform)
    worker_rows = copy.copy(rows)
    worker_rows.dataset = source
    return KeyedRows(worker_rows)


def build_device_loader(rows: Dataset, sampler: Iterable, batch_size: int, num_workers: int,
                        device: torch.device | str, drop_last: bool = False, worker_seed: int = 0) -> DecodedLoader:
    """The loader of decode=gpu over `rows`, whose source's transform is a `DecodeTransform`; batches
    come out as the cpu path's loader gives them, images on `device`."""
    transform = rows.dataset.transform
    if not isinstance(transform, DecodeTransform):
        raise TypeError(f"device decoding needs the source's transform to be a DecodeTransform, got {type(transform)}")
    loader = build_loader(_deferring(rows), sampler, batch_size, num_workers, drop_last=drop_last,
                          worker_seed=worker_seed, collate_fn=collate_encoded)
    return DecodedLoader(loader, DecodeStage(transform, device, rows))
