"""Wall time of the one-shot latency search (`pruner=obs_search`) per model size: the layer
statistics (forward + backward over the calibration images; saved to disk), the removal traces (read
back from there, as a resumed search does), and the knapsack over every target, timed separately;
issue #28's budget is statistics + search < 1 minute for DeiT-Tiny and < 5 minutes for DeiT-Base on
2 CPU cores.

    python benchmarks/search_speed.py --out benchmarks/results/search_speed

Random weights and images (the time does not depend on them), the calibration set of `prune.py`'s
defaults (8 batches of 32 images), the FLOPs latency model (a table exists for DeiT-Tiny only; the
knapsack's time does not depend on the model). Variants: the default options, and `depth` +
`head_dims` (more options per block, a V trace per number of heads dropped, a logit fit per head).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import timm
import torch

import nvit_lightning.models  # noqa: F401  (registers nvit_* in timm)
from nvit_lightning.latency import FlopsLatency
from nvit_lightning.pruning.interrupt import Checkpoint, StopRequested, request_stop, stop_on_signals
from nvit_lightning.pruning.search import LatencySearch, cheapest_under_budget

MODELS = ("nvit_deit_tiny_patch16_224", "nvit_deit_small_patch16_224", "nvit_deit_base_patch16_224")
VARIANTS = {"default": {}, "depth + head widths": {"depth": True, "head_dims": True}}
TARGETS = (0.9, 0.8, 0.7, 0.6, 0.5)


def time_search(name: str, options: dict, batches: int, batch_size: int, scratch: Path) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name).eval().with_masks()
    images = [(torch.randn(batch_size, 3, 224, 224), torch.randint(0, 1000, (batch_size,))) for _ in range(batches)]
    latency = FlopsLatency()
    search = LatencySearch(target=min(TARGETS), snapshots=TARGETS[:-1], row_weights="uniform", **options)
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
    for target in TARGETS:
        cheapest_under_budget(blocks, target * dense - base, search.bins)
    t3 = time.perf_counter()
    for path in scratch.glob(f"{name}*.pt"):
        path.unlink()
    return {"model": name, "statistics_s": round(t1 - t0, 1), "traces_s": round(t2 - t1, 1),
            "knapsack_s": round(t3 - t2, 1), "total_s": round(t3 - t0, 1),
            "options_per_block": len(blocks[0].removed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} at start", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="search_speed_"))  # the statistics, saved between the two steps
    for variant in args.variants:
        for name in args.models:
            row = {"variant": variant, **time_search(name, VARIANTS[variant], args.batches, args.batch_size,
                                                     scratch)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "search_speed.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
