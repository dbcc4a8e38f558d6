"""The LightningDataModule: train / val / calibration loaders built from small dataset spec dicts."""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import ParallelStrategy
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .datasets import (
    Cifar10Tar,
    ImageListDataset,
    ImageNetFolders,
    ImageNetSample,
    SkipsUnreadable,
    SyntheticImages,
    Transform,
    require_path,
)
from .transforms import eval_transform, train_transform

log = logging.getLogger("nvit_lightning")

DATASET_KINDS: dict[str, type[Dataset]] = {
    "imagenet_sample": ImageNetSample,
    "image_list": ImageListDataset,
    "folder": ImageNetFolders,
    "cifar10_tar": Cifar10Tar,
    "synthetic": SyntheticImages,
}
# spec keys that differ from the constructor argument they feed
_KEY_ALIASES = {"path": "tar_path"}
# spec keys that name files or folders: relative ones are resolved against the datamodule's `root`
_PATH_KEYS = ("root", "path", "tar_path", "synsets_file")


def _spec_kwargs(spec: Mapping[str, Any]) -> tuple[type[Dataset], dict[str, Any]]:
    """Check a spec's kind, paths and keys; return the dataset class and its constructor kwargs.

    Paths are checked before keys: after switching ``kind`` on the command line, a missing data
    folder is the more useful error than the keys left over from the old kind.
    """
    spec = dict(spec)  # also turns an OmegaConf DictConfig into a plain dict
    kind = spec.pop("kind", None)
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r} in {spec}; valid kinds: {sorted(DATASET_KINDS)}")
    cls = DATASET_KINDS[kind]
    kwargs = {_KEY_ALIASES.get(k, k): v for k, v in spec.items()}
    for key in ("root", "tar_path", "synsets_file"):
        if kwargs.get(key) is not None:
            require_path(kwargs[key], f"{cls.__name__} {key}")
    if cls is ImageListDataset and "root" in kwargs:
        require_path(Path(kwargs["root"]) / kwargs.get("list_file", "dataset.txt"), "image list file")
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in ("self", "transform")}
    unknown = sorted(set(kwargs) - params.keys())
    if unknown:
        raise ValueError(f"dataset kind {kind!r} does not take {unknown}; it takes {sorted(params)}")
    missing = sorted(n for n, p in params.items() if p.default is p.empty and n not in kwargs)
    if missing:
        raise ValueError(f"dataset kind {kind!r} needs {missing} in its spec")
    return cls, kwargs


def check_spec(spec: Mapping[str, Any]) -> None:
    """Fail fast on a bad kind, a missing path or unknown keys, without listing any files."""
    _spec_kwargs(spec)


def build_dataset(spec: Mapping[str, Any], transform: Transform | None = None) -> Dataset:
    """Build a dataset from ``{"kind": ..., <constructor args>}``; ``DATASET_KINDS`` lists the kinds."""
    cls, kwargs = _spec_kwargs(spec)
    return cls(**kwargs, transform=transform)


def with_transform(dataset: Dataset, transform: Transform) -> Dataset:
    """A shallow copy of ``dataset`` (or of the dataset inside a Subset) that uses ``transform``."""
    if isinstance(dataset, Subset):
        return Subset(with_transform(dataset.dataset, transform), dataset.indices)
    clone = copy.copy(dataset)  # shares the file lists; no folder is scanned again
    clone.transform = transform
    return clone


def first_n(dataset: Dataset, n: int | None) -> Dataset:
    """The first n samples (deterministic); the whole dataset when n is None."""
    if n is None or n >= len(dataset):
        return dataset
    if n < 1:
        raise ValueError(f"a sample limit must be >= 1 or None, got {n}")
    return Subset(dataset, range(n))


def _unwrap(dataset: Dataset) -> Dataset:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def class_names(dataset: Dataset) -> list[str] | None:
    """The `classes` a dataset names (label i is `classes[i]`), or None."""
    classes = getattr(_unwrap(dataset), "classes", None)
    return list(classes) if classes is not None else None


def num_labels(dataset: Dataset) -> int | None:
    """Largest label + 1 of a dataset that lists its labels (`targets`, or `samples` of (..., label))."""
    dataset = _unwrap(dataset)
    labels = getattr(dataset, "targets", None)
    if labels is None and hasattr(dataset, "samples"):
        labels = [sample[-1] for sample in dataset.samples]
    return max(labels) + 1 if labels else None


# what a resumed fit must train on to go on as the interrupted one would: the training set, the sample
# count, the order (seed) and the batches; a checkpoint records them (`ViTDataModule.state_dict`)
_TRAINING_DATA_KEYS = ("train", "root", "train_limit", "seed", "batch_size")


def training_data(data: Mapping[str, Any]) -> dict[str, Any]:
    """The training-data options of a `ViTDataModule` config (plain values, the defaults filled in),
    keyed as on the command line (`data.train.num_samples`, `data.batch_size`, ...)."""
    params = inspect.signature(ViTDataModule.__init__).parameters
    values = {k: data.get(k, params[k].default) for k in _TRAINING_DATA_KEYS}
    flat = {f"data.{k}": v for k, v in values.items() if k != "train"}
    flat |= {f"data.train.{k}": v for k, v in dict(values["train"] or {}).items()}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()}


def training_data_difference(saved: Mapping[str, Any], own: Mapping[str, Any]) -> str | None:
    """`key: checkpoint X, this run Y` for each training-data option that differs; None if none does."""
    keys = sorted(k for k in set(saved) | set(own) if saved.get(k) != own.get(k))
    if not keys:
        return None
    return "; ".join(f"{k}: checkpoint {saved.get(k)!r}, this run {own.get(k)!r}" for k in keys)


class EpochShuffleSampler(Sampler[int]):
    """A shuffle that is a function of (seed, epoch) only, so a run resumed from a checkpoint sees the
    same batches as an uninterrupted one (Lightning calls `set_epoch` at every epoch start; under DDP
    it swaps in a `DistributedSampler`, which shuffles the same way)."""

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self.skip = 0  # samples of the next pass already trained on (a mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        start, self.skip = self.skip, 0
        return iter(torch.randperm(self.size, generator=generator).tolist()[start:])

    def __len__(self) -> int:
        return self.size


class ViTDataModule(L.LightningDataModule):
    """Train / val / calibration loaders for ViT pruning, configured entirely by constructor arguments.

    ``train`` and ``val`` are dataset specs (see :func:`build_dataset`), e.g.
    ``{"kind": "image_list", "root": "data/imagenet_val_subset_acuity1300", "list_file": "dataset.txt"}``.
    Paths are checked here, so a wrong data root fails before any model is built. ``root``, when
    given, is the folder that relative dataset paths are under (``data=folder data.root=/my/data``
    reads ``/my/data/train`` and ``/my/data/val``); absolute paths ignore it. ``train_limit`` /
    ``val_limit`` keep the first N samples: note that on a class-sorted folder that means few classes.
    """

    def __init__(
        self,
        train: Mapping[str, Any] | None = None,
        val: Mapping[str, Any] | None = None,
        root: str | None = None,
        batch_size: int = 64,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        img_size: int = 224,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        augment: bool = True,
        scale: Sequence[float] = (0.08, 1.0),
        hflip: float = 0.5,
        color_jitter: float | None = None,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        train_limit: int | None = None,
        val_limit: int | None = None,
        seed: int = 0,
        strict: bool = False,
    ) -> None:
        super().__init__()
        if train is None and val is None:
            raise ValueError("ViTDataModule needs a train or a val dataset spec")
        # synthetic train and val sets get different default seeds so they are not the same images
        self.img_size = img_size
        self.strict = strict  # unreadable images: stop naming the file (True) or skip with a warning
        self.train_spec = self._with_defaults(train, img_size, seed, root)
        self.val_spec = self._with_defaults(val, img_size, seed + 1, root)
        for spec in (self.train_spec, self.val_spec):
            if spec is not None:
                check_spec(spec)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_limit = train_limit
        self.val_limit = val_limit
        self.seed = seed
        self.eval_tf = eval_transform(img_size, crop_pct, interpolation, mean, std)
        self.train_tf = train_transform(
            img_size, augment=augment, scale=scale, hflip=hflip, color_jitter=color_jitter,
            auto_augment=auto_augment, re_prob=re_prob, interpolation=interpolation,
            crop_pct=crop_pct, mean=mean, std=std,
        )
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.training_data = training_data({"train": dict(train) if train is not None else None, "root": root,
                                            "train_limit": train_limit, "seed": seed, "batch_size": batch_size})
        self._resume_batches: int | None = None  # from a checkpoint: batches of its epoch already trained on

    @staticmethod
    def _with_defaults(spec: Mapping[str, Any] | None, img_size: int, seed: int, root: str | None) -> dict | None:
        if spec is None:
            return None
        spec = dict(spec)
        for key in _PATH_KEYS if root is not None else ():
            if spec.get(key) is not None:
                spec[key] = str(Path(root).expanduser() / spec[key])  # an absolute spec path wins
        if spec.get("kind") == "synthetic":
            spec.setdefault("img_size", img_size)
            spec.setdefault("seed", seed)
        return spec

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and self.train_spec is not None:
            self.train_set = first_n(self._build(self.train_spec, self.train_tf), self.train_limit)
        if self.val_set is None and self.val_spec is not None:
            self.val_set = first_n(self._build(self.val_spec, self.eval_tf), self.val_limit)

    def _build(self, spec: Mapping[str, Any], transform: Transform) -> Dataset:
        dataset = build_dataset(spec, transform)
        if isinstance(dataset, SkipsUnreadable):
            dataset.strict = self.strict
        return dataset

    def num_labels(self) -> int | None:
        """Largest label + 1 over the train and val sets (after `setup`), where the datasets list them."""
        counts = [num_labels(d) for d in (self.train_set, self.val_set) if d is not None]
        counts = [c for c in counts if c is not None]
        return max(counts) if counts else None

    def classes(self) -> list[str] | None:
        """The class names (after `setup`) of datasets that name their classes: class folders, the
        CIFAR-10 tar, the ImageNet sample's synsets; None for label lists and synthetic images.

        Each dataset's label is the index of a name in its own list, so a train and a val set that
        name different classes (a class folder missing from val/) would disagree on every label after
        it: that is refused here.
        """
        named = {name: class_names(d) for name, d in (("train", self.train_set), ("val", self.val_set))
                 if d is not None and class_names(d) is not None}
        if len(named) == 2 and named["train"] != named["val"]:
            only = sorted(set(named["train"]) ^ set(named["val"]))
            raise ValueError(f"data.train and data.val name different classes ({len(named['train'])} vs "
                             f"{len(named['val'])}, differing: {only[:5]}): labels follow the sorted class "
                             f"names, so both need the same class folders")
        return next(iter(named.values()), None)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # a seeded generator fixes the workers' augmentation seeds
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def _require(self, name: str) -> Dataset:
        self.setup()
        dataset = getattr(self, name)
        if dataset is None:
            raise RuntimeError(f"ViTDataModule has no {name.removesuffix('_set')} dataset spec")
        return dataset

    def train_dataloader(self) -> DataLoader:
        loader = self._loader(self._require("train_set"), self.batch_size, shuffle=True)
        loader.sampler.skip = self._resumed_batches(len(loader)) * self.batch_size
        return loader

    # ---- resume: the checkpoint records the training data and how far into its epoch it was -----------
    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed if trainer is not None else 0
        return {"training_data": self.training_data, "epoch_batches_done": int(done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse a checkpoint of other training data; note how far into its epoch it was. Lightning
        restores this before it builds the optimizers, whose learning-rate schedule may already ask for
        the train loader (`estimated_stepping_batches`), i.e. before its loops' progress is restored."""
        saved = state_dict.get("training_data")
        difference = training_data_difference(saved, self.training_data) if saved is not None else None
        if difference:
            raise ValueError(f"the checkpoint was written for other training data ({difference}): resume with "
                             f"the run's own data settings, or start a new run")
        self._resume_batches = state_dict.get("epoch_batches_done")

    def teardown(self, stage: str) -> None:
        self._resume_batches = None  # one fit's resume position, never the next fit's (train.py's stage 2)

    def _resumed_batches(self, batches_per_epoch: int) -> int:
        """Batches of the current epoch a resumed fit already trained on (0 unless it resumes from a
        mid-epoch checkpoint): its loader then starts after them, so the run goes on exactly as an
        uninterrupted one. The checkpoint's count (`load_state_dict`), else (a checkpoint of an older
        version) the loops' restored progress."""
        trainer = self.trainer
        if self._resume_batches is not None:
            done, self._resume_batches = self._resume_batches, None
        elif trainer is None or not trainer.fit_loop.restarting:
            return 0
        else:
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if trainer is None or not 0 < done < batches_per_epoch:
            return 0
        if isinstance(trainer.strategy, ParallelStrategy):  # Lightning's distributed sampler wraps ours
            log.warning(f"resuming mid-epoch under {type(trainer.strategy).__name__}: the {done} batches of this "
                        f"epoch already trained on are seen again (single-device runs resume exactly)")
            return 0
        return done

    def val_dataloader(self) -> DataLoader | list:
        if self.val_spec is None:
            return []
        return self._loader(self._require("val_set"), self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()

    def calib_dataloader(self, num_batches: int, batch_size: int | None = None,
                         skip_batches: int = 0) -> DataLoader:
        """``num_batches`` batches of a fixed random subset of the train set (seeded by ``seed``),
        with the eval transform: the same images in the same order on every call.

        Random rather than the first images: a sample sorted by class would otherwise calibrate the
        saliency on a few classes only. ``skip_batches`` skips that many batches of the same order,
        e.g. to hold out images that calibration never saw.
        """
        if num_batches < 1 or skip_batches < 0:
            raise ValueError(f"need num_batches >= 1 and skip_batches >= 0, got {num_batches}, {skip_batches}")
        batch_size = batch_size or self.batch_size
        train_set = self._require("train_set")
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(self.seed))
        chosen = order[skip_batches * batch_size:(skip_batches + num_batches) * batch_size].tolist()
        if not chosen:
            raise ValueError(f"skip_batches={skip_batches} skips all {len(train_set)} training samples")
        dataset = Subset(with_transform(train_set, self.eval_tf), chosen)
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=self.pin_memory)
