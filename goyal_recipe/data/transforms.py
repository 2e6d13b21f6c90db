"""The paper's ImageNet transforms (fb.resnet.torch), with sizes that follow the recipe's image size."""

from __future__ import annotations

from typing import Sequence

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224

# PCA of ImageNet RGB pixels (AlexNet, as used by fb.resnet.torch); the eigenvectors are the columns.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)


class Lighting(torch.nn.Module):
    """AlexNet-style PCA lighting noise on a (3, H, W) tensor in [0, 1], before normalisation.

    Adds eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, alphastd) per image.
    alphastd = 0 returns the input unchanged.
    """

    def __init__(self, alphastd: float, eigval: Sequence[float] = IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC):
        super().__init__()
        self.alphastd = float(alphastd)
        self.register_buffer("eigval", torch.tensor(eigval, dtype=torch.float32), persistent=False)
        self.register_buffer("eigvec", torch.tensor(eigvec, dtype=torch.float32), persistent=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if self.alphastd == 0:
            return img
        return img + self.rgb_shift(self.draw_alpha()).to(img.dtype)

    def draw_alpha(self) -> torch.Tensor:
        """alpha ~ N(0, alphastd), 3 values, from the global torch RNG (seeded per sample by the pipeline)."""
        return torch.randn(3) * self.alphastd

    def rgb_shift(self, alpha: torch.Tensor) -> torch.Tensor:
        """The (3, 1, 1) offset added to every pixel for this alpha."""
        return (self.eigvec @ (alpha.to(self.eigval) * self.eigval)).view(3, 1, 1)

    def extra_repr(self) -> str:
        return f"alphastd={self.alphastd}"


def train_transform(
    image_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    color_jitter: float = 0.0,
    pca_lighting: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Inception-style random-size crop, flip, optional colour jitter and PCA lighting, normalise."""
    steps = [T.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if color_jitter > 0:
        steps.append(T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps.append(T.ToTensor())
    if pca_lighting > 0:
        steps.append(Lighting(pca_lighting))
    steps.append(T.Normalize(mean, std))
    return T.Compose(steps)


def eval_resize_size(image_size: int = 224, resize_ratio: float = EVAL_RESIZE_RATIO) -> int:
    """Shorter side before the centre crop: 256 for 224."""
    return int(round(image_size * resize_ratio))


def eval_transform(
    image_size: int = 224,
    resize_ratio: float = EVAL_RESIZE_RATIO,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> T.Compose:
    """Resize the shorter side to image_size * 256/224, centre crop image_size, normalise."""
    return T.Compose(
        [
            T.Resize(eval_resize_size(image_size, resize_ratio), antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
