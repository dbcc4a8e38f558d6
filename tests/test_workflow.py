"""The user's tools around a run: every logger with every pipeline, sweeps (grid, Optuna, SLURM
launcher) with their summary, and what W&B / TensorBoard / CSV receive."""

from __future__ import annotations

import csv
import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from nvit_lightning.models import FAMILIES, PrunableViT
from nvit_lightning.models.families import SMALL as SMALL_TIMM
from nvit_lightning.sweep import metric_value
from nvit_lightning.tracking import report_rows, summary_values
from tests.test_app import BASE, CONF, ROOT, SMALL, run_prune, run_sparsify, run_train

OBS = [*BASE, "pruner=obs_search", "pruner.group_sizes.mlp=8", "calib_batches=2", "reconstruction.batches=2"]
PIPELINES = {  # entry point and small overrides of each pipeline family
    "obs_search": (run_prune, [*OBS, "pruner.target=0.7", "pruner.snapshots=[0.85]"]),
    "gradual": (run_train, [*SMALL, "pruner.interval=2", "pruner.groups_per_event=50", "pruner.group_sizes.emb=8",
                            "pruner.target=0.6", "schedule.prune_max_epochs=3", "schedule.finetune_epochs=1"]),
    "ovit": (run_sparsify, ["pruner=ovit", "pruner.sparsities=[0.4,0.7]", "pruner.num_grads=8",
                         "pruner.block_size=16", "reconstruction=none"]),
}


def without_logger(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("logger=")]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def wandb_run(out_dir: Path) -> Path:
    """The one offline W&B run under a run dir."""
    runs = sorted((out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    return runs[0]


def wandb_records(run_dir: Path) -> dict[str, Any]:
    """What an offline W&B run recorded (its `run-<id>.wandb` file: W&B's 7-byte header, then
    LevelDB-log blocks of protobuf records): the config, the summary and the artifacts. W&B's
    service process may still be writing the file's last records when `run.finish()` returns, so it
    is read again until its exit record is there."""
    for _ in range(40):
        records, complete = _read_wandb_log(next(run_dir.glob("run-*.wandb")).read_bytes())
        if complete:
            break
        time.sleep(0.5)
    out: dict[str, Any] = {"config": {}, "summary": {}, "artifacts": []}
    for record in records:
        which = record.WhichOneof("record_type")
        if which == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif which == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.summary.update})
        elif which == "artifact":
            out["artifacts"].append((record.artifact.name, record.artifact.type))
    return out


def _read_wandb_log(data: bytes) -> tuple[list[Any], bool]:
    """The whole records of a W&B log, and whether it ends with the run's exit record."""
    from wandb.proto import wandb_internal_pb2 as pb

    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == kind == 0 or pos + 7 + length > len(data):  # the end, or a record still being written
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # FIRST / MIDDLE fragments of a record that goes on
            continue
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
        chunk = b""
    return records, any(r.WhichOneof("record_type") == "exit" for r in records)


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_every_logger_gets_the_config_and_the_final_report(pipeline: str, logger: str, tmp_path: Path) -> None:
    run, overrides = PIPELINES[pipeline]
    report = run([*without_logger(overrides), f"logger={logger}"], tmp_path)
    values = summary_values(report)
    assert values and all(isinstance(v, float) for v in values.values())
    top1_key = "pruned/top1" if "pruned" in report else "sparsity_0.70/top1"
    assert values[top1_key] == pytest.approx(report["pruned"]["top1"] if "pruned" in report
                                             else report["sparse"][1]["top1"])
    if logger == "csv":
        rows = read_csv(next((tmp_path / "csv").rglob("metrics.csv")))
        final = [r for r in rows if r.get(f"final/{top1_key}")]
        assert len(final) == 1 and float(final[0][f"final/{top1_key}"]) == pytest.approx(values[top1_key])
        hparams = yaml.safe_load(next((tmp_path / "csv").rglob("hparams.yaml")).read_text())
        assert set(hparams) >= {"model", "data", "pruner", "latency", "reconstruction"}  # the whole Hydra config
        assert hparams["pruner"] == report.get("pruner", hparams["pruner"])
    elif logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(next((tmp_path / "tensorboard").rglob("events.out.*")).parent),
                                  size_guidance={"images": 0}).Reload()
        assert events.Scalars(f"final/{top1_key}")[-1].value == pytest.approx(values[top1_key], rel=1e-5)
        plots = {"architecture"} if pipeline != "ovit" else set()
        assert plots <= set(events.Tags()["images"])
    else:
        run_dir = wandb_run(tmp_path)
        recorded = wandb_records(run_dir)
        assert recorded["config"]["model"]["_target_"].endswith("build_model")  # the whole Hydra config
        assert recorded["config"]["task_name"] in ("train", "prune")
        assert recorded["summary"][top1_key] == pytest.approx(values[top1_key])
        table = json.loads(next((run_dir / "files" / "media" / "table").glob("report_*.table.json")).read_text())
        assert len(table["data"]) == len(report_rows(report)) and "top1" in table["columns"]
        assert any(kind == "run_table" for _, kind in recorded["artifacts"])
    if pipeline != "ovit":
        assert (tmp_path / "architecture.png").stat().st_size > 1000


def test_several_targets_are_evaluated_and_plotted(tmp_path: Path) -> None:
    report = run_prune(PIPELINES["obs_search"][1], tmp_path)
    targets = {t["target"]: t for t in report["targets"]}
    assert set(targets) == {0.7, 0.85}
    assert targets[0.7]["top1"] == report["pruned"]["top1"]
    assert targets[0.85]["latency_pred_ms"] > targets[0.7]["latency_pred_ms"]
    assert [r["model"] for r in report_rows(report)] == ["dense", "pruned", "target 0.85"]
    assert (tmp_path / "accuracy_latency.png").stat().st_size > 1000


def test_wandb_offline_run_of_the_train_cli_holds_config_summary_and_table(tmp_path: Path) -> None:
    """`python train.py logger=wandb` (the default pipeline, downsized) as a user runs it."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *OBS, "pruner.target=0.7", "logger=wandb", "log_model=true",
         "~callbacks.progress_bar", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    run_dir = wandb_run(tmp_path)
    recorded = wandb_records(run_dir)
    assert recorded["config"]["pruner"]["target"] == 0.7 and recorded["config"]["latency"]["_target_"]
    assert recorded["summary"]["pruned/top1"] == pytest.approx(report["pruned"]["top1"])
    assert recorded["summary"]["pruned/params"] == report["pruned"]["params"]
    assert next((run_dir / "files" / "media" / "table").glob("report_*.table.json")).is_file()
    assert next((run_dir / "files" / "media" / "images").glob("architecture_*.png")).stat().st_size > 1000
    assert any(kind == "model" for _, kind in recorded["artifacts"])  # log_model=true


def run_sweep(script: str, overrides: list[str], sweep_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"],
                          capture_output=True, text=True, timeout=600, cwd=sweep_dir.parent)


def test_multirun_of_the_default_pruner_writes_a_summary(tmp_path: Path) -> None:
    result = run_sweep("prune.py", [*OBS, "pruner.target=0.8,0.7"], tmp_path / "sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_csv(tmp_path / "sweep" / "summary.csv")
    assert [(r["job"], r["status"], r["model"]) for r in rows] == [("0", "ok", "pruned"), ("1", "ok", "pruned")]
    assert [float(r["target"]) for r in rows] == [0.8, 0.7]
    assert "pruner.target=0.8" in rows[0]["overrides"]
    for row in rows:
        report = json.loads((tmp_path / "sweep" / row["job"] / "report.json").read_text())
        assert float(row["top1"]) == pytest.approx(report["pruned"]["top1"])
    assert (tmp_path / "sweep" / "summary.png").stat().st_size > 1000
    assert "sweep summary" in result.stdout


def test_a_failing_job_is_recorded_and_the_others_finish(tmp_path: Path) -> None:
    """An unreachable latency target fails its own job only; the sweep exits 1 after the summary."""
    result = run_sweep("prune.py", [*OBS, "pruner.target=0.7,0.01,0.8"], tmp_path / "sweep")
    assert result.returncode == 1
    rows = {r["job"]: r for r in read_csv(tmp_path / "sweep" / "summary.csv")}
    assert [rows[j]["status"] for j in ("0", "1", "2")] == ["ok", "failed", "ok"]
    assert "budget" in rows["1"]["error"] or "target" in rows["1"]["error"]
    assert (tmp_path / "sweep" / "2" / "report.json").is_file()
    assert "1 of 3 jobs failed" in result.stderr and "Traceback" not in result.stderr


def test_optuna_sweeper_optimises_the_reported_metric(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    result = run_sweep("prune.py", [*OBS, "+hparams_search=optuna", "hydra.sweeper.n_trials=3",
                                    "hydra.sweeper.sampler.n_startup_trials=2"], tmp_path / "sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    reports = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/report.json"))]
    assert len(reports) == 3
    assert best["best_value"] == pytest.approx(max(r["pruned"]["top1"] for r in reports))
    assert len(read_csv(tmp_path / "sweep" / "summary.csv")) == 3


def test_slurm_launcher_composes_without_a_cluster(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)
    assert launcher.partition == "gpu"
    assert type(instantiate(launcher)).__name__ == "SlurmLauncher"


def test_eta_target_grid_composes_with_the_summary_callback(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["+hparams_search=eta_target"], return_hydra_config=True)
    assert cfg.pruner.criterion == "hessian" and cfg.hydra.sweeper.params["pruner.eta"] == "0,5e-4"
    assert cfg.hydra.callbacks.sweep_summary._target_ == "nvit_lightning.sweep.SweepSummary"
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"  # keys every pipeline has


def test_metric_value_reads_dotted_report_keys() -> None:
    report = {"pruned": {"top1": 70.5, "dims": {}}, "sparse": [{"top1": 60.0}]}
    assert metric_value(report, "pruned.top1") == 70.5
    assert metric_value(report, "sparse.0.top1") == 60.0
    assert metric_value(None, "pruned.top1") is None and metric_value(report, None) is None
    with pytest.raises(ValueError, match="no 'top7'"):
        metric_value(report, "pruned.top7")
    with pytest.raises(ValueError, match="not a number"):
        metric_value(report, "pruned.dims")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prune_cli_on_every_family_writes_a_timm_model(family: str, tmp_path: Path) -> None:
    """`python prune.py model.timm_name=<name> model.checkpoint=null data=synthetic latency=flops`,
    downsized by `model.timm_kwargs`: searched, refit, compacted, loadable by timm with the same logits."""
    import timm
    import torch

    f = FAMILIES[family]
    small = ",".join(f"{k}:{v}" for k, v in {**f.timm_kwargs, **SMALL_TIMM}.items())
    report = run_prune([f"model.timm_name={f.timm_name}", "model.checkpoint=null", f"+model.timm_kwargs={{{small}}}",
                        "model.num_classes=10", "data=synthetic", "latency=flops", "logger=none",
                        "measure_latency=false", "pruner.target=0.75", "pruner.group_sizes.mlp=8", "calib_batches=2",
                        "reconstruction.batches=2"], tmp_path)
    assert report["pruned"]["latency_pred_ms"] <= 0.75 * report["dense"]["latency_pred_ms"] + 1e-9
    model = timm.create_model(f"local-dir:{tmp_path / 'model'}", pretrained=True).eval()
    ours = PrunableViT.from_pretrained(tmp_path / "model").eval()
    assert ours.dims.to_dict() == report["pruned"]["dims"]
    assert all(ours.config.get(k, v) == v for k, v in f.features.items())  # the family's features kept
    x = torch.randn(2, 3, SMALL_TIMM["img_size"], SMALL_TIMM["img_size"])
    assert torch.equal(model(x), ours(x))
    assert (tmp_path / "model" / "README.md").read_text().count(f.timm_name) == 1  # the model card


@pytest.mark.parametrize("run", [run_prune, run_train])
def test_unreachable_target_fails_before_the_dense_evaluation(run, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import nvit_lightning.measure as measure

    monkeypatch.setattr(measure, "evaluate", lambda *a, **k: pytest.fail("evaluated before refusing the target"))
    with pytest.raises(ValueError, match=r"target 0.1 is unreachable.*pruner.target >= 0.364"):
        run([*OBS, "pruner.target=0.1"], tmp_path)


def test_prune_with_pruner_none_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "prune.py"), *BASE, "pruner=none", f"hydra.run.dir={tmp_path}"],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and "python train.py pruner=none" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "report.json").exists()


def test_a_second_run_into_a_busy_run_dir_stops_and_changes_nothing(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom nvit_lightning.runlock import acquire\n"
                               "acquire(sys.argv[1]); print('locked', flush=True); time.sleep(120)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        (tmp_path / "report.json").write_text("the first run's")
        before = sorted(p.name for p in tmp_path.iterdir())
        result = subprocess.run([sys.executable, str(ROOT / "prune.py"), *OBS, f"hydra.run.dir={tmp_path}"],
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2 and f"in use by another run (PID {holder.pid}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no .hydra/, no log, nothing rewritten
    assert (tmp_path / "report.json").read_text() == "the first run's"


def test_a_stale_run_dir_lock_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": __import__("socket").gethostname(),
                                                    "started": "2026-01-01 00:00:00"}))
    result = subprocess.run([sys.executable, str(ROOT / "prune.py"), *OBS, "pruner.target=0.8",
                             f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"PID {int(dead.stdout)}" in result.stderr and "taking it over" in result.stderr
    assert (tmp_path / "report.json").is_file() and not (tmp_path / ".run.lock").exists()  # released at exit
