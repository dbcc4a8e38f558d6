"""Data: datasets for the bundled samples, ImageNet folders, CIFAR-10 and synthetic images; the datamodule."""

from .datamodule import DATASET_KINDS, ViTDataModule, build_dataset, check_spec, first_n, with_transform
from .datasets import (
    Cifar10Tar,
    ImageListDataset,
    ImageNetFolders,
    ImageNetSample,
    SyntheticImages,
    UnreadableImageError,
    read_synsets,
    require_path,
)
from .transforms import eval_transform, train_transform

__all__ = [
    "DATASET_KINDS",
    "Cifar10Tar",
    "ImageListDataset",
    "ImageNetFolders",
    "ImageNetSample",
    "SyntheticImages",
    "UnreadableImageError",
    "ViTDataModule",
    "build_dataset",
    "check_spec",
    "eval_transform",
    "first_n",
    "read_synsets",
    "require_path",
    "train_transform",
    "with_transform",
]
