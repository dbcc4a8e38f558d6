"""Your own data and transfer: `data=folder`, `data=cifar10`, `model.num_classes` (a new head),
`pruner=none` (fine-tuning alone), and the one-line errors when data and head do not fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue
from PIL import Image

from nvit_lightning.app import build, build_run, setup_environment
from nvit_lightning.build import build_model
from nvit_lightning.models import PrunableViT
from nvit_lightning.pruning.none import NoPruning

from .conftest import DEIT_TINY_CKPT, needs_deit_tiny

ROOT = Path(__file__).resolve().parents[1]
CIFAR_TAR = ROOT / "data" / "cifar10_test_jpeg" / "cifar10_test_jpeg.tar"
setup_environment()

# the small model on a FLOPs latency model, no logging, no timing: seconds per run
QUIET = ["logger=none", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
         "measure_latency=false", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
         "~callbacks.progress_bar"]
SMALL = ["model=small_random", "latency=flops", "latency.tokens=17", *QUIET]
# fine-tuning alone, fast enough for a tiny model to learn three colours
FINETUNE = ["pruner=none", "distill=none", "schedule.finetune_epochs=4", "schedule.finetune_optimizer.lr=2e-3",
            "schedule.finetune_scheduler.warmup_steps=1"]
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]  # one per class: learnable in a few steps


def compose_cfg(overrides: list[str], out_dir: Path, config: str = "train") -> DictConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name=config, overrides=[*overrides, f"paths.output_dir={out_dir}"])


def run_train(overrides: list[str], out_dir: Path) -> dict:
    from nvit_lightning.cli import train

    return train.train(compose_cfg(overrides, out_dir))


def write_class_folders(root: Path, per_class: dict[str, int], classes: list[str] | None = None) -> Path:
    """`root/<split>/<class>/<i>.png`: 40x40 images of the class colour plus noise."""
    generator = torch.Generator().manual_seed(0)
    for split, count in per_class.items():
        for label, name in enumerate(classes or ["cat", "dog", "fox"]):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                noise = torch.randint(-30, 31, (40, 40, 3), generator=generator)
                pixels = (torch.tensor(COLOURS[label % 3]) + noise).clamp(0, 255).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return root


# ---- data=folder ------------------------------------------------------------------------------------
def test_folder_preset_trains_and_evaluates_a_three_class_head(tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "data", {"train": 8, "val": 4})
    report = run_train([*SMALL, *FINETUNE, "data=folder", f"data.root={data}", "data.img_size=32",
                        "data.batch_size=8", "data.num_workers=0", "model.num_classes=3"], tmp_path / "run")
    model = PrunableViT.from_pretrained(tmp_path / "run" / "model")
    assert model.num_classes == 3 and model.head.weight.shape == (3, 64)
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    assert report["criterion"] == "none" and report["target_latency"] == 1.0
    assert report["pruned"]["dims"] == model.dims.to_dict()  # no structure pruned
    # 12 val images, so accuracies are multiples of 1/12; three colours are learnt in 4 epochs
    assert report["pruned"]["top1"] == 100.0 and report["pruned"]["top5"] == 100.0
    assert report["dense"]["top1"] < 100.0  # the new head starts untrained
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["pruned"]["top1"] == report["pruned"]["top1"]


def test_folder_root_and_absolute_overrides(tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "data", {"train": 2, "val": 1})
    other = write_class_folders(tmp_path / "other", {"validation": 1})
    cfg = compose_cfg(["data=folder", f"data.root={data}", f"data.val.root={other / 'validation'}"], tmp_path)
    datamodule = build(cfg.data)
    assert datamodule.train_spec["root"] == str(data / "train")
    assert datamodule.val_spec["root"] == str(other / "validation")  # an absolute path ignores data.root
    datamodule.setup()
    assert datamodule.classes() == ["cat", "dog", "fox"] and len(datamodule.train_set) == 6
    assert datamodule.img_size == 224 and datamodule.batch_size == 32 and datamodule.num_workers == 2


def test_folder_without_root_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(MissingMandatoryValue, match=r"data\.root"):
        build_run(compose_cfg([*SMALL, "data=folder"], tmp_path))


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_class_count_mismatch_exits_2_with_one_line(tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "data", {"train": 1, "val": 1})
    result = _cli([*SMALL, "pruner=none", "distill=none", "data=folder", f"data.root={data}", "data.img_size=32",
                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[-1] == "error: the data has 3 classes but the model's head has 10: set model.num_classes=3 " \
                         "(a new head, trained on the data)"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("overrides,message", [
    # more classes than the head has, and fewer: a head of another size is refused either way
    (["model.num_classes=2"], "the data has 3 classes but the model's head has 2: set model.num_classes=3"),
    (["model.num_classes=5"], "the data has 3 classes but the model's head has 5: set model.num_classes=3"),
])
def test_folder_classes_must_match_the_head(overrides: list[str], message: str, tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "data", {"train": 1, "val": 1})
    with pytest.raises(ValueError, match=message):
        build_run(compose_cfg([*SMALL, "data=folder", f"data.root={data}", "data.img_size=32", *overrides],
                              tmp_path / "run"))


def test_more_labels_than_the_head_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"labels up to 11, but the model has 10 classes: set model.num_classes=12"):
        build_run(compose_cfg([*SMALL, "data=synthetic", "data.val.num_classes=12"], tmp_path))


def test_train_and_val_folders_must_name_the_same_classes(tmp_path: Path) -> None:
    data = write_class_folders(tmp_path / "data", {"train": 1})
    write_class_folders(data, {"val": 1}, classes=["cat", "dog"])  # fox/ missing from val/
    with pytest.raises(ValueError, match=r"name different classes \(3 vs 2, differing: \['fox'\]\)"):
        build_run(compose_cfg([*SMALL, "data=folder", f"data.root={data}", "data.img_size=32",
                               "model.num_classes=3"], tmp_path / "run"))


# ---- data=cifar10 -----------------------------------------------------------------------------------
def test_cifar10_preset_split_is_deterministic_disjoint_and_balanced(tmp_path: Path) -> None:
    if not CIFAR_TAR.is_file():
        pytest.skip(f"{CIFAR_TAR} not available (see data/README.md)")
    cfg = compose_cfg(["data=cifar10", "model.num_classes=10"], tmp_path)
    assert cfg.data.img_size == 224 and cfg.data.crop_pct == 1.0 and cfg.data.num_workers == 2
    datamodule = build(cfg.data)
    datamodule.setup()
    train, test = datamodule.train_set, datamodule.val_set
    assert (len(train), len(test)) == (8000, 2000)
    assert datamodule.classes()[:2] == ["airplane", "automobile"] and len(datamodule.classes()) == 10
    train_names, test_names = [s[0] for s in train.samples], [s[0] for s in test.samples]
    assert not set(train_names) & set(test_names) and len(set(train_names) | set(test_names)) == 10000
    assert test_names[:2] == ["airplane/0800.jpg", "airplane/0801.jpg"] and test_names[-1] == "truck/0999.jpg"
    assert all(test.targets.count(c) == 200 for c in range(10))
    assert train.targets[:20] == list(range(10)) * 2  # interleaved: any first N images are balanced
    again = build(compose_cfg(["data=cifar10"], tmp_path).data)
    again.setup()
    assert [s[0] for s in again.train_set.samples] == train_names  # no seed involved
    image, label = test[0]
    assert image.shape == (3, 224, 224) and label == 0


# ---- model.num_classes ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["deit_tiny", "deit_small", "deit_base_distilled", "from_dir", "small_random"])
def test_every_model_config_has_num_classes(model: str, tmp_path: Path) -> None:
    cfg = compose_cfg([f"model={model}", "model.num_classes=3"], tmp_path)  # no `+` needed
    assert cfg.model.num_classes == 3


def test_num_classes_gives_a_saved_model_a_new_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_model(dims={"emb": 32, "heads": [2], "qk": [8], "v": [8], "mlp": [64]}, img_size=16,
                         patch_size=8).compact()
    source.save_pretrained(tmp_path / "m")
    kept = build_model(pretrained_dir=str(tmp_path / "m"))
    assert kept.num_classes == 1000 and torch.equal(kept.head.weight, source.head.weight)
    new = build_model(pretrained_dir=str(tmp_path / "m"), num_classes=3)
    assert new.num_classes == 3 and new.config["num_classes"] == 3 and new.head.weight.shape == (3, 32)
    assert torch.equal(new.blocks[0].mlp.fc1.weight, source.blocks[0].mlp.fc1.weight)  # the backbone stays
    assert new.with_masks().head.weight.shape == (3, 32)  # the config follows the new head
    with pytest.raises(ValueError, match=r"model\.num_classes must be >= 1"):
        build_model(pretrained_dir=str(tmp_path / "m"), num_classes=0)


@needs_deit_tiny
def test_num_classes_on_the_pretrained_deit_tiny(tmp_path: Path) -> None:
    dense = build_model("deit_tiny_patch16_224", checkpoint=str(DEIT_TINY_CKPT))
    model = build_model("deit_tiny_patch16_224", checkpoint=str(DEIT_TINY_CKPT), num_classes=10)
    assert model.head.weight.shape == (10, 192) and dense.head.weight.shape == (1000, 192)
    assert torch.equal(model.blocks[11].mlp.fc2.weight, dense.blocks[11].mlp.fc2.weight)


# ---- pruner=none ------------------------------------------------------------------------------------
def test_pruner_none_finetunes_without_changing_the_architecture(tmp_path: Path) -> None:
    report = run_train([*SMALL, *FINETUNE, "data=synthetic", "schedule.finetune_epochs=1"], tmp_path / "run")
    start = build_run(compose_cfg([*SMALL, "data=synthetic"], tmp_path / "start"))[1]  # same seed
    model = PrunableViT.from_pretrained(tmp_path / "run" / "model")
    assert model.dims == start.live_dims() and not model.masked
    assert report["pruned"]["latency_pred_ms"] == report["dense"]["latency_pred_ms"]
    assert report["pruned"]["params"] == report["dense"]["params"] and report["events"] == 0
    assert not torch.equal(model.blocks[0].mlp.fc1.weight, start.blocks[0].mlp.fc1.weight)  # it trained
    assert not (tmp_path / "run" / "snapshots").exists()
    assert report["criterion"] == "none" and report["dense"]["top1"] is not None


def test_pruner_none_on_a_compact_model_with_a_new_head(tmp_path: Path) -> None:
    """The transfer recipe, downsized: a saved compact model, a new 3-class head, no training
    (finetune_epochs=0: evaluation only), written back with its backbone untouched."""
    torch.manual_seed(0)
    compact = build_model(dims={"emb": 64, "heads": [1, 2], "qk": [16, 8], "v": [8, 16], "mlp": [32, 64]},
                          img_size=32, patch_size=8, num_classes=10).compact()
    compact.save_pretrained(tmp_path / "compact")
    data = write_class_folders(tmp_path / "data", {"train": 2, "val": 2})
    report = run_train([*QUIET, "latency=flops", "latency.tokens=17", "pruner=none", "distill=none",
                        "model=from_dir", f"model.pretrained_dir={tmp_path / 'compact'}", "model.num_classes=3",
                        "data=folder", f"data.root={data}", "data.img_size=32", "data.num_workers=0",
                        "schedule.finetune_epochs=0"], tmp_path / "run")
    model = PrunableViT.from_pretrained(tmp_path / "run" / "model")
    assert model.dims == compact.dims and model.head.weight.shape == (3, 64)
    assert torch.equal(model.blocks[1].attn.proj.weight, compact.blocks[1].attn.proj.weight)
    assert report["pruned"]["top1"] == report["dense"]["top1"]  # nothing trained: the same model


def test_pruner_none_refuses_kl_to_a_new_head_and_a_latency_target(tmp_path: Path) -> None:
    for pruner in ("pruner=none", "pruner=obs_search", "pruner=gradual"):  # every pruner distils to the start
        with pytest.raises(ValueError, match=r"new, untrained head.*add distill=none"):
            run_train([*SMALL, pruner, "distill=kl", "model=from_dir", "model.pretrained_dir=/unused",
                       "model.num_classes=3"], tmp_path)
    with pytest.raises(ValueError, match=r"its latency target is 1\.0"):
        run_train([*SMALL, "pruner=none", "pruner.target=0.5", "data=synthetic"], tmp_path)
    model = build_model(dims={"emb": 8, "heads": [1], "qk": [8], "v": [8], "mlp": [8]}, img_size=8, patch_size=8)
    assert NoPruning()(model, None, []) == {1.0: model}
