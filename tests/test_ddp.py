"""DDP on CPU (gloo, 2 processes) through Lightning: every rank makes the same pruning decisions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from nvit_lightning.models import PrunableViT

ROOT = Path(__file__).resolve().parents[1]


def run_ddp_train(overrides: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """`train.py` on 2 CPU processes (gloo) with a small model on synthetic data; each rank dumps what
    it ended with (tests/ddp_probe.py). Returns the run dir and the dump dir."""
    run_dir, dump_dir = tmp_path / "run", tmp_path / "dump"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", "trainer.precision=32-true", "model=small_random", "data=synthetic", "latency=flops",
         "latency.tokens=17", "logger=none", "measure_latency=false", "~callbacks.progress_bar",
         "+trainer.enable_progress_bar=false", "+callbacks.dump._target_=tests.ddp_probe.DumpPerRank",
         f"+callbacks.dump.out_dir={dump_dir}", f"hydra.run.dir={run_dir}"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, dump_dir


def test_ddp_two_processes_agree_and_only_rank_zero_writes(tmp_path: Path) -> None:
    run_dir, dump_dir = run_ddp_train(
        ["pruner=gradual", "pruner.kinds=[emb,head,qk,v,mlp]", "pruner.latency_step=null", "pruner.interval=2",
         "pruner.groups_per_event=3", "pruner.group_sizes.emb=8", "pruner.target=0.6", "pruner.snapshots=[0.8]",
         "schedule.prune_max_epochs=20", "schedule.finetune_epochs=1"], tmp_path)
    for stage in ("prune", "finetune"):
        rank0, rank1 = (torch.load(dump_dir / f"{stage}_rank{r}.pt") for r in (0, 1))
        assert rank0["world_size"] == rank1["world_size"] == 2 and (rank0["rank"], rank1["rank"]) == (0, 1)
        for key, mask in rank0["masks"].items():
            assert torch.equal(mask, rank1["masks"][key]), (stage, key)
        assert rank0["compact"].keys() == rank1["compact"].keys()
        for key, value in rank0["compact"].items():
            assert torch.equal(value, rank1["compact"][key]), (stage, key)
    pruned = sum(int((m == 0).sum()) for m in torch.load(dump_dir / "prune_rank0.pt")["masks"].values())
    assert pruned > 0
    # rank 0 alone wrote the report, the model and both snapshots (no files tagged with another rank)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["pruned"]["latency_pred_ms"] <= 0.6 * report["dense"]["latency_pred_ms"]
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == ["target_0.60", "target_0.80"]
    final = PrunableViT.from_pretrained(run_dir / "model")
    finetuned = torch.load(dump_dir / "finetune_rank0.pt")["compact"]
    for key, value in final.state_dict().items():
        assert torch.equal(value, finetuned[key])
    assert len(list(run_dir.rglob("report.json"))) == 1


def test_ddp_latency_search_picks_the_same_architecture_on_every_rank(tmp_path: Path) -> None:
    """pruner=obs_search: every rank searches and refits on the same calibration batches, then stage 2
    runs under DDP; both ranks end with the same compact model, rank 0 alone writes."""
    run_dir, dump_dir = run_ddp_train(
        ["pruner=obs_search", "pruner.target=0.75", "pruner.group_sizes.mlp=8", "calib_batches=2",
         "reconstruction.batches=2", "schedule.finetune_epochs=1"], tmp_path)
    rank0, rank1 = (torch.load(dump_dir / f"finetune_rank{r}.pt")["compact"] for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
    report = json.loads((run_dir / "report.json").read_text())
    assert report["criterion"] == "obs_search"
    assert report["pruned"]["latency_pred_ms"] <= 0.75 * report["dense"]["latency_pred_ms"] + 1e-9
    assert [p.name for p in (run_dir / "snapshots").iterdir()] == ["target_0.75"]


def test_ddp_sparsity_sweep_keeps_the_same_zeros_on_every_rank(tmp_path: Path) -> None:
    run_dir, dump_dir = run_ddp_train(
        ["+experiment=ovit_sweep", "data.train.num_samples=64", "data.batch_size=8", "pruner.sparsities=[0.4,0.6]",
         "pruner.num_grads=16", "pruner.block_size=16", "sweep.steps_per_level=3"], tmp_path)
    rank0, rank1 = (torch.load(dump_dir / f"finetune_rank{r}.pt")["compact"] for r in (0, 1))
    for key, value in rank0.items():  # same masks and the same fine-tuned weights on both ranks
        assert torch.equal(value, rank1[key]), key
    linears = [v for k, v in rank0.items() if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2]
    zeros = sum(int((w == 0).sum()) for w in linears) / sum(w.numel() for w in linears)
    assert abs(zeros - 0.6) < 1e-3  # the last level, still exactly sparse after its fine-tuning steps
    report = json.loads((run_dir / "report.json").read_text())
    assert [e["sparsity"] for e in report["sparse"]] == [0.4, 0.6]
    assert sorted(p.name for p in (run_dir / "sparse").iterdir()) == ["sparsity_0.40", "sparsity_0.60"]
