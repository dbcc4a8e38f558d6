"""Our PrunableViT modules against timm's own DeiT-Tiny, forward pass at inference, side by side.

    python benchmarks/module_speed.py --out benchmarks/results/module_speed
    python benchmarks/module_speed.py --device cuda --dtype float16 --batch-size 256 \
        --arch gpu_0.90=benchmarks/results/module_speed/archs/h100_0.90.json --out <dir>

Models (random weights; speed does not depend on them): timm's `deit_tiny_patch16_224`, our dense
PrunableViT, and pruned DeiT-Tiny architectures (`--arch`, repeatable: a dims.json or model
directory; default: the one `python prune.py` chose at 0.70). Each of ours runs twice: as shipped
(q, k and v as one matrix product at inference) and with the three separate products (forced by a
no-op forward hook on each of q, k, v, which makes `Attention` take its hooked path).

On a shared machine the speed drifts by 30 % and more within minutes, so the models are timed as in
the application's fresh-process timing (`nvit_lightning.latency.timing.time_modules`): every cycle runs each
model once, in a random order, and the result is the median over cycles of each model's time
divided by timm's time in the same cycle (a paired ratio), with its quartiles.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import timm
import torch

from nvit_lightning.latency.profiler import load_arch
from nvit_lightning.latency.timing import TimingSetup, round_ratios, time_modules
from nvit_lightning.models import PrunableViT, ViTDims

# what `python prune.py` (defaults) kept at 0.70 of the predicted latency (2026-11-25)
PRUNE_PY_070 = ViTDims(192, [3, 3, 2, 2, 1, 2, 2, 2, 2, 3, 2, 2], [64] * 12, [64] * 12,
                       [624, 368, 368, 320, 368, 688, 752, 656, 640, 560, 256, 96])


def three_products(model: PrunableViT) -> PrunableViT:
    """`model` with a no-op forward hook on every q, k, v: attention then runs three products."""
    for block in model.blocks:
        for layer in (block.attn.q, block.attn.k, block.attn.v):
            layer.register_forward_hook(lambda module, args, output: None)
    return model


def parse_arch(spec: str) -> tuple[str, ViTDims]:
    """`NAME=PATH` or `PATH` (named after its folder or file) -> (name, dims)."""
    name, _, path = spec.rpartition("=")
    return name or Path(path).stem, load_arch(path)[0]


def paired_summary(result: dict, reference: str) -> dict[str, dict[str, float]]:
    """Per model of a `time_modules` result: median ms, and the median and quartiles of its
    per-round time / `reference`'s."""
    out = {}
    for name in result["ms"]:
        q1, median, q3 = statistics.quantiles(round_ratios(result, name, reference), n=4, method="inclusive")
        out[name] = {"ms": result["ms"][name], "ratio": median, "q1": q1, "q3": q3}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", default=[],
                        help="[NAME=]dims.json or save_pretrained directory of a pruned model; repeatable "
                             "(default: the 0.70 architecture of prune.py, named 'pruned')")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16")
    parser.add_argument("--cycles", type=int, default=60)
    parser.add_argument("--out", default=None, help="directory for results.json and results.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    archs = dict(parse_arch(a) for a in args.arch) if args.arch else {"pruned": PRUNE_PY_070}
    models = {
        "timm deit_tiny": timm.create_model("deit_tiny_patch16_224", pretrained=False).eval(),
        "ours, dense": PrunableViT(ViTDims.uniform(192, 12, 3), masked=False).eval(),
        "ours, dense, 3 products": three_products(PrunableViT(ViTDims.uniform(192, 12, 3), masked=False).eval()),
    }
    for name, dims in archs.items():
        models[f"ours, {name}"] = PrunableViT(dims, masked=False).eval()
        models[f"ours, {name}, 3 products"] = three_products(PrunableViT(dims, masked=False).eval())
    setup = TimingSetup(args.device, args.dtype, args.batch_size, args.threads)
    result = paired_summary(time_modules(models, setup, rounds=args.cycles), reference="timm deit_tiny")
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{args.threads} threads"
    lines = [f"{where}, {args.dtype}, batch {args.batch_size}, {args.cycles} cycles, torch {torch.__version__}",
             "", "| model | median ms | paired ratio to timm (median) | quartiles |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['ms']:.1f} | {r['ratio']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} |" for n, r in result.items()]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        setup = {"device": where, "dtype": args.dtype, "batch_size": args.batch_size, "threads": args.threads,
                 "cycles": args.cycles,
                 "archs": {n: d.to_dict() for n, d in archs.items()}, "torch": torch.__version__}
        (out / "results.json").write_text(json.dumps({"setup": setup, "models": result}, indent=1))
        (out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
