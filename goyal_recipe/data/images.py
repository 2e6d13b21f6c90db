"""Encoded images as sources hand them on: the stored bytes and the name a decode error reports.

Decoding is deferred so that the reader can read the header first (the stored size the crop plan
is drawn from), then decode at reduced size, on the device, or not at all.
"""

from __future__ import annotations

import io
from typing import NamedTuple

from PIL import Image

from .bad_images import DECODE_ERRORS, BadImageError


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever the stored mode: ImageNet holds CMYK and grayscale JPEGs and a PNG named .JPEG."""
    return image.convert("RGB")  # also forces the decode, so the source file may be closed after


def read_bytes(path: str) -> bytes:
    """The file's bytes; `BadImageError` naming the path if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise BadImageError.at(path, f"unreadable ({e.strerror})") from None


class EncodedImage(NamedTuple):
    """Image bytes as stored (any format PIL reads), not decoded yet, and the name errors report."""

    data: bytes
    name: str = "<image bytes>"

    def open(self) -> Image.Image:
        """The image with only its header read (size, mode, format); `BadImageError` if PIL cannot."""
        if not self.data:
            raise BadImageError.at(self.name, "empty file (0 bytes)")
        try:
            return Image.open(io.BytesIO(self.data))
        except DECODE_ERRORS as e:
            raise BadImageError.decoding(self.name, e) from None

    def decode(self, header: Image.Image) -> Image.Image:
        """The pixels of `header` (from `open`, drafted or not) as RGB; `BadImageError` if they cannot be decoded."""
        try:
            header.load()
            return header if header.mode == "RGB" else to_rgb(header)
        except DECODE_ERRORS as e:
            raise BadImageError.decoding(self.name, e) from None

    def rgb(self) -> Image.Image:
        """The whole image decoded to RGB."""
        return self.decode(self.open())


def decode_rgb(data: bytes, name: str = "<image bytes>") -> Image.Image:
    """Decode encoded image bytes (any PIL format) to an RGB image; `BadImageError` naming `name` if it cannot."""
    return EncodedImage(data, name).rgb()


def rgb_loader(path: str) -> Image.Image:
    """A folder loader for torchvision's ImageFolder: decode with PIL, always RGB; `BadImageError` naming the path."""
    return decode_rgb(read_bytes(path), path)
