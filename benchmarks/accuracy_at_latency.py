"""Accuracy at equal latency: NViT's criteria vs baselines and Torch-Pruning, one-shot and after a
short recovery fine-tune with KL distillation to the dense model.

    pip install -r benchmarks/requirements.txt      # torch-pruning, for the baseline
    python benchmarks/accuracy_at_latency.py --out benchmarks/results

Real DeiT-Tiny (conf/prune.yaml: model, data, CPU lookup table at batch 32). Saliency is calibrated
on a fixed random subset of the 1000-image ImageNet sample, then the model is pruned through the
targets in order (a compact snapshot at each), re-scoring saliency on 2 of those batches before every
event, as `prune.py` does. "hessian (tuned η)" uses the best η > 0 of a grid, judged by one-shot top-1
on held-out sample images (never the validation images) at the 0.7 target. Torch-Pruning prunes the
timm model with its ViT recipe (Taylor importance, uniform ratio over embedding, head dims and MLP),
on the same calibration batches, its ratio bisected until its *measured* speed-up equals that of
hessian (η = 0) at each target. Every model is converted to the same compact PrunableViT for
timing, evaluation and recovery (the conversion is checked to compute the same function). Speed-ups
are measured side by side: the dense model is timed right before each pruned one.
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
from nvit_lightning.evaluation import evaluate, measure_latency
from nvit_lightning.models import PrunableViT, from_timm
from nvit_lightning.oneshot import calibrator, recover
from nvit_lightning.pruning import build_pruning, prune_to_targets

ROOT = Path(__file__).resolve().parents[1]
Batches = list[tuple[torch.Tensor, torch.Tensor]]


def load_setup(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("prune", overrides=[*overrides, "paths.output_dir=/tmp/nvit_benchmark"])
    datamodule, dense, latency_model = build_run(cfg)
    return cfg, datamodule, dense.eval(), latency_model


# ---- NViT's criteria ------------------------------------------------------------------------------
def pruning_for(cfg, model: PrunableViT, latency_model, criterion: str, eta: float, targets: list[float]):
    p = cfg.pruner
    return build_pruning(model, latency_model, criterion, eta, targets, p.groups_per_event, p.group_sizes,
                         p.divisors, p.ema_beta, cfg.seed)


def calibrated_state(cfg, dense: PrunableViT, latency_model, criterion: str, calib: Batches) -> dict:
    """Criterion state after accumulating saliency over the calibration batches (once per criterion)."""
    model = copy.deepcopy(dense)
    _, scorer, _ = pruning_for(cfg, model, latency_model, criterion, 0.0, [0.5])
    calibrator(model, calib, scorer)()
    scorer.end_interval()
    return scorer.state_dict()


def prune_snapshots(cfg, dense: PrunableViT, latency_model, criterion: str, state: dict, eta: float,
                    targets: list[float], rescore_batches: Batches) -> dict[float, PrunableViT]:
    """Compact models at each latency target, pruned in order from one calibrated criterion state
    (and re-scored on `rescore_batches` before every later event, when there are any)."""
    model = copy.deepcopy(dense)
    _, scorer, pruner = pruning_for(cfg, model, latency_model, criterion, eta, targets)
    scorer.load_state_dict(state)
    snapshots = {}

    def on_event(event) -> None:
        for target in event.targets_reached:
            snapshots[target] = model.compact().eval()

    prune_to_targets(pruner, scorer, calibrate=lambda: None, rescore=bool(rescore_batches), on_event=on_event,
                     recalibrate=calibrator(model, rescore_batches, scorer))
    return snapshots


def eta_scale(cfg, dense: PrunableViT, latency_model, criterion: str, state: dict, quantile: float = 0.1) -> float:
    """η at which a typical group's latency penalty η·ΔLat equals the saliency of the groups pruning
    starts with (the `quantile` of group saliencies: they are heavy-tailed, the median is far too big)."""
    structure, scorer, pruner = pruning_for(cfg, copy.deepcopy(dense), latency_model, criterion, 0.0, [0.5])
    scorer.load_state_dict(state)
    saliency = pruner.rank(scorer.scores()).scores.quantile(quantile)
    latency_drop = torch.tensor(list(pruner.latency_deltas(structure.live_dims()).values())).median()
    return float(saliency / latency_drop)


# ---- Torch-Pruning --------------------------------------------------------------------------------
def torch_pruning_model(timm_model: torch.nn.Module, ratio: float) -> PrunableViT:
    """Torch-Pruning's timm ViT recipe (examples/transformers/prune_timm_vit.py): Taylor importance
    from the gradients already in `timm_model`, uniform ratio, head dims pruned, classifier kept."""
    import timm
    import torch_pruning as tp

    model = copy.deepcopy(timm_model)
    for copied, original in zip(model.parameters(), timm_model.parameters()):
        copied.grad = None if original.grad is None else original.grad.clone()
    attention = [m for m in model.modules() if isinstance(m, timm.models.vision_transformer.Attention)]
    pruner = tp.pruner.BasePruner(
        model, torch.randn(1, 3, 224, 224), global_pruning=False,
        importance=tp.importance.GroupTaylorImportance(), pruning_ratio=ratio, ignored_layers=[model.head],
        num_heads={m.qkv: m.num_heads for m in attention}, prune_num_heads=False, prune_head_dims=True,
        round_to=1)
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


def torch_pruning_snapshots(cfg, calib: Batches, speedup_goal: dict[float, float],
                            speedup: Callable[[PrunableViT], tuple[float, float]], steps: int
                            ) -> tuple[dict[float, PrunableViT], dict[float, float]]:
    """Per target, bisect Torch-Pruning's ratio until its measured speed-up matches the goal;
    returns the models and the ratios chosen."""
    import timm

    from nvit_lightning.models.convert import load_state_dict_file

    timm_model = timm.create_model(cfg.model.timm_name).eval()  # the same weights, timm's own module
    timm_model.load_state_dict(load_state_dict_file(cfg.model.checkpoint))
    for images, labels in calib:  # the recipe: gradients summed over the calibration batches
        F.cross_entropy(timm_model(images), labels).backward()
    snapshots, ratios = {}, {}
    for target, goal in speedup_goal.items():
        lo, hi = 0.0, 0.9
        for _ in range(steps):
            ratio = (lo + hi) / 2
            _, achieved = speedup(torch_pruning_model(timm_model, ratio))
            lo, hi = (ratio, hi) if achieved < goal else (lo, ratio)
        snapshots[target] = torch_pruning_model(timm_model, hi)  # the smallest ratio reaching the goal
        ratios[target] = hi
    return snapshots, ratios


# ---- one row of the table -------------------------------------------------------------------------
def measure_row(model: PrunableViT, latency_model, speedup, val: Batches) -> dict:
    dims = model.live_dims()
    size = model.size_of(dims)
    ms, measured_speedup = speedup(model)
    return {"params_m": size["params"] / 1e6, "gmac": size["macs"] / 1e9,
            "lut_ms": latency_model.model_latency(dims), "measured_ms": ms, "measured_speedup": measured_speedup,
            **evaluate(model, val, desc="evaluate")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.8, 0.7, 0.5])
    parser.add_argument("--methods", nargs="+",
                        default=["hessian", "hessian_tuned", "taylor", "magnitude", "random", "torch_pruning"])
    parser.add_argument("--calib-batches", type=int, default=16, help="batches of 32 sample images")
    parser.add_argument("--rescore-batches", type=int, default=2,
                        help="re-score saliency on this many of the calibration batches before every event "
                             "after the first (0: score once)")
    parser.add_argument("--tune-batches", type=int, default=4, help="held-out sample batches to tune η on")
    parser.add_argument("--eta-grid", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3],
                        help="η > 0 candidates, in units of the η where the penalty ~ the lowest saliencies")
    parser.add_argument("--recovery-steps", type=int, default=50)
    parser.add_argument("--recovery-lr", type=float, default=1e-4)
    parser.add_argument("--val-batches", type=int, default=None, help="limit (default: all 1300 images)")
    parser.add_argument("--bisect-steps", type=int, default=6)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra prune.yaml overrides")
    args = parser.parse_args()
    setup_environment()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    t_start = time.time()
    cfg, datamodule, dense, latency_model = load_setup(args.overrides)
    batch = latency_model.meta.get("batch_size", 1)

    def latency_ms(model: PrunableViT) -> float:
        return measure_latency(model, batch, num_threads=latency_model.meta.get("num_threads"))

    dense_compact = dense.compact().eval()

    def speedup(model: PrunableViT) -> tuple[float, float]:
        """(ms, measured speed-up over dense), dense timed right before: this machine's speed drifts."""
        reference = latency_ms(dense_compact)
        ms = latency_ms(model)
        return ms, reference / ms

    print("caching data ...", flush=True)
    calib = list(datamodule.calib_dataloader(args.calib_batches))
    tune = list(datamodule.calib_dataloader(args.tune_batches, skip_batches=args.calib_batches))
    val = list(datamodule.val_dataloader())[: args.val_batches]
    rescore = calib[: args.rescore_batches]
    rows = [{"method": "dense", "target": 1.0, "one_shot": measure_row(dense, latency_model, speedup, val)}]
    print(rows[0], flush=True)

    snapshots: dict[str, dict[float, PrunableViT]] = {}
    states: dict[str, dict] = {}
    etas: dict[str, float] = {}
    eta_tuning: dict[str, dict[float, float]] = {}
    for method in args.methods:
        if method == "torch_pruning":
            continue
        criterion = "hessian" if method.startswith("hessian") else method
        if criterion not in states:
            states[criterion] = calibrated_state(cfg, dense, latency_model, criterion, calib)
        eta = 0.0
        if method == "hessian_tuned":
            scale = eta_scale(cfg, dense, latency_model, criterion, states[criterion])
            tuning = {}
            for factor in [0.0, *args.eta_grid]:  # η = 0 only as the reference point
                model = prune_snapshots(cfg, dense, latency_model, criterion, states[criterion],
                                        factor * scale, [0.7], rescore)[0.7]
                tuning[factor * scale] = evaluate(model, tune, desc="tune η")["top1"]
            eta = max((e for e in tuning if e > 0), key=lambda e: (tuning[e], -e))  # the best η > 0
            print(f"η tuning on {len(tune) * 32} held-out sample images: {tuning} -> {eta:.4g}", flush=True)
            etas[method], eta_tuning[method] = eta, tuning
        snapshots[method] = prune_snapshots(cfg, dense, latency_model, criterion, states[criterion], eta,
                                            args.targets, rescore)
    if "torch_pruning" in args.methods:
        reference = snapshots.get("hessian") or next(iter(snapshots.values()))
        goal = {t: speedup(m)[1] for t, m in reference.items()}
        snapshots["torch_pruning"], tp_ratios = torch_pruning_snapshots(cfg, calib, goal, speedup,
                                                                        args.bisect_steps)

    trainer_kwargs = dict(accelerator="cpu", devices=1, max_steps=args.recovery_steps, max_epochs=-1,
                          logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
    d, teacher = cfg.distill, dense.compact().eval()  # same function as dense, without mask multiplies
    for method in args.methods:
        for target in args.targets:
            model = snapshots[method][target]
            row = {"method": method, "target": target, "eta": etas.get(method, 0.0),
                   "one_shot": measure_row(model, latency_model, speedup, val)}
            if method == "torch_pruning":
                row["torch_pruning_ratio"] = tp_ratios[target]
            if args.recovery_steps > 0:
                L.seed_everything(cfg.seed, workers=True)  # the same batches for every method
                student = recover(copy.deepcopy(model).train(), teacher, datamodule, L.Trainer(**trainer_kwargs),
                                  build(cfg.schedule.finetune_optimizer, lr=args.recovery_lr), d.kl_weight,
                                  d.temperature, d.label_smoothing)
                row["recovered"] = evaluate(student, val, desc="evaluate recovered")
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {"machine": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__,
              "latency_model": latency_model.describe(), "calib_images": len(calib) * calib[0][1].numel(),
              "val_images": sum(len(y) for _, y in val), "recovery_steps": args.recovery_steps,
              "recovery_lr": args.recovery_lr, "recovery_batch": datamodule.batch_size, "etas": etas,
              "eta_tuning_top1": {m: {f"{e:.4g}": a for e, a in t.items()} for m, t in eta_tuning.items()},
              "rescore_batches": args.rescore_batches, "groups_per_event": cfg.pruner.groups_per_event,
              "minutes": (time.time() - t_start) / 60, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "accuracy_at_latency.json").write_text(json.dumps(result, indent=2))
    table = markdown(result)
    (out / "accuracy_at_latency.md").write_text(table)
    print(table)


NAMES = {"dense": "dense DeiT-Tiny", "hessian": "NViT hessian (η = 0)", "hessian_tuned": "NViT hessian (tuned η)",
         "taylor": "taylor", "magnitude": "magnitude", "random": "random",
         "torch_pruning": "Torch-Pruning (Taylor, uniform)"}


def markdown(result: dict) -> str:
    lines = [f"{result['val_images']} validation images; calibration {result['calib_images']} sample images "
             f"(re-scored on {result['rescore_batches']} x 32 of them every {result['groups_per_event']} groups); "
             f"recovery {result['recovery_steps']} steps x batch {result['recovery_batch']} "
             f"(lr {result['recovery_lr']:g}, KL to dense); latency: {result['latency_model']}", "",
             "| target | method | params (M) | GMAC | LUT ms | measured ms | speed-up | top-1 one-shot | "
             "top-5 one-shot | top-1 recovered | top-5 recovered |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        o, r = row["one_shot"], row.get("recovered", {})
        name = NAMES.get(row["method"], row["method"])
        if row["method"] == "hessian_tuned":
            name += f" η={row['eta']:.3g}"
        lines.append(
            f"| {row['target']:.1f} | {name} | {o['params_m']:.2f} | {o['gmac']:.3f} | {o['lut_ms']:.0f} | "
            f"{o['measured_ms']:.0f} | {o['measured_speedup']:.2f}x | {o['top1']:.2f} | {o['top5']:.2f} | "
            f"{_pct(r.get('top1'))} | {_pct(r.get('top5'))} |")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
