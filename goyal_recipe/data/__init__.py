"""Data adapters: synthetic ImageNet-format data, sources, the paper's transforms, loaders.

The only part of goyal_recipe that imports torchvision, datasets, PIL or pyarrow.
"""

from .decode import DecodeTransform, EvalDecode, Plan, TrainDecode, draft_reduction
from .generate import generate_dataset, generate_main, read_done, synset_names
from .loader import build_loader
from .sources import (
    BAD_IMAGE_POLICIES,
    BadImageError,
    EncodedImage,
    HFSource,
    ImageFolderSource,
    ParquetSource,
    build_dataset,
    decode_rgb,
    find_split_files,
    load_hf_dataset,
    load_sample,
    rgb_loader,
)
from .transforms import IMAGENET_MEAN, IMAGENET_STD, Lighting, eval_resize_size, eval_transform, train_transform
from .validate import find_bad_images, validate_main

__all__ = [
    "generate_dataset",
    "generate_main",
    "read_done",
    "synset_names",
    "ImageFolderSource",
    "ParquetSource",
    "HFSource",
    "build_dataset",
    "load_hf_dataset",
    "find_split_files",
    "rgb_loader",
    "decode_rgb",
    "EncodedImage",
    "BadImageError",
    "BAD_IMAGE_POLICIES",
    "load_sample",
    "find_bad_images",
    "validate_main",
    "train_transform",
    "eval_transform",
    "eval_resize_size",
    "Lighting",
    "DecodeTransform",
    "TrainDecode",
    "EvalDecode",
    "Plan",
    "draft_reduction",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_loader",
]
