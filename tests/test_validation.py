"""Bad input stops the real entry points (train.py / prune.py `main()`, in-process: the same Hydra
app a shell runs) with exit code 2 and one line naming the key or file, before any model is built or
evaluated; Hydra's own errors exit 2 too. Two cases also run as subprocesses (the shell's view)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from nvit_lightning.app import setup_environment
from nvit_lightning.data.datasets import ImageListDataset
from nvit_lightning.latency.models import CorruptTableError, LookupTableLatency
from nvit_lightning.models import PrunableViT, ViTDims
from nvit_lightning.validation import check_config, resolved

ROOT = Path(__file__).resolve().parents[1]
setup_environment()

# a 2-block ViT on synthetic 32x32 images, a FLOPs latency model, nothing logged
BASE = ["model=small_random", "data=synthetic", "latency=flops", "logger=none", "callbacks=none",
        "trainer.accelerator=cpu", "trainer.devices=1", "measure_latency=false",
        "+trainer.enable_progress_bar=false"]


def run_main(script: str, overrides: list[str], run_dir: Path, monkeypatch: pytest.MonkeyPatch,
             capsys: pytest.CaptureFixture, build: bool = False) -> tuple[int | str | None, list[str]]:
    """`python <script>.py <BASE> <overrides> hydra.run.dir=<run_dir>` in this process: its exit code
    and its stderr lines. Any dense evaluation fails the test; so does building the run's model and
    data unless `build` (the cases found only in a file the run reads)."""
    from nvit_lightning import measure
    from nvit_lightning.cli import prune, train

    module = {"train": train, "prune": prune}[script]

    def no_evaluation(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dense model was evaluated before the error")

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model and data were built before the error")

    monkeypatch.setattr(measure, "evaluate", no_evaluation)
    if not build:
        monkeypatch.setattr(module, "build_run", no_build)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *BASE, *overrides, f"hydra.run.dir={run_dir}"])
    with pytest.raises(SystemExit) as done:
        module.main()
    return done.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_error(code: int | str | None, errors: list[str], key: str, allowed: str, run_dir: Path) -> None:
    assert code == 2, errors[-5:]
    assert errors and errors[-1].startswith("error: "), errors[-5:]
    assert key in errors[-1] and allowed in errors[-1], errors[-1]
    assert not (run_dir / "report.json").exists() and not (run_dir / "model").exists()


# (script, overrides, the key the message names, what it says is allowed)
BAD_VALUES = [
    ("train", ["schedule.finetune_epochs=-1"], "schedule.finetune_epochs", ">= 0"),
    ("train", ["schedule.finetune_epochs=abc"], "schedule.finetune_epochs", "an integer"),
    ("train", ["schedule.prune_max_epochs=0"], "schedule.prune_max_epochs", ">= 1"),
    ("train", ["calib_batches=-3"], "calib_batches", ">= 1"),
    ("train", ["calib_batches=0"], "calib_batches", ">= 1"),
    ("prune", ["calib_batches=abc"], "calib_batches", "an integer"),
    ("train", ["trainer.devices=two"], "trainer.devices", "a positive count, -1 (all), 'auto'"),
    ("train", ["trainer.devices=0"], "trainer.devices", "a positive count"),
    ("train", ["trainer.precision=99"], "trainer.precision", "one of 64, 32, 16"),
    ("train", ["trainer.accelerator=tpux"], "trainer.accelerator", "one of cpu, gpu"),
    ("train", ["trainer.num_nodes=0"], "trainer.num_nodes", ">= 1"),
    ("train", ["+data.val_batch_size=0"], "data.val_batch_size", ">= 1"),
    ("train", ["data.batch_size=0"], "data.batch_size", ">= 1"),
    ("train", ["data.num_workers=-1"], "data.num_workers", ">= 0"),
    ("train", ["data.augment=maybe"], "data.augment", "true or false"),
    ("train", ["+data.strict=maybe"], "data.strict", "true or false"),
    ("train", ["+data.crop_pct=2"], "data.crop_pct", "in (0, 1]"),
    ("train", ["data.train.num_samples=0"], "data.train.num_samples", ">= 1"),
    ("train", ["data.val.num_classes=abc"], "data.val.num_classes", "an integer"),
    ("train", ["data.train.kind=pictures"], "data.train.kind", "must be one of"),
    ("train", ["+data.train.root=/x"], "data.train key(s) ['root']", "SyntheticImages takes"),
    ("train", ["+data.val_batch_sizee=1"], "data key(s) ['val_batch_sizee']", "ViTDataModule takes"),
    ("train", ["model.patch_size=7"], "model.patch_size=7", "does not divide model.img_size=32"),
    ("train", ["model.patch_size=abc"], "model.patch_size", "an integer"),
    ("train", ["model.num_classes=0"], "model.num_classes", ">= 1"),
    ("train", ["model.img_size=-32"], "model.img_size", ">= 1"),
    ("train", ["evaluate=maybe"], "evaluate", "true or false"),
    ("train", ["measure_latency=maybe"], "measure_latency", "true or false"),
    ("train", ["log_model=maybe"], "log_model", "true or false"),
    ("train", ["seed=abc"], "seed", "an integer"),
    ("train", ["seed=-1"], "seed", "in [0, 4294967295]"),
    ("train", ["max_nonfinite_skips=-1"], "max_nonfinite_skips", ">= 0"),
    ("train", ["schedule.optimizer.lr=fast"], "schedule.optimizer.lr", "a number"),
    ("train", ["schedule.finetune_optimizer.lr=fast"], "schedule.finetune_optimizer.lr", "a number"),
    ("train", ["schedule.finetune_optimizer.lr=0"], "schedule.finetune_optimizer.lr", "> 0"),
    ("train", ["schedule.finetune_optimizer.weight_decay=-1"], "schedule.finetune_optimizer.weight_decay", ">= 0"),
    ("train", ["schedule.finetune_scheduler.warmup_steps=-5"], "schedule.finetune_scheduler.warmup_steps", ">= 0"),
    ("train", ["+schedule.optimizer.lrr=1"], "schedule.optimizer key(s) ['lrr']", "AdamW takes"),
    ("train", ["+schedule.epochs=3"], "schedule key(s) ['epochs']", "schedule takes"),
    ("train", ["distill.kl_weight=-1"], "distill.kl_weight", ">= 0"),
    ("train", ["distill.temperature=0"], "distill.temperature", "> 0"),
    ("train", ["distill.finetune_temperature=abc"], "distill.finetune_temperature", "a number"),
    ("train", ["distill.label_smoothing=1"], "distill.label_smoothing", "in [0, 1)"),
    ("train", ["distill.mixup.mixup_alpha=-1"], "distill.mixup.mixup_alpha", ">= 0"),
    ("train", ["distill.cnn_alpha=2"], "distill.cnn_alpha", "in [0, 1]"),
    ("train", ["+distill.foo=1"], "distill key(s) ['foo']", "distill takes"),
    ("train", ["pruner.target=abc"], "pruner.target", "a number"),
    ("train", ["pruner.target=0"], "pruner.target", "strictly between 0 and 1"),
    ("train", ["pruner.target=1.5"], "pruner.target", "strictly between 0 and 1"),
    ("train", ["pruner.snapshots=[abc]"], "pruner.snapshots", "a list of numbers"),
    ("train", ["pruner.snapshots=0.8"], "pruner.snapshots", "a list of numbers"),
    ("train", ["pruner.snapshots=[0.5]"], "pruner.snapshots", "above pruner.target"),
    ("train", ["pruner.snapshots=[1.5]"], "pruner.snapshots", "strictly between 0 and 1"),
    ("train", ["pruner.damping=abc"], "pruner.damping", "a number"),
    ("train", ["pruner.bins=0"], "pruner.bins", ">= 1"),
    ("train", ["pruner.group_sizes.mlp=0"], "pruner.group_sizes", ">= 1"),
    ("train", ["+pruner.etaa=1"], "pruner key(s) ['etaa']", "takes"),
    ("train", ["pruner._target_=nowhere.Pruner"], "pruner._target_=nowhere.Pruner", "cannot be imported"),
    ("train", ["pruner=gradual", "pruner.eta=-1"], "pruner.eta", ">= 0"),
    ("train", ["pruner=gradual", "pruner.interval=0"], "pruner.interval", ">= 1"),
    ("train", ["pruner=gradual", "pruner.ema_beta=1"], "pruner.ema_beta", "in [0, 1)"),
    ("train", ["pruner=gradual", "pruner.divisors.emb=0"], "pruner.divisors", "> 0"),
    ("train", ["pruner=gradual", "pruner.latency_step=abc"], "pruner.latency_step", "a number"),
    ("prune", ["pruner=ovit", "pruner.sparsities=[0.5,1.0]"], "pruner.sparsities", "strictly between 0 and 1"),
    ("prune", ["pruner=ovit", "pruner.block_size=0"], "pruner.block_size", ">= 1"),
    ("prune", ["pruner=ovit", "pruner.steps=0"], "pruner.steps", ">= 1"),
    ("prune", ["pruner=ovit", "pruner.steps=2.5"], "pruner.steps", "an integer"),
    ("prune", ["pruner=ovit", "pruner.head=maybe"], "pruner.head", "true or false"),
    ("train", ["reconstruction.batches=0"], "reconstruction.batches", ">= 1"),
    ("train", ["reconstruction.damping=abc"], "reconstruction.damping", "a number"),
    ("train", ["reconstruction.distillation.epochs=0"], "reconstruction.distillation.epochs", ">= 1"),
    ("train", ["reconstruction.distillation.lr=fast"], "reconstruction.distillation.lr", "a number"),
    ("prune", ["reconstruction=block_distill", "reconstruction.distillation.readout=1"],
     "reconstruction.distillation.readout", "in [0, 1)"),
    ("prune", ["reconstruction=block_distill", "reconstruction.distillation.readout=half"],
     "reconstruction.distillation.readout", "a number"),
    ("train", ["latency.tokens=abc"], "latency.tokens", "an integer"),
    ("train", ["latency.tokens=1"], "latency.tokens", ">= 2"),
    ("prune", ["rescore_batches=-1"], "rescore_batches", ">= 1"),
    ("prune", ["rescore=maybe"], "rescore", "true or false"),
    ("prune", ["recovery_steps=-5"], "recovery_steps", ">= 0"),
    ("prune", ["mode=bogus"], "mode", "one of prune, export, onnx"),
    ("prune", ["onnx.rounds=0"], "onnx.rounds", ">= 1"),
    ("prune", ["onnx.threads=abc"], "onnx.threads", "an integer or null"),
    ("prune", ["+onnx.device=gpu"], "onnx key(s) ['device']", "onnx takes"),
    ("train", ["+sweep.steps_per_level=0"], "sweep.steps_per_level", ">= 1"),
    ("train", ["optimized_metric=[1]"], "optimized_metric", "a string or null"),
    ("train", ["+foo=1"], "top-level key(s) ['foo']", "the config takes"),
    ("train", ["model=from_dir"], "model.pretrained_dir", "must be set"),
]


@pytest.mark.parametrize("script,overrides,key,allowed", BAD_VALUES, ids=[" ".join(c[1]) for c in BAD_VALUES])
def test_a_bad_value_is_one_line_exit_2_before_any_work(script: str, overrides: list[str], key: str, allowed: str,
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    code, errors = run_main(script, overrides, tmp_path / "run", monkeypatch, capsys)
    assert_one_line_error(code, errors, key, allowed, tmp_path / "run")


HYDRA_ERRORS = [
    (["pruner=hesian"], "Could not find 'pruner/hesian'"),
    (["+experiment=nvit_tinyy"], "Could not find 'experiment/nvit_tinyy'"),
    (["evaluat=true"], "Could not override 'evaluat'"),
    (["pruner.target=[0.5"], "no viable alternative at input"),
]


@pytest.mark.parametrize("script", ["train", "prune"])
@pytest.mark.parametrize("overrides,message", HYDRA_ERRORS, ids=[o[0][0] for o in HYDRA_ERRORS])
def test_hydras_own_errors_exit_2_with_hydras_message(script: str, overrides: list[str], message: str,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    code, errors = run_main(script, overrides, tmp_path / "run", monkeypatch, capsys)
    assert code == 2 and any(message in line for line in errors), errors[-5:]


def test_a_run_dir_that_cannot_be_a_directory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "a_file").write_text("")
    for run_dir, reason in [(tmp_path / "a_file" / "run", "a_file is a file, not a directory"),
                            (Path("/proc/nvit_run"), "cannot be used as a run directory")]:
        code, errors = run_main("train", [], run_dir, monkeypatch, capsys)
        assert code == 2 and len(errors) == 1, errors
        assert errors[0].startswith(f"error: hydra.run.dir={run_dir} cannot be used as a run directory (")
        assert reason in errors[0] and errors[0].endswith("choose another hydra.run.dir")


def test_the_shell_sees_exit_2_for_a_bad_value_and_for_hydras_errors(tmp_path: Path) -> None:
    for script, overrides, expected in [("train.py", ["evaluate=maybe"], "error: evaluate must be true or false"),
                                        ("prune.py", ["pruner=hesian"], "Could not find 'pruner/hesian'")]:
        result = subprocess.run([sys.executable, str(ROOT / script), *BASE, *overrides,
                                 f"hydra.run.dir={tmp_path / script}"], capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 2 and expected in result.stderr, result.stderr[-2000:]


def test_a_bad_job_of_a_sweep_is_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    """`-m`: a job with a bad value fails alone (failed.json naming the key); the good job runs."""
    result = subprocess.run([sys.executable, str(ROOT / "prune.py"), "-m", *BASE, "recovery_steps=-5,0",
                             "pruner.target=0.8", "calib_batches=1", "reconstruction=none", "evaluate=false",
                             "latency.tokens=17", f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True,
                            cwd=ROOT)
    assert "recovery_steps must be >= 0, got -5" in json.loads((tmp_path / "0" / "failed.json").read_text())["error"]
    assert (tmp_path / "1" / "report.json").is_file(), result.stderr[-3000:]


# ---- bad input found in a file the run reads: after the config check, still before any evaluation ----

def test_an_image_list_line_without_a_valid_label_names_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"")
    for bad in ["a.jpg", "a.jpg, -3", "a.jpg, cat"]:
        (tmp_path / "dataset.txt").write_text(f"a.jpg, 1\n\n{bad}\n")
        with pytest.raises(ValueError, match=rf"image list {tmp_path / 'dataset.txt'} line 3: expected "
                                             rf"'<image path>, <label>' with a label 0, 1, 2\.\.\."):
            ImageListDataset(tmp_path)
    (tmp_path / "dataset.txt").write_text("a.jpg, 1\na.jpg 0\n")
    assert [label for _, label in ImageListDataset(tmp_path).samples] == [1, 0]


def test_an_image_list_with_a_bad_label_stops_the_cli_before_evaluation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"")
    (images / "dataset.txt").write_text("a.jpg, -3\n")
    overrides = ["data.val.kind=image_list", "~data.val.num_samples", "~data.val.num_classes",
                 f"+data.val.root={images}"]
    code, errors = run_main("train", overrides, tmp_path / "run", monkeypatch, capsys, build=True)
    assert_one_line_error(code, errors, f"{images / 'dataset.txt'} line 1", "with a label 0, 1, 2", tmp_path / "run")


def test_a_latency_table_whose_values_do_not_fit_its_grid_is_one_line(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    grid = {"emb": [32, 64], "heads": [1, 2], "qk": [8, 16], "v": [8, 16], "mlp": [64, 128]}
    table = {"meta": {"tokens": 17}, "grid": grid, "block_ms": [1.0] * 31, "base_ms": {"emb": [32, 64], "ms": [1, 2]}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    with pytest.raises(CorruptTableError, match=rf"latency table {path} is corrupt \(its block_ms .*does not fit "
                                                r"its grid: shape '\[2, 2, 2, 2, 2\]' is invalid for input of size 31"):
        LookupTableLatency.load(path)
    code, errors = run_main("train", ["latency=lut", f"latency.path={path}"], tmp_path / "run", monkeypatch, capsys,
                            build=True)
    assert_one_line_error(code, errors, f"latency table {path}", "does not fit its grid", tmp_path / "run")


def test_a_model_with_a_nan_weight_names_the_parameter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    model = PrunableViT(ViTDims.from_dict({"emb": 64, "heads": [2, 2], "qk": [16, 16], "v": [16, 16],
                                           "mlp": [128, 128]}), img_size=32, patch_size=8, num_classes=10)
    model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    state = load_file(weights)
    state["blocks.1.mlp.fc1.weight"][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    code, errors = run_main("train", ["model=from_dir", f"model.pretrained_dir={tmp_path / 'model'}"],
                            tmp_path / "run", monkeypatch, capsys, build=True)
    assert_one_line_error(code, errors, "blocks.1.mlp.fc1.weight holds NaN/inf values", "load another one",
                          tmp_path / "run")
    assert "learning rate" not in errors[-1]


# ---- the schema itself ------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["train", "prune"])
@pytest.mark.parametrize("group_option", [
    "", "pruner=gradual", "pruner=oneshot", "pruner=ovit", "pruner=woodfisher", "pruner=global_magnitude",
    "pruner=none", "pruner=taylor", "reconstruction=block_distill", "reconstruction=none", "latency=flops",
    "latency=profile", "data=cifar10", "data=imagenet", "logger=wandb", "logger=tensorboard", "distill=none",
    "schedule=paper", "+experiment=ovit_sweep", "+experiment=cifar10_finetune"])
def test_every_shipped_config_passes_the_check(script: str, group_option: str, tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name=script, overrides=[o for o in [group_option] if o] +
                      [f"paths.output_dir={tmp_path}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    check_config(cfg)
    assert resolved(cfg)["seed"] == 42


def test_types_come_from_the_targets_signature() -> None:
    """A key the schema does not declare is checked against the annotation of the parameter it feeds."""
    base = {"_target_": "nvit_lightning.pruning.block_distill.BlockDistillation", "epochs": 4}
    check_config({"reconstruction": {"_target_": "nvit_lightning.pruning.reconstruct.Reconstruction",
                                     "distillation": base}})
    with pytest.raises(ValueError, match=r"model\.dims must be a mapping or null, got \[1\]"):
        check_config({"model": {"_target_": "nvit_lightning.build.build_model", "dims": [1]}})
    with pytest.raises(ValueError, match=r"trainer\.deterministic must be one of warn, true or false or null, "
                                         r"got 'maybe'"):
        check_config({"trainer": {"_target_": "lightning.Trainer", "deterministic": "maybe"}})
    checkpoint = {"_target_": "lightning.pytorch.callbacks.ModelCheckpoint", "every_n_train_steps": -1}
    with pytest.raises(ValueError, match=r"callbacks\.step\.every_n_train_steps must be >= 0, got -1"):
        check_config({"callbacks": {"step": checkpoint}})
    with pytest.raises(ValueError, match=r"unknown pruner key\(s\) \['etaa'\]; GlobalRanking takes"):
        check_config({"pruner": {"_target_": "nvit_lightning.pruning.GlobalRanking", "target": 0.5, "etaa": 1}})
    with pytest.raises(ValueError, match="the pruner config names no class"):
        check_config({"pruner": {"criterion": "hessian", "target": 0.5}})
