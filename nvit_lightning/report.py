"""report.json (dense vs pruned) and the summary table printed at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .latency.models import LatencyModel
from .latency.timing import paired_ratio
from .models import PrunableViT
from .plots import plot_accuracy_latency, plot_architecture
from .tracking import accuracy_latency_points, report_rows

REPORT_FILE = "report.json"  # a run's report, in its run dir; written last, once the run is finished


def model_entry(model: PrunableViT, latency_model: LatencyModel, measured_ms: float | None,
                metrics: dict[str, float] | None, with_dims: bool) -> dict[str, Any]:
    dims = model.live_dims()
    size = model.size_of(dims)
    entry = {"params": size["params"], "flops": size["macs"],
             "latency_pred_ms": latency_model.model_latency(dims), "latency_measured_ms": measured_ms,
             "top1": (metrics or {}).get("top1"), "top5": (metrics or {}).get("top5")}
    if with_dims:
        entry["dims"] = dims.to_dict()
    return entry


def write_report(path: str | Path, dense: dict, pruned: dict, target_latency: float, criterion: str,
                 eta: float, latency_model: LatencyModel, timing: dict | None = None,
                 targets: list[dict] | None = None, **extra: Any) -> dict:
    """report.json; `timing` is `measure.measure_side_by_side`'s fresh-process measurement, `targets` the
    entries of every latency target of a run that wrote several."""
    targets = targets or []
    if timing is not None:
        ms = timing["ms"]
        dense["latency_measured_ms"] = ms["dense"]
        dense["latency_measured_timm_ms"] = ms.get("timm_dense")
        _add_measured(pruned, "pruned", timing)
        for entry in targets:
            name = "pruned" if entry["target"] == target_latency else target_name(entry["target"])
            if name in ms:
                _add_measured(entry, name, timing)
    report = {"dense": dense, "pruned": pruned, "target_latency": target_latency, "criterion": criterion,
              "eta": eta, "latency_model": latency_model.describe(), "timing": timing, **extra}
    if targets:
        report["targets"] = targets
    Path(path).write_text(json.dumps(report, indent=2))
    return report


def target_name(target: float) -> str:
    """The name of a latency target's model: its snapshot directory and its key in the timing."""
    return f"target_{target:.2f}"


def _add_measured(entry: dict, name: str, timing: dict) -> None:
    """Measured ms of model `name` and its speed-ups from round-by-round ratios (`paired_ratio`),
    not from the two medians."""
    ms = timing["ms"]
    entry["latency_measured_ms"] = ms[name]
    entry["speedup"] = 1 / paired_ratio(timing, name, "dense")
    entry["speedup_vs_timm"] = 1 / paired_ratio(timing, name, "timm_dense") if "timm_dense" in ms else None


def write_plots(report: dict, out_dir: str | Path, history: list[dict] | None = None) -> list[Path]:
    """The PNGs of a finished run: `architecture.png` for a structured run, and `accuracy_latency.png`
    (or `accuracy_sparsity.png`) when it evaluated several models beside the dense one."""
    out_dir = Path(out_dir)
    plots = []
    if "sparse" in report:
        points = [{"label": r["model"], "latency": r.get("sparsity") or 0.0, "top1": r["top1"]}
                  for r in report_rows(report) if r.get("top1") is not None]
        if len(points) > 2:
            plots.append(plot_accuracy_latency(points, out_dir / "accuracy_sparsity.png",
                                               f"{report['method']} ({report['pattern']})", xlabel="sparsity"))
        return plots
    if report["dense"].get("dims") and report["pruned"].get("dims"):
        plots.append(plot_architecture(report["dense"]["dims"], report["pruned"]["dims"], out_dir / "architecture.png",
                                       history or []))
    points = accuracy_latency_points(report)
    if len(points) > 2:
        timed = report["pruned"].get("speedup_vs_timm") is not None
        plots.append(plot_accuracy_latency(
            points, out_dir / "accuracy_latency.png", f"{report['criterion']} · {report['latency_model']}",
            xlabel="measured latency / timm's dense model" if timed else "predicted latency / dense model"))
    return plots


def summary_table(report: dict) -> str:
    """Dense vs pruned: params, FLOPs, predicted and measured latency, speed-up, accuracy."""
    dense, pruned = report["dense"], report["pruned"]

    def fmt(value: Any, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def ratio(a: float | None, b: float | None) -> str:
        return "-" if not a or not b else f"{a / b:.2f}x"

    def speedup(key: str, a: float | None, b: float | None) -> str:  # measured: paired, where recorded
        return ratio(a, b) if pruned.get(key) is None else f"{pruned[key]:.2f}x"

    rows = [
        ("params (M)", fmt(dense["params"] / 1e6, ".2f"), fmt(pruned["params"] / 1e6, ".2f"),
         ratio(dense["params"], pruned["params"])),
        ("FLOPs (GMAC)", fmt(dense["flops"] / 1e9, ".3f"), fmt(pruned["flops"] / 1e9, ".3f"),
         ratio(dense["flops"], pruned["flops"])),
        ("latency predicted (ms)", fmt(dense["latency_pred_ms"], ".4g"), fmt(pruned["latency_pred_ms"], ".4g"),
         ratio(dense["latency_pred_ms"], pruned["latency_pred_ms"])),
        ("latency measured (ms)", fmt(dense["latency_measured_ms"], ".4g"),
         fmt(pruned["latency_measured_ms"], ".4g"),
         speedup("speedup", dense["latency_measured_ms"], pruned["latency_measured_ms"])),
        *([("latency measured, timm (ms)", fmt(dense["latency_measured_timm_ms"], ".4g"), "",
            speedup("speedup_vs_timm", dense["latency_measured_timm_ms"], pruned["latency_measured_ms"]))]
          if dense.get("latency_measured_timm_ms") else []),
        ("top-1 (%)", fmt(dense["top1"], ".2f"), fmt(pruned["top1"], ".2f"), ""),
        ("top-5 (%)", fmt(dense["top5"], ".2f"), fmt(pruned["top5"], ".2f"), ""),
    ]
    header = ("", "dense", "pruned", "speed-up / ratio")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(header, widths))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    title = (f"target latency {report['target_latency']} · criterion {report['criterion']} · "
             f"eta {report['eta']} · {report['latency_model']}")
    timing = report.get("timing")
    if timing:
        lines.append(f"(measured in a fresh process, {timing['setup']['device']} {timing['setup']['dtype']} "
                     f"batch {timing['setup']['batch_size']}; speed-ups: median of per-round ratios; "
                     f"timm = timm's own dense module"
                     f"{'; NOISY: the machine was busy' if timing.get('noisy') else ''})")
    return title + "\n" + "\n".join(lines)


def write_sparsity_report(path: str | Path, dense: dict, levels: list[dict], method: str, pattern: str,
                          distribution: str, pruner: dict, **extra: Any) -> dict:
    """report.json of `prune.py pruner=ovit | woodfisher | global_magnitude` and of the oViT sweep: the
    dense model and one entry per sparsity level (top-1/top-5, model directory, per-layer sparsity);
    the summary table is printed."""
    report = {"dense": dense, "sparse": levels, "method": method, "pattern": pattern, "distribution": distribution,
              "pruner": pruner, **extra}
    Path(path).write_text(json.dumps(report, indent=2))
    print(f"\n{sparsity_table(report)}\n\nreport: {path}")
    return report


def sparsity_table(report: dict) -> str:
    """One row per sparsity level: achieved sparsity, accuracy, model directory."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    dense = report["dense"]
    rows = [("dense", "0.000", pct(dense.get("top1")), pct(dense.get("top5")), "")]
    rows += [(f"{e['sparsity']:.2f}", f"{e['achieved']:.3f}", pct(e.get("top1")), pct(e.get("top5")), e["dir"])
             for e in report["sparse"]]
    header = ("sparsity", "achieved", "top-1 (%)", "top-5 (%)", "model")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return f"{report['method']} · {report['pattern']} · {report['distribution']}\n" + "\n".join(lines)
