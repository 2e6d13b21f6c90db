"""The reader: what a loader worker does with one sample, from the source's bytes to what it hands on.

For a training key (epoch, index) it, in order:

1. seeds the CPU generator from (seed, epoch, index) (`sample_seed`), so every random draw of the
   sample is a function of those three alone: a resumed run, another number of loader workers or
   another world size crops and flips every image as an uninterrupted run does;
2. reads the source's `(EncodedImage, label)` and opens the header (the stored size);
3. draws the crop plan from it (`DecodeTransform.plan`: the draws of the torchvision transforms);
4. decodes now (`Placed`: uint8 pixels and the lighting draw) or, with `defer_jpegs` (data.decode=gpu),
   hands a plain JPEG on undecoded (`Deferred`: bytes, plan and key) for the device stage; a file the
   device decoder cannot take (PNG, CMYK, a JPEG cut short) is decoded now under the same plan;
5. applies the bad-image policy around 2-4 (`BadImages`): under skip a substitute is read in the same
   RNG stream, and the row's bad flag says so.

Evaluation keys are plain indices: nothing is drawn (the eval plan is a fixed resize and centre crop).
Rows: training ``(image, label, index, bad)``, evaluation ``(image, label, bad)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .bad_images import BadImages
from .decode import DecodeTransform
from .pixels import Placed, Plan, is_plain_jpeg

_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9)  # odd 64-bit constants (golden ratio, splitmix64)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The CPU generator's seed for sample `index` of `epoch` in a run seeded `seed`."""
    return (seed * _MIX[0] + epoch * _MIX[1] + index) % (2**63)


@dataclass
class Deferred:
    """A JPEG left for the device stage: its bytes, its plan, and the key to read it again decoded now."""

    data: bytes
    plan: Plan
    key: object


class SampleReader(Dataset):
    """A source's samples read, planned and decoded (or deferred) by `transform` under `bad_images`.

    `seed` None: evaluation, keyed by index, nothing seeded. `defer_jpegs`: what `reader[key]` does with
    a plain JPEG (`read(key, defer=False)` decodes it now whatever the setting, for the device stage).
    """

    def __init__(self, source, transform: DecodeTransform, bad_images: BadImages, seed: int | None = None,
                 defer_jpegs: bool = False):
        self.source, self.transform, self.bad_images = source, transform, bad_images
        self.seed, self.defer_jpegs = seed, defer_jpegs

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> tuple:
        return self.read(key, self.defer_jpegs)

    def read(self, key, defer: bool) -> tuple:
        if self.seed is None:
            (image, label), bad = self.bad_images.read(lambda i: self._decode(i, defer, key), key, len(self.source))
            return image, label, bad
        epoch, index = key
        saved = torch.get_rng_state()  # restored after: the main process's stream (workers=0) is left as it was
        # The CPU generator only: torch.manual_seed also queues a CUDA reseed, which on CUDA builds
        # costs more than decoding a small image; the transforms draw from the CPU generator.
        torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
        try:
            (image, label), bad = self.bad_images.read(lambda i: self._decode(i, defer, key), index, len(self.source))
        finally:
            torch.set_rng_state(saved)
        return image, label, index, bad

    def _decode(self, index: int, defer: bool, key) -> tuple[Placed | Deferred, int]:
        image, label = self.source[index]
        header = image.open()
        plan = self.transform.plan(*header.size)
        if defer and is_plain_jpeg(header, image.data):
            return Deferred(image.data, plan, key), label
        return self.transform.place_planned(image, header, plan), label
