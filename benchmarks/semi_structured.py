"""Speed-up of 2:4 sparse weights on a GPU's sparse tensor cores, per linear and for whole DeiTs.

    python benchmarks/semi_structured.py --out benchmarks/results/semi_structured

For each DeiT size, every block linear's weight gets a 2:4 magnitude mask (the speed of the kernels
does not depend on which weights are kept, only on the pattern); the masked dense model and the same
model after `to_semi_structured` are timed side by side (CUDA events, interleaved rounds), per
linear on the activations of a batch (tokens = batch x 197) and for the whole forward. The logits of
the two must agree: the sparse kernels compute the same function. Needs a CUDA GPU of compute
capability 8.0+; elsewhere it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nvit_lightning.latency.timing import measure_ms
from nvit_lightning.models import PrunableViT, ViTDims
from nvit_lightning.models.registry import DEIT_VARIANTS
from nvit_lightning.sparsity import MagnitudeSparsifier
from nvit_lightning.sparsity.layers import sparsifiable_layers
from nvit_lightning.sparsity.semi_structured import check_semi_structured_device, to_semi_structured

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 197


def two_four_model(name: str, dtype: torch.dtype) -> PrunableViT:
    """A mask-free DeiT of timm variant `name` (random weights) with 2:4 magnitude-masked block linears."""
    emb, depth, heads, distilled = DEIT_VARIANTS[name]
    model = PrunableViT(ViTDims.uniform(emb, depth, heads), distilled=distilled, masked=False)
    (sparse,) = MagnitudeSparsifier(sparsities=None, pattern="2:4")(model).values()
    return sparse.eval().cuda().to(dtype)


def interleaved_ms(fns: dict[str, object], rounds: int, repeats: int) -> dict[str, float]:
    """Median over rounds of each callable's median time; the callables alternate every round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(measure_ms(fn, "cuda", warmup=5, repeats=repeats))
    return {name: statistics.median(t) for name, t in times.items()}


def layer_speedups(dense: PrunableViT, sparse: PrunableViT, batch: int, rounds: int, repeats: int) -> list[dict]:
    """Dense vs sparse time of block 0's linears on random activations of `batch` images."""
    rows = []
    sparse_layers = sparsifiable_layers(sparse)
    for name, layer in sparsifiable_layers(dense).items():
        if not name.startswith("blocks.0."):
            continue
        x = torch.randn(batch * TOKENS, layer.in_features, device="cuda", dtype=layer.weight.dtype)
        twin = sparse_layers[name]
        ms = interleaved_ms({"dense": lambda layer=layer, x=x: F.linear(x, layer.weight, layer.bias),
                             "2:4": lambda twin=twin, x=x: F.linear(x, twin.weight, twin.bias)}, rounds, repeats)
        rows.append({"layer": name.removeprefix("blocks.0."), "shape": [layer.out_features, layer.in_features],
                     "dense_ms": ms["dense"], "sparse_ms": ms["2:4"], "speedup": ms["dense"] / ms["2:4"]})
    return rows


def benchmark(name: str, batches: list[int], dtype: torch.dtype, rounds: int, repeats: int) -> dict:
    torch.manual_seed(0)
    dense = two_four_model(name, dtype)
    sparse = copy.deepcopy(dense)
    left_dense = to_semi_structured(sparse)
    result = {"model": name, "left_dense": left_dense, "batches": []}
    for batch in batches:
        images = torch.randn(batch, 3, 224, 224, device="cuda", dtype=dtype)
        with torch.inference_mode():
            ref, out = dense(images).float(), sparse(images).float()
        ms = interleaved_ms({"dense": lambda x=images: dense(x), "2:4": lambda x=images: sparse(x)}, rounds, repeats)
        result["batches"].append({
            "batch": batch, "dense_ms": ms["dense"], "sparse_ms": ms["2:4"], "speedup": ms["dense"] / ms["2:4"],
            "max_abs_logit_diff": (out - ref).abs().max().item(), "logit_scale": ref.abs().max().item(),
            "layers": layer_speedups(dense, sparse, batch, rounds, repeats)})
    return result


def markdown(results: list[dict], device: str, dtype: str) -> str:
    lines = [f"Device: {device}, {dtype}, 2:4 on every block linear (q, k, v, proj, fc1, fc2).", "",
             "| model | batch | dense ms | 2:4 ms | speed-up | max logit diff | q (k, v) / proj / fc1 / fc2 speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        for b in r["batches"]:
            per = {row["layer"]: row["speedup"] for row in b["layers"]}
            layers = " / ".join(f"{per[k]:.2f}x" for k in ("attn.q", "attn.proj", "mlp.fc1", "mlp.fc2"))
            lines.append(f"| {r['model']} | {b['batch']} | {b['dense_ms']:.2f} | {b['sparse_ms']:.2f} | "
                         f"{b['speedup']:.2f}x | {b['max_abs_logit_diff']:.3g} (of {b['logit_scale']:.3g}) | "
                         f"{layers} |")
        if r["left_dense"]:
            lines.append(f"| {r['model']}: left dense | {r['left_dense']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "semi_structured")
    parser.add_argument("--models", nargs="*", default=["deit_tiny_patch16_224", "deit_small_patch16_224",
                                                        "deit_base_patch16_224"], choices=list(DEIT_VARIANTS))
    parser.add_argument("--batches", nargs="*", type=int, default=[64, 256])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    try:
        check_semi_structured_device("cuda")
    except RuntimeError as err:
        print(f"skipped: {err}")
        return
    start, dtype = time.time(), getattr(torch, args.dtype)
    results = [benchmark(name, args.batches, dtype, args.rounds, args.repeats) for name in args.models]
    device = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "dtype": args.dtype, "torch": torch.__version__, "seconds": round(time.time() - start)}
    (args.out / "semi_structured.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    (args.out / "semi_structured.md").write_text(markdown(results, device, args.dtype))
    print(markdown(results, device, args.dtype))


if __name__ == "__main__":
    main()
