"""Data package: label mappings of the bundled assets, transforms, synthetic data, the datamodule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from nvit_lightning.data import (
    DATASET_KINDS,
    Cifar10Tar,
    ImageListDataset,
    ImageNetFolders,
    ImageNetSample,
    SyntheticImages,
    UnreadableImageError,
    ViTDataModule,
    build_dataset,
    eval_transform,
    train_transform,
)

DATA = Path(__file__).resolve().parents[1] / "data"
SAMPLE = DATA / "imagenet_sample_1000"
SYNSETS = DATA / "imagenet_labels" / "synset_words.txt"
VAL1300 = DATA / "imagenet_val_subset_acuity1300"
CIFAR_TAR = DATA / "cifar10_test_jpeg" / "cifar10_test_jpeg.tar"

# ImageNet mean/std put every normalized value of a [0, 1] image inside these bounds
LOW, HIGH = (0 - 0.485) / 0.229, (1 - 0.406) / 0.225


def needs(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"{path} not available (see data/README.md)")


def synthetic(num_samples: int, num_classes: int = 10) -> dict:
    return {"kind": "synthetic", "num_samples": num_samples, "num_classes": num_classes}


def write_jpeg(path: Path, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 200, 90)).save(path)


# ---- bundled assets ------------------------------------------------------------------------------
def test_imagenet_sample_labels_follow_synset_words():
    needs(SAMPLE)
    needs(SYNSETS)
    ds = ImageNetSample(SAMPLE)
    assert len(ds) == 1000
    by_name = {path.name: label for path, label in ds.samples}
    assert by_name["n01440764_tench.JPEG"] == 0
    assert by_name["n01443537_goldfish.JPEG"] == 1
    wnid_line = {line.split()[0]: i for i, line in enumerate(SYNSETS.read_text().splitlines())}
    for path, label in ds.samples[::97]:
        assert label == wnid_line[path.name.split("_")[0]]
    assert sorted(ds.targets) == list(range(1000))  # one image per class


def test_image_list_reads_val_subset():
    needs(VAL1300)
    ds = ImageListDataset(VAL1300, "dataset.txt")
    assert len(ds) == 1300
    assert ds.samples[0][0].name == "ILSVRC2012_val_00000347.JPEG"
    assert ds.targets[0] == 472
    img, label = ds[0]
    assert label == 472
    assert img.shape == (3, 227, 227) and 0.0 <= img.min() <= img.max() <= 1.0


def test_cifar10_tar_labels_and_workers():
    needs(CIFAR_TAR)
    ds = Cifar10Tar(CIFAR_TAR)
    assert len(ds) == 10000
    assert ds.classes[:3] == ["airplane", "automobile", "bird"] and ds.classes[-1] == "truck"
    assert ds.targets[0] == 0 and ds.targets[-1] == 9
    img, label = ds[len(ds) - 1]
    assert img.shape == (3, 32, 32) and label == 9
    # worker processes must read the tar on their own (not through a file inherited mid-read)
    dm = ViTDataModule(val={"kind": "cifar10_tar", "path": str(CIFAR_TAR)}, img_size=32, crop_pct=1.0,
                       batch_size=16, val_limit=48, num_workers=2)
    dm.setup()
    labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert labels.tolist() == ds.targets[:48]


# ---- local fixtures: ImageNetSample fallbacks, folders, lists ------------------------------------
def test_imagenet_sample_needs_synsets_unless_all_classes(tmp_path):
    root = tmp_path / "sample"
    for name in ("n02_b.JPEG", "n01_a.JPEG", "n03_c.JPEG"):
        write_jpeg(root / name)
    with pytest.raises(FileNotFoundError, match="synsets_file"):
        ImageNetSample(root)
    synsets = tmp_path / "words.txt"
    synsets.write_text("n03 c\nn01 a\nn02 b\n")
    ds = ImageNetSample(root, synsets_file=synsets)
    assert {p.name: y for p, y in ds.samples} == {"n01_a.JPEG": 1, "n02_b.JPEG": 2, "n03_c.JPEG": 0}
    # the default location: imagenet_labels/ beside the sample folder
    (tmp_path / "imagenet_labels").mkdir()
    (tmp_path / "imagenet_labels" / "synset_words.txt").write_text("n02 b\nn03 c\nn01 a\n")
    assert ImageNetSample(root).targets == [2, 0, 1]


def test_image_list_and_folders_from_local_files(tmp_path):
    write_jpeg(tmp_path / "imgs" / "a.jpg")
    write_jpeg(tmp_path / "imgs" / "b.jpg", size=(20, 50))
    (tmp_path / "list.txt").write_text("./imgs/a.jpg, 7\nimgs/b.jpg 3\n\n")
    ds = ImageListDataset(tmp_path, "list.txt")
    assert ds.targets == [7, 3]
    assert ds[1][0].shape == (3, 50, 20)

    write_jpeg(tmp_path / "val" / "n02" / "x.jpg")
    write_jpeg(tmp_path / "val" / "n01" / "y.jpg")
    folders = ImageNetFolders(tmp_path / "val", transform=eval_transform(16))
    assert folders.classes == ["n01", "n02"]
    img, label = folders[0]
    assert img.shape == (3, 16, 16) and label == 0


@pytest.mark.parametrize("kind", ["image_list", "folder"])
def test_unreadable_images_are_skipped_with_a_named_warning_or_stop_strict(kind, tmp_path):
    """A truncated JPEG and a non-image file: skipped (each named, counted) or, strict, the first stops."""
    root = tmp_path / "n01"
    write_jpeg(root / "a.jpg")
    write_jpeg(root / "b.jpg")
    (root / "b.jpg").write_bytes((root / "b.jpg").read_bytes()[:200])  # truncated
    (root / "c.jpg").write_text("not an image")
    write_jpeg(root / "d.jpg", size=(20, 50))
    (tmp_path / "list.txt").write_text("".join(f"n01/{n}.jpg {i}\n" for i, n in enumerate("abcd")))
    spec = {"kind": kind, "root": str(tmp_path)} | ({"list_file": "list.txt"} if kind == "image_list" else {})
    module = ViTDataModule(val=spec, batch_size=2, img_size=16, num_workers=0)
    module.setup()
    with pytest.warns(UserWarning) as caught:
        samples = [module.val_set[i] for i in range(4)]
    messages = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert any("b.jpg" in m for m in messages) and any("c.jpg" in m and "2 skipped" in m for m in messages)
    assert [label for _, label in samples] == ([0, 3, 3, 3] if kind == "image_list" else [0, 0, 0, 0])
    assert all(img.shape == (3, 16, 16) for img, _ in samples)

    strict = ViTDataModule(val=spec, batch_size=2, img_size=16, num_workers=0, strict=True)
    strict.setup()
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*b\.jpg .*data\.strict=false"):
        strict.val_set[1]


# ---- transforms ----------------------------------------------------------------------------------
def test_eval_transform_resize_256_crop_224_normalized():
    tf = eval_transform()
    assert tf.transforms[0].size == 256
    img = Image.fromarray(torch.randint(0, 256, (300, 400, 3), dtype=torch.uint8).numpy())
    x = tf(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    assert LOW - 1e-4 <= x.min() < -1.5 and 2.0 < x.max() <= HIGH + 1e-4
    if VAL1300.exists():
        real = tf(Image.open(VAL1300 / "data" / "ILSVRC2012_val_00000347.JPEG").convert("RGB"))
        assert real.shape == (3, 224, 224) and LOW - 1e-4 <= real.min() <= real.max() <= HIGH + 1e-4


def test_train_transform_shapes_and_augment_switch():
    img = Image.new("RGB", (60, 45), (120, 30, 200))
    assert train_transform(32)(img).shape == (3, 32, 32)
    assert train_transform(32, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)(img).shape == (3, 32, 32)
    plain = train_transform(32, augment=False)
    assert torch.equal(plain(img), eval_transform(32)(img))


# ---- synthetic -----------------------------------------------------------------------------------
def test_synthetic_images_deterministic_per_seed():
    a, b = SyntheticImages(8, 4, img_size=16, seed=1), SyntheticImages(8, 4, img_size=16, seed=1)
    c = SyntheticImages(8, 4, img_size=16, seed=2)
    assert a.targets == b.targets and all(0 <= y < 4 for y in a.targets)
    for i in (0, 7, 3):  # order of access must not matter
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert a[0][0].shape == (3, 16, 16)
    assert not torch.equal(a[0][0], c[0][0])
    with pytest.raises(IndexError):
        a[8]


# ---- datamodule ----------------------------------------------------------------------------------
def test_datamodule_synthetic_batches_and_limits():
    dm = ViTDataModule(train=synthetic(40), val=synthetic(30), batch_size=8, val_batch_size=16,
                       img_size=32, train_limit=20)
    dm.setup("fit")
    train_batches = list(dm.train_dataloader())
    assert sum(len(y) for _, y in train_batches) == 20
    assert [len(y) for _, y in train_batches] == [8, 8, 4]  # drop_last=False
    x, y = train_batches[0]
    assert x.shape == (8, 3, 32, 32) and y.dtype == torch.int64
    val_batches = list(dm.val_dataloader())
    assert [len(y) for _, y in val_batches] == [16, 14]
    # train and val synthetic sets default to different seeds
    assert not torch.equal(dm.train_set[0][0], dm.val_set[0][0])


def test_calib_dataloader_fixed_random_subset_eval_transform():
    dm = ViTDataModule(train=synthetic(40), batch_size=4, img_size=32, hflip=1.0)
    first = list(dm.calib_dataloader(2))  # setup() is implicit
    assert len(first) == 2 and all(x.shape == (4, 3, 32, 32) for x, _ in first)
    second = list(dm.calib_dataloader(2))
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # a seeded permutation of the train set, not its first (on a class-sorted folder: few-class) samples
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0)).tolist()
    assert order[:8] != list(range(8))
    reference = SyntheticImages(40, 10, img_size=32, seed=0, transform=dm.eval_tf)  # no random crop/flip
    assert torch.equal(first[1][0][0], reference[order[4]][0])
    # held-out batches continue the same order and never repeat a calibration image
    held_out = list(dm.calib_dataloader(1, skip_batches=2))
    assert torch.equal(held_out[0][0][0], reference[order[8]][0])
    assert len(list(dm.calib_dataloader(100))) == 10  # capped by the dataset size
    with pytest.raises(ValueError, match="skips all"):
        dm.calib_dataloader(1, skip_batches=10)


def test_datamodule_accepts_omegaconf_specs():
    omegaconf = pytest.importorskip("omegaconf")
    spec = omegaconf.OmegaConf.create(synthetic(6, 3))
    dm = ViTDataModule(train=spec, val=spec, batch_size=3, img_size=16,
                       scale=omegaconf.OmegaConf.create([0.5, 1.0]))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 16, 16) and y.max() < 3


# ---- errors --------------------------------------------------------------------------------------
def test_unknown_kind_and_keys_are_reported():
    with pytest.raises(ValueError, match="valid kinds") as err:
        build_dataset({"kind": "imagenet21k", "root": "x"})
    for kind in DATASET_KINDS:
        assert kind in str(err.value)
    with pytest.raises(ValueError, match="list_fil"):
        ViTDataModule(train={"kind": "synthetic", "list_fil": "dataset.txt"})
    with pytest.raises(ValueError, match="needs"):
        ViTDataModule(val={"kind": "folder"})


@pytest.mark.parametrize("spec", [
    {"kind": "imagenet_sample", "root": "{missing}"},
    {"kind": "image_list", "root": "{missing}", "list_file": "dataset.txt"},
    {"kind": "folder", "root": "{missing}"},
    {"kind": "cifar10_tar", "path": "{missing}"},
])
def test_missing_paths_fail_in_init_with_path_and_hint(tmp_path, spec):
    missing = str(tmp_path / "no_such_data")
    spec = {k: v.format(missing=missing) for k, v in spec.items()}
    with pytest.raises(FileNotFoundError, match=r"paths\.data_dir") as err:
        ViTDataModule(train=spec)
    assert missing in str(err.value)
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(spec)
    assert missing in str(err.value)
    # keys left over from another kind (e.g. after data.train.kind=... on the CLI) come second
    with pytest.raises(FileNotFoundError, match="no_such_data"):
        ViTDataModule(train={**spec, "num_samples": 32})


def test_missing_list_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        ViTDataModule(val={"kind": "image_list", "root": str(tmp_path), "list_file": "nope.txt"})


@pytest.mark.filterwarnings("ignore:Total length of `list` across ranks is zero")
def test_datamodule_drives_a_lightning_trainer():
    """Wiring only: a linear model on synthetic data, with and without a val spec."""
    import lightning as L

    class Linear(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(3 * 16 * 16, 10)
            self.val_batches = 0

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.fc(x.flatten(1)), y)

        def validation_step(self, batch, batch_idx):
            self.val_batches += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for val, val_batches in ((synthetic(12), 2), (None, 0)):
        dm = ViTDataModule(train=synthetic(20), val=val, batch_size=8, img_size=16)
        model = Linear()
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(model, dm)
        assert trainer.global_step == 3 and model.val_batches == val_batches


# ---- CIFAR-10 split, data root, class names ------------------------------------------------------
def write_class_tar(path: Path, classes: dict[str, int]) -> Path:
    """An uncompressed tar of `<class>/<NNNN>.jpg` members, as the bundled CIFAR-10 tar."""
    import tarfile

    src = path.parent / "members"
    with tarfile.open(path, "w") as tar:
        for name, count in classes.items():
            for i in range(count):
                write_jpeg(src / name / f"{i:04d}.jpg", size=(8, 8))
                tar.add(src / name / f"{i:04d}.jpg", arcname=f"{name}/{i:04d}.jpg")
    return path


def test_cifar10_tar_split_is_disjoint_interleaved_and_seedless(tmp_path):
    tar = write_class_tar(tmp_path / "c.tar", {"b": 5, "a": 5, "c": 6})
    train = Cifar10Tar(tar, split="train", holdout_per_class=2)
    test = Cifar10Tar(tar, split="test", holdout_per_class=2)
    assert [s[0] for s in test.samples] == ["a/0003.jpg", "a/0004.jpg", "b/0003.jpg", "b/0004.jpg",
                                           "c/0004.jpg", "c/0005.jpg"]  # the last 2 of each class
    assert train.targets == [0, 1, 2] * 3 + [2]  # image k of every class, then image k + 1
    assert not {s[0] for s in train.samples} & {s[0] for s in test.samples}
    assert len(train) + len(test) == len(Cifar10Tar(tar)) == 16
    assert train.classes == test.classes == ["a", "b", "c"]
    assert train[9][1] == 2 and train[9][0].shape == (3, 8, 8)  # reads the member it names
    with pytest.raises(ValueError, match=r"split must be one of \('all', 'train', 'test'\), got 'val'"):
        Cifar10Tar(tar, split="val")
    for holdout in (0, 5):  # the smallest class has 5 images: at least one must stay to train on
        with pytest.raises(ValueError, match=rf"holdout_per_class must be between 1 and 4 .* got {holdout}"):
            Cifar10Tar(tar, split="test", holdout_per_class=holdout)


def test_datamodule_root_resolves_relative_spec_paths(tmp_path):
    write_jpeg(tmp_path / "data" / "train" / "x" / "a.jpg")
    write_jpeg(tmp_path / "data" / "val" / "x" / "b.jpg")
    dm = ViTDataModule(train={"kind": "folder", "root": "train"}, val={"kind": "folder", "root": "val"},
                       root=str(tmp_path / "data"), img_size=16)
    assert dm.train_spec["root"] == str(tmp_path / "data" / "train")
    elsewhere = tmp_path / "elsewhere"
    write_jpeg(elsewhere / "x" / "c.jpg")
    dm = ViTDataModule(val={"kind": "folder", "root": str(elsewhere)}, root=str(tmp_path / "data"), img_size=16)
    assert dm.val_spec["root"] == str(elsewhere)  # absolute: data.root does not apply
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "data" / "nope")):
        ViTDataModule(val={"kind": "folder", "root": "nope"}, root=str(tmp_path / "data"))


def test_datamodule_classes_must_agree_between_train_and_val(tmp_path):
    for split, names in (("train", "xyz"), ("val", "xz")):
        for name in names:
            write_jpeg(tmp_path / split / name / "a.jpg")
    dm = ViTDataModule(train={"kind": "folder", "root": str(tmp_path / "train")},
                       val={"kind": "folder", "root": str(tmp_path / "val")}, img_size=16, train_limit=1)
    dm.setup()
    with pytest.raises(ValueError, match=r"name different classes \(3 vs 2, differing: \['y'\]\)"):
        dm.classes()
    only_train = ViTDataModule(train={"kind": "folder", "root": str(tmp_path / "train")}, val=synthetic(4),
                               img_size=16, train_limit=1)
    only_train.setup()
    assert only_train.classes() == ["x", "y", "z"]  # through the train_limit Subset; synthetic names none
    assert ViTDataModule(val=synthetic(4), img_size=16).classes() is None
