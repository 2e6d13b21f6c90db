"""The synthetic images: per class a seeded prototype (coloured oriented gratings plus colour blobs);
each image the prototype moved, scaled, rotated, recoloured, overlaid with a random clutter grating
and noised, with strengths that grow with ``difficulty`` in [0, 1]."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

_CHUNK_PIXELS = 1 << 22  # pixels per vectorised batch; bounds memory at ImageNet-like sizes
_RENDER_HEIGHT = 96  # the smooth pattern is drawn at most this high, then upsampled


def _prototype(seed: int, label: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0x5EED, label])
    n_gratings, n_blobs = 2, 2
    colours = rng.normal(size=(n_gratings, 3))
    colours *= 0.22 / np.linalg.norm(colours, axis=1, keepdims=True)
    return {
        "background": rng.uniform(0.3, 0.7, size=3),
        "theta": rng.uniform(0.0, math.pi, size=n_gratings),
        "freq": rng.uniform(1.0, 3.0, size=n_gratings),  # cycles per half image height
        "phase": rng.uniform(0.0, 2 * math.pi, size=n_gratings),
        "grating_colour": colours,
        "blob_centre": rng.uniform(-0.6, 0.6, size=(n_blobs, 2)),
        "blob_radius": rng.uniform(0.15, 0.4, size=n_blobs),
        "blob_colour": rng.uniform(-0.35, 0.35, size=(n_blobs, 3)),
    }


def _render(proto: dict, n: int, width: int, height: int, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """n images of one class as uint8 (n, height, width, 3)."""
    d = difficulty
    f32 = np.float32
    # The pattern is smooth, so it is drawn at most _RENDER_HEIGHT pixels high and upsampled; only the
    # pixel noise is drawn at full resolution. This keeps ImageNet-sized images cheap.
    rh = min(height, _RENDER_HEIGHT)
    rw = max(1, round(width * rh / height))
    # Coordinates in units of half the image height, so patterns keep their look at any size.
    x = ((np.arange(rw, dtype=f32) + 0.5 - rw / 2) / (rh / 2))[None, None, :]
    y = ((np.arange(rh, dtype=f32) + 0.5 - rh / 2) / (rh / 2))[None, :, None]

    def draw(size):
        return rng.uniform(-1.0, 1.0, size=size).astype(f32)

    tx, ty = draw(n) * 2.0 * d, draw(n) * 2.0 * d
    scale = np.exp(draw(n) * 0.4 * d)
    rot = draw(n) * (math.pi / 8) * d
    clutter_theta = rng.uniform(0.0, math.pi, size=n).astype(f32)
    clutter_freq = rng.uniform(1.0, 3.0, size=n).astype(f32)
    clutter_phase = rng.uniform(0.0, 2 * math.pi, size=n).astype(f32)
    clutter_colour = rng.normal(size=(n, 3)).astype(f32)
    clutter_colour *= (0.25 * d * rng.uniform(0.5, 1.0, size=(n, 1))).astype(f32) / np.linalg.norm(
        clutter_colour, axis=1, keepdims=True
    )
    gain = np.exp(rng.normal(0.0, 0.3 * d, size=(n, 3))).astype(f32)
    offset = rng.normal(0.0, 0.2 * d, size=(n, 3)).astype(f32)
    contrast = np.exp(rng.normal(0.0, 0.3 * d, size=n)).astype(f32)
    noise_amplitude = f32((0.02 + 0.12 * d) * 255.0 * math.sqrt(12.0))  # uniform noise with this std

    def col(a):  # per-image scalar -> broadcastable over (n, H, W)
        return a[:, None, None]

    cos_r, sin_r = col(np.cos(rot)), col(np.sin(rot))
    xs, ys = x - col(tx), y - col(ty)
    u = (cos_r * xs + sin_r * ys) / col(scale)
    v = (cos_r * ys - sin_r * xs) / col(scale)

    img = np.empty((n, rh, rw, 3), dtype=f32)
    img[...] = proto["background"].astype(f32)
    for k in range(len(proto["theta"])):
        t = proto["theta"][k]
        along = u * f32(math.cos(t)) + v * f32(math.sin(t))
        wave = np.sin(f32(math.pi * proto["freq"][k]) * along + f32(proto["phase"][k]))
        img += wave[..., None] * proto["grating_colour"][k].astype(f32)
    for b in range(len(proto["blob_radius"])):
        cx, cy = proto["blob_centre"][b]
        r2 = (u - f32(cx)) ** 2 + (v - f32(cy)) ** 2
        blob = np.exp(r2 * f32(-0.5 / proto["blob_radius"][b] ** 2))
        img += blob[..., None] * proto["blob_colour"][b].astype(f32)
    # Clutter lives in image coordinates: it does not move with the object.
    clutter = np.sin(
        f32(math.pi) * col(clutter_freq) * (x * col(np.cos(clutter_theta)) + y * col(np.sin(clutter_theta)))
        + col(clutter_phase)
    )
    img += clutter[..., None] * clutter_colour[:, None, None, :]

    mean = img.mean(axis=(1, 2, 3), keepdims=True)
    img = (img - mean) * contrast[:, None, None, None] + mean
    img = img * gain[:, None, None, :] + offset[:, None, None, :]
    img = np.clip(img * 255.0 + 0.5, 0.0, 255.0).astype(np.uint8)
    if (rh, rw) != (height, width):
        img = np.stack([np.asarray(Image.fromarray(a).resize((width, height), Image.BILINEAR)) for a in img])
    out = rng.random(size=img.shape, dtype=f32)
    out -= f32(0.5)
    out *= noise_amplitude
    out += img
    np.clip(out + f32(0.5), 0.0, 255.0, out=out)
    return out.astype(np.uint8)


def _encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def class_images(seed, label, split_id, count, width, height, difficulty, quality) -> list[bytes]:
    """JPEG bytes of one class and split, rendered in memory-bounded chunks."""
    proto = _prototype(seed, label)
    rng = np.random.default_rng([seed, split_id, label])
    chunk = max(1, _CHUNK_PIXELS // (width * height))
    out = []
    for start in range(0, count, chunk):
        for pixels in _render(proto, min(chunk, count - start), width, height, difficulty, rng):
            out.append(_encode_jpeg(pixels, quality))
    return out
