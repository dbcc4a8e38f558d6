"""What a finished run hands its loggers (W&B, TensorBoard, CSV): the resolved Hydra config, the
report's numbers as summary values and a table, its plots, and, with `log_model=true` on W&B, the
compact model as an artifact. Every pipeline (latency search, NViT's gradual pruning, sparsity)
ends here, so every logger sees the same things whichever pruner ran."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("nvit_lightning")

# the columns of the report table, in order; a report row holds those it has
COLUMNS = ("model", "target", "sparsity", "top1", "top5", "params", "flops", "latency_pred_ms",
           "latency_measured_ms", "speedup", "speedup_vs_timm", "dir")


def report_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per model of a report.json: dense, then the pruned model and every other latency
    target of a structured run, or every sparsity level of a sparsity run."""
    rows = [{"model": "dense", **_numbers(report["dense"])}]
    if "sparse" in report:
        rows += [{"model": f"sparsity {e['sparsity']:.2f}", "sparsity": e["achieved"], "dir": e["dir"],
                  **_numbers(e)} for e in report["sparse"]]
        return rows
    rows.append({"model": "pruned", "target": report["target_latency"], **_numbers(report["pruned"])})
    rows += [{"model": f"target {t['target']:.2f}", **_numbers(t)} for t in report.get("targets", [])
             if t["target"] != report["target_latency"]]
    return rows


def _numbers(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k in COLUMNS and (v is None or isinstance(v, int | float | str))}


def summary_values(report: Mapping[str, Any]) -> dict[str, float]:
    """`<model>/<quantity>` for every number of the report table, e.g. `pruned/top1`."""
    return {f"{row['model'].replace(' ', '_')}/{key}": float(value) for row in report_rows(report)
            for key, value in row.items() if key != "target" and isinstance(value, int | float)
            and not isinstance(value, bool)}


def accuracy_latency_points(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """(latency ratio, top-1) of every evaluated model of a structured run: measured against timm's
    dense model where timed, else predicted against our dense model."""
    dense = report["dense"]
    points = []
    for row in report_rows(report):
        if row.get("top1") is None:
            continue
        if row.get("speedup_vs_timm"):
            latency = 1.0 / row["speedup_vs_timm"]
        elif row["model"] == "dense":
            latency = 1.0
        else:
            latency = row["latency_pred_ms"] / dense["latency_pred_ms"]
        points.append({"label": row["model"], "latency": latency, "top1": row["top1"]})
    return points


def publish(loggers: Sequence[Any], cfg: DictConfig, report: Mapping[str, Any], plots: Sequence[Path],
            model_dir: Path | None = None, log_model: bool = False) -> None:
    """Hand the finished run to every logger, then close it (a W&B run ends here, so the next run
    of the same process starts its own)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    values = summary_values(report)
    rows = report_rows(report)
    for logger in loggers:
        logger.log_hyperparams(config)
        logger.log_metrics({f"final/{k}": v for k, v in values.items()})
        kind = type(logger).__name__
        if kind == "WandbLogger":
            _to_wandb(logger, values, rows, plots, model_dir if log_model else None)
        elif kind == "TensorBoardLogger":
            _to_tensorboard(logger, plots)
        logger.save()
        logger.finalize("success")
        if kind == "WandbLogger":
            logger.experiment.finish()


def _to_wandb(logger: Any, values: dict[str, float], rows: list[dict[str, Any]], plots: Sequence[Path],
              model_dir: Path | None) -> None:
    run = logger.experiment
    run.summary.update(values)
    columns = [c for c in COLUMNS if any(c in row for row in rows)]
    logger.log_table(key="report", columns=columns, data=[[row.get(c) for c in columns] for row in rows])
    for path in plots:
        logger.log_image(key=path.stem, images=[str(path)])
    if model_dir is not None:
        import wandb

        artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata=values)
        artifact.add_dir(str(model_dir))
        run.log_artifact(artifact, aliases=["latest"])
        log.info(f"model {model_dir} logged to W&B as artifact model-{run.id}")


def _to_tensorboard(logger: Any, plots: Sequence[Path]) -> None:
    from matplotlib.image import imread

    for path in plots:
        logger.experiment.add_image(path.stem, imread(str(path))[..., :3], dataformats="HWC")
