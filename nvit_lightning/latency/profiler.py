"""Profile a ViT block latency lookup table on the target device, and check it against a real model.

    python -m nvit_lightning.latency.profiler profile --preset deit_tiny --batch-size 32 \\
        --device cpu --dtype float32 --out data/latency/deit_tiny_cpu_b32.json
    python -m nvit_lightning.latency.profiler depth --table data/latency/deit_tiny_cpu_b32.json
    python -m nvit_lightning.latency.profiler check --table data/latency/deit_tiny_cpu_b32.json \\
        --dims outputs/pruned/model

Blocks are timed where they run: inside a mask-free `PrunableViT` whose `stack` blocks all have the
grid point's dims, under `torch.inference_mode()` with a fixed thread count (recorded in the table's
meta and re-applied by `check`). A block's latency is (model - model without blocks) / stack, so it
includes what an isolated block would miss: its weights evicted from the caches by its neighbours
and by the patch embedding and head (at batch 1 on a CPU an isolated block runs ~10 % faster than
the same block inside DeiT-Tiny). A uniform model of depth `stack` is predicted exactly by
construction.

On a CPU, `measure_ms` pins glibc's malloc thresholds first (`steady_malloc`): otherwise whether a
forward page-faults its largest activations afresh depends on the process's allocation history,
and the same model's latency jumps by ~40 % between processes.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import platform
import random
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..models.dims import ViTDims
from ..models.vit import CONFIG_FILE, LEGACY_CONFIG_FILE, WEIGHTS_FILE, Block, PrunableViT, read_model_args
from .models import AXES, CorruptTableError, LookupTableLatency
from .timing import measure_ms, steady_malloc

# Grids span the smallest dims the pruner can reach (one group of each type: EMB 16, 1 head, QK/V 8,
# MLP 16) up to the dense model, so every architecture met while pruning is inside the table.
PRESETS: dict[str, dict[str, list[int]]] = {
    "deit_tiny": dict(emb=[16, 64, 128, 192], heads=[1, 2, 3], qk=[8, 32, 64], v=[8, 32, 64],
                      mlp=[16, 256, 512, 768]),
    "deit_small": dict(emb=[16, 128, 256, 384], heads=[1, 2, 4, 6], qk=[8, 32, 64], v=[8, 32, 64],
                       mlp=[16, 512, 1024, 1536]),
    "deit_base": dict(emb=[16, 256, 512, 768], heads=[1, 4, 8, 12], qk=[8, 32, 64], v=[8, 32, 64],
                      mlp=[16, 1024, 2048, 3072]),
}

# the attention kernels that accept qk != v: flash (and cuDNN) attention need equal head dims
UNEQUAL_DIMS_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:  # platform.processor() is just "x86_64" on Linux; the model name is in /proc/cpuinfo
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _patch_grid(tokens: int) -> tuple[int, bool]:
    """(patches per side, distilled) for a token count: 197 = 14² + cls, 198 = 14² + cls + dist."""
    for prefix, distilled in ((1, False), (2, True)):
        side = math.isqrt(tokens - prefix)
        if side >= 1 and side * side == tokens - prefix:
            return side, distilled
    raise ValueError(f"tokens={tokens} is not a square number of patches plus 1 (cls) or 2 (cls + dist)")


def _base_model(emb: int, tokens: int, num_classes: int, patch_size: int) -> PrunableViT:
    """A compact PrunableViT with its blocks removed: patch embed, tokens, pos embed, norm, head."""
    side, distilled = _patch_grid(tokens)
    model = PrunableViT(ViTDims(emb, (1,), (8,), (8,), (16,)), img_size=side * patch_size,
                        patch_size=patch_size, num_classes=num_classes, distilled=distilled, masked=False)
    model.blocks = nn.ModuleList()
    return model


def _round(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def profile_lut(grid: dict[str, list[int]], tokens: int = 197, batch_size: int = 32, device: str = "cpu",
                dtype: str = "float32", warmup: int = 3, repeats: int = 10, num_classes: int = 1000,
                patch_size: int = 16, progress: bool = True, num_threads: int | None = None,
                rounds: int = 3, stack: int = 12, same_qk_v: bool = True, model: str = "custom",
                seed: int = 0, no_attn: bool = True) -> LookupTableLatency:
    """Profile the per-block latency table over `grid` (and the non-block base at every emb).

    Every grid point is timed as a compact model of `stack` identical blocks, minus the same model
    without blocks. `stack` = the depth of the models to predict is the most faithful: at batch 1 a
    block's time depends on its neighbours evicting its weights from the caches; at large batches
    activations dominate and a few blocks (e.g. 4) give the same per-block time. The 5-D table is
    timed with the attention kernels that accept qk ≠ v; with `same_qk_v`, blocks with qk = v (every
    qk value also in the v grid) are timed again with all kernels, for the table's qk = v part.

    The grid is swept `rounds` times, each time in a fresh random order, and every point keeps the
    median of its per-round medians (as `measure_ms`): a burst of load from other processes, or a
    faster spell, then spoils one sweep of a few points, not the table. `num_threads` (default: the
    current setting) is recorded in the meta.
    """
    from tqdm.auto import tqdm

    missing = set(AXES) - set(grid)
    if missing:
        raise ValueError(f"profile grid misses axes {sorted(missing)}; needs {AXES}")
    grid = {a: sorted({int(g) for g in grid[a]}) for a in AXES}
    same_grid = sorted(set(grid["qk"]) & set(grid["v"])) if same_qk_v else []
    device_t, dtype_t = torch.device(device), _torch_dtype(dtype)
    side, distilled = _patch_grid(tokens)
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    rng = random.Random(seed)  # the sweep order; weights stay random (their values do not matter)
    # per-round timings, reduced by a median over rounds at the end
    model_ms = torch.full((rounds, *(len(grid[a]) for a in AXES)), math.nan, dtype=torch.float64)
    same_ms = torch.full((rounds, len(grid["emb"]), len(grid["heads"]), len(same_grid), len(grid["mlp"])),
                         math.nan, dtype=torch.float64)
    # (table, index, dims) of every timed model
    jobs = [(model_ms, idx, tuple(grid[a][i] for a, i in zip(AXES, idx)))
            for idx in itertools.product(*(range(len(grid[a])) for a in AXES))]
    jobs += [(same_ms, idx, (grid["emb"][idx[0]], grid["heads"][idx[1]], same_grid[idx[2]],
                             same_grid[idx[2]], grid["mlp"][idx[3]]))
             for idx in itertools.product(*(range(n) for n in same_ms.shape[1:]))]
    base_ms = torch.full((rounds, len(grid["emb"])), math.nan, dtype=torch.float64)
    images = torch.randn(batch_size, 3, side * patch_size, side * patch_size, device=device_t, dtype=dtype_t)
    start = time.perf_counter()
    bar = tqdm(total=rounds * (len(jobs) + len(grid["emb"])), desc=f"profiling b{batch_size} {device}",
               disable=not progress)
    try:
        for r in range(rounds):
            bases = {e: _base_model(e, tokens, num_classes, patch_size).eval().to(device_t, dtype_t)
                     for e in grid["emb"]}
            for i, base in enumerate(bases.values()):
                base_ms[r, i] = measure_ms(lambda m=base: m(images), device_t, warmup, repeats)
                bar.update()
            # a random order keeps a slow spell from biasing one corner of the table, which
            # interpolation would turn into wrong latency differences
            rng.shuffle(jobs)
            for table, idx, (emb, heads, qk, v, mlp) in jobs:
                net = bases[emb]
                # fresh blocks every round: keeping all grid points alive would need GBs for DeiT-B
                net.blocks = nn.ModuleList(Block(emb, heads, qk, v, mlp, masked=False) for _ in range(stack))
                net.eval().to(device_t, dtype_t)
                kernels = nullcontext() if table is same_ms else sdpa_kernel(UNEQUAL_DIMS_BACKENDS)
                with kernels:
                    table[(r, *idx)] = measure_ms(lambda m=net: m(images), device_t, warmup, repeats)
                bar.update()
            for net in bases.values():
                net.blocks = nn.ModuleList()
        num_threads = torch.get_num_threads()
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    base = base_ms.nanquantile(0.5, dim=0)
    block_ms = _per_block(model_ms.nanquantile(0.5, dim=0), base.view(-1, 1, 1, 1, 1), stack)
    same_block_ms = (_per_block(same_ms.nanquantile(0.5, dim=0), base.view(-1, 1, 1, 1), stack)
                     if same_grid else None)
    meta = dict(model=model, device=device_name(device_t), device_type=device_t.type,
                dtype=str(dtype_t).removeprefix("torch."), batch_size=batch_size, tokens=tokens,
                distilled=distilled, num_classes=num_classes, patch_size=patch_size,
                num_threads=num_threads, torch=torch.__version__,
                date=datetime.datetime.now().isoformat(timespec="seconds"), warmup=warmup,
                repeats=repeats, rounds=rounds, stack=stack,
                steady_malloc=device_t.type == "cpu" and steady_malloc(),
                profile_seconds=round(time.perf_counter() - start, 1), host=platform.node(), grid=grid)
    table = LookupTableLatency(grid, block_ms, grid["emb"], [_round(m) for m in base.tolist()], meta,
                               same_grid or None, same_block_ms)
    if no_attn:  # depth pruning: blocks whose attention sub-layer is removed
        table = profile_no_attn(table, device, stack=stack, seed=seed)
    return table


def profile_no_attn(table: LookupTableLatency, device: str | None = None, rounds: int = 8, repeats: int = 2,
                    stack: int | None = None, seed: int = 0) -> LookupTableLatency:
    """`table` with its `no_attn_ms` part (depth pruning: blocks whose attention is removed, over the
    table's emb x mlp grid) measured now, on the table's device, dtype, batch size and threads.

    Each no-attention block is timed beside the full block of the same emb and mlp at the table's
    largest heads and qk = v, and the model without blocks, in `stack`-deep models, all interleaved
    in every one of `rounds` rounds (`timing.time_modules`). Per round, the no-attention block's
    share of the full block is `(no-attention model - base) / (full model - base)`; its median over
    rounds times the table's full block is stored. Paired within rounds, a shared machine's changing
    speed (today's, or the day the table was profiled) cancels from the ratio the search trades."""
    from .timing import TimingSetup, time_modules

    meta = table.meta
    stack = int(stack or meta.get("stack", 12))
    tokens, patch_size = int(meta.get("tokens", 197)), int(meta.get("patch_size", 16))
    emb_grid = [int(e) for e in table.grid["emb"].tolist()]
    mlp_grid = [int(m) for m in table.grid["mlp"].tolist()]
    heads = int(table.grid["heads"][-1])
    d = int(min(table.grid["qk"][-1], table.grid["v"][-1]))
    setup = TimingSetup(device or meta.get("device_type", "cpu"), meta.get("dtype", "float32"),
                        int(meta.get("batch_size", 1)), meta.get("num_threads"))
    start = time.perf_counter()
    shares = torch.ones(len(emb_grid), len(mlp_grid), dtype=torch.float64)
    for i, emb in enumerate(emb_grid):  # one emb at a time: a few models in memory, compared per round
        models = {"base": _base_model(emb, tokens, int(meta.get("num_classes", 1000)), patch_size)}
        for m in mlp_grid:
            for name, h in (("full", heads), ("no_attn", 0)):
                net = _base_model(emb, tokens, int(meta.get("num_classes", 1000)), patch_size)
                net.blocks = nn.ModuleList(Block(emb, h, d, d, m, masked=False) for _ in range(stack))
                models[f"{name}{m}"] = net
        result = time_modules(models, setup, rounds, repeats, warmup=2, seed=seed)["rounds"]
        for j, m in enumerate(mlp_grid):
            ratios = [(a - b) / max(f - b, 1e-9) for a, f, b in
                      zip(result[f"no_attn{m}"], result[f"full{m}"], result["base"])]
            shares[i, j] = min(max(float(torch.tensor(ratios).median()), 0.0), 1.0)
    return with_no_attn(table, shares, dict(rounds=rounds, repeats=repeats, stack=stack,
                                            seconds=round(time.perf_counter() - start, 1)))


def with_no_attn(table: LookupTableLatency, shares: Tensor, info: dict) -> LookupTableLatency:
    """`table` with `no_attn_ms` = measured `shares` (emb x mlp) of its full blocks at the largest heads
    and qk = v, smoothed: a block without attention is an MLP, whose cost is linear in its width, so
    per emb the measurements are replaced by their least-squares line over mlp (a noisy point of a
    loaded machine then cannot make a wider MLP look cheaper than a narrower one)."""
    emb_grid, mlp_grid = table.grid["emb"].tolist(), table.grid["mlp"]
    heads, d = float(table.grid["heads"][-1]), float(min(table.grid["qk"][-1], table.grid["v"][-1]))
    rows = torch.tensor([[e, heads, d, d, m] for e in emb_grid for m in mlp_grid.tolist()], dtype=torch.float64)
    in_table = table.block_latency(rows).view(len(emb_grid), len(mlp_grid))
    measured = in_table * shares
    if len(mlp_grid) > 1:
        basis = torch.stack([torch.ones_like(mlp_grid), mlp_grid], 1)  # mlp, 2
        line = torch.linalg.lstsq(basis, measured.T).solution  # 2, emb
        measured = (basis @ line).T.clamp_min(0)
    data = table.to_dict()
    data["no_attn_ms"] = {"axes": ["emb", "mlp"], "ms": measured.apply_(_round).tolist()}
    data["meta"] = {**table.meta, "no_attn": dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                                                  reference=f"heads {int(heads)}, qk = v = {int(d)}",
                                                  share_of_full_block=[[_round(x, 3) for x in r]
                                                                       for r in shares.tolist()], **info)}
    return LookupTableLatency.from_dict(data)


def _per_block(model_ms: Tensor, base_ms: Tensor, stack: int) -> Tensor:
    """(model - model without blocks) / stack, rounded to 4 significant digits."""
    block_ms = (model_ms - base_ms) / stack
    # a difference of two noisy timings: only a tiny block on a loaded machine can make it <= 0
    floor = 1e-3 * model_ms / stack
    if bool((block_ms < floor).any()):
        warnings.warn(f"{int((block_ms < floor).sum())} grid points measured no slower than the model "
                      f"without blocks; clamped. Re-profile on an idle machine or with a larger --stack",
                      stacklevel=3)
    return torch.maximum(block_ms, floor).apply_(_round)


def load_or_profile(path: str | Path, preset: str = "deit_tiny", tokens: int = 197, batch_size: int = 32,
                    device: str = "cpu", dtype: str = "float32", **profile_kwargs: object) -> LookupTableLatency:
    """The table cached at `path` when it was profiled for this preset's grid, tokens, batch size,
    device type and dtype; otherwise profile it now (`profile_lut(**profile_kwargs)`) and cache it."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    grid = PRESETS[preset]
    wanted = dict(model=preset, tokens=tokens, batch_size=batch_size, device_type=torch.device(device).type,
                  dtype=str(_torch_dtype(dtype)).removeprefix("torch."), grid=grid)
    path = Path(path)
    if path.is_file():
        try:
            table = LookupTableLatency.load(path)
        except CorruptTableError as err:
            print(f"{err}; profiling a new one")
        else:
            stale = {k: (table.meta.get(k), v) for k, v in wanted.items() if table.meta.get(k) != v}
            if not stale:
                return table
            print(f"latency table {path} does not match ({stale}); profiling a new one")
    table = profile_lut(grid, tokens=tokens, batch_size=batch_size, device=device, dtype=dtype,
                        model=preset, **profile_kwargs)  # type: ignore[arg-type]
    table.save(path)
    return table


# ---- check: predicted vs measured -------------------------------------------------------------------
def load_arch(path: str | Path) -> tuple[ViTDims, dict]:
    """Dims and PrunableViT config from a `save_pretrained` directory or its dims.json, or a
    plain ViTDims json. A masked checkpoint is reduced to its live dims (what `compact()` keeps)."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE if (path / CONFIG_FILE).is_file() else path / LEGACY_CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"dims file {path} not found")
    data = json.loads(path.read_text())
    if "dims" not in data and "model_args" not in data:  # a plain ViTDims json
        return ViTDims.from_dict(data), {}
    data = read_model_args(path)  # config.json (timm's format) or the older dims.json
    config = {k: v for k, v in data.items() if k not in ("architecture", "attn_scale_dims", "pretrained_cfg")}
    dims = ViTDims.from_dict(config.pop("dims"))
    if config.pop("masked", False) and (path.parent / WEIGHTS_FILE).is_file():
        dims = PrunableViT.from_pretrained(path.parent).live_dims()
    return dims, config


def check_table(table: LookupTableLatency, dims: ViTDims, config: dict | None = None,
                device: str | None = None, warmup: int = 3, repeats: int = 10,
                rounds: int = 3) -> dict[str, float]:
    """Build the compact model, time full forwards as the table was profiled, compare to the prediction."""
    meta = table.meta
    config = dict(config or {})
    if not config:  # plain dims: the table's own image geometry
        side, distilled = _patch_grid(meta["tokens"])
        config = dict(img_size=side * meta.get("patch_size", 16), patch_size=meta.get("patch_size", 16),
                      num_classes=meta.get("num_classes", 1000), distilled=distilled)
    patches = (config.get("img_size", 224) // config.get("patch_size", 16)) ** 2
    tokens = patches + (2 if config.get("distilled", False) else 1)
    if tokens != meta.get("tokens"):
        raise ValueError(f"the model has {tokens} tokens per image but the table was profiled for "
                         f"{meta.get('tokens')}; profile a table with --tokens {tokens}")
    device_t = torch.device(device or meta.get("device_type", "cpu"))
    dtype_t = _torch_dtype(meta.get("dtype", "float32"))
    old_threads = torch.get_num_threads()
    torch.set_num_threads(int(meta.get("num_threads", old_threads)))
    try:
        model = PrunableViT(dims, **config, masked=False).eval().to(device_t, dtype_t)
        size = config.get("img_size", 224)
        images = torch.randn(meta["batch_size"], config.get("in_chans", 3), size, size,
                             device=device_t, dtype=dtype_t)
        measured = measure_ms(lambda: model(images), device_t, warmup, repeats, rounds)
    finally:
        torch.set_num_threads(old_threads)
    predicted = table.model_latency(dims)
    return dict(predicted_ms=predicted, measured_ms=measured, rel_error=(predicted - measured) / measured)


# ---- CLI --------------------------------------------------------------------------------------------
def _int_list(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nvit_lightning.latency.profiler",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="profile a block latency lookup table")
    p.add_argument("--out", required=True, help="output table (.json)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="grid preset; --emb etc. override its axes")
    for axis in AXES:
        p.add_argument(f"--{axis}", type=_int_list, help=f"comma-separated {axis} grid values")
    p.add_argument("--model", help="model family recorded in the meta (default: the preset, or 'custom')")
    p.add_argument("--tokens", type=int, default=197, help="tokens per image (198 for distilled DeiT)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per point and round")
    p.add_argument("--rounds", type=int, default=3, help="sweeps over the grid; each point keeps its median")
    p.add_argument("--stack", type=int, default=12,
                   help="identical blocks per timed model: the depth of the models to predict")
    p.add_argument("--no-same-qk-v", action="store_true",
                   help="skip the qk = v table (fused attention kernels that need equal head dims)")
    p.add_argument("--no-depth", action="store_true", help="skip the no-attention blocks (depth pruning)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--no-progress", action="store_true")

    d = sub.add_parser("depth", help="add (or re-profile) a table's no-attention blocks (depth pruning)")
    d.add_argument("--table", required=True, help="the table to extend, rewritten in place (or to --out)")
    d.add_argument("--out", help="default: --table")
    d.add_argument("--rounds", type=int, default=8, help="interleaved rounds (median of per-round ratios)")
    d.add_argument("--repeats", type=int, default=2, help="calls per model and round")

    c = sub.add_parser("check", help="predicted vs measured latency of a compact model")
    c.add_argument("--table", required=True)
    c.add_argument("--dims", required=True,
                   help="a PrunableViT.save_pretrained directory (or its config.json / older dims.json), "
                        "or a ViTDims json")
    c.add_argument("--device", help="default: the table's device type")
    c.add_argument("--warmup", type=int, default=3)
    c.add_argument("--repeats", type=int, default=10)
    c.add_argument("--rounds", type=int, default=3)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "profile":
        grid = dict(PRESETS[args.preset]) if args.preset else {}
        grid.update({a: getattr(args, a) for a in AXES if getattr(args, a)})
        missing = [a for a in AXES if a not in grid]
        if missing:
            raise SystemExit(f"no grid for {missing}: pass --preset or --{' --'.join(missing)}")
        table = profile_lut(grid, tokens=args.tokens, batch_size=args.batch_size, device=args.device,
                            dtype=args.dtype, warmup=args.warmup, repeats=args.repeats,
                            num_classes=args.num_classes, patch_size=args.patch_size,
                            progress=not args.no_progress, num_threads=args.threads, rounds=args.rounds,
                            stack=args.stack, same_qk_v=not args.no_same_qk_v, no_attn=not args.no_depth,
                            model=args.model or args.preset or "custom")
        table.save(args.out)
        print(f"wrote {args.out}: {table.describe()} in {table.meta['profile_seconds']} s")
    elif args.command == "depth":
        table = profile_no_attn(LookupTableLatency.load(args.table), rounds=args.rounds, repeats=args.repeats)
        table.save(args.out or args.table)
        print(f"wrote {args.out or args.table}: {table.describe()}; a block without attention costs "
              f"{table.meta['no_attn']['share_of_full_block']} of the full block (emb x mlp)")
    else:
        table = LookupTableLatency.load(args.table)
        dims, config = load_arch(args.dims)
        try:
            result = check_table(table, dims, config, args.device, args.warmup, args.repeats, args.rounds)
        except ValueError as err:  # e.g. an architecture outside the table's grid: one line, not a traceback
            raise SystemExit(f"check: {err}") from None
        print(table.describe())
        print(f"predicted {result['predicted_ms']:.3f} ms  measured {result['measured_ms']:.3f} ms  "
              f"relative error {100 * result['rel_error']:+.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
