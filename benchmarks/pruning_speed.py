"""Cost of NViT's machinery: saliency accumulation per training step, and one pruning decision.

    python benchmarks/pruning_speed.py --out benchmarks/results

1. DeiT-Tiny, batch 32, CPU: a training step (forward, backward, AdamW) with and without
   `criterion.accumulate()`, interleaved pairs, median ratio (goal <= 1.05x).
2. One full pruning decision (`GlobalPruner.select`: rank every group of every layer by penalised
   saliency, cut at the latency target) and applying it (`Structure.prune`: masks, zeroed slices),
   for DeiT-Tiny/Small/Base dims, random weights and scores (goal < 50 ms for DeiT-B, ~40k units).
3. Scaling with model size: `accumulate()` and the saliency overhead of a batch-8 step, per dims.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

import nvit_lightning.models  # noqa: F401  (registers nvit_* in timm)
from nvit_lightning.latency import FlopsLatency
from nvit_lightning.pruning import GlobalPruner, Structure
from nvit_lightning.pruning.criteria import HessianCriterion, RandomCriterion


def step_overhead(name: str, pairs: int, batch: int) -> dict:
    model = timm.create_model(name).train()
    structure = Structure(model, {"head": 1})
    criterion = HessianCriterion(structure)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))

    def step(with_saliency: bool) -> float:
        t0 = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if with_saliency:
            criterion.accumulate()
        optimizer.step()
        return time.perf_counter() - t0

    step(True), step(False)  # warm-up
    plain, with_saliency, ratios = [], [], []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)  # alternate so drift hits both
        times = {flag: step(flag) for flag in order}
        plain.append(times[False])
        with_saliency.append(times[True])
        ratios.append(times[True] / times[False])
    accumulate = []
    for _ in range(5):
        t0 = time.perf_counter()
        criterion.accumulate()
        accumulate.append((time.perf_counter() - t0) * 1e3)
    return {"model": name, "units": sum(layer.size for layer in structure), "batch": batch, "pairs": pairs,
            "step_s_median": statistics.median(plain),
            "step_with_saliency_s_median": statistics.median(with_saliency),
            "ratio_median": statistics.median(ratios), "accumulate_ms": statistics.median(accumulate)}


def decision_time(name: str, repeats: int) -> dict:
    decide, apply, units = [], [], 0
    for r in range(repeats):
        model = timm.create_model(name)
        structure = Structure(model, {"head": 1})
        units = sum(layer.size for layer in structure)
        pruner = GlobalPruner(structure, FlopsLatency(), eta=1.0, groups_per_event=64, targets=[0.1])
        scores = RandomCriterion(structure, seed=r).scores()
        t0 = time.perf_counter()
        chosen, _ = pruner.select(scores)
        t1 = time.perf_counter()
        structure.prune(chosen)
        t2 = time.perf_counter()
        decide.append((t1 - t0) * 1e3)
        apply.append((t2 - t1) * 1e3)
    return {"model": name, "units": units, "groups": len(chosen), "decision_ms_median": statistics.median(decide),
            "decision_ms_max": max(decide), "apply_ms_median": statistics.median(apply)}


MODELS = ("nvit_deit_tiny_patch16_224", "nvit_deit_small_patch16_224", "nvit_deit_base_patch16_224")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--scaling-pairs", type=int, default=3)
    parser.add_argument("--scaling-batch", type=int, default=8)
    args = parser.parse_args()
    result = {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "step_overhead": step_overhead(MODELS[0], args.pairs, args.batch),
              "decision": [decision_time(n, args.repeats) for n in MODELS],
              "scaling": [step_overhead(n, args.scaling_pairs, args.scaling_batch) for n in MODELS]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pruning_speed.json").write_text(json.dumps(result, indent=2))
    o = result["step_overhead"]
    lines = ["| measurement | value |", "|---|---|",
             f"| DeiT-Tiny train step, batch {o['batch']} (median) | {o['step_s_median'] * 1e3:.0f} ms |",
             f"| same step + saliency accumulation (median) | {o['step_with_saliency_s_median'] * 1e3:.0f} ms |",
             f"| overhead ratio (median of {o['pairs']} interleaved pairs) | {o['ratio_median']:.3f}x |",
             f"| `accumulate()` alone (median) | {o['accumulate_ms']:.1f} ms |", "",
             "| model dims | prunable units | groups chosen | decision (median) | decision (max) | apply (median) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {d['model']} | {d['units']} | {d['groups']} | {d['decision_ms_median']:.1f} ms | "
              f"{d['decision_ms_max']:.1f} ms | {d['apply_ms_median']:.1f} ms |" for d in result["decision"]]
    lines += ["", f"| model dims | prunable units | `accumulate()` | train step, batch {args.scaling_batch} | "
              "saliency overhead |", "|---|---|---|---|---|"]
    lines += [f"| {s['model']} | {s['units']} | {s['accumulate_ms']:.1f} ms | {s['step_s_median'] * 1e3:.0f} ms | "
              f"{s['ratio_median']:.3f}x |" for s in result["scaling"]]
    (out / "pruning_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
