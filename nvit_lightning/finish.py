"""The end of every run, written once for train.py and prune.py: the compact model, accuracy and
fresh-process timing of every latency target, report.json, pruning_history.json, the plots, the
summary table, and what the loggers get (`tracking.publish`)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .latency.models import LatencyModel
from .measure import describe_model, measure_side_by_side
from .models import PrunableViT, write_model_card
from .report import REPORT_FILE, summary_table, target_name, write_plots, write_report, write_sparsity_report
from .tracking import publish


def finish_pruning(cfg: DictConfig, compact: PrunableViT, dense: dict[str, Any], dense_arch: PrunableViT | dict,
                   latency_model: LatencyModel, datamodule: Any, loggers: Sequence[Any], method: Mapping[str, Any],
                   snapshots: dict[float, str], history: list[dict],
                   others: dict[float, PrunableViT] | None = None, **extra: Any) -> dict:
    """Save, evaluate and time the pruned `compact` model (with the models of the other latency
    targets, `others`, when a run wrote several), and write every artefact of a structured run."""
    out_dir = Path(cfg.paths.output_dir)
    compact.save_pretrained(out_dir / "model")
    pruned = describe_model(compact, latency_model, datamodule, cfg, "pruned", with_dims=True)
    others = {t: m for t, m in (others or {}).items() if t != float(cfg.pruner.target)}
    targets = [{"target": t, **describe_model(m, latency_model, datamodule, cfg, target_name(t), with_dims=False)}
               for t, m in sorted(others.items(), reverse=True)]
    if targets:
        targets.append({"target": float(cfg.pruner.target), **{k: v for k, v in pruned.items() if k != "dims"}})
    timing = measure_side_by_side(dense_arch, compact, latency_model, cfg,
                                  others={target_name(t): m for t, m in others.items()})
    report = write_report(out_dir / REPORT_FILE, dense, pruned, float(cfg.pruner.target), method["criterion"],
                          method.get("eta"),
                          latency_model, timing=timing, targets=targets, snapshots=snapshots, events=len(history),
                          **extra)
    (out_dir / "pruning_history.json").write_text(json.dumps(history, indent=1))
    write_model_card(out_dir / "model", model_card(cfg, report))
    publish(loggers, cfg, report, write_plots(report, out_dir, history), out_dir / "model", cfg.get("log_model", False))
    print(f"\n{summary_table(report)}\n\ncompact model: {out_dir / 'model'}\nreport: {out_dir / 'report.json'}")
    return report


def finish_sparsity(cfg: DictConfig, dense: dict[str, Any], levels: list[dict], method: Mapping[str, Any],
                    loggers: Sequence[Any], **extra: Any) -> dict:
    """report.json, the accuracy-sparsity plot and the loggers' share of a sparsity run (`method`: the
    sparsifier's `describe()`)."""
    out_dir = Path(cfg.paths.output_dir)
    report = write_sparsity_report(out_dir / REPORT_FILE, dense, levels, method["criterion"], method["pattern"],
                                   method["distribution"],
                                   OmegaConf.to_container(cfg.pruner, resolve=True), **extra)
    publish(loggers, cfg, report, write_plots(report, out_dir))
    return report


def model_card(cfg: DictConfig, report: dict) -> dict[str, Any]:
    """What the model card beside model/ says: where the model came from and what it was measured at."""
    pruned, timing = report["pruned"], report.get("timing")
    source = cfg.model.get("timm_name") or cfg.model.get("pretrained_dir") or "a randomly initialised ViT"
    speedup = pruned.get("speedup_vs_timm") or pruned.get("speedup")
    return {"source": source, "target": f"{report['target_latency']} of the dense latency ({report['latency_model']})",
            "speedup": speedup,
            "device": f"{timing['setup']['device']} {timing['setup']['dtype']} batch {timing['setup']['batch_size']}, "
                      f"vs {'timm' if pruned.get('speedup_vs_timm') else 'our'} dense model" if timing else None,
            "top1": pruned.get("top1"), "dataset": "data.val of this run" if pruned.get("top1") is not None else None,
            "pruner": report["criterion"]}
