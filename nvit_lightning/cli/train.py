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
    config_dir,
    is_latency_search,
    is_no_pruning,
    is_rank_zero,
    is_sparsifier,
    lock_explicit_run_dir,
    log,
    save_config,
    setup_environment,
    work_device,
)
from nvit_lightning.build import build_cnn_teacher
from nvit_lightning.callbacks import GlobalPruning, InterruptCheckpoint, SparsitySweep
from nvit_lightning.errors import cli_errors
from nvit_lightning.finish import finish_pruning, finish_sparsity
from nvit_lightning.measure import calibration_batches, describe_model, describe_sparse, val_accuracy
from nvit_lightning.models import PrunableViT
from nvit_lightning.module import NViTModule
from nvit_lightning.oneshot import search_and_refit, snapshot_path
from nvit_lightning.pruning.none import check_teacher
from nvit_lightning.sparsity.distill import sparse_distillation
from nvit_lightning.sweep import metric_value
from nvit_lightning.timing import prunable_spec


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


def resume_path(ckpt_path: str | None, checkpoint_dir: Path) -> str | None:
    """`ckpt_path=last`: the newest stage-1 checkpoint of this run dir; a path: that file. A fresh run
    into a dir that already holds checkpoints overwrites them, with a warning."""
    existing = sorted(checkpoint_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if ckpt_path == "last":
        if not existing:
            raise FileNotFoundError(f"ckpt_path=last: no checkpoint in {checkpoint_dir} (set hydra.run.dir to the "
                                    f"run to resume, or ckpt_path=<file>)")
        return str(existing[-1])
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path {ckpt_path} not found (ckpt_path=last resumes the newest checkpoint "
                                f"of hydra.run.dir)")
    if ckpt_path is None and existing and is_rank_zero():
        log.warning(f"{checkpoint_dir} already holds checkpoints of an earlier run: this fresh run overwrites "
                    f"them (resume with ckpt_path=last instead)")
    return ckpt_path


def finetune_resume_path(ckpt_path: str | None, finetune_dir: Path) -> str | None:
    """`ckpt_path=last` goes on with stage 2 where it stopped, once stage 1 (resumed past its targets)
    has compacted the same model again; otherwise stage 2 starts afresh."""
    last = finetune_dir / "last.ckpt"
    if ckpt_path == "last" and last.is_file():
        log.info(f"resuming the fine-tuning stage from {last}")
        return str(last)
    return None


def train(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    if is_sparsifier(cfg.pruner):
        return sparsity_sweep(cfg)
    search = build(cfg.pruner) if is_latency_search(cfg.pruner) else None  # bad options fail first
    no_pruning = build(cfg.pruner) if is_no_pruning(cfg.pruner) else None  # pruner=none: stage 2 alone
    if no_pruning is not None:
        check_teacher(cfg.model, cfg.distill.kl_weight)
    if search is not None and cfg.ckpt_path is not None:
        raise ValueError("ckpt_path resumes the pruning-while-training stage; pruner=obs_search prunes in one "
                         "shot (minutes) and has no stage-1 checkpoint: run again without ckpt_path")
    datamodule, model, latency_model = build_run(cfg)
    if search is not None:
        search.check(model, latency_model)  # an unreachable target: before the dense evaluation
    dense_arch = prunable_spec(model)  # timed beside the pruned model at the end
    reconstruction = build(cfg.reconstruction) if cfg.reconstruction else None
    if search is None and no_pruning is None:
        pruning = GlobalPruning(latency_model, snapshot_dir=str(out_dir / "snapshots"),
                                reconstruction=reconstruction, **cfg.pruner)
        pruning.build(model)  # fails now, not after an epoch, on bad group sizes or unreachable targets
    if is_rank_zero():
        save_config(cfg, out_dir)
        log.info(f"latency model: {latency_model.describe()}; output: {out_dir}")
        dense = describe_model(model, latency_model, datamodule, cfg, "dense", with_dims=True)

    loggers = build_all(cfg.logger)
    if no_pruning is not None:
        # ---- no stage 1 (pruner=none): the model as it is; a distillation teacher would be its start ----
        compact, step, history, snapshots, others = no_pruning(model).compact(), 0, [], {}, {}
        teacher = copy.deepcopy(compact).eval()
    elif search is None:
        # ---- stage 1: prune while fine-tuning, with KL to the dense model after the first event ------
        module = make_module(cfg, model, "prune")
        callbacks = [pruning, *build_all(cfg.callbacks)]
        trainer = build(cfg.trainer, max_epochs=cfg.schedule.prune_max_epochs, callbacks=callbacks,
                        logger=loggers or False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path(cfg.ckpt_path, out_dir / "checkpoints"))
        if not pruning.done:
            raise ValueError(f"pruning stopped at {pruning.pruner.latency_ratio():.3f} of the dense latency, "
                             f"before the target {cfg.pruner.target}: raise schedule.prune_max_epochs or "
                             f"pruner.groups_per_event, and resume with hydra.run.dir=<run> ckpt_path=last")
        compact, teacher, step = module.student.compact(), module.teacher, trainer.global_step
        snapshots, history = pruning.snapshots, pruning.history
        others = {t: PrunableViT.from_pretrained(path) for t, path in snapshots.items()} if is_rank_zero() else {}
    else:
        # ---- stage 1, one shot: latency search on calibration images, refit to the dense model -------
        teacher = copy.deepcopy(model).eval()
        needed = max(cfg.calib_batches, reconstruction.batches if reconstruction else 0)
        compacts = search_and_refit(search, model, teacher, latency_model,
                                    list(datamodule.calib_dataloader(needed)), cfg.calib_batches, reconstruction,
                                    device=work_device(cfg),
                                    snapshot_dir=out_dir / "snapshots" if is_rank_zero() else None,
                                    progress=is_rank_zero())
        compact, step, history = compacts[search.target], 0, []
        snapshots = {t: str(snapshot_path(out_dir / "snapshots", t)) for t in compacts}
        others = compacts

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
    named = search or no_pruning  # the one-shot pruners name themselves
    method = (named.name, None) if named is not None else (cfg.pruner.criterion, cfg.pruner.eta)
    return finish_pruning(cfg, compact, dense, dense_arch, latency_model, datamodule, loggers, *method, snapshots,
                          history, others=others)


def sparsity_sweep(cfg: DictConfig, max_steps: int | None = None) -> dict:
    """`+experiment=ovit_sweep`: sparsify to each level in turn, fine-tuning with KL to the dense model
    and the zeros fixed between levels; one model per level under sparse/ (callbacks.SparsitySweep).
    `max_steps` stops the run early (as an interruption would)."""
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("sweep") is None:
        raise ValueError(f"pruner={cfg.pruner._target_.rsplit('.', 1)[-1]} in train.py runs a sparsity sweep: "
                         f"use +experiment=ovit_sweep (or python prune.py pruner=... for one-shot sparsity)")
    sparsifier = build(cfg.pruner)
    distillation = sparse_distillation(build(cfg.reconstruction) if cfg.reconstruction else None)
    datamodule, model, _ = build_run(cfg)
    model = model.compact()
    sweep = SparsitySweep(sparsifier, calibration_batches(sparsifier, datamodule), cfg.sweep.steps_per_level,
                          save_dir=str(out_dir / "sparse"), checkpoint_dir=str(out_dir / "checkpoints"),
                          distillation=distillation, reference=copy.deepcopy(model).eval() if distillation else None,
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
    levels = [describe_sparse(PrunableViT.from_pretrained(path), sparsifier, level, path, datamodule, cfg)
              for level, path in sorted(sweep.saved.items())]
    return finish_sparsity(cfg, dense, levels, f"{sparsifier.name} sweep", sparsifier.pattern,
                           sparsifier.distribution, loggers, steps_per_level=cfg.sweep.steps_per_level)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="train")
@cli_errors
def _main(cfg: DictConfig) -> float | None:
    return metric_value(train(cfg), cfg.get("optimized_metric"))  # what a sweeper (Optuna) optimises


def main() -> None:
    """`nvit-train` and `python train.py`: Hydra overrides from the command line."""
    setup_environment()  # before Hydra composes: paths.root_dir reads NVIT_ROOT
    lock_explicit_run_dir(sys.argv[1:])
    _main()
