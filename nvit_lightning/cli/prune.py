"""One-/few-shot pruning of a checkpoint to a latency target, compaction, export and report.

    python prune.py                                   # DeiT-Tiny to 0.7x CPU latency (conf/prune.yaml)
    python prune.py pruner.criterion=magnitude recovery_steps=100
    python prune.py mode=export checkpoint=outputs/train/<run>/checkpoints/last.ckpt
    python prune.py pruner=ovit                       # oViT: one sparse model per sparsity level
"""

from __future__ import annotations

import copy
import sys
from functools import partial
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from nvit_lightning.app import (
    build,
    build_all,
    build_run,
    config_dir,
    lock_explicit_run_dir,
    save_config,
    setup_environment,
    work_device,
)
from nvit_lightning.data import ViTDataModule
from nvit_lightning.errors import check_cli_args, cli_errors, hydra_exit_codes
from nvit_lightning.export import onnx_mode
from nvit_lightning.finish import finish_pruning, finish_sparsity
from nvit_lightning.measure import calibration_data, describe_model, describe_sparse, val_accuracy
from nvit_lightning.models import PrunableViT
from nvit_lightning.oneshot import (
    prune_and_refit,
    prune_step,
    recover,
    repair_step,
    structured_reconstruction,
    write_sparse,
)
from nvit_lightning.oneshot_state import check_before_hydra as check_oneshot_resume
from nvit_lightning.oneshot_state import open_state
from nvit_lightning.pruning import Pruner
from nvit_lightning.pruning.interrupt import Checkpoint
from nvit_lightning.resume import load_train_checkpoint
from nvit_lightning.sparsity.distill import SparseReconstruction, distill_sparse, sparse_distillation
from nvit_lightning.sweep import metric_value


def export(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    if not cfg.checkpoint:
        raise ValueError("mode=export needs checkpoint=<train run>/checkpoints/last.ckpt")
    student = load_train_checkpoint(cfg.checkpoint)
    compact = student.compact() if student.masked else student  # a stage-2 checkpoint's is compact already
    compact.save_pretrained(out_dir / "model")
    print(f"compact model {compact.dims.emb=} {compact.num_params() / 1e6:.2f}M params -> {out_dir / 'model'}")
    return {"model": str(out_dir / "model")}


def prune(cfg: DictConfig, pruner: Pruner) -> dict:
    """Structural pruning to `pruner.target` (and its snapshots) by a masked-output pruner: the
    latency search (`pruner=obs_search`) or NViT's ranking in events (`pruner=oneshot | hessian |
    ...`), then the refit, compaction, an optional recovery fine-tune, evaluation and the report."""
    out_dir = Path(cfg.paths.output_dir)
    if pruner.target >= 1.0:
        raise ValueError(f"pruner={pruner.name} keeps the whole model: prune.py needs a pruner that removes "
                         f"something (obs_search, oneshot, ovit, ...); to fine-tune without pruning use "
                         f"python train.py pruner=none")
    datamodule, model, latency_model = build_run(cfg)
    pruner.check(model, latency_model)  # an unreachable target: before the dense evaluation
    state = open_state(cfg, "prune.py")  # ckpt_path=last: the saved one-shot state, checked
    dense_model = copy.deepcopy(model).eval()
    reconstruction = structured_reconstruction(build(cfg.reconstruction) if cfg.reconstruction else None)
    save_config(cfg, out_dir)
    dense = describe_model(dense_model, latency_model, datamodule, cfg, "dense", with_dims=True)
    loggers = build_all(cfg.logger)

    calib, batches = calibration_data(pruner, datamodule, cfg.calib_batches,
                                      reconstruction.batches if reconstruction else 0)
    batches = list(batches)  # decoded once, reused by the pruner and the refit
    compacts, snapshots, history = prune_and_refit(pruner, model, dense_model, latency_model, batches, calib,
                                                   reconstruction, work_device(cfg), out_dir / "snapshots", state=state)
    compact = compacts[pruner.target]
    if cfg.recovery_steps > 0:
        d = cfg.distill
        trainer = build(cfg.trainer, max_steps=cfg.recovery_steps, max_epochs=-1, logger=loggers or False,
                        enable_checkpointing=False)
        compact = recover(compact, dense_model, datamodule, trainer, build(cfg.schedule.finetune_optimizer),
                          d.kl_weight, d.temperature, d.label_smoothing, cfg.max_nonfinite_skips)
    report = finish_pruning(cfg, compact, dense, dense_model, latency_model, datamodule, loggers, pruner.describe(),
                            snapshots, history, others=compacts, calib_batches=calib,
                            recovery_steps=cfg.recovery_steps, pruner=OmegaConf.to_container(cfg.pruner, resolve=True),
                            reconstruction=OmegaConf.to_container(cfg.reconstruction) if cfg.reconstruction else None)
    state.finish()
    return report


def sparsify(cfg: DictConfig, pruner: Pruner) -> dict:
    """A sparse-output pruner (`pruner=ovit | woodfisher | global_magnitude`): one sparse model per
    level under sparse/, each block-distilled when `reconstruction=block_distill`."""
    out_dir = Path(cfg.paths.output_dir)
    if cfg.recovery_steps > 0:
        raise ValueError("recovery_steps works with structural pruning only: a plain fine-tune would refill "
                         "the zeros of a sparse model (set recovery_steps=0)")
    reconstruction = build(cfg.reconstruction) if cfg.reconstruction else None
    distillation = sparse_distillation(reconstruction)  # the refit of whole layers does not apply
    datamodule, model, latency_model = build_run(cfg)
    dense = model.compact().eval()  # mask-free: dead structures are gone, not counted as zeros
    pruner.check(dense, latency_model)
    save_config(cfg, out_dir)

    state = open_state(cfg, "prune.py")  # ckpt_path=last: the saved state, checked
    report_dense = {"params": dense.num_params(), **val_accuracy(dense, datamodule, cfg, "dense")}
    _, batches = calibration_data(pruner, datamodule, cfg.calib_batches)
    levels = []
    with state.running():
        models, _, _ = prune_step(pruner, dense, latency_model, list(batches), work_device(cfg), True, state)
        for level, sparse in models.items():
            extra = {}
            if distillation is not None:  # the same images as the structured reconstruction's
                reconstruct = partial(_reconstruct_level, cfg, distillation, sparse, dense, level, datamodule,
                                      list(pruner.layers(sparse)))
                extra = repair_step(f"the reconstruction of sparsity {level:.2f}", level, sparse, state, reconstruct)
            path = write_sparse(sparse, out_dir / "sparse", level)
            levels.append({**describe_sparse(sparse, pruner, level, path, datamodule, cfg), **extra})
            if distillation is not None:  # runs take minutes per level: each level's result as it comes
                print(f"sparsity {level:.2f}: top-1 {extra['before_reconstruction'].get('top1')} ({pruner.name} "
                      f"alone) -> {levels[-1].get('top1')} after the reconstruction "
                      f"({extra['distillation']['seconds']} s)", flush=True)
    report = finish_sparsity(cfg, report_dense, levels, pruner.describe(), build_all(cfg.logger),
                             reconstruction=OmegaConf.to_container(cfg.reconstruction) if distillation else None)
    state.finish()
    return report


def _reconstruct_level(cfg: DictConfig, distillation: SparseReconstruction, sparse: PrunableViT, dense: PrunableViT,
                       level: float, datamodule: ViTDataModule, layers: list[str], checkpoint: Checkpoint) -> dict:
    """A sparse level's report entries: its top-1 as the sparsifier left it, then its reconstruction
    (zeros held), in place, on the calibration images the structured reconstruction uses."""
    before = val_accuracy(sparse, datamodule, cfg, f"sparsity {level:.2f}, before")
    batches = datamodule.calib_dataloader(distillation.batches)
    return {"before_reconstruction": before,
            "distillation": distill_sparse(distillation, sparse, dense, batches, layers, work_device(cfg),
                                           checkpoint=checkpoint)}


# what a run does with a pruner's models, by the kind of model it makes (`Pruner.output`)
PIPELINES = {"masked": prune, "sparse": sparsify}


def run(cfg: DictConfig) -> dict:
    """`mode=prune`: the configured pruner and the pipeline for the models it makes."""
    pruner = build(cfg.pruner)  # bad options fail before any model or data is loaded
    return PIPELINES[pruner.output](cfg, pruner)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="prune")
@cli_errors
def _main(cfg: DictConfig) -> float | None:
    if cfg.mode == "export":
        export(cfg)
    elif cfg.mode == "onnx":
        onnx_mode(cfg)
    elif cfg.mode == "prune":
        report = run(cfg)
        return metric_value(report, cfg.get("optimized_metric"))  # what a sweeper (Optuna) optimises
    else:
        _bad_mode(cfg.mode)
    return None


def _bad_mode(mode: str) -> None:
    raise ValueError(f"unknown mode '{mode}': use mode=prune, mode=export or mode=onnx")


def main() -> None:
    """`nvit-prune` and `python prune.py`: Hydra overrides from the command line."""
    setup_environment()  # before Hydra composes: paths.root_dir reads NVIT_ROOT
    check_cli_args(sys.argv[1:])  # a hydra.run.dir that cannot be a directory: one line, exit 2
    lock_explicit_run_dir(sys.argv[1:])
    check_oneshot_resume("prune", "prune.py", sys.argv[1:])  # a refused resume changes no file of the run
    try:
        hydra_exit_codes(_main)  # Hydra's own errors (pruner=hesian, an unknown key) exit 2 too
    except KeyboardInterrupt:  # Ctrl-C outside the one-shot pipeline (which stops after its block, saved)
        print("SIGINT: stopped; what the one-shot pipeline finished is kept in <run>/checkpoints/oneshot/ "
              "(the same command with ckpt_path=last resumes it)", file=sys.stderr)
        sys.exit(130)
