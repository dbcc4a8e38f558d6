"""A sparse reconstruction applied to the models a `prune.py pruner=ovit reconstruction=none` run saved.

    OMP_NUM_THREADS=1 python prune.py pruner=ovit reconstruction=none hydra.run.dir=/tmp/ovit_alone
    python benchmarks/sparsity_reconstruct.py --run /tmp/ovit_alone --name "readout 0.5" \
        --overrides reconstruction=block_distill reconstruction.distillation.readout=0.5 --levels 0.50 0.60

oViT in 4 Fisher steps takes ~17 minutes per run on one thread; comparing reconstructions on the same
sparse models does not need it again. For each saved level (`<run>/sparse/sparsity_<s>`) this does
what `prune.py pruner=ovit` does after oViT with the configured reconstruction (`sparse_distillation`
of `conf/reconstruction/<...>`, then `distill_sparse`, exactly as `_reconstruct_level`): the run's
dense model as the reference, the first `reconstruction.batches` calibration batches, every zero of
the sparsified layers held (checked here). Top-1 on the validation images (the 1300 ImageNet val
images), which calibration never sees. Rows go to `--out`/reconstruct.json and reconstruct.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nvit_lightning.app import build, config_dir, setup_environment
from nvit_lightning.evaluation import evaluate
from nvit_lightning.models import PrunableViT
from nvit_lightning.sparsity import sparsifiable_layers, weight_masks
from nvit_lightning.sparsity.distill import distill_sparse, sparse_distillation

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a prune.py pruner=ovit reconstruction=none run dir")
    parser.add_argument("--name", required=True, help="the row's name, e.g. 'readout 0.5'")
    parser.add_argument("--overrides", nargs="+", required=True, help="prune.py overrides naming the reconstruction "
                        "(model and data are the run's)")
    parser.add_argument("--levels", nargs="*", help="only these levels, e.g. 0.50 (default: every saved one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sparsity_reconstruction")
    args = parser.parse_args()
    setup_environment()
    run = OmegaConf.load(args.run / "config_resolved.yaml")
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("prune", overrides=["pruner=ovit", *args.overrides])
    reconstruction = sparse_distillation(build(cfg.reconstruction))
    if reconstruction is None:
        raise SystemExit(f"reconstruction={cfg.reconstruction} does nothing to a sparse model")
    datamodule = build(run.data)  # the run's calibration and validation images
    datamodule.setup()
    dense = build(run.model).compact().eval()  # as prune.py's sparsify: the reference, mask-free
    batches = list(datamodule.calib_dataloader(reconstruction.batches))
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "reconstruct.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for level_dir in sorted((args.run / "sparse").iterdir()):
        level = level_dir.name.removeprefix("sparsity_")
        if args.levels and level not in args.levels:
            continue
        sparse = PrunableViT.from_pretrained(level_dir).eval()
        layers = list(sparsifiable_layers(sparse))
        masks = weight_masks(sparse, layers)
        before = evaluate(sparse, datamodule.val_dataloader(), desc=f"{level} before")
        report = distill_sparse(reconstruction, sparse, dense, batches, layers)
        held = weight_masks(sparse, layers)
        assert all(torch.equal(held[name], mask) for name, mask in masks.items()), "a zero moved"
        after = evaluate(sparse, datamodule.val_dataloader(), desc=f"{level} after")
        results.setdefault(args.name, {"overrides": args.overrides, "levels": {}})["levels"][level] = {
            "before": before, "after": after, **report}
        print(args.name, level, json.dumps({"before": before, "after": after, "s": report["seconds"]}), flush=True)
        saved.write_text(json.dumps(results, indent=2))
        (args.out / "reconstruct.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    levels = sorted({level for r in results.values() for level in r["levels"]})
    lines = ["| reconstruction | " + " | ".join(f"{float(s):.0%}" for s in levels) + " |",
             "|---|" + "---|" * len(levels)]
    for name, r in results.items():
        cells = [(f"{r['levels'][s]['before']['top1']:.1f} -> {r['levels'][s]['after']['top1']:.1f} "
                  f"({r['levels'][s]['seconds']:.0f} s)") if s in r["levels"] else "" for s in levels]
        lines.append(f"| {name} (`{' '.join(r['overrides'])}`) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
