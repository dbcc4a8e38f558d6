"""A run as one job of a `-m` sweep (targets, η, Optuna trials, any override): the number a
sweeper optimises (`optimized_metric`), a failed job recorded in its run dir while the others go
on, and the summary after the last job: every job's overrides, status and report numbers in
`summary.csv` / `summary.json`, top-1 against latency in `summary.png`, and a W&B run holding the
table when the sweep logs to W&B. With a failed job the sweep exits 1 after writing the summary."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .plots import plot_accuracy_latency
from .report import REPORT_FILE
from .tracking import COLUMNS, accuracy_latency_points, report_rows

SUMMARY_COLUMNS = ("job", "overrides", "status", "error", *COLUMNS)


def in_multirun() -> bool:
    """Whether this process runs one job of a `-m` sweep (Hydra's multirun)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


FAILED_FILE = "failed.json"


def record_failed_job(err: BaseException) -> None:
    """One failed job of a sweep: its error goes to `failed.json` in its run dir (read by the sweep
    summary, `sweep.py`) and the sweep goes on with the next job."""
    from hydra.core.hydra_config import HydraConfig

    out_dir = Path(HydraConfig.get().runtime.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / FAILED_FILE).write_text(json.dumps({"error": str(err), "type": type(err).__name__}, indent=1))
    print(f"error: {err} (job {out_dir.name} of the sweep; the others go on)", file=sys.stderr)
    return None


def metric_value(report: dict | None, key: str | None) -> float | None:
    """The number a sweeper optimises (`optimized_metric`, e.g. `pruned.top1`) from a run's report;
    None for a failed job or without a key."""
    if report is None or not key:
        return None
    value: Any = report
    for part in key.split("."):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise ValueError(f"optimized_metric={key}: the report has no '{part}' (e.g. pruned.top1, "
                             f"pruned.speedup_vs_timm, sparse.0.top1)")
    if not isinstance(value, int | float):
        raise ValueError(f"optimized_metric={key} is {value!r}, not a number")
    return float(value)



def job_rows(job_dir: Path) -> list[dict[str, Any]]:
    """The rows of one job: its pruned model(s) from report.json, or its error from failed.json."""
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    overrides = " ".join(OmegaConf.load(overrides_file)) if overrides_file.is_file() else ""
    job = {"job": job_dir.name, "overrides": overrides}
    if (job_dir / REPORT_FILE).is_file():
        report = json.loads((job_dir / REPORT_FILE).read_text())
        rows = [{**job, "status": "ok", **row} for row in report_rows(report) if row["model"] != "dense"]
        return _with_latency(rows, report)
    if (job_dir / FAILED_FILE).is_file():
        return [{**job, "status": "failed", "error": json.loads((job_dir / FAILED_FILE).read_text())["error"]}]
    return [{**job, "status": "no report"}]  # killed, or still running elsewhere (a cluster launcher)


def _with_latency(rows: list[dict[str, Any]], report: dict) -> list[dict[str, Any]]:
    """Each structured row's latency ratio (measured vs timm's dense model where timed), for the plot."""
    if "sparse" in report:
        return rows
    ratios = {p["label"]: p["latency"] for p in accuracy_latency_points(report)}
    return [{**row, "latency_ratio": ratios.get(row["model"])} for row in rows]


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every job of the sweep in `sweep_dir`, in job order, written to summary.csv / .json / .png."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted((d for d in sweep_dir.iterdir() if d.is_dir() and (d / ".hydra").is_dir()),
                  key=lambda d: (not d.name.isdigit(), int(d.name) if d.name.isdigit() else d.name))
    rows = [row for job in jobs for row in job_rows(job)]
    columns = [c for c in (*SUMMARY_COLUMNS, "latency_ratio") if any(c in row for row in rows)]
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=1))
    points = [{"label": f"{r['job']} {r['model']}", "latency": r["latency_ratio"], "top1": r["top1"]}
              for r in rows if r.get("latency_ratio") is not None and r.get("top1") is not None]
    if points:
        plot_accuracy_latency(points, sweep_dir / "summary.png", f"sweep {sweep_dir.name}",
                              xlabel="latency ratio (measured vs timm's dense where timed, else predicted)")
    return rows


def summary_table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "-")

    columns = ("job", "status", "model", "top1", "latency_ratio", "speedup_vs_timm", "overrides")
    table = [columns, *[[fmt(row.get(c)) for c in columns] for row in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in table)


class SweepSummary(Callback):
    """Hydra callback (`hydra.callbacks` in conf/hydra/default.yaml): summarise the sweep at its end."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarize(sweep_dir)
        print(f"\nsweep summary ({sweep_dir / 'summary.csv'}):\n{summary_table(rows)}")
        if "wandb" in (config.get("logger") or {}):
            _to_wandb(rows, sweep_dir, config)
        failed = [row["job"] for row in rows if row["status"] != "ok"]
        if failed:
            print(f"error: {len(set(failed))} of {len({r['job'] for r in rows})} jobs failed: {sorted(set(failed))} "
                  f"(their errors are in {sweep_dir / 'summary.csv'})", file=sys.stderr)
            sys.exit(1)


def _to_wandb(rows: list[dict[str, Any]], sweep_dir: Path, config: DictConfig) -> None:
    """One W&B run for the whole sweep, holding the summary table and plot."""
    import wandb

    columns = [c for c in (*SUMMARY_COLUMNS, "latency_ratio") if any(c in row for row in rows)]
    run = wandb.init(project=config.logger.wandb.get("project"), group=config.logger.wandb.get("group"),
                     name=f"sweep-{sweep_dir.name}", job_type="sweep-summary", dir=str(sweep_dir),
                     reinit="finish_previous")
    run.log({"sweep": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])})
    if (sweep_dir / "summary.png").is_file():
        run.log({"sweep_plot": wandb.Image(str(sweep_dir / "summary.png"))})
    run.finish()
