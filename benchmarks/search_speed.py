"""Wall time of the one-shot latency search (`pruner=obs_search`) per model size: the layer
statistics (forward passes over the calibration images; saved to disk), the removal traces (read
back from there, as a resumed search does), and the knapsack over every target, timed separately;
issue #28's budget is statistics + search < 1 minute for DeiT-Tiny and < 5 minutes for DeiT-Base on
2 CPU cores.

    python benchmarks/search_speed.py --out benchmarks/results/search_speed
    python benchmarks/search_speed.py --baseline HEAD   # also the committed search, side by side

Random weights and images (the time does not depend on them), the calibration set of `prune.py`'s
defaults (8 batches of 32 images), the FLOPs latency model (a table exists for DeiT-Tiny only; the
knapsack's time does not depend on the model). Variants: the default options, and `depth` +
`head_dims` (more options per block, a V trace per number of heads dropped, a logit fit per head).

`--baseline REV`: `search.py` and `structured_obs.py` as committed at git revision REV are loaded
beside the working tree's and timed on the same model and images, one after the other per model
(REV first); each row then also says whether the two made the same decisions: the same removal
order in every trace, the same widths at every target, and the largest relative differences of the
statistics and the trace costs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import timm
import torch

import nvit_lightning.models  # noqa: F401  (registers nvit_* in timm)
from nvit_lightning.latency import FlopsLatency
from nvit_lightning.pruning import search as current
from nvit_lightning.pruning.interrupt import Checkpoint, StopRequested, request_stop, stop_on_signals

MODELS = ("nvit_deit_tiny_patch16_224", "nvit_deit_small_patch16_224", "nvit_deit_base_patch16_224")
VARIANTS = {"default": {}, "depth + head widths": {"depth": True, "head_dims": True}}
TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
ROOT = Path(__file__).resolve().parents[1]


def load_baseline(rev: str) -> types.ModuleType:
    """`nvit_lightning.pruning.search` as committed at `rev`, with its own `structured_obs` of `rev`
    (both loaded as modules of the package, beside the working tree's)."""
    package = "nvit_lightning.pruning"
    for name in ("structured_obs", "search"):
        text = subprocess.run(["git", "show", f"{rev}:nvit_lightning/pruning/{name}.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        text = text.replace("from .structured_obs import", "from ._baseline_structured_obs import")
        module = types.ModuleType(f"{package}._baseline_{name}")
        module.__package__, module.__file__ = package, f"{rev}:nvit_lightning/pruning/{name}.py"
        sys.modules[module.__name__] = module
        exec(compile(text, module.__file__, "exec"), module.__dict__)
    return sys.modules[f"{package}._baseline_search"]


def time_search(impl: types.ModuleType, name: str, options: dict, batches: int, batch_size: int,
                scratch: Path) -> tuple[dict, dict]:
    """The timings of one search (`impl`: a `search` module), and what it decided (statistics,
    traces, picks per target) for the comparison."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval().with_masks()
    images = [(torch.randn(batch_size, 3, 224, 224), torch.randint(0, 1000, (batch_size,))) for _ in range(batches)]
    latency = FlopsLatency()
    search = impl.LatencySearch(target=min(TARGETS), snapshots=TARGETS[:-1], row_weights="uniform", **options)
    checkpoint = Checkpoint(scratch / f"{name}.pt")
    t0 = time.perf_counter()
    with stop_on_signals(), contextlib.suppress(StopRequested):  # stops once the statistics are saved
        request_stop()
        search.traces(model, images, progress=False, checkpoint=checkpoint)
    t1 = time.perf_counter()
    traces = search.traces(model, images, progress=False, checkpoint=checkpoint)  # from the saved statistics
    t2 = time.perf_counter()
    blocks = search.options(model, latency, traces)
    dense = latency.model_latency(model.live_dims())
    base = latency.base_latency(model.live_dims().emb)
    picks = {target: impl.cheapest_under_budget(blocks, target * dense - base, search.bins) for target in TARGETS}
    t3 = time.perf_counter()
    statistics = checkpoint.part("statistics").load()["statistics"]
    for path in scratch.glob(f"{name}*.pt"):
        path.unlink()
    return ({"model": name, "statistics_s": round(t1 - t0, 1), "traces_s": round(t2 - t1, 1),
             "knapsack_s": round(t3 - t2, 1), "total_s": round(t3 - t0, 1),
             "options_per_block": len(blocks[0].removed)},
            {"statistics": statistics, "traces": traces, "picks": picks})


def _tensors(value, prefix: str = ""):
    """(path, tensor) of every tensor in a nested structure of dicts, lists and dataclasses."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{prefix}.{i}")
    elif hasattr(value, "__dataclass_fields__"):
        for k in value.__dataclass_fields__:
            yield from _tensors(getattr(value, k), f"{prefix}.{k}")


def compare(before: dict, after: dict) -> dict:
    """Whether two searches decided the same: removal orders (every trace), picks (every target);
    the largest relative differences of the statistics and of the traces' costs."""
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double(), b.double()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if a.numel() else 0.0

    stats = dict(_tensors(before["statistics"]))
    traces = dict(_tensors(before["traces"]))
    orders = [k for k in traces if k.endswith(".order")]
    costs = [k for k in traces if k.endswith(".cost")]
    new_traces = dict(_tensors(after["traces"]))
    return {"same_orders": all(torch.equal(traces[k], new_traces[k]) for k in orders),
            "same_picks": before["picks"] == after["picks"],
            "statistics_max_rel_diff": max(rel(v, w) for (_, v), (_, w) in zip(stats.items(),
                                                                                 _tensors(after["statistics"]))),
            "cost_max_rel_diff": max(rel(new_traces[k], traces[k]) for k in costs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also time the search as committed at this git revision, and compare decisions")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    impls = {"working tree": current} if args.baseline is None else {args.baseline: load_baseline(args.baseline),
                                                                     "working tree": current}
    rows = []
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="search_speed_"))  # the statistics, saved between the two steps
    for variant in args.variants:
        for name in args.models:
            decided = {}
            for code, impl in impls.items():
                row, decided[code] = time_search(impl, name, VARIANTS[variant], args.batches, args.batch_size,
                                                 scratch)
                row = {"code": code, "variant": variant, **row, "load_average": round(os.getloadavg()[0], 1)}
                if len(decided) == 2:
                    row.update(compare(*decided.values()))
                    before = rows[-1]
                    row["speedup"] = {k: round(before[k] / max(row[k], 0.05), 1)
                                      for k in ("statistics_s", "traces_s", "knapsack_s", "total_s")}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "search_speed.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
