"""Pruning (stage 1: one-shot latency search + refit, or NViT's saliency while fine-tuning),
compaction, then fine-tuning of the compact model (stage 2).

    python train.py                                  # the CPU demo on DeiT-Tiny (conf/train.yaml)
    python train.py +experiment=nvit_base            # the paper recipe (conf/experiment/)
    python train.py -m pruner=gradual pruner.eta=0,5e-4 pruner.target=0.5,0.7   # a sweep, one run dir per job
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import hydra
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from nvit_lightning.app import (
    build,
    build_all,
    build_run,
    check_teacher,
    config_dir,
    is_rank_zero,
    lock_explicit_run_dir,
    log,
    save_config,
    setup_environment,
    work_device,
)
from nvit_lightning.build import build_cnn_teacher
from nvit_lightning.callbacks import GlobalPruning, InterruptCheckpoint, SparsitySweep
from nvit_lightning.errors import check_cli_args, cli_errors, hydra_exit_codes
from nvit_lightning.finish import finish_pruning, finish_sparsity
from nvit_lightning.latency.timing import prunable_spec
from nvit_lightning.measure import calibration_data, describe_model, describe_sparse, val_accuracy
from nvit_lightning.models import PrunableViT
from nvit_lightning.module import NViTModule
from nvit_lightning.oneshot import prune_and_refit, structured_reconstruction
from nvit_lightning.oneshot_state import check_before_hydra as check_oneshot_resume
from nvit_lightning.oneshot_state import has_state as has_oneshot_state
from nvit_lightning.oneshot_state import open_state
from nvit_lightning.pruning import Pruner
from nvit_lightning.resume import check_before_hydra, check_resume, finetune_resume_path, resume_path
from nvit_lightning.sparsity.distill import sparse_distillation
from nvit_lightning.sweep import metric_value


def make_module(cfg: DictConfig, model, stage: str, teacher=None, step_offset: int = 0) -> NViTModule:
    d, s = cfg.distill, cfg.schedule
    cnn = build_cnn_teacher(**d.cnn_teacher) if d.cnn_teacher else None
    prune = stage == "prune"
    # plain containers: the module's hyperparameters go into checkpoints, loaded with weights_only=True
    mixup = OmegaConf.to_container(d.mixup) if d.mixup else None
    return NViTModule(
        model, optimizer=build(s.optimizer if prune else s.finetune_optimizer),
        scheduler=build(s.scheduler if prune else s.finetune_scheduler), kl_weight=d.kl_weight,
        temperature=d.temperature if prune else d.finetune_temperature, kl_from_start=not prune,
        teacher=teacher, label_smoothing=d.label_smoothing, mixup=mixup, cnn_teacher=cnn,
        cnn_alpha=d.cnn_alpha, max_nonfinite_skips=cfg.max_nonfinite_skips, stage=stage, step_offset=step_offset)


def train(cfg: DictConfig) -> dict:
    pruner = build(cfg.pruner)  # bad options fail before any model or data is loaded
    return PIPELINES[pruner.output](cfg, pruner)


def prune_and_finetune(cfg: DictConfig, pruner: Pruner) -> dict:
    """A masked-output pruner: stage 1 prunes (in one shot, or while fine-tuning when the pruner is
    `gradual`), the model is compacted, stage 2 fine-tunes the compact model."""
    out_dir = Path(cfg.paths.output_dir)
    check_teacher(cfg)
    if not pruner.gradual and cfg.ckpt_path is not None and not has_oneshot_state(cfg):
        raise ValueError(f"ckpt_path resumes the pruning-while-training stage; pruner={pruner.name} prunes in one "
                         f"shot (minutes) and has no stage-1 checkpoint: run again without ckpt_path")
    # a one-shot pruner's ckpt_path=last: its saved state (checked here), then stage 2's checkpoint if any
    oneshot = None if pruner.gradual or not is_rank_zero() else open_state(cfg, "train.py")
    if pruner.gradual or cfg.ckpt_path is None:
        check_resume(cfg, pruner)  # the checkpoints and their settings, before any work or file written
    datamodule, model, latency_model = build_run(cfg)
    pruner.check(model, latency_model)  # bad group sizes, an unreachable target: before the dense evaluation
    dense_arch = prunable_spec(model)  # timed beside the pruned model at the end
    reconstruction = structured_reconstruction(build(cfg.reconstruction) if cfg.reconstruction else None)
    if is_rank_zero():
        save_config(cfg, out_dir)
        log.info(f"latency model: {latency_model.describe()}; output: {out_dir}")
        dense = describe_model(model, latency_model, datamodule, cfg, "dense", with_dims=True)

    loggers = build_all(cfg.logger)
    if pruner.gradual:
        # ---- stage 1: prune while fine-tuning, with KL to the dense model after the first event ------
        pruning = GlobalPruning(pruner, latency_model, reconstruction, snapshot_dir=str(out_dir / "snapshots"))
        module = make_module(cfg, model, "prune")
        trainer = build(cfg.trainer, max_epochs=cfg.schedule.prune_max_epochs,
                        callbacks=[pruning, *build_all(cfg.callbacks)], logger=loggers or False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg.ckpt_path, out_dir / "checkpoints"))
        if not pruning.done:
            raise ValueError(f"pruning stopped at {pruning.pruner.latency_ratio():.3f} of the dense latency, "
                             f"before the target {pruner.target}: raise schedule.prune_max_epochs or "
                             f"pruner.groups_per_event, and resume with hydra.run.dir=<run> ckpt_path=last")
        compact, teacher, step = module.student.compact(), module.teacher, trainer.global_step
        snapshots, history = pruning.snapshots, pruning.history
        others = {t: PrunableViT.from_pretrained(path) for t, path in snapshots.items()} if is_rank_zero() else {}
    else:
        # ---- stage 1, one shot: the pruner on calibration images, refit to the dense model -----------
        teacher = copy.deepcopy(model).eval()
        calib, batches = calibration_data(pruner, datamodule, cfg.calib_batches,
                                          reconstruction.batches if reconstruction else 0)
        batches = list(batches)  # decoded once, reused by the pruner and the refit
        # DDP's other ranks prune alike (the same batches and decisions) but write nothing
        others, snapshots, history = prune_and_refit(
            pruner, model, teacher, latency_model, batches, calib, reconstruction, device=work_device(cfg),
            progress=is_rank_zero(), snapshot_dir=out_dir / "snapshots" if is_rank_zero() else None, state=oneshot)
        compact, step = others[pruner.target], 0

    # ---- stage 2: fine-tune the compact model (fresh optimizer state: nothing stale survives) ---------
    if cfg.schedule.finetune_epochs > 0:
        finetune = make_module(cfg, compact, "finetune", teacher=teacher, step_offset=step)
        callbacks = build_all(cfg.callbacks)
        finetune_dir = out_dir / "checkpoints" / "finetune"
        for callback in callbacks:  # stage-2 checkpoints must not overwrite stage 1's (resumable) ones
            if isinstance(callback, ModelCheckpoint | InterruptCheckpoint):
                callback.dirpath = str(finetune_dir)
        trainer = build(cfg.trainer, max_epochs=cfg.schedule.finetune_epochs, logger=loggers or False,
                        callbacks=callbacks)
        trainer.fit(finetune, datamodule=datamodule, ckpt_path=finetune_resume_path(cfg.ckpt_path, finetune_dir))
        compact = finetune.student

    if not is_rank_zero():
        return {}
    report = finish_pruning(cfg, compact, dense, dense_arch, latency_model, datamodule, loggers, pruner.describe(),
                            snapshots, history, others=others)
    if oneshot is not None:
        oneshot.finish()
    return report


def sparsity_sweep(cfg: DictConfig, pruner: Pruner, max_steps: int | None = None) -> dict:
    """`+experiment=ovit_sweep`: sparsify to each level in turn, fine-tuning with KL to the dense model
    and the zeros fixed between levels; one model per level under sparse/ (callbacks.SparsitySweep).
    `max_steps` stops the run early (as an interruption would)."""
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("sweep") is None:
        raise ValueError(f"pruner={pruner.name} in train.py runs a sparsity sweep: use +experiment=ovit_sweep "
                         f"(or python prune.py pruner=... for one-shot sparsity)")
    distillation = sparse_distillation(build(cfg.reconstruction) if cfg.reconstruction else None)
    check_resume(cfg, pruner)
    datamodule, model, latency_model = build_run(cfg)
    model = model.compact()
    pruner.check(model, latency_model)
    sweep = SparsitySweep(pruner, calibration_data(pruner, datamodule, cfg.calib_batches)[1],
                          cfg.sweep.steps_per_level, save_dir=str(out_dir / "sparse"),
                          checkpoint_dir=str(out_dir / "checkpoints"), distillation=distillation,
                          reference=copy.deepcopy(model).eval() if distillation else None,
                          distill_batches=datamodule.calib_dataloader(cfg.reconstruction.batches) if distillation
                          else None)
    if is_rank_zero():
        save_config(cfg, out_dir)
        dense = {"params": model.num_params(), **val_accuracy(model, datamodule, cfg, "dense")}
    module = make_module(cfg, model, "sweep")
    loggers = build_all(cfg.logger)
    trainer = build(cfg.trainer, max_steps=max_steps or sweep.total_steps, max_epochs=-1,
                    logger=loggers or False, callbacks=[sweep, *build_all(cfg.callbacks)])
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg.ckpt_path, out_dir / "checkpoints"))
    if not sweep.done:
        raise ValueError(f"the sweep stopped after {sorted(sweep.saved)} of {sweep.levels}: resume with "
                         f"hydra.run.dir=<run> ckpt_path=last")
    if not is_rank_zero():
        return {}
    levels = [describe_sparse(PrunableViT.from_pretrained(path), pruner, level, path, datamodule, cfg)
              for level, path in sorted(sweep.saved.items())]
    method = {**pruner.describe(), "criterion": f"{pruner.name} sweep"}
    return finish_sparsity(cfg, dense, levels, method, loggers, steps_per_level=cfg.sweep.steps_per_level)


# what a run does with a pruner's models, by the kind of model it makes (`Pruner.output`)
PIPELINES = {"masked": prune_and_finetune, "sparse": sparsity_sweep}


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@cli_errors
def _main(cfg: DictConfig) -> float | None:
    return metric_value(train(cfg), cfg.get("optimized_metric"))  # what a sweeper (Optuna) optimises


def main() -> None:
    """`nvit-train` and `python train.py`: Hydra overrides from the command line."""
    setup_environment()  # before Hydra composes: paths.root_dir reads NVIT_ROOT
    check_cli_args(sys.argv[1:])  # a hydra.run.dir that cannot be a directory: one line, exit 2
    lock_explicit_run_dir(sys.argv[1:])
    if not check_oneshot_resume("train", "train.py", sys.argv[1:]):  # a one-shot stage 1's saved state
        check_before_hydra("train", sys.argv[1:])  # a refused resume (ckpt_path) changes no file of the run
    hydra_exit_codes(_main)  # Hydra's own errors (pruner=hesian, an unknown key) exit 2 too
