"""Accuracy at equal *measured* latency: our one-shot pipeline and its variants against Torch-Pruning's
strongest configurations, magnitude and random, one-shot and after the same recovery budget.

    pip install -r benchmarks/requirements.txt      # torch-pruning, for the baselines
    python benchmarks/accuracy_at_latency.py --out benchmarks/results

Every method has one knob that sets its size: the predicted latency target for ours (one pruning run
yields every candidate, each saved as masks), the pruning ratio for Torch-Pruning. Candidates whose
lookup-table prediction lies near each target are timed in ONE fresh process, interleaved with
timm's own dense DeiT-Tiny (`nvit_lightning.latency.timing`), on the latency table's device, dtype, batch
size and threads; per target, each method's candidate whose measured latency / timm dense is within
±2 % of the target (the closest one otherwise, flagged) is evaluated on the 1300 validation images.
Calibration uses the 1000-image sample only (the validation images are never seen before the final
evaluation). Recovery: the same KL-distillation fine-tune for every method.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from nvit_lightning.app import build, build_run, setup_environment
from nvit_lightning.evaluation import evaluate
from nvit_lightning.latency.timing import paired_ratio, prunable_spec, time_in_fresh_process, timm_spec
from nvit_lightning.models import PrunableViT, from_timm
from nvit_lightning.oneshot import recover
from nvit_lightning.pruning import Structure

ROOT = Path(__file__).resolve().parents[1]
Batches = list[tuple[torch.Tensor, torch.Tensor]]
UNIT_GROUPS = dict.fromkeys(("emb", "head", "qk", "v", "mlp"), 1)

# our pipeline's variants: Hydra overrides of conf/prune.yaml (its defaults are "ours")
OURS: dict[str, list[str]] = {
    "ours": [],
    "ours + block distillation": ["reconstruction=block_distill"],
    # its learning rate before 2026-12-07 (now 2e-3 on structured models)
    "ours + block distillation, lr 1e-3": ["reconstruction=block_distill", "reconstruction.distillation.lr=1e-3"],
    # the search before 2026-12-07: whole heads and MLP neurons only, no head widths
    "ours + block distillation, heads and MLP only": ["reconstruction=block_distill", "pruner.head_dims=false"],
    # issue 28: whole sub-layers (depth) and head widths (qk = v) among the search's options; head widths
    # are on by default since 2026-12-07, so "depth" alone turns them off
    "ours + depth + block distillation": ["reconstruction=block_distill", "pruner.depth=true",
                                          "pruner.head_dims=false"],
    "ours + depth + head widths + block distillation": ["reconstruction=block_distill", "pruner.depth=true",
                                                        "pruner.head_dims=true"],
    "ours + depth + head widths": ["pruner.depth=true", "pruner.head_dims=true"],
    "ours, no reconstruction": ["reconstruction=none"],
    "saliency events (hessian) + reconstruction": ["pruner=oneshot"],
    "NViT paper ranking (hessian, η=0, every kind), no reconstruction": [
        "pruner=hessian", "pruner.ranking=penalty", "pruner.eta=0", "reconstruction=none",
        "pruner.group_sizes={emb: 16, head: 1, qk: 8, v: 8, mlp: 16}",
        "pruner.divisors={emb: 12, head: 12, qk: 2, v: 2, mlp: 1}"],
    "magnitude + reconstruction": ["pruner=oneshot", "pruner.criterion=magnitude"],
    "random + reconstruction": ["pruner=oneshot", "pruner.criterion=random"],
}
# Torch-Pruning 1.6.1: (importance, global ranking)
TORCH_PRUNING = {
    "Torch-Pruning global L2": ("l2", True),
    "Torch-Pruning global Taylor": ("taylor", True),
    "Torch-Pruning uniform Taylor (ViT recipe)": ("taylor", False),
}


def load_setup(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("prune", overrides=[*overrides, "paths.output_dir=/tmp/nvit_benchmark"])
    datamodule, dense, latency_model = build_run(cfg)
    return cfg, datamodule, dense.eval(), latency_model


# ---- candidates -----------------------------------------------------------------------------------
def our_candidates(overrides: list[str], grid: list[float], batches: Batches) -> dict[float, dict]:
    """Masks at every predicted-latency target of `grid`, from one pruning run with this variant."""
    cfg, _, dense, latency_model = load_setup(overrides)
    # every pruner: one call serves every target (the search's traces, the ranking's events)
    pruner = build(cfg.pruner, target=min(grid), snapshots=[t for t in grid if t != min(grid)])
    pruned = pruner(dense, latency_model, batches[: cfg.calib_batches])
    return {t: _masks(m) for t, m in pruned.items()}


def _masks(model: PrunableViT) -> dict:
    """The masks of a pruned model, and its q / k weights: the search's head widths (head_dims) write
    low-rank fits of the logits there, which the dense weights under the same masks would not have."""
    masks = {k: v.detach().clone() for k, v in model.masks().items()}
    return {**masks, **{k: v.detach().clone() for k, v in model.state_dict().items()
                        if ".attn.q." in k or ".attn.k." in k}}


def _apply(model: PrunableViT, masks: dict) -> PrunableViT:
    """`_masks` put back: q / k weights loaded, then masks set (zeroing the pruned slices)."""
    with torch.no_grad():
        for name, value in masks.items():
            if not name.endswith("mask"):
                model.get_parameter(name).copy_(value)
    Structure(model, UNIT_GROUPS).set_masks({k: v for k, v in masks.items() if k.endswith("mask")})
    return model


def materialise(dense: PrunableViT, masks: dict, overrides: list[str], batches: Batches) -> PrunableViT:
    """The compact model of a candidate: masks applied to the dense weights, refit when configured."""
    cfg, *_ = load_setup(overrides)
    model = _apply(copy.deepcopy(dense), masks)
    if cfg.reconstruction:
        build(cfg.reconstruction)(model, dense, batches)
    return model.compact().eval()


def torch_pruning_model(timm_model: torch.nn.Module, ratio: float, importance: str, global_pruning: bool
                        ) -> PrunableViT:
    """Torch-Pruning on timm's DeiT (gradients already in `timm_model` for Taylor): heads kept, head
    dims / MLP / embedding pruned, classifier kept, `round_to=1`; converted to a compact PrunableViT
    (checked to compute the same function)."""
    import timm
    import torch_pruning as tp

    model = copy.deepcopy(timm_model)
    for copied, original in zip(model.parameters(), timm_model.parameters()):
        copied.grad = None if original.grad is None else original.grad.clone()
    attention = [m for m in model.modules() if isinstance(m, timm.models.vision_transformer.Attention)]
    scorer = (tp.importance.GroupMagnitudeImportance(p=2) if importance == "l2"
              else tp.importance.GroupTaylorImportance())
    pruner = tp.pruner.BasePruner(
        model, torch.randn(1, 3, 224, 224), global_pruning=global_pruning, importance=scorer,
        pruning_ratio=ratio, ignored_layers=[model.head], num_heads={m.qkv: m.num_heads for m in attention},
        prune_num_heads=False, prune_head_dims=True, round_to=1)
    for group in pruner.step(interactive=True):
        group.prune()
    for m in attention:  # the recipe's fix-up, plus timm >= 1.0's attn_dim and the scale it implies
        m.num_heads = pruner.num_heads[m.qkv]
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
        m.attn_dim, m.scale = m.num_heads * m.head_dim, m.head_dim**-0.5
    converted = from_timm(model, masked=False).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        gap = (converted(x) - model.eval()(x)).abs().max().item()
    if gap > 1e-3:
        raise RuntimeError(f"Torch-Pruning model and its conversion differ by {gap}")
    return converted


def torch_pruning_candidates(cfg, batches: Batches, importance: str, global_pruning: bool,
                             ratios: list[float]) -> dict[float, PrunableViT]:
    import timm

    from nvit_lightning.models.convert import load_state_dict_file

    timm_model = timm.create_model(cfg.model.timm_name).eval()  # the same weights, timm's own module
    timm_model.load_state_dict(load_state_dict_file(cfg.model.checkpoint))
    for images, labels in batches:  # Taylor: gradients summed over the calibration batches
        F.cross_entropy(timm_model(images), labels).backward()
    return {r: torch_pruning_model(timm_model, r, importance, global_pruning) for r in ratios}


# ---- main -------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5],
                        help="measured latency / timm's dense DeiT-Tiny")
    parser.add_argument("--methods", nargs="+", default=[*OURS, *TORCH_PRUNING])
    parser.add_argument("--tolerance", type=float, default=0.02)
    parser.add_argument("--max-ratio", type=float, default=0.6, help="largest Torch-Pruning ratio tried")
    parser.add_argument("--per-target", type=int, default=3, help="candidates timed per method and target")
    parser.add_argument("--recovery-steps", type=int, default=0, help="KL fine-tune steps (0: one-shot only)")
    parser.add_argument("--recover-methods", nargs="*", default=None, help="default: every method")
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=12, help="paired timing rounds (one call per model each)")
    parser.add_argument("--val-batches", type=int, default=None, help="limit (default: all 1300 images)")
    parser.add_argument("--replot", action="store_true",
                        help="only rewrite the table and plot from <out>/accuracy_at_latency.json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.replot:
        result = json.loads((out / "accuracy_at_latency.json").read_text())
        write_outputs(result, out)
        return
    setup_environment()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    t_start = time.time()
    cfg, datamodule, dense, latency_model = load_setup([])
    needed = max(cfg.calib_batches, cfg.reconstruction.batches)
    batches = list(datamodule.calib_dataloader(needed))
    val = list(datamodule.val_dataloader())[: args.val_batches]
    dense_lut = latency_model.model_latency(dense.live_dims())
    # predicted-latency candidates around each target (each one also ends a pruning event)
    grid = sorted({round(t + d, 2) for t in args.targets for d in (0.06, 0.04, 0.02, 0.0, -0.02, -0.04)},
                  reverse=True)

    # 1. candidates of every method: (method, knob) -> (architecture, how to build the model)
    candidates: dict[str, dict[float, tuple[dict, Callable[[], PrunableViT]]]] = {}
    pruned_masks: dict[tuple[str, ...], dict[float, dict]] = {}  # the refit does not change the pruning path
    for method in args.methods:
        print(f"candidates: {method}", flush=True)
        if method in OURS:
            overrides = OURS[method]
            path_key = tuple(o for o in overrides if not o.startswith("reconstruction"))
            if path_key not in pruned_masks:
                pruned_masks[path_key] = our_candidates(overrides, grid, batches)
            for knob, masks in pruned_masks[path_key].items():
                model = _apply(copy.deepcopy(dense), masks)
                candidates.setdefault(method, {})[knob] = (
                    prunable_spec(model), lambda m=masks, o=overrides: materialise(dense, m, o, batches))
        else:
            importance, global_pruning = TORCH_PRUNING[method]
            ratios = [round(0.02 * i, 2) for i in range(1, int(args.max_ratio / 0.02) + 1)]
            models = torch_pruning_candidates(cfg, batches[: cfg.calib_batches], importance, global_pruning, ratios)
            candidates[method] = {r: (prunable_spec(m), lambda m=m: m) for r, m in models.items()}

    # 2. per target, the candidates predicted nearest; all timed in one fresh process with timm's dense
    def predicted_ratio(spec: dict) -> float:
        return latency_model.model_latency(PrunableViT(**spec["prunable"]).dims) / dense_lut

    shortlist: dict[tuple[str, float], list[float]] = {}
    for method, cands in candidates.items():
        for target in args.targets:
            near = sorted(cands, key=lambda k: abs(predicted_ratio(cands[k][0]) - target))
            shortlist[(method, target)] = near[: args.per_target]
    specs = {"timm_dense": timm_spec(cfg.model.timm_name), "dense": prunable_spec(dense)}
    for (method, _), knobs in shortlist.items():
        for knob in knobs:
            specs[f"{method}|{knob}"] = candidates[method][knob][0]
    print(f"timing {len(specs)} models in a fresh process", flush=True)
    timing = time_in_fresh_process(specs, latency_model.timing, rounds=args.rounds)
    ms = timing["ms"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "timing.json").write_text(json.dumps(timing, indent=2))

    # 3. evaluate the chosen candidate of every (method, target), and recover it
    # prune.py's recovery trainer (conf/trainer: no validation during the fine-tune, no sanity check)
    trainer_kwargs = dict(max_steps=args.recovery_steps, max_epochs=-1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)
    teacher = dense.compact().eval()
    d = cfg.distill
    rows = [{"method": "dense DeiT-Tiny", "target": 1.0, "measured_ratio": paired_ratio(timing, "dense", "timm_dense"),
             "top1": evaluate(dense, val, desc="evaluate dense")["top1"]}]
    print(rows[0], flush=True)
    for (method, target), knobs in shortlist.items():
        ratio = {k: paired_ratio(timing, f"{method}|{k}", "timm_dense") for k in knobs}
        knob = min(knobs, key=lambda k: abs(ratio[k] - target))
        model = candidates[method][knob][1]()
        size = model.size_of()
        row = {"method": method, "target": target, "knob": knob, "measured_ratio": ratio[knob],
               "within_tolerance": abs(ratio[knob] - target) <= args.tolerance, "speedup": 1 / ratio[knob],
               "lut_ratio": predicted_ratio(candidates[method][knob][0]), "params_m": size["params"] / 1e6,
               "gmac": size["macs"] / 1e9, **evaluate(model, val, desc=f"evaluate {method}")}
        if args.recovery_steps > 0 and (args.recover_methods is None or method in args.recover_methods):
            L.seed_everything(cfg.seed, workers=True)  # the same batches for every method
            student = recover(copy.deepcopy(model).train(), teacher, datamodule, build(cfg.trainer, **trainer_kwargs),
                              build(cfg.schedule.finetune_optimizer, lr=args.recovery_lr), d.kl_weight,
                              d.temperature, d.label_smoothing)
            row["recovered"] = evaluate(student, val, desc="evaluate recovered")
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "partial_rows.json").write_text(json.dumps(rows, indent=2))  # kept if a later cell fails

    result = {"machine": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "latency_model": latency_model.describe(), "timing_setup": str(latency_model.timing),
              "timm_dense_ms": ms["timm_dense"], "dense_ms": ms["dense"], "timing_spread": timing["spread"],
              "calib_images": len(batches) * batches[0][1].numel(), "val_images": sum(len(y) for _, y in val),
              "recovery_steps": args.recovery_steps, "recovery_lr": args.recovery_lr,
              "minutes": (time.time() - t_start) / 60, "rows": rows}
    (out / "accuracy_at_latency.json").write_text(json.dumps(result, indent=2))
    (out / "partial_rows.json").unlink(missing_ok=True)
    write_outputs(result, out)


def write_outputs(result: dict, out: Path) -> None:
    (out / "accuracy_at_latency.md").write_text(markdown(result))
    plot(result, out / "accuracy_at_latency.png")
    print(markdown(result))


def markdown(result: dict) -> str:
    targets = sorted({r["target"] for r in result["rows"] if r["target"] < 1}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in result["rows"] if r["target"] < 1))
    cell = {(r["method"], r["target"]): r for r in result["rows"]}
    recovered = any("recovered" in r for r in result["rows"])
    lines = [f"{result['val_images']} validation images; {result['calib_images']} calibration images of the "
             f"1000-image sample; latency {result['timing_setup']}, timm dense {result['timm_dense_ms']:.1f} ms "
             f"(our dense PrunableViT {result['dense_ms']:.1f} ms), all timed in one fresh process. Each cell: "
             f"top-1 % one-shot{' / after ' + str(result['recovery_steps']) + ' KL steps' if recovered else ''} "
             f"@ measured speed-up vs timm dense (* = outside ±2 % of the target).", "",
             "| method | " + " | ".join(f"{t:.1f}x latency" for t in targets) + " |",
             "|---|" + "---|" * len(targets)]
    for method in methods:
        cells = []
        for t in targets:
            r = cell.get((method, t))
            if r is None:
                cells.append("-")
                continue
            rec = f" / {r['recovered']['top1']:.1f}" if "recovered" in r else ""
            flag = "" if r["within_tolerance"] else "*"
            cells.append(f"{r['top1']:.1f}{rec} @ {r['speedup']:.2f}x{flag}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for method in dict.fromkeys(r["method"] for r in result["rows"] if r["target"] < 1):
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: r["speedup"])
        style = "-o" if method.startswith("ours") else "--s"
        (line,) = ax.plot([r["speedup"] for r in rows], [r["top1"] for r in rows], style, label=method,
                          markersize=4)
        recovered = [r for r in rows if "recovered" in r]
        if recovered:  # the same models after the recovery fine-tune: hollow markers, same colour
            ax.plot([r["speedup"] for r in recovered], [r["recovered"]["top1"] for r in recovered], ":",
                    marker=style[-1], color=line.get_color(), markerfacecolor="none", markersize=5,
                    label=f"{method}, + {result['recovery_steps']} KL steps")
    dense = next(r for r in result["rows"] if r["target"] == 1.0)
    ax.axhline(dense["top1"], color="gray", lw=0.8, ls=":", label="dense DeiT-Tiny")
    ax.set_xlabel("measured speed-up vs timm's DeiT-Tiny (fresh process)")
    ax.set_ylabel("top-1 % (1300 ImageNet val images)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
