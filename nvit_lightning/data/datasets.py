"""Datasets for the bundled sample assets, ImageNet folders, CIFAR-10 in a tar, and synthetic images.

Every dataset yields ``(transform(image), int_label)``; without a transform the image becomes a float
tensor in [0, 1]. Missing paths raise ``FileNotFoundError`` at construction, so a bad config fails
before any training starts.
"""

from __future__ import annotations

import io
import os
import tarfile
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from .transforms import Transform

PathLike = str | os.PathLike

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


def require_path(path: PathLike, what: str) -> Path:
    """Return ``path`` as a Path, or raise a one-line FileNotFoundError that says how to fix it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{what} not found: {path} (cwd {Path.cwd()}); put the data there or set "
            f"paths.data_dir=... / the dataset's root in the data config (see data/README.md)"
        )
    return path


def _load_rgb(source: PathLike | io.BytesIO) -> Image.Image:
    with Image.open(source) as img:
        return img.convert("RGB")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (truncated, not an image), with `strict` reading."""


class SkipsUnreadable(Dataset):
    """Base of the file-backed datasets: `_read(i)` gives (PIL image, label), `_source(i)` names the file.

    An unreadable image (a truncated JPEG, a non-image file: a real ImageNet copy has such files) is
    replaced by the next readable sample with a warning naming it and counting the skips so far
    (per worker), or, with `strict = True`, stops the run naming the file.
    """

    transform: Transform | None = None
    strict = False
    skipped = 0

    samples: list  # (path, label) per image; datasets with other sample layouts override _read/_source

    def _read(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return _load_rgb(path), label

    def _source(self, i: int) -> str:
        return str(self.samples[i][0])

    def __getitem__(self, i: int) -> tuple[object, int]:
        n = len(self)
        for j in range(i, i + n):
            try:
                image, label = self._read(j % n)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                self._unreadable(j % n, err)
                continue
            return _apply(self.transform, image), label
        raise UnreadableImageError(f"no image of {type(self).__name__} can be read")

    def _unreadable(self, i: int, err: BaseException) -> None:
        if self.strict:
            raise UnreadableImageError(f"cannot read image {self._source(i)} ({err}): remove or replace it, or "
                                       f"set data.strict=false to skip unreadable images") from None
        self.skipped += 1
        warnings.warn(f"skipping unreadable image {self._source(i)} ({err}); {self.skipped} skipped so far",
                      stacklevel=3)


def _apply(transform: Transform | None, img: Image.Image) -> object:
    return T.functional.to_tensor(img) if transform is None else transform(img)


def read_synsets(path: PathLike) -> list[str]:
    """The wnids of ``synset_words.txt`` (``n01440764 tench, Tinca tinca``); line i is class i."""
    path = require_path(path, "synset file")
    lines = path.read_text().splitlines()
    return [line.split(maxsplit=1)[0] for line in lines if line.strip()]


class ImageNetSample(SkipsUnreadable):
    """``<wnid>_<name>.JPEG`` files in one folder; the label is the wnid's index in synset_words.txt.

    The synset file is ``synsets_file``, else ``root/../imagenet_labels/synset_words.txt`` or
    ``root/synset_words.txt``. Without one, the sorted wnids of the folder are the class order, which is
    only the ImageNet order when all 1000 classes are present.
    """

    def __init__(self, root: PathLike, transform: Transform | None = None,
                 synsets_file: PathLike | None = None) -> None:
        self.root = require_path(root, "ImageNetSample folder")
        self.transform = transform
        files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no images in ImageNetSample folder {self.root} (see data/README.md)")
        wnids = [p.name.split("_", 1)[0] for p in files]
        self.classes = self._class_order(wnids, synsets_file)
        index = {wnid: i for i, wnid in enumerate(self.classes)}
        unknown = sorted(set(wnids) - index.keys())
        if unknown:
            raise ValueError(f"ImageNetSample: wnids not in the synset list: {unknown[:5]}")
        self.samples = [(p, index[w]) for p, w in zip(files, wnids)]
        self.targets = [label for _, label in self.samples]

    def _class_order(self, wnids: list[str], synsets_file: PathLike | None) -> list[str]:
        if synsets_file is not None:
            return read_synsets(synsets_file)
        candidates = [
            self.root.parent / "imagenet_labels" / "synset_words.txt",
            # the root may be a symlink into a folder that holds the labels beside it
            self.root.resolve().parent / "imagenet_labels" / "synset_words.txt",
            self.root / "synset_words.txt",
        ]
        for candidate in candidates:
            if candidate.is_file():
                return read_synsets(candidate)
        distinct = sorted(set(wnids))
        if len(distinct) != 1000:
            raise FileNotFoundError(
                f"synset_words.txt not found (looked at {candidates[0]}) and {self.root} holds "
                f"{len(distinct)} wnids, not 1000, so the class order is unknown; pass synsets_file=..."
            )
        return distinct

    def __len__(self) -> int:
        return len(self.samples)


class ImageListDataset(SkipsUnreadable):
    """Images listed in a text file, one ``path, label`` (or ``path label``) per line.

    Paths are relative to ``root``; so is ``list_file`` unless absolute. This reads the 1300-image
    validation subset's ``dataset.txt`` and ImageNet's ``val.txt`` ground-truth format.
    """

    def __init__(self, root: PathLike, list_file: PathLike = "dataset.txt",
                 transform: Transform | None = None) -> None:
        self.root = require_path(root, "ImageListDataset root")
        list_path = require_path(self.root / list_file, "image list file")
        self.transform = transform
        self.samples: list[tuple[Path, int]] = []
        for number, line in enumerate(list_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            path, label = _list_entry(line, list_path, number)
            self.samples.append((self.root / path, label))
        if not self.samples:
            raise ValueError(f"image list {list_path} is empty")
        # checking one file catches a wrong root without stat-ing the whole list
        require_path(self.samples[0][0], f"first image listed in {list_path}")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


def _list_entry(line: str, list_path: Path, number: int) -> tuple[str, int]:
    """One ``path, label`` (or ``path label``) line of an image list; a line without a label, or with a
    label that is not a class index (>= 0), is one error naming the file and the line."""
    sep = "," if "," in line else None
    parts = line.rsplit(sep, 1)
    label = parts[1].strip() if len(parts) == 2 else ""
    if len(parts) != 2 or not parts[0].strip() or not label.isdigit():
        raise ValueError(f"image list {list_path} line {number}: expected '<image path>, <label>' with a label "
                         f"0, 1, 2..., got {line.strip()!r}")
    return parts[0].strip(), int(label)


class ImageNetFolders(ImageFolder, SkipsUnreadable):
    """A standard ``train/`` or ``val/`` tree with one sub-folder per wnid (torchvision ImageFolder)."""

    def __init__(self, root: PathLike, transform: Transform | None = None) -> None:
        root = require_path(root, "image folder")
        super().__init__(str(root), transform=transform)

    __getitem__ = SkipsUnreadable.__getitem__


CIFAR10_SPLITS = ("all", "train", "test")


class Cifar10Tar(SkipsUnreadable):
    """CIFAR-10 JPEGs in one uncompressed tar, ``<class>/<NNNN>.jpg``; labels = sorted class folders.

    ``split`` divides the tar deterministically and disjointly, with no seed: ``test`` holds the last
    ``holdout_per_class`` images of every class (by file name), ``train`` the others, interleaved class
    by class (image k of each class, then image k + 1), so its first N images (``data.train_limit``)
    cover the classes evenly; ``all`` keeps every image in name order. The bundled tar is CIFAR-10's
    test set, whose per-class order is already random, so the last images by name are a random sample.

    The member offsets are indexed once; images are read with ``os.pread`` from a file opened lazily
    in each process, so the dataset pickles for spawn workers and forked workers share no file offset.
    """

    def __init__(self, tar_path: PathLike, transform: Transform | None = None, split: str = "all",
                 holdout_per_class: int = 200) -> None:
        if split not in CIFAR10_SPLITS:
            raise ValueError(f"Cifar10Tar split must be one of {CIFAR10_SPLITS}, got {split!r}")
        self.tar_path = require_path(tar_path, "CIFAR-10 tar")
        self.transform, self.split = transform, split
        with tarfile.open(self.tar_path) as tar:
            members = sorted((m.name, m.offset_data, m.size) for m in tar.getmembers()
                             if m.isfile() and Path(m.name).suffix.lower() in IMAGE_SUFFIXES)
        if not members:
            raise ValueError(f"no images in {self.tar_path}")
        self.classes = sorted({Path(name).parts[0] for name, _, _ in members})
        index = {c: i for i, c in enumerate(self.classes)}
        samples = [(name, offset, size, index[Path(name).parts[0]]) for name, offset, size in members]
        self.samples = samples if split == "all" else _split_by_class(samples, split, holdout_per_class)
        self.targets = [label for *_, label in self.samples]
        self._file: io.BufferedReader | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        return state

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, i: int) -> tuple[Image.Image, int]:
        if self._file is None:
            self._file = open(self.tar_path, "rb")  # noqa: SIM115 (kept open for the dataset's life)
        _, offset, size, label = self.samples[i]
        return _load_rgb(io.BytesIO(os.pread(self._file.fileno(), size, offset))), label

    def _source(self, i: int) -> str:
        return f"{self.tar_path} member {self.samples[i][0]}"


def _split_by_class(samples: list[tuple], split: str, holdout_per_class: int) -> list[tuple]:
    """`Cifar10Tar`'s split of name-ordered (..., label) samples: per class the last `holdout_per_class`
    (test) or the others, interleaved class by class (train)."""
    by_class: dict[int, list[tuple]] = {}
    for sample in samples:
        by_class.setdefault(sample[-1], []).append(sample)
    smallest = min(len(group) for group in by_class.values())
    if not 0 < holdout_per_class < smallest:
        raise ValueError(f"holdout_per_class must be between 1 and {smallest - 1} (the smallest class has "
                         f"{smallest} images), got {holdout_per_class}")
    if split == "test":
        return [s for label in sorted(by_class) for s in by_class[label][-holdout_per_class:]]
    kept = [by_class[label][:-holdout_per_class] for label in sorted(by_class)]
    return [group[k] for k in range(max(map(len, kept))) for group in kept if k < len(group)]


class SyntheticImages(Dataset):
    """Deterministic random RGB images whose mean colour depends on the label, so they are learnable.

    Image i is generated from ``seed`` and i alone: reproducible in any worker and any order.
    """

    def __init__(self, num_samples: int = 64, num_classes: int = 10, img_size: int = 224, seed: int = 0,
                 transform: Transform | None = None) -> None:
        if num_samples < 1 or num_classes < 1 or img_size < 1:
            raise ValueError("SyntheticImages: num_samples, num_classes and img_size must be >= 1")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.img_size = img_size
        self.seed = seed
        self.transform = transform
        gen = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(num_classes, (num_samples,), generator=gen).tolist()
        self.class_colors = torch.randint(40, 216, (num_classes, 3, 1, 1), generator=gen)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> tuple[object, int]:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        label = self.targets[i]
        # a large odd stride keeps per-index streams of neighbouring seeds apart
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        noise = torch.randint(-40, 41, (3, self.img_size, self.img_size), generator=gen)
        pixels = (self.class_colors[label] + noise).clamp(0, 255).to(torch.uint8)
        img = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        return _apply(self.transform, img), label
