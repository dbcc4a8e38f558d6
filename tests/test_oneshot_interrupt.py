"""An interruptible one-shot pipeline (issue #30, item 5): SIGINT / SIGTERM during prune.py's search,
refit or block distillation stop after the current block, save the state under
`<run>/checkpoints/oneshot/`, print the command that resumes; `ckpt_path=last` ends with the same
model as an uninterrupted run (bit for bit); a resume with another config is refused in one line.

The real entry point (`cli.prune.main`, what `python prune.py` runs) in this process, on a 2-block
model; the signal is a real one, sent to this process from inside the pipeline (after block k of a
step patched to send it). One run goes through a new interpreter, as a user's does."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nvit_lightning.pruning import block_distill, reconstruct, search
from nvit_lightning.pruning import ranking as ranking_module

ROOT = Path(__file__).resolve().parents[1]

# the latency search to 0.85 and 0.7 (in that order), then 2 blocks distilled per target; no least-squares
# refit (on this random model it leaves block distillation nothing to improve: every block would keep its
# refit weights, and a resume would be trivially exact); train.py's test below stops the refit
ONESHOT = ["model=small_random", "data=synthetic", "latency=flops", "latency.tokens=17", "logger=none",
           "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "evaluate=false",
           "measure_latency=false", "pruner=obs_search", "pruner.group_sizes.mlp=8", "calib_batches=2",
           "pruner.target=0.7", "pruner.snapshots=[0.85]"]
RUN = [*ONESHOT, "reconstruction=block_distill", "reconstruction.batches=2", "reconstruction.layers=[]",
       "reconstruction.distillation.epochs=1", "reconstruction.distillation.batch_size=8",
       "reconstruction.distillation.lr=1e-4"]


def run_main(run_dir: Path, *overrides: str, script: str = "prune", run: list[str] = RUN) -> int:
    """`python <script>.py <run> overrides hydra.run.dir=<run_dir>` in this process (`cli.<script>.main`,
    the function the script runs): its exit code."""
    from nvit_lightning import runlock
    from nvit_lightning.cli import prune, train

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", [f"{script}.py", *run, *overrides, f"hydra.run.dir={run_dir}"])
        patch.delenv("HYDRA_FULL_ERROR", raising=False)
        try:
            {"prune": prune, "train": train}[script].main()
        except SystemExit as stopped:
            return stopped.code
        finally:
            runlock.release(run_dir)  # what the process's exit would do
    return 0


def main(capfd: pytest.CaptureFixture, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`run_main`, with its output."""
    capfd.readouterr()
    code = run_main(run_dir, *overrides)
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["prune.py", *overrides], code, out, err)


def signal_at(patch: pytest.MonkeyPatch, owner: type, method: str, call: int, signal_name: str = "SIGTERM") -> None:
    """Send this process `signal_name` at the `call`-th call of `owner.method` (a pre-empted job)."""
    original, calls = getattr(owner, method), []

    def patched(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), getattr(signal, signal_name))
        return original(*args, **kwargs)

    patch.setattr(owner, method, patched)


def resume_line(run_dir: Path) -> str:
    return " ".join(["python", "prune.py", *map(shlex.quote, RUN), f"hydra.run.dir={run_dir}", "ckpt_path=last"])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def assert_bit_identical(resumed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert resumed.keys() == reference.keys()
    differ = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not differ, f"{len(differ)} of {len(reference)} tensors differ: {differ}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert run_main(run_dir) == 0
    return weights(run_dir)


# `python prune.py ...` in a new interpreter, sent `signal` (a real one) while block distillation
# trains its `call`-th block (calls 1, 2: target 0.85; 3, 4: target 0.7)
_INTERRUPTED = """
import os, signal, sys
from nvit_lightning.cli import prune
from nvit_lightning.pruning import block_distill
signal_name, call, calls, train = sys.argv[1], int(sys.argv[2]), [], block_distill.BlockDistillation._train
def _train(self, *args):
    calls.append(1)
    if len(calls) == call:
        os.kill(os.getpid(), getattr(signal, signal_name))
    return train(self, *args)
block_distill.BlockDistillation._train = _train
sys.argv = ["prune.py", *sys.argv[3:]]
prune.main()
"""


def interrupted_run(run_dir: Path, signal_name: str, call: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-c", _INTERRUPTED, signal_name, str(call), *RUN,
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SIGTERM while the first block of target 0.7 is distilled (the 0.85 model is done)."""
    run_dir = tmp_path_factory.mktemp("interrupted") / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, block_distill.BlockDistillation, "_train", call=3)
        assert run_main(run_dir) == 143
    return run_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_sigterm_during_block_distillation_saves_and_resumes_bit_identically(
        capfd: pytest.CaptureFixture, interrupted: Path, uninterrupted: dict[str, torch.Tensor],
        tmp_path: Path) -> None:
    run_dir = copy_of(interrupted, tmp_path)
    state = run_dir / "checkpoints" / "oneshot"
    assert not (run_dir / "model").exists()
    assert sorted(p.name for p in state.iterdir()) == ["fingerprint.json", "pruned.pt", "target_0.70.distillation.pt",
                                                       "target_0.70.least_squares.pt", "target_0.85.pt"]
    progress = torch.load(state / "target_0.70.distillation.pt", weights_only=True)
    assert progress["blocks_done"] == 1 and set(progress) == {"blocks_done", "student", "generator", "results"}
    assert progress["results"][0]["error_after"] < progress["results"][0]["error_before"]  # the block was tuned

    with pytest.MonkeyPatch.context() as patch:  # the search and the finished blocks are not redone
        patch.setattr(search.LatencySearch, "traces", lambda *a, **k: pytest.fail("the search ran again"))
        trained = []
        original = block_distill.BlockDistillation._train
        patch.setattr(block_distill.BlockDistillation, "_train", lambda *a: trained.append(1) or original(*a))
        done = main(capfd, run_dir, "ckpt_path=last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert trained == [1]  # the second block of target 0.7 only
    assert_bit_identical(weights(run_dir), uninterrupted)
    assert (run_dir / "report.json").is_file() and not state.parent.exists()  # the run finished: its state is removed
    again = main(capfd, run_dir, "ckpt_path=last")
    assert again.returncode == 2
    assert again.stderr.strip() == (f"error: ckpt_path=last: the run in {run_dir} finished (report.json); there is "
                                    f"nothing to resume: run again without ckpt_path")


def test_the_stop_message_names_the_block_and_the_command(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, block_distill.BlockDistillation, "_train", call=1)
        done = main(capfd, run_dir)
    assert done.returncode == 143
    output = done.stdout + done.stderr
    assert "SIGTERM: stopping after the current block of the refit of target 0.85" in output
    assert (f"SIGTERM: stopped after block 1 of 2 of block distillation (target 0.85); state saved in "
            f"{run_dir}/checkpoints/oneshot; resume with: {resume_line(run_dir)}") in output
    assert "Traceback" not in output


def oneshot_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints" / "oneshot").iterdir())


def counting(patch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """The calls of `owner.name` from now on."""
    original, calls = getattr(owner, name), []
    patch.setattr(owner, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_a_stop_during_the_search_statistics_saves_them_and_resumes_bit_identically(
        capfd: pytest.CaptureFixture, tmp_path: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, search, "collect_statistics", call=1)
        done = main(capfd, run_dir)
    assert done.returncode == 143, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert "SIGTERM: stopping after the current step of the pruner (obs_search)" in output
    assert "stopped after the search's layer statistics; state saved in" in output
    assert oneshot_files(run_dir) == ["fingerprint.json", "search.statistics.pt"]
    saved = torch.load(run_dir / "checkpoints" / "oneshot" / "search.statistics.pt", weights_only=True)
    # the readers' statistics, and the attention inputs the head-width fits need (head_dims, on by default)
    assert set(saved["statistics"]) == {f"blocks.{i}.{layer}" for i in range(2)
                                        for layer in ("attn.proj", "attn.q", "mlp.fc2")}

    with pytest.MonkeyPatch.context() as patch:
        collected = counting(patch, search, "collect_statistics")
        traced = counting(patch, search, "_trace")
        assert main(capfd, run_dir, "ckpt_path=last").returncode == 0
    assert collected == [] and len(traced) == 4  # the statistics read back; both blocks traced
    assert_bit_identical(weights(run_dir), uninterrupted)
    assert not (run_dir / "checkpoints" / "oneshot").exists()  # finished: the state is removed


def test_a_stop_during_the_search_traces_stops_after_the_block_and_resumes_from_the_next(
        capfd: pytest.CaptureFixture, tmp_path: Path, uninterrupted: dict[str, torch.Tensor]) -> None:
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, search, "_trace", call=1)  # the first block's head trace
        done = main(capfd, run_dir)
    assert done.returncode == 143, done.stderr[-3000:]
    assert "stopped after block 1 of 2 of the search's removal traces; state saved in" in done.stdout + done.stderr
    assert oneshot_files(run_dir) == ["fingerprint.json", "search.pt", "search.statistics.pt"]
    assert len(torch.load(run_dir / "checkpoints" / "oneshot" / "search.pt", weights_only=True)["blocks"]) == 1

    with pytest.MonkeyPatch.context() as patch:
        collected = counting(patch, search, "collect_statistics")
        traced = counting(patch, search, "_trace")
        assert main(capfd, run_dir, "ckpt_path=last").returncode == 0
    assert collected == [] and len(traced) == 2  # the second block's head and MLP traces only
    assert_bit_identical(weights(run_dir), uninterrupted)


def test_a_pruner_that_does_not_save_progress_stops_when_it_returns(capfd: pytest.CaptureFixture,
                                                                     tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run = ["pruner=oneshot" if a == "pruner=obs_search" else a for a in RUN]  # NViT's saliency ranking
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, ranking_module, "calibrator", call=1)
        capfd.readouterr()
        assert run_main(run_dir, run=run) == 143
    output = "".join(capfd.readouterr())
    assert "SIGTERM: stopping after the pruner (hessian) finishes: it runs as one step" in output
    assert "stopped after the pruner (hessian)" in output
    assert oneshot_files(run_dir) == ["fingerprint.json", "pruned.pt"]
    with pytest.MonkeyPatch.context() as patch:
        scored = counting(patch, ranking_module, "calibrator")
        assert run_main(run_dir, "ckpt_path=last", run=run) == 0
    assert scored == []  # the pruner's models read back from pruned.pt


@pytest.mark.parametrize("override", ["reconstruction.distillation.epochs=3", "pruner.target=0.6", "seed=1",
                                      "data.train.num_samples=24", "model.dims.mlp=[96,96]"])
def test_a_resume_with_another_config_is_refused_and_changes_nothing(
        capfd: pytest.CaptureFixture, interrupted: Path, tmp_path: Path, override: str) -> None:
    run_dir = copy_of(interrupted, tmp_path)
    before = files(run_dir)
    done = main(capfd, run_dir, override, "ckpt_path=last")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    key = override.split("=")[0]  # seed=1 shows as data.seed, its first use
    assert lines[0].startswith(f"error: cannot resume the one-shot state in {run_dir}/checkpoints/oneshot: it was "
                               f"saved with {'data.seed' if key == 'seed' else key}="), lines
    assert files(run_dir) == before


def test_nothing_to_resume_is_one_line(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    done = main(capfd, tmp_path, "ckpt_path=last")
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: ckpt_path=last: no one-shot state in {tmp_path}/checkpoints/oneshot (set "
                                f"hydra.run.dir to the interrupted run, or run without ckpt_path)")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_exits_130_without_a_traceback(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    done = interrupted_run(run_dir, "SIGINT", 1)
    assert done.returncode == 130, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr and "KeyboardInterrupt" not in done.stderr
    assert "SIGINT: stopping after the current block of the refit of target 0.85" in done.stdout
    assert "SIGINT: stopped after block 1 of 2 of block distillation (target 0.85)" in done.stdout
    assert f"resume with: {resume_line(run_dir)}" in done.stdout
    assert (run_dir / "checkpoints" / "oneshot" / "target_0.85.distillation.pt").is_file()


# train.py's one-shot stage 1 (the search, the least-squares refit), then one epoch of stage 2
TRAIN = [*ONESHOT, "reconstruction=least_squares", "reconstruction.batches=2", "schedule.finetune_epochs=1",
         "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "~callbacks.progress_bar"]


def test_train_py_resumes_its_one_shot_stage(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert run_main(tmp_path / "full", script="train", run=TRAIN) == 0
    run_dir = tmp_path / "run"
    capfd.readouterr()
    with pytest.MonkeyPatch.context() as patch:  # after block 1 of target 0.7's refit (0.85's is done)
        signal_at(patch, reconstruct._Refit, "apply", call=7)  # fc1, proj, fc2 per block
        assert run_main(run_dir, script="train", run=TRAIN) == 143
    out, err = capfd.readouterr()
    command = " ".join(["python", "train.py", *map(shlex.quote, TRAIN), f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    assert (f"SIGTERM: stopped after block 1 of 2 of the least-squares refit (target 0.7); state saved in "
            f"{run_dir}/checkpoints/oneshot; resume with: {command}") in out + err
    state = run_dir / "checkpoints" / "oneshot"
    assert torch.load(state / "target_0.70.least_squares.pt", weights_only=True)["blocks_done"] == 1
    assert (state / "target_0.85.pt").is_file() and not (run_dir / "model").exists()
    assert run_main(run_dir, "ckpt_path=last", script="train", run=TRAIN) == 0
    assert_bit_identical(weights(run_dir), weights(tmp_path / "full"))


def test_ctrl_c_outside_the_pipeline_is_one_line_too(capfd: pytest.CaptureFixture, tmp_path: Path) -> None:
    from nvit_lightning.cli import prune

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the dense evaluation

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prune, "describe_model", interrupted)
        done = main(capfd, tmp_path)
    assert done.returncode == 130 and "Traceback" not in done.stdout + done.stderr
    assert done.stderr.splitlines()[-1].startswith("SIGINT: stopped; what the one-shot pipeline finished is kept in")


def test_a_damaged_state_file_is_one_line_naming_it(capfd: pytest.CaptureFixture, interrupted: Path,
                                                    tmp_path: Path) -> None:
    run_dir = copy_of(interrupted, tmp_path)
    damaged = run_dir / "checkpoints" / "oneshot" / "pruned.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])
    done = main(capfd, run_dir, "ckpt_path=last")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (f"error: {damaged} is not readable (RuntimeError): delete it to redo "
                                            f"that step, or start a new run")


# prune.py with a sparsifier: oViT to 50 % and 70 %, each level block-distilled (2 blocks: calls 1, 2 for
# 50 %, 3, 4 for 70 %), then logit-distilled
SPARSE = [a for a in ONESHOT if not a.startswith("pruner")] + [
    "pruner=ovit", "pruner.sparsities=[0.5,0.7]", "pruner.num_grads=16", "pruner.block_size=16",
    "reconstruction=block_distill", "reconstruction.batches=2", "reconstruction.distillation.epochs=1",
    "reconstruction.distillation.batch_size=8", "reconstruction.distillation.lr=1e-4"]


def sparse_weights(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p / "model.safetensors") for p in sorted((run_dir / "sparse").iterdir())}


def test_a_stopped_sparse_run_resumes_each_level_bit_identically(capfd: pytest.CaptureFixture,
                                                                  tmp_path: Path) -> None:
    from nvit_lightning.sparsity import sparsifier

    assert run_main(tmp_path / "full", run=SPARSE) == 0
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:  # the first block of 70 % (50 % is done)
        signal_at(patch, block_distill.BlockDistillation, "_train", call=3)
        capfd.readouterr()
        assert run_main(run_dir, run=SPARSE) == 143
    output = "".join(capfd.readouterr())
    command = " ".join(["python", "prune.py", *map(shlex.quote, SPARSE), f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    assert "SIGTERM: stopping after the current block of the reconstruction of sparsity 0.70" in output
    assert (f"SIGTERM: stopped after block 1 of 2 of block distillation (target 0.7); state saved in "
            f"{run_dir}/checkpoints/oneshot; resume with: {command}") in output
    assert oneshot_files(run_dir) == ["fingerprint.json", "pruned.pt", "target_0.50.pt", "target_0.70.distillation.pt"]

    with pytest.MonkeyPatch.context() as patch:
        sparsified = counting(patch, sparsifier.OBSSparsifier, "__call__")
        trained = counting(patch, block_distill.BlockDistillation, "_train")
        capfd.readouterr()
        assert run_main(run_dir, "ckpt_path=last", run=SPARSE) == 0
    assert sparsified == [] and trained == [1]  # oViT's models read back; 70 %'s second block only
    resumed, full = sparse_weights(run_dir), sparse_weights(tmp_path / "full")
    assert list(resumed) == ["sparsity_0.50", "sparsity_0.70"]
    for level in full:
        assert_bit_identical(resumed[level], full[level])
    assert not (run_dir / "checkpoints" / "oneshot").exists()
    assert without_timings(run_dir) == without_timings(tmp_path / "full")  # the same numbers in the report


def without_timings(run_dir: Path) -> dict:
    """The run's report.json, its wall times and run dir left out."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "seconds" not in k}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value.replace(str(run_dir), "<run>") if isinstance(value, str) else value
    return strip(json.loads((run_dir / "report.json").read_text()))
