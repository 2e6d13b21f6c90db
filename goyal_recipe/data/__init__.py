"""Data adapters: synthetic ImageNet-format data, sources, the reader, the paper's transforms, loaders.

The only part of goyal_recipe that imports torchvision, datasets, PIL or pyarrow. A sample's path:
source (bytes, name, label) -> `SampleReader` (seed, crop plan, decode now or defer to the device,
bad-image policy) -> the loader's stage (finish on the training device); see data/pipeline.py.
"""

from .bad_images import BAD_IMAGE_POLICIES, BadImageError, BadImages
from .decode import DecodeTransform, EvalDecode, TrainDecode
from .pixels import Placed, Plan, draft_reduction
from .generate import generate_dataset, generate_main, read_done, synset_names
from .hf import HFSource, load_hf_dataset
from .images import EncodedImage, decode_rgb, rgb_loader
from .loader import build_loader
from .parquet import ParquetSource, find_split_files
from .reader import Deferred, SampleReader, sample_seed
from .sources import ImageFolderSource, build_dataset
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
    "BadImages",
    "BAD_IMAGE_POLICIES",
    "SampleReader",
    "Deferred",
    "sample_seed",
    "find_bad_images",
    "validate_main",
    "train_transform",
    "eval_transform",
    "eval_resize_size",
    "Lighting",
    "DecodeTransform",
    "TrainDecode",
    "EvalDecode",
    "Placed",
    "Plan",
    "draft_reduction",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_loader",
]
