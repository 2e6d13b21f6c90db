"""The pixel operations of a sample's plan (data/decode.py says the rules): the plan itself, the
draft rule, full-size JPEG decoding by torchvision, the box cut and resized, the crop, flip and jitter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import functional as TF

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


def draft(header: Image.Image, reduction: int) -> tuple[float, float]:
    """Have PIL decode `header`'s image at 1/reduction; the (x, y) scale it will decode at ((1, 1): full size)."""
    if reduction == 1:
        return 1.0, 1.0
    width, height = header.size
    drafted = header.draft("RGB", (width // reduction, height // reduction))
    if drafted is None:  # not a JPEG
        return 1.0, 1.0
    _, (_, _, drafted_width, drafted_height) = drafted  # the stored image's extent in drafted pixels
    return width / drafted_width, height / drafted_height


def resize_box(rgb: Image.Image, plan: Plan, scale_xy: tuple[float, float]) -> torch.Tensor:
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
