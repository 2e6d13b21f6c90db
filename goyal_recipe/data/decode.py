"""The trainer's transforms as one step from encoded bytes: plan the crop from the header, decode
(at reduced size when the crop allows it), crop, resize, flip, colour jitter; then, in `finish`, float,
PCA lighting and normalisation.

Two halves. Loader workers run the first (`DecodeTransform.placed`) and hand on `Placed`: uint8 pixels
and the sample's lighting draw, a quarter of the bytes of the float image through the loader's shared
memory. `finish` runs the second on a whole batch where it reaches the training device (the stage of
data/device_decode.py), with the draws the workers made. Calling the transform runs both on one image:
the float image the torchvision transforms give, and what the batch stage gives for that sample.

Crop plan. The stored image size is read from the header (PIL opens lazily) and the crop box, flip,
colour jitter and lighting are drawn from the torch RNG with the same calls, in the same order, as
`train_transform` (RandomResizedCrop.get_params, RandomHorizontalFlip, ColorJitter.get_params,
Lighting). The plan is therefore the same whether or not the JPEG is then drafted, and the same
as the torchvision transforms would draw; the pipeline's per-sample seeding keeps it a function of
(seed, epoch, index). Evaluation draws nothing: the shorter side is resized to
image_size * 256/224, then the centre image_size x image_size is cropped.

Draft rule (`draft_reduction`). A JPEG is decoded at 1/s of its size (libjpeg's DCT scaling
through PIL's `draft`) for the largest s in 8, 4, 2 with which the region to resize, measured in
the reduced image, is still at least its resize target in both dimensions:
``box_height / s >= target_height and box_width / s >= target_width``; otherwise s = 1. The final
resize thus stays a downsample (or 1:1) wherever it was one, and a crop smaller than the output
(upsampled) is never drafted: the drafted output differs from the full decode by resampling noise
only (part of the downscale done by the DCT instead of the antialiased bilinear filter). Training:
the box is the random-resized crop, the target image_size x image_size. Evaluation: the box is the
whole image, the target its resized size, i.e. draft only while the shorter side stays >= 256 at 224.
Files that are not JPEG ignore the draft; any mode (CMYK, grayscale, palette) ends as RGB.

Decoders and resampling. At full size a plain RGB or grayscale JPEG (`is_plain_jpeg`) is decoded by
`torchvision.io.decode_jpeg` (libjpeg-turbo like PIL, the same pixels, and faster: it skips PIL's
4-byte internal copy); the integer box is cut from it and resized with torch's antialiased bilinear
filter on uint8 (the filter of `transforms.v2`, a mean 0.03 of 255 from PIL's at 224 px). Drafted,
or for any other file, PIL decodes; a drafted box has fractional coordinates in the reduced image,
so PIL resizes it with its antialiased bilinear filter and the exact box (``Image.resize(box=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T

from .images import EncodedImage
from .pixels import (Placed, Plan, crop_and_flip, decode_plain_jpeg, draft, draft_reduction, is_plain_jpeg,
                     jitter_uint8, place, resize_box)
from .transforms import EVAL_RESIZE_RATIO, IMAGENET_MEAN, IMAGENET_STD, Lighting, eval_resize_size

class DecodeTransform:
    """Base of the train and eval transforms: `EncodedImage` -> normalised float (3, S, S), or its two
    halves: `placed` (uint8 pixels and the lighting draw) and `finish` (float, lighting, normalise).

    `plan` is the only part that differs between training and evaluation.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], pca_lighting: float,
                 draft: bool):
        self.image_size = int(image_size)
        self.draft = bool(draft)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self._normalisation: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # (mean, std) per device
        self.lighting = Lighting(pca_lighting) if pca_lighting > 0 else None

    def plan(self, width: int, height: int) -> Plan:
        raise NotImplementedError

    def __call__(self, image: EncodedImage) -> torch.Tensor:
        """The normalised float (3, S, S) image: `placed`, then `finish` on it alone."""
        pixels, alpha = self.placed(image)
        return self.finish(pixels.unsqueeze(0), alpha.unsqueeze(0))[0]

    def placed(self, image: EncodedImage) -> Placed:
        """The worker's half: plan from the header (the RNG draws), decode, place, jitter."""
        header = image.open()
        return self.place_planned(image, header, self.plan(*header.size))

    def place_planned(self, image: EncodedImage, header: Image.Image, plan: Plan) -> Placed:
        """`Placed` of `plan` for an image whose header is open."""
        pixels, _ = self.decode_placed(image, header, plan)
        return Placed(jitter_uint8(pixels, plan.jitter), plan.alpha())

    def decode_placed(self, image: EncodedImage, header: Image.Image, plan: Plan) -> tuple[torch.Tensor, float]:
        """(uint8 output pixels of `plan`, the reduction the image was decoded at: 1 = full size)."""
        reduction = draft_reduction(plan.box[2:], plan.resize_hw) if self.draft else 1
        if reduction == 1 and is_plain_jpeg(header, image.data):
            pixels = decode_plain_jpeg(image.data, plan.image_hw)
            if pixels is not None:
                return place(pixels, plan), 1.0
        scale_xy = draft(header, reduction)
        rgb = image.decode(header)
        return crop_and_flip(resize_box(rgb, plan, scale_xy), plan), math.sqrt(scale_xy[0] * scale_xy[1])

    def finish(self, pixels: torch.Tensor, lighting_alpha: torch.Tensor) -> torch.Tensor:
        """The batch's half, on the device `pixels` are on: uint8 (N, 3, S, S) and their (N, 3) lighting
        draws (CPU) -> float in [0, 1], lighting, normalised: float32 (N, 3, S, S).

        The arithmetic of ToTensor, Lighting and Normalize in their order, so equal pixels and draws give
        equal floats on the CPU, batched or not. (CUDA divides by the scalar 255 through its reciprocal:
        within an ulp.)
        """
        device = pixels.device
        out = torch.empty(pixels.shape, dtype=torch.float32, device=device)
        out.copy_(pixels).div_(255)
        if self.lighting is not None:
            # Per sample, as Lighting computes it: a batched matmul may sum in another order.
            shifts = torch.stack([self.lighting.rgb_shift(a) for a in lighting_alpha.cpu()])
            out.add_(to_device(shifts, device))
        if device not in self._normalisation:  # copied once per device, not once per batch
            self._normalisation[device] = (to_device(self.mean, device), to_device(self.std, device))
        mean, std = self._normalisation[device]
        return out.sub_(mean).div_(std)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor on `device`; to CUDA through pinned memory, so the copy queues on the stream
    instead of waiting for the kernels queued before it (the training step's)."""
    if tensor.device == device:
        return tensor
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _size_only(width: int, height: int) -> torch.Tensor:
    """An empty tensor that torchvision's get_params reads the (height, width) of, without pixels."""
    return torch.empty((0, height, width))


class TrainDecode(DecodeTransform):
    """`train_transform` from bytes: random-resized crop, flip, optional colour jitter and PCA
    lighting, normalise; the same RNG draws in the same order; JPEGs drafted by the draft rule."""

    def __init__(self, image_size: int = 224, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5, color_jitter: float = 0.0,
                 pca_lighting: float = 0.0, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, draft: bool = True):
        super().__init__(image_size, mean, std, pca_lighting, draft)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)
        self.jitter = T.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None

    def plan(self, width: int, height: int) -> Plan:
        box = T.RandomResizedCrop.get_params(_size_only(width, height), self.scale, self.ratio)
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        jitter = None
        if self.jitter is not None:
            j = self.jitter
            order, *factors = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            jitter = (tuple(order.tolist()), *factors)
        alpha = tuple(self.lighting.draw_alpha().tolist()) if self.lighting is not None else None
        size = self.image_size
        return Plan((height, width), box, (size, size), None, flip, jitter, alpha)


class EvalDecode(DecodeTransform):
    """`eval_transform` from bytes: shorter side to image_size * resize_ratio, centre crop, normalise;
    JPEGs drafted only while the shorter side stays >= that resize target."""

    def __init__(self, image_size: int = 224, resize_ratio: float = EVAL_RESIZE_RATIO,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, draft: bool = True):
        if resize_ratio < 1:
            raise ValueError(f"resize_ratio must be >= 1 (resize, then crop inside), got {resize_ratio}")
        super().__init__(image_size, mean, std, 0.0, draft)
        self.resize_short = eval_resize_size(image_size, resize_ratio)

    def plan(self, width: int, height: int) -> Plan:
        short, long = min(width, height), max(width, height)
        resized_long = int(self.resize_short * long / short)  # torchvision Resize's rounding
        resize_hw = (self.resize_short, resized_long) if height <= width else (resized_long, self.resize_short)
        size = self.image_size
        # torchvision CenterCrop's offsets
        crop = (round((resize_hw[0] - size) / 2.0), round((resize_hw[1] - size) / 2.0), size, size)
        return Plan((height, width), (0, 0, height, width), resize_hw, crop)
