"""The logit distillation (issue #29) after the block distillation, on the models §7's runs saved.

    python benchmarks/sparsity_logits.py --runs /tmp/nvit_sparsity/oViT_+_block_distillation \
        /tmp/nvit_sparsity_29/oViT_+_block_distillation --out benchmarks/results/sparsity_reconstruction

`prune.py pruner=ovit reconstruction=sparse_logits` runs oViT, the block distillation (4 passes, as
§7's runs), then the logit distillation, on the same calibration images. Rather than run oViT and the
block distillation again (~10 minutes per level on 2 shared cores), this takes each block-distilled
model a `benchmarks/sparsity.py` run saved (`<run>/sparse/sparsity_<s>`, with its run's
`config_resolved.yaml`: model, data, calibration batches) and applies the logit step of
`conf/reconstruction/sparse_logits.yaml` exactly as `distill_sparse` does: the run's dense model as
the reference, its first `reconstruction.batches` calibration batches, the zeros of the block
linears held. Top-1 on the run's validation images (the 1300 ImageNet val images), which
calibration never sees.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from nvit_lightning.app import build, setup_environment
from nvit_lightning.evaluation import evaluate
from nvit_lightning.models import PrunableViT
from nvit_lightning.sparsity import is_n_m_sparse, sparsifiable_layers, weight_masks
from nvit_lightning.sparsity.logit_distill import LogitDistillation

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="benchmarks/sparsity.py run dirs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sparsity_reconstruction")
    parser.add_argument("--levels", nargs="*", help="only these levels, e.g. 0.70 (default: every saved one)")
    parser.add_argument("--set", nargs="*", default=[], help="LogitDistillation settings other than "
                        "conf/reconstruction/sparse_logits.yaml's, e.g. epochs=4 trainable=all")
    args = parser.parse_args()
    setup_environment()
    torch.set_num_threads(1)  # shared cores (benchmarks/README.md §7)
    settings = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "reconstruction" / "sparse_logits.yaml").logits,
                               OmegaConf.from_dotlist(args.set))
    step = build(settings)
    saved = args.out / "logits.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    for run in args.runs:
        cfg = OmegaConf.load(run / "config_resolved.yaml")
        datamodule = build(cfg.data)
        datamodule.setup()
        dense = build(cfg.model).compact().eval()  # as prune.py's sparsify: the reference, mask-free
        calib = [x for x, _ in datamodule.calib_dataloader(cfg.reconstruction.batches)]
        for level_dir in sorted((run / "sparse").iterdir()):
            level = level_dir.name.removeprefix("sparsity_")
            if args.levels and level not in args.levels:
                continue
            results[f"{run.name}/{level}"] = one(step, level_dir, dense, calib, datamodule, run)
            saved.write_text(json.dumps(results, indent=2))
            (args.out / "logits.md").write_text(table(results))
    print(table(results))


def one(step: LogitDistillation, level_dir: Path, dense: PrunableViT, calib: list, datamodule, run: Path) -> dict:
    sparse = PrunableViT.from_pretrained(level_dir).eval()
    masks = weight_masks(sparse, list(sparsifiable_layers(sparse)))
    before = evaluate(sparse, datamodule.val_dataloader(), desc=f"{level_dir.name} before")
    start = time.time()
    kl = step(sparse, dense, calib, masks=masks)
    seconds = round(time.time() - start, 1)
    held = weight_masks(sparse, list(sparsifiable_layers(sparse)))
    assert all(torch.equal(held[name], mask) for name, mask in masks.items())  # the zeros as the distillation left them
    params = dict(sparse.named_parameters())
    two_four = all(is_n_m_sparse(params[name], 2, 4) for name in masks)
    after = evaluate(sparse, datamodule.val_dataloader(), desc=f"{level_dir.name} after")
    sparse.save_pretrained(run / "logit_distilled" / level_dir.name)
    row = {"before": before, "after": after, "logit_kl": kl, "seconds": seconds, "two_four": two_four,
           "logit_distillation": asdict(step)}
    print(level_dir, json.dumps(row), flush=True)
    return row


def table(results: dict) -> str:
    lines = ["| run / level | block distillation | + logit step | top-5 | KL (calibration) | time |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        before, after, kl = r["before"], r["after"], r["logit_kl"]
        lines.append(f"| {name} | {before['top1']:.1f} | {after['top1']:.1f} | {before['top5']:.1f} -> "
                     f"{after['top5']:.1f} | {kl[0]:.3f} -> {kl[1]:.3f} | {r['seconds']} s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
