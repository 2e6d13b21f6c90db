"""Where batches reach the training device: the stage in the main process that finishes them there.

data.decode=cpu. Workers decode, crop, resize, flip and jitter (`DecodeTransform.placed`) and hand on
uint8 batches with each sample's PCA lighting draw (`Placed`; pinned when the device is CUDA): a
quarter of the bytes of float images through the loader's shared memory. As the training loop takes
a batch, `FinishStage` copies it to the device and runs `DecodeTransform.finish` there (float, the
lighting with the draws carried from the worker, normalisation), as timm's PrefetchLoader does.
When the device is the CPU there is nothing to gain from finishing in the main process, which also
computes the training step: the workers finish each batch as they collate it (`FinishStage.collate`,
the same arithmetic on the same CPU, so the same floats) and the stage passes it on.

data.decode=gpu: JPEGs decoded in batches on the training device instead of in the loader workers.
The workers' reader (data/reader.py, `defer_jpegs`) reads each file's bytes and its header and draws
the sample's plan exactly as the cpu path does, then passes on the bytes and the plan (`Deferred`).
In the main process, as the training loop takes a batch, `DecodeStage` decodes its JPEGs with one
`torchvision.io.decode_jpeg(list, device=...)` call (nvjpeg on CUDA), cuts, resizes (antialiased),
flips and jitters each on the device, and finishes the batch with the same `DecodeTransform.finish`.

Both stages return the list the loader would give without them, e.g. (images, labels, index, bad) or
(images, labels, bad), with the images normalised float32 on the device.

Fallbacks, all to the cpu path under the same plan, so every sample keeps the crop decode=cpu
gives it: a file that is not a plain JPEG (PNG, CMYK, a JPEG cut short, a header PIL cannot read)
is decoded by the worker itself; a JPEG that `decode_jpeg` still rejects is read again in the main
process by the same reader, decoding now (`SampleReader.read(key, defer=False)`), which also applies
data.bad_images to it. On the CPU device the output equals decode=cpu's with decode_draft=false
exactly (same libjpeg-turbo decode, same resize and arithmetic); on CUDA nvjpeg's IDCT and a float
resize differ by rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate
from torchvision.io import ImageReadMode, decode_jpeg

from .decode import DecodeTransform
from .pixels import Placed, Plan, jitter_uint8, place
from .loader import build_loader
from .reader import Deferred, SampleReader


@dataclass
class EncodedBatch:
    """The images of one batch as workers leave them: deferred JPEGs end to end in one uint8 tensor
    (one shared-memory block), and the images the workers decoded themselves (`Placed`, collated)."""

    size: int
    data: torch.Tensor
    ends: list[int] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)
    keys: list = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    decoded: Placed | None = None
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
        decoded = default_collate([images[i] for i in done]) if done else None
        return cls(len(images), data, ends, [x.plan for _, x in deferred], [x.key for _, x in deferred],
                   [i for i, _ in deferred], decoded, done)

    def pin_memory(self) -> EncodedBatch:
        """The DataLoader's pin_memory hook: the bytes and the worker-decoded pixels page-locked."""
        decoded = None if self.decoded is None else self.decoded._replace(pixels=self.decoded.pixels.pin_memory())
        return dataclasses.replace(self, data=self.data.pin_memory(), decoded=decoded)

    def jpegs(self) -> list[torch.Tensor]:
        starts = [0] + self.ends[:-1]
        return [self.data[a:b] for a, b in zip(starts, self.ends)]


def collate_encoded(rows: list) -> list:
    """Rows (image or Deferred, *columns) -> [EncodedBatch, *collated columns]."""
    images = [row[0] for row in rows]
    return [EncodedBatch.pack(images), *default_collate([tuple(row[1:]) for row in rows])]


class FinishStage:
    """Main-process stage of data.decode=cpu: [Placed batch, *columns] -> [images on `device`, *columns].

    With `in_workers` (a CPU device) the loader's workers finish each batch themselves through `collate`,
    and the stage passes their batches on unchanged."""

    def __init__(self, transform: DecodeTransform, device: torch.device | str, in_workers: bool = False):
        self.transform, self.device, self.in_workers = transform, torch.device(device), in_workers

    def __call__(self, batch: list) -> list:
        if self.in_workers:
            return batch
        return self.finish(batch)

    def finish(self, batch: list) -> list:
        (pixels, lighting_alpha), *columns = batch
        return [self.transform.finish(pixels.to(self.device, non_blocking=True), lighting_alpha), *columns]

    def collate(self, rows: list) -> list:
        """The loader's collate_fn with `in_workers`: rows of (Placed, *columns) -> the finished batch."""
        return self.finish(default_collate(rows))


class DecodeStage:
    """Main-process stage of data.decode=gpu: [EncodedBatch, *columns] -> [images on `device`, *columns].

    A JPEG the device decoder rejects is read again by the workers' `reader`, decoding now (bad-image
    policy included).
    """

    def __init__(self, reader: SampleReader, device: torch.device | str):
        self.reader, self.transform, self.device = reader, reader.transform, torch.device(device)

    def __call__(self, batch: list) -> list:
        encoded, *columns = batch
        size = self.transform.image_size
        pixels = torch.empty((encoded.size, 3, size, size), dtype=torch.uint8, device=self.device)
        lighting_alpha = torch.zeros((encoded.size, 3), dtype=torch.float32)
        for k, decoded in enumerate(self.decode(encoded.jpegs())):
            plan, position = encoded.plans[k], encoded.positions[k]
            if decoded is None or tuple(decoded.shape) != (3, *plan.image_hw):
                self._redo(encoded.keys[k], position, Placed(pixels, lighting_alpha), columns)
                continue
            pixels[position] = jitter_uint8(place(decoded, plan), plan.jitter)
            lighting_alpha[position] = plan.alpha()
        if encoded.decoded is not None:
            pixels[encoded.decoded_positions] = encoded.decoded.pixels.to(self.device, non_blocking=True)
            lighting_alpha[encoded.decoded_positions] = encoded.decoded.lighting_alpha
        return [self.transform.finish(pixels, lighting_alpha), *columns]

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

    def _redo(self, key, position: int, batch: Placed, columns: list) -> None:
        """Row `position` decoded now: its pixels and lighting draw, and its label and bad flag (a
        substitute's under skip)."""
        (pixels, lighting_alpha), *rest = self.reader.read(key, defer=False)
        batch.pixels[position] = pixels.to(self.device)
        batch.lighting_alpha[position] = lighting_alpha
        for column, value in zip(columns, rest):
            column[position] = value


class StagedLoader:
    """A DataLoader whose batches pass through `stage` in this process as they are taken."""

    def __init__(self, loader: DataLoader, stage: Callable[[list], list]):
        self.loader, self.stage = loader, stage

    def __iter__(self):
        return map(self.stage, self.loader)

    def __len__(self) -> int:
        return len(self.loader)


def build_staged_loader(reader: SampleReader, sampler: Iterable, batch_size: int, num_workers: int,
                        device: torch.device | str, drop_last: bool = False, worker_seed: int = 0,
                        pin_memory: bool = True) -> StagedLoader:
    """The loader over `reader` with the stage that finishes its batches on `device`: images normalised
    float32 there, the other columns as the reader's rows have them.

    decode=cpu (the reader decodes now): uint8 batches from the workers (pinned for CUDA unless
    `pin_memory` is false), finished on `device` as they are taken; for a CPU device, finished by the
    workers as they collate them.
    decode=gpu (`reader.defer_jpegs`): the workers' bytes and plans, decoded by `DecodeStage` on `device`.
    """
    device = torch.device(device)
    if reader.defer_jpegs:
        stage, collate = DecodeStage(reader, device), collate_encoded
    else:
        stage = FinishStage(reader.transform, device, in_workers=device.type == "cpu")
        collate = stage.collate if stage.in_workers else None
    loader = build_loader(reader, sampler, batch_size, num_workers, pin_memory=pin_memory and device.type == "cuda",
                          drop_last=drop_last, worker_seed=worker_seed, collate_fn=collate)
    return StagedLoader(loader, stage)
