"""Resume (issue #30): checkpoints that survive, checked before any work; a refused resume changes no
file of the run; stage 2 (fine-tuning) resumes bit-identically. The real entry point (train.py) on
a tiny model: a run interrupted by SIGTERM in stage 2 is shared by the tests (copied where changed)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]

# a 2-block ViT on synthetic images, no evaluation: stage 1 prunes in 3 events (steps 2, 4, 6: the
# checkpoints keep last.ckpt at step 6 and last.previous.ckpt at step 4), stage 2 runs 2 epochs of 4 steps
RUN = ["model=small_random", "data=synthetic", "latency=flops", "latency.tokens=17", "logger=none",
       "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "evaluate=false",
       "measure_latency=false", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
       "~callbacks.progress_bar", "pruner=gradual", "pruner.kinds=[emb,head,qk,v,mlp]", "pruner.latency_step=null",
       "pruner.interval=2", "pruner.groups_per_event=4", "pruner.group_sizes.emb=8", "pruner.target=0.5",
       "reconstruction=none", "schedule.prune_max_epochs=3", "schedule.finetune_epochs=2"]
STOP_AT = 3  # the fine-tuning step SIGTERM arrives at: mid-epoch (epoch 0, 3 of its 4 batches done)


class SignalAt(L.Callback):
    """Send this process `signal_name` at fine-tuning step `step` (a pre-empted job)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step, self.signal_name = step, signal_name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.stage == "finetune" and trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal_name))


def train_py(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *RUN, *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def train_main(capfd: pytest.CaptureFixture, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python train.py ...` in this process (`cli.train.main`, the function the script runs), for runs
    that stop before Hydra starts: seconds instead of a new interpreter's imports."""
    from nvit_lightning import runlock
    from nvit_lightning.cli import train

    argv = ["train.py", *RUN, *overrides, f"hydra.run.dir={run_dir}"]
    capfd.readouterr()
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as stopped:
        patch.setattr(sys, "argv", argv)
        patch.delenv("HYDRA_FULL_ERROR", raising=False)
        try:
            train.main()
        finally:
            runlock.release(run_dir)  # what the process's exit would do
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, stopped.value.code, out, err)


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr  # the run's log goes to stdout (Hydra's console handler)


def files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in output(result).splitlines() if line.strip()]
    assert len(lines) == 1, output(result)[-3000:]
    return lines[0]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    done = train_py(run_dir, f"+callbacks.signal._target_={__name__}.SignalAt", f"+callbacks.signal.step={STOP_AT}")
    assert done.returncode == 143, done.stderr[-3000:]
    assert f"SIGTERM at step {STOP_AT}: checkpoint written to {run_dir}/checkpoints/finetune/last.ckpt" in output(done)
    steps = {name: torch.load(run_dir / "checkpoints" / name, weights_only=True)["global_step"]
             for name in ("last.ckpt", "last.previous.ckpt", "finetune/last.ckpt")}
    assert steps == {"last.ckpt": 6, "last.previous.ckpt": 4, "finetune/last.ckpt": STOP_AT}
    return run_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = train_py(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_weights(run_dir)


def resumed_copy(interrupted: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(interrupted, run_dir)
    return run_dir


def assert_bit_identical(resumed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert resumed.keys() == reference.keys()
    differ = {k: float((resumed[k] - reference[k]).abs().max()) for k in reference
              if not torch.equal(resumed[k], reference[k])}
    assert not differ, f"{len(differ)} of {len(reference)} tensors differ: {differ}"


@pytest.mark.slow  # three runs of train.py: 50 s on 2 busy cores
@pytest.mark.parametrize("damage", [None, "truncated last.ckpt"])
def test_sigterm_mid_finetuning_resumes_bit_identically(interrupted: Path, uninterrupted: dict, damage: str | None,
                                                        tmp_path: Path) -> None:
    run_dir = resumed_copy(interrupted, tmp_path)
    if damage:  # stage 1 then goes on from step 4 exactly, stage 2 from its own checkpoint
        truncate(run_dir / "checkpoints" / "last.ckpt")
    done = train_py(run_dir, "ckpt_path=last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming the fine-tuning stage from {run_dir}/checkpoints/finetune/last.ckpt" in output(done)
    assert_bit_identical(final_weights(run_dir), uninterrupted)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # e.g. a full disk, a broken copy


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(interrupted: Path, tmp_path: Path) -> None:
    run_dir = resumed_copy(interrupted, tmp_path)
    last, previous = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.previous.ckpt"
    truncate(last)
    done = train_py(run_dir, "ckpt_path=last")
    assert done.returncode == 0, done.stderr[-3000:]
    warning = next(line for line in output(done).splitlines() if "resuming from the previous checkpoint" in line)
    assert f"{last} is not a readable Lightning checkpoint (truncated" in warning, warning
    assert f"{previous} (step 4)" in warning, warning
    assert f"Restoring states from the checkpoint path at {previous}" in output(done)
    assert (run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("override,key", [
    ("pruner.interval=3", "'interval': (2, 3)"),
    ("data.train.num_samples=64", "data.train.num_samples: checkpoint 32, this run 64"),
    ("model.dims.emb=48", "it was written for another model (dims: checkpoint {'emb': 64"),
])
def test_a_refused_resume_is_one_line_and_changes_no_file(interrupted: Path, override: str, key: str,
                                                          capfd: pytest.CaptureFixture) -> None:
    before = files(interrupted)
    line = one_error_line(train_main(capfd, interrupted, "ckpt_path=last", override))
    assert line.startswith(f"error: cannot resume from {interrupted}/checkpoints/last.ckpt") and key in line, line
    assert files(interrupted) == before  # .hydra/, config_resolved.yaml, train.log, checkpoints: all as they were


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_an_unreadable_ckpt_path_is_one_line_naming_the_file(interrupted: Path, content: str, tmp_path: Path,
                                                             capfd: pytest.CaptureFixture) -> None:
    bad = tmp_path / f"{content}.ckpt"
    real = (interrupted / "checkpoints" / "last.ckpt").read_bytes()
    bad.write_bytes({"garbage": b"not a checkpoint", "truncated": real[: len(real) // 2]}[content])
    result = train_main(capfd, tmp_path / "run", f"ckpt_path={bad}")
    line = one_error_line(result)
    assert line == f"error: {bad} is not a readable Lightning checkpoint (truncated, or not a checkpoint file)", line
    assert "weights_only" not in output(result)  # torch's advice to unpickle it anyway: wrong and unsafe
    assert not files(tmp_path / "run")  # refused before Hydra wrote anything


def test_export_of_a_finetuning_checkpoint_writes_the_compact_model(interrupted: Path, tmp_path: Path) -> None:
    ckpt = interrupted / "checkpoints" / "finetune" / "last.ckpt"
    done = subprocess.run([sys.executable, str(ROOT / "prune.py"), "mode=export", f"checkpoint={ckpt}", "logger=none",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from nvit_lightning.models import PrunableViT
    from nvit_lightning.resume import load_train_checkpoint

    exported = PrunableViT.from_pretrained(tmp_path / "model").eval()
    student = load_train_checkpoint(str(ckpt)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported(x), student(x))


# ---- the pieces, in process ------------------------------------------------------------------------------
def test_each_checkpoint_file_keeps_its_previous_version(tmp_path: Path) -> None:
    from lightning.fabric.plugins import TorchCheckpointIO

    from nvit_lightning.resume import KeepPreviousCheckpointIO, previous_path

    io = KeepPreviousCheckpointIO(TorchCheckpointIO())
    path = tmp_path / "last.ckpt"

    def step_of(p: Path) -> int:
        return torch.load(p, weights_only=True)["global_step"]

    io.save_checkpoint({"global_step": 1, "state_dict": {}}, path)
    assert not previous_path(path).exists()
    io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.ones(1)}}, path)  # the same step again
    assert not previous_path(path).exists()
    io.save_checkpoint({"global_step": 2, "state_dict": {}}, path)
    assert (step_of(path), step_of(previous_path(path))) == (2, 1)
    path.write_bytes(b"broken")  # a damaged last.ckpt is overwritten, never kept over a good previous one
    KeepPreviousCheckpointIO(TorchCheckpointIO()).save_checkpoint({"global_step": 3, "state_dict": {}}, path)
    assert (step_of(path), step_of(previous_path(path))) == (3, 1)
    KeepPreviousCheckpointIO(TorchCheckpointIO()).save_checkpoint({"global_step": 4, "state_dict": {}}, path)
    assert (step_of(path), step_of(previous_path(path))) == (4, 3)  # a new process reads the step on disk


def test_a_checkpoint_with_nan_weights_is_refused(tmp_path: Path) -> None:
    from nvit_lightning.resume import CheckpointError, resume_path

    torch.save({"global_step": 1, "state_dict": {"student.w": torch.tensor([1.0, float("nan")])}},
               tmp_path / "last.ckpt")
    with pytest.raises(CheckpointError, match=r"last\.ckpt holds NaN/inf values \(state_dict\.student\.w\)"):
        resume_path("last", tmp_path)


def test_ckpt_path_last_without_a_readable_checkpoint_names_them_all(tmp_path: Path) -> None:
    from nvit_lightning.resume import CheckpointError, resume_path

    (tmp_path / "last.previous.ckpt").write_bytes(b"x")
    os.utime(tmp_path / "last.previous.ckpt", (1, 1))
    (tmp_path / "last.ckpt").write_bytes(b"y")
    with pytest.raises(CheckpointError, match=r"last\.ckpt is not a readable .* no earlier checkpoint of .* is "
                                              r"readable either \(last\.previous\.ckpt\)"):
        resume_path("last", tmp_path)


def test_training_data_of_a_config_is_what_the_datamodule_records() -> None:
    from nvit_lightning.data import ViTDataModule
    from nvit_lightning.data.datamodule import training_data, training_data_difference

    cfg = {"train": {"kind": "synthetic", "num_samples": 32, "num_classes": 10}, "batch_size": 8, "seed": 3,
           "val": {"kind": "synthetic", "num_samples": 16, "num_classes": 10}}
    recorded = ViTDataModule(**cfg, img_size=32).state_dict()["training_data"]
    assert recorded == training_data(cfg)
    assert training_data_difference(recorded, training_data({**cfg, "val": None, "num_workers": 4})) is None
    assert training_data_difference(recorded, training_data({**cfg, "train_limit": 16})) == (
        "data.train_limit: checkpoint None, this run 16")
