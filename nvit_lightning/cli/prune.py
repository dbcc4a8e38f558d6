"""One-/few-shot pruning of a checkpoint to a latency target, compaction, export and report.

    python prune.py                                   # DeiT-Tiny to 0.7x CPU latency (conf/prune.yaml)
    python prune.py pruner.criterion=magnitude recovery_steps=100
    python prune.py mode=export checkpoint=outputs/train/<run>/checkpoints/last.ckpt
    python prune.py pruner=ovit                       # oViT: one sparse model per sparsity level
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from nvit_lightning.app import (
    build,
    build_all,
    build_run,
    config_dir,
    is_latency_search,
    is_no_pruning,
    is_sparsifier,
    lock_explicit_run_dir,
    log,
    pruning_options,
    save_config,
    setup_environment,
    work_device,
)
from nvit_lightning.errors import cli_errors
from nvit_lightning.export import onnx_mode
from nvit_lightning.finish import finish_pruning, finish_sparsity
from nvit_lightning.measure import calibration_batches, describe_model, describe_sparse, val_accuracy
from nvit_lightning.models import PrunableViT
from nvit_lightning.oneshot import prune_one_shot, recover, search_and_refit, snapshot_path
from nvit_lightning.pruning import Criterion, GlobalPruner, build_pruning
from nvit_lightning.pruning.reconstruct import Reconstruction
from nvit_lightning.report import history_record
from nvit_lightning.sparsity.distill import distill_sparse, sparse_distillation
from nvit_lightning.sweep import metric_value


def load_train_checkpoint(path: str) -> PrunableViT:
    """The masked student of a train.py Lightning checkpoint."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (set checkpoint=<run>/checkpoints/last.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # unpickling raises many types for a truncated or foreign file
        raise ValueError(f"{path} is not a readable Lightning checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or "student_config" not in ckpt:
        raise ValueError(f"{path} is not a train.py checkpoint (no student_config)")
    model = PrunableViT(**ckpt["student_config"])
    state = {k.removeprefix("student."): v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}
    model.load_state_dict(state, strict=True)
    return model


def export(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    if not cfg.checkpoint:
        raise ValueError("mode=export needs checkpoint=<train run>/checkpoints/last.ckpt")
    masked = load_train_checkpoint(cfg.checkpoint)
    compact = masked.compact()
    compact.save_pretrained(out_dir / "model")
    print(f"compact model {compact.dims.emb=} {compact.num_params() / 1e6:.2f}M params -> {out_dir / 'model'}")
    return {"model": str(out_dir / "model")}


def prune(cfg: DictConfig) -> dict:
    """Structural pruning to `pruner.target` (and `pruner.snapshots`): the NViT saliency ranking in
    events (`pruner=oneshot | hessian | taylor | ...`) or the latency search (`pruner=obs_search`)."""
    out_dir = Path(cfg.paths.output_dir)
    if is_no_pruning(cfg.pruner):
        raise ValueError("pruner=none prunes nothing: prune.py needs a pruner (obs_search, oneshot, ovit, ...); "
                         "to fine-tune without pruning use python train.py pruner=none")
    search = build(cfg.pruner) if is_latency_search(cfg.pruner) else None  # bad options fail first
    datamodule, model, latency_model = build_run(cfg)
    if search is not None:
        search.check(model, latency_model)  # an unreachable target: before the dense evaluation
    dense_model = copy.deepcopy(model).eval()  # the reference: before any pruning hook is attached
    if search is None:
        _, criterion, pruner = build_pruning(model, latency_model, **pruning_options(cfg.pruner))
    reconstruction = build(cfg.reconstruction) if cfg.reconstruction else None
    save_config(cfg, out_dir)
    device = work_device(cfg)
    dense = describe_model(dense_model, latency_model, datamodule, cfg, "dense", with_dims=True)
    loggers = build_all(cfg.logger)

    needed = max(cfg.calib_batches, cfg.rescore_batches, reconstruction.batches if reconstruction else 0)
    batches = list(datamodule.calib_dataloader(needed))  # decoded once, reused by every pass
    if search is None:
        compacts, history = _prune_by_saliency(cfg, model, dense_model, pruner, criterion, batches, reconstruction,
                                               device, out_dir / "snapshots")
        method = {"criterion": cfg.pruner.criterion, "eta": cfg.pruner.eta}
    else:
        compacts = search_and_refit(search, model, dense_model, latency_model, batches, cfg.calib_batches,
                                    reconstruction, device, out_dir / "snapshots")
        method, history = {"criterion": search.name, "eta": None}, []
    snapshots = {t: str(snapshot_path(out_dir / "snapshots", t)) for t in compacts}
    compact = compacts[float(cfg.pruner.target)]
    if cfg.recovery_steps > 0:
        d = cfg.distill
        trainer = build(cfg.trainer, max_steps=cfg.recovery_steps, max_epochs=-1, logger=loggers or False,
                        enable_checkpointing=False)
        compact = recover(compact, dense_model, datamodule, trainer, build(cfg.schedule.finetune_optimizer),
                          d.kl_weight, d.temperature, d.label_smoothing, cfg.max_nonfinite_skips)
    return finish_pruning(cfg, compact, dense, dense_model, latency_model, datamodule, loggers, method["criterion"],
                          method["eta"], snapshots, history, others=compacts, calib_batches=cfg.calib_batches,
                          rescore=cfg.rescore and search is None, recovery_steps=cfg.recovery_steps,
                          pruner=OmegaConf.to_container(cfg.pruner, resolve=True),
                          reconstruction=OmegaConf.to_container(cfg.reconstruction) if cfg.reconstruction else None)


def _prune_by_saliency(cfg: DictConfig, model: PrunableViT, dense_model: PrunableViT, pruner: GlobalPruner,
                       criterion: Criterion, batches: list, reconstruction: Reconstruction | None,
                       device: str, snapshot_dir: Path) -> tuple[dict[float, PrunableViT], list[dict]]:
    """`pruner=oneshot | hessian | ...`: NViT's ranking in events; the compact (refit) model of every
    target, saved under `snapshot_dir`, and the event history."""
    compacts = {}

    def on_target(target: float, snapshot: PrunableViT) -> None:
        compacts[target] = snapshot.compact()
        compacts[target].save_pretrained(snapshot_path(snapshot_dir, target))

    events = prune_one_shot(model, dense_model, pruner, criterion, batches, cfg.calib_batches, cfg.rescore_batches,
                            cfg.rescore, reconstruction, on_target, lambda e: log.info(e.summary()), device)
    history = [history_record(e, model) for e in events]
    return compacts, history


def sparsify(cfg: DictConfig) -> dict:
    """`pruner=ovit | woodfisher | global_magnitude`: one sparse model per level under sparse/."""
    out_dir = Path(cfg.paths.output_dir)
    sparsifier = build(cfg.pruner)  # bad options fail before any model or data is loaded
    if cfg.recovery_steps > 0:
        raise ValueError("recovery_steps works with structural pruning only: a plain fine-tune would refill "
                         "the zeros of a sparse model (set recovery_steps=0)")
    reconstruction = build(cfg.reconstruction) if cfg.reconstruction else None
    distillation = sparse_distillation(reconstruction)  # the refit of whole layers does not apply
    datamodule, model, _ = build_run(cfg)
    dense = model.compact().eval()  # mask-free: dead structures are gone, not counted as zeros
    save_config(cfg, out_dir)

    report_dense = {"params": dense.num_params(), **val_accuracy(dense, datamodule, cfg, "dense")}
    levels = []
    for level, sparse in sparsifier(dense, calibration_batches(sparsifier, datamodule)).items():
        extra = {}
        if distillation is not None:  # the same images as the structured reconstruction's
            extra["before_reconstruction"] = val_accuracy(sparse, datamodule, cfg, f"sparsity {level:.2f}, before")
            extra["distillation"] = distill_sparse(distillation, sparse, dense,
                                                   datamodule.calib_dataloader(reconstruction.batches),
                                                   list(sparsifier.layers(sparse)), work_device(cfg))
        path = sparse.save_pretrained(out_dir / "sparse" / f"sparsity_{level:.2f}")
        levels.append({**describe_sparse(sparse, sparsifier, level, path, datamodule, cfg), **extra})
        if distillation is not None:  # runs take minutes per level: each level's result as it comes
            print(f"sparsity {level:.2f}: top-1 {extra['before_reconstruction'].get('top1')} ({sparsifier.name} "
                  f"alone) -> {levels[-1].get('top1')} with block distillation ({extra['distillation']['seconds']} s)",
                  flush=True)
    return finish_sparsity(cfg, report_dense, levels, sparsifier.name, sparsifier.pattern, sparsifier.distribution,
                           build_all(cfg.logger),
                           reconstruction=OmegaConf.to_container(cfg.reconstruction) if distillation else None)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="prune")
@cli_errors
def _main(cfg: DictConfig) -> float | None:
    if cfg.mode == "export":
        export(cfg)
    elif cfg.mode == "onnx":
        onnx_mode(cfg)
    elif cfg.mode == "prune":
        report = sparsify(cfg) if is_sparsifier(cfg.pruner) else prune(cfg)
        return metric_value(report, cfg.get("optimized_metric"))  # what a sweeper (Optuna) optimises
    else:
        _bad_mode(cfg.mode)
    return None


def _bad_mode(mode: str) -> None:
    raise ValueError(f"unknown mode '{mode}': use mode=prune, mode=export or mode=onnx")


def main() -> None:
    """`nvit-prune` and `python prune.py`: Hydra overrides from the command line."""
    setup_environment()  # before Hydra composes: paths.root_dir reads NVIT_ROOT
    lock_explicit_run_dir(sys.argv[1:])
    _main()
