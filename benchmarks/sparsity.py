"""One-shot sparsity of DeiT-Tiny: oViT against WoodFisher and global magnitude, unstructured and 2:4.

    python benchmarks/sparsity.py --out benchmarks/results/sparsity
    python benchmarks/sparsity.py --nvit-model outputs/prune/<run>/model   # + NViT compact model, then oViT
    python benchmarks/sparsity.py --out benchmarks/results/sparsity_reconstruction \
        --methods "oViT + block distillation" "oViT 2:4 + block distillation"   # + reconstruction
    python benchmarks/sparsity.py --out benchmarks/results/sparsity_reconstruction --append \
        --methods "oViT + block distillation" --levels "[0.6,0.8]" --nvit-model outputs/prune/<run>/model
    python benchmarks/sparsity.py --out benchmarks/results/sparsity_reconstruction --append --methods \
        --report "oViT + block distillation (16 passes)" outputs/prune/<run>/report.json   # a prune.py run's rows

Every method runs exactly as `python prune.py pruner=<method>` does (the same configs and code path):
the Fisher from per-sample gradients on the 1000-image ImageNet sample (eval transform), sparsity over
the block linears (q, k, v, proj, fc1, fc2), one model per level (oViT: the Fisher computed again at each
of `pruner.steps` = 4 equal steps to the highest level; "oViT, 1 step": one Fisher at the dense
weights, as before); top-1 on the 1300 validation images,
which calibration never sees. The damping of each second-order method is its config default, chosen
on held-out sample images (README). The plain rows run with `reconstruction=none`. A "+ block
distillation" run (`reconstruction=block_distill`) or "+ masked refit" run
(`reconstruction=sparse_refit`: the least-squares refit of each sparse row on its kept weights) also
reports each level before its reconstruction (the same oViT model, same run) as "<method>, alone".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from nvit_lightning.app import setup_environment

ROOT = Path(__file__).resolve().parents[1]
LEVELS = "[0.5,0.6,0.7,0.8]"
# the reconstruction of each sparse model, zeros held (docs/sparsity_reconstruction.md for the settings)
NONE = ["reconstruction=none"]  # the same as prune.py's default (least_squares) for sparse models
DISTILL = ["reconstruction=block_distill"]
RECONSTRUCTIONS = {"block distillation": DISTILL, "masked refit": ["reconstruction=sparse_refit"]}
RUNS = {  # name: prune.py overrides
    "oViT": ["pruner=ovit", f"pruner.sparsities={LEVELS}", *NONE],
    "WoodFisher": ["pruner=woodfisher", f"pruner.sparsities={LEVELS}", *NONE],
    "global magnitude": ["pruner=global_magnitude", f"pruner.sparsities={LEVELS}", *NONE],
    "oViT 2:4": ["pruner=ovit", "pruner.pattern=2:4", "pruner.sparsities=null", *NONE],
    "WoodFisher 2:4": ["pruner=woodfisher", "pruner.pattern=2:4", "pruner.sparsities=null", *NONE],
    "magnitude 2:4": ["pruner=global_magnitude", "pruner.pattern=2:4", "pruner.sparsities=null", *NONE],
    **{f"oViT + {step}": ["pruner=ovit", f"pruner.sparsities={LEVELS}", *how] for step, how in RECONSTRUCTIONS.items()},
    # oViT before `pruner.steps` (one Fisher at the dense weights for every level; the default is 4 steps)
    "oViT, 1 step": ["pruner=ovit", "pruner.steps=1", f"pruner.sparsities={LEVELS}", *NONE],
    "oViT, 1 step + block distillation": ["pruner=ovit", "pruner.steps=1", f"pruner.sparsities={LEVELS}", *DISTILL],
    **{f"oViT 2:4 + {step}": ["pruner=ovit", "pruner.pattern=2:4", "pruner.sparsities=null", *how]
       for step, how in RECONSTRUCTIONS.items()},
}


def run(overrides: list[str], out_dir: Path) -> dict:
    from nvit_lightning.cli import prune

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("prune", overrides=[*overrides, f"paths.output_dir={out_dir}"])
    start = time.time()
    report = prune.run(cfg)
    report["seconds"] = round(time.time() - start)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sparsity")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nvit_sparsity"), help="where the models go")
    parser.add_argument("--methods", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--nvit-model", type=Path, help="a prune.py model/ dir: also sparsify it to 50 %% by oViT")
    parser.add_argument("--nvit-reconstruction", choices=["none", *RECONSTRUCTIONS],
                        help="of the NViT + oViT run (default: that of the last --methods entry with one, else none)")
    parser.add_argument("--levels", help="sparsities of the unstructured runs, e.g. [0.5,0.7] (default: all four)")
    parser.add_argument("--overrides", nargs="*", default=[], help="more prune.py overrides for every run, e.g. "
                        "reconstruction.distillation.epochs=4")
    parser.add_argument("--report", nargs=2, action="append", default=[], metavar=("NAME", "REPORT_JSON"),
                        help="add the rows of a finished prune.py run (its report.json), e.g. --report "
                        "'oViT + block distillation (16 passes)' outputs/prune/<run>/report.json; its time is unknown")
    parser.add_argument("--append", action="store_true", help="keep the rows already in --out's sparsity.json (a row "
                        "run again gains the new levels)")
    args = parser.parse_args()
    setup_environment()
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "sparsity.json"
    results = json.loads(saved.read_text()) if args.append and saved.is_file() else {}
    for name in args.methods:
        overrides = [f"pruner.sparsities={args.levels}" if o.startswith("pruner.sparsities=[") and args.levels else o
                     for o in RUNS[name]]
        merge(results, rows(name, run([*overrides, *args.overrides],
                                      args.work / name.replace(" ", "_").replace(":", "of"))))
    if args.nvit_model:
        step = args.nvit_reconstruction or next((name.split(" + ", 1)[1] for name in reversed(args.methods)
                                                 if " + " in name), "none")
        name = "NViT compact + oViT 50 %" + ("" if step == "none" else f" + {step}")
        report = run(["pruner=ovit", "pruner.sparsities=[0.5]", "model=from_dir",
                      f"model.pretrained_dir={args.nvit_model}", *RECONSTRUCTIONS.get(step, NONE), *args.overrides],
                     args.work / ("nvit_ovit" if step == "none" else f"nvit_ovit_{step.replace(' ', '_')}"))
        merge(results, rows(name, report))
    for name, path in args.report:
        merge(results, rows(name, json.loads(Path(path).read_text())))
    saved.write_text(json.dumps(results, indent=2))
    (args.out / "sparsity.md").write_text(table(results))
    plot(results, args.out / "sparsity.png")
    print(table(results))


def merge(results: dict, new: dict) -> None:
    """Add `new` rows; a row already there (an --append run of other levels) gains the new levels,
    and its time becomes that of both runs."""
    for name, row in new.items():
        old = results.get(name)
        if old == row:
            continue
        if old is None or old["dense_top1"] != row["dense_top1"]:
            results[name] = row
            continue
        for key in ("levels", "distill_seconds", "refit_seconds"):
            if key in row:
                old[key] = dict(sorted({**old.get(key, {}), **row[key]}.items()))
        old["seconds"] = None if None in (old["seconds"], row["seconds"]) else old["seconds"] + row["seconds"]


def rows(name: str, report: dict) -> dict[str, dict]:
    """The benchmark row(s) of one run: its models, and, after a reconstruction, the same run's models
    before it (the wall time then covers both)."""
    seconds = report.get("seconds")  # None: a prune.py run added with --report
    out = {name: {"dense_top1": report["dense"]["top1"], "seconds": seconds,
                  "levels": {f"{e['sparsity']:.2f}": e["top1"] for e in report["sparse"]}}}
    if all("before_reconstruction" in e for e in report["sparse"]):
        out[name]["distill_seconds"] = {f"{e['sparsity']:.2f}": e["distillation"]["seconds"] for e in report["sparse"]}
        step = next((step for step in RECONSTRUCTIONS if f" + {step}" in name), None)
        if step is None:
            raise SystemExit(f"{name!r}: a run with a reconstruction is named '<method> + <"
                             + "|".join(RECONSTRUCTIONS) + ">[ (details)]'")
        base = name.split(f" + {step}")[0]
        alone = f"{base}, alone" if step == "block distillation" else f"{base}, alone (before {step})"
        if any("refit_seconds" in e["distillation"] for e in report["sparse"]):
            out[name]["refit_seconds"] = {f"{e['sparsity']:.2f}": e["distillation"]["refit_seconds"]
                                          for e in report["sparse"]}
        out[alone] = {"dense_top1": report["dense"]["top1"], "seconds": seconds,
                      "levels": {f"{e['sparsity']:.2f}": e["before_reconstruction"]["top1"] for e in report["sparse"]}}
    for key, row in out.items():
        print(key, json.dumps(row), flush=True)
    return out


def table(results: dict) -> str:
    levels = sorted({level for r in results.values() for level in r["levels"]})
    lines = ["| method | before | " + " | ".join(f"{float(s):.0%}" for s in levels) + " | time |",
             "|---|---|" + "---|" * len(levels) + "---|"]
    for name, r in results.items():
        cells = [f"{r['levels'][s]:.1f}" if s in r["levels"] else "" for s in levels]
        wall = "" if r["seconds"] is None else f"{r['seconds']} s"
        lines.append(f"| {name} | {r['dense_top1']:.1f} | " + " | ".join(cells) + f" | {wall} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        if "2:4" in name or "NViT" in name:
            continue
        xs = [float(s) for s in r["levels"]]
        ax.plot(xs, list(r["levels"].values()), "o-", label=name)
    ax.axhline(next(iter(results.values()))["dense_top1"], color="gray", ls=":", label="dense")
    ax.set_xlabel("sparsity of the block linears (one-shot, global)")
    ax.set_ylabel("top-1 on 1300 ImageNet val images (%)")
    ax.legend(fontsize="x-small", loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
