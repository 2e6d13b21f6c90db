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
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF

from .images import EncodedImage
from .transforms import EVAL_RESIZE_RATIO, IMAGENET_MEAN, IMAGENET_STD, Lighting, eval_resize_size

DCT_REDUCTIONS = (8, 4, 2)  # the scales libjpeg decodes at through PIL's draft, largest first
_JPEG_END = b"\xff\xd9"  # EOI marker: a file without it at its end was cut short
_PLAIN_JPEG_MODES = ("RGB", "L")  # stored modes decode_jpeg turns into RGB as PIL does; CMYK/YCCK stay with PIL

Box = tuple[int, int, int, int]  # top, left, height, width in pixels


@dataclass(frozen=True)
class Plan:
    """Everything random or size-dependent about one sample, in pixels of the stored image.

    `box` is cut from the stored image and resized to `resize_hw`; then `crop` (top, left, height,
    width in the resized image; None: all of it) is taken and the result flipped if `flip`. `jitter`
    is `ColorJitter.get_params`'s draw (fn order and factors), `lighting_alpha` the PCA lighting draw.
    """

    image_hw: tuple[int, int]
    box: Box
    resize_hw: tuple[int, int]
    crop: Box | None = None
    flip: bool = False
    jitter: tuple | None = None
    lighting_alpha: tuple[float, float, float] | None = None

    @property
    def output_hw(self) -> tuple[int, int]:
        return self.crop[2:] if self.crop is not None else self.resize_hw

    def alpha(self) -> torch.Tensor:
        """The lighting draw as float32 (3,), zeros without lighting (exact: it was drawn as float32)."""
        return torch.tensor(self.lighting_alpha or (0.0, 0.0, 0.0), dtype=torch.float32)


class Placed(NamedTuple):
    """A sample (or, collated, a batch) as loader workers hand it on: uint8 (3, S, S) pixels cropped,
    resized, flipped and colour jittered, and the float32 (3,) PCA lighting draw `finish` applies to it
    (zeros without lighting). A NamedTuple, so the DataLoader collates and pins it field by field."""

    pixels: torch.Tensor
    lighting_alpha: torch.Tensor


def draft_reduction(box_hw: tuple[int, int], target_hw: tuple[int, int]) -> int:
    """The draft rule: largest s in (8, 4, 2) with box / s >= target in both dimensions, else 1."""
    for s in DCT_REDUCTIONS:
        if box_hw[0] >= s * target_hw[0] and box_hw[1] >= s * target_hw[1]:
            return s
    return 1


def is_plain_jpeg(header: Image.Image, data: bytes) -> bool:
    """An RGB or grayscale JPEG that ends with its EOI marker: what `decode_jpeg` decodes as PIL would.
    A file cut short goes to PIL, which reports it as a bad image instead of padding it."""
    return header.format == "JPEG" and header.mode in _PLAIN_JPEG_MODES and data.rstrip(b"\0").endswith(_JPEG_END)


def jpeg_tensor(data: bytes) -> torch.Tensor:
    """The bytes as the 1-D uint8 tensor decode_jpeg takes (a writable copy: torch refuses read-only buffers)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_plain_jpeg(data: bytes, image_hw: tuple[int, int]) -> torch.Tensor | None:
    """uint8 (3, H, W) RGB pixels by libjpeg-turbo through torchvision, or None if it rejects the file
    or reads another size than the header (the caller then decodes with PIL)."""
    try:
        pixels = decode_jpeg(jpeg_tensor(data), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    return pixels if tuple(pixels.shape[-2:]) == tuple(image_hw) else None


def pil_to_chw(image: Image.Image) -> torch.Tensor:
    """uint8 (3, H, W) view of an RGB image's pixels stored as H x W x 3 (the channels-last layout
    torch's uint8 antialiased resize is fast on)."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def resize_uint8(pixels: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (3, h, w) pixels to `size_hw`, uint8 (3, H, W)."""
    if tuple(pixels.shape[-2:]) == tuple(size_hw):
        return pixels
    batch = pixels.unsqueeze(0)
    if pixels.device.type == "cpu":  # torch has a uint8 kernel on CPU only; elsewhere round like it does
        return torch.nn.functional.interpolate(batch, size=size_hw, mode="bilinear", antialias=True)[0]
    out = torch.nn.functional.interpolate(batch.float(), size=size_hw, mode="bilinear", antialias=True)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def crop_and_flip(pixels: torch.Tensor, plan: Plan) -> torch.Tensor:
    """The resized box's `plan.crop`, flipped if `plan.flip`."""
    if plan.crop is not None:
        top, left, height, width = plan.crop
        pixels = pixels[:, top:top + height, left:left + width]
    return pixels.flip(-1) if plan.flip else pixels


def place(pixels: torch.Tensor, plan: Plan) -> torch.Tensor:
    """uint8 (3, H, W) pixels of the whole stored image (any device) -> the plan's output pixels."""
    top, left, height, width = plan.box
    return crop_and_flip(resize_uint8(pixels[:, top:top + height, left:left + width], plan.resize_hw), plan)


def jitter_uint8(pixels: torch.Tensor, jitter: tuple | None) -> torch.Tensor:
    """`ColorJitter` with its drawn parameters, applied in the drawn order (as ColorJitter.forward)."""
    if jitter is None:
        return pixels
    order, *factors = jitter
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for fn in order:
        if factors[fn] is not None:
            pixels = adjust[fn](pixels, factors[fn])
    return pixels


def _draft(header: Image.Image, reduction: int) -> tuple[float, float]:
    """Have PIL decode `header`'s image at 1/reduction; the (x, y) scale it will decode at ((1, 1): full size)."""
    if reduction == 1:
        return 1.0, 1.0
    width, height = header.size
    drafted = header.draft("RGB", (width // reduction, height // reduction))
    if drafted is None:  # not a JPEG
        return 1.0, 1.0
    _, (_, _, drafted_width, drafted_height) = drafted  # the stored image's extent in drafted pixels
    return width / drafted_width, height / drafted_height


def _resize_box(rgb: Image.Image, plan: Plan, scale_xy: tuple[float, float]) -> torch.Tensor:
    """`plan.box` of a PIL image decoded at 1/scale, resized to `plan.resize_hw`: uint8 (3, H, W)."""
    top, left, height, width = plan.box
    scale_x, scale_y = scale_xy
    if scale_xy == (1.0, 1.0):
        if (height, width) != tuple(plan.image_hw):
            rgb = rgb.crop((left, top, left + width, top + height))
        return resize_uint8(pil_to_chw(rgb), plan.resize_hw)
    # In drafted pixels the box has fractional edges: PIL resizes exactly that region.
    box = (left / scale_x, top / scale_y, (left + width) / scale_x, (top + height) / scale_y)
    return pil_to_chw(rgb.resize(plan.resize_hw[::-1], Image.BILINEAR, box=box))


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
        scale_xy = _draft(header, reduction)
        rgb = image.decode(header)
        return crop_and_flip(_resize_box(rgb, plan, scale_xy), plan), math.sqrt(scale_xy[0] * scale_xy[1])

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
