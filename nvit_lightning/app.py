"""What train.py and prune.py share before any work: the environment, building configs
(`_target_`), the config checks, and the run's data, model and latency model."""

from __future__ import annotations

import inspect
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from . import runlock
from .errors import USER_ERRORS
from .models import PrunableViT
from .module import check_training_options
from .pruning import build_pruning
from .pruning.latency import LatencyModel
from .pruning.none import NoPruning
from .pruning.search import LatencySearch
from .sparsity import Sparsifier

log = logging.getLogger("nvit_lightning")


def is_rank_zero() -> bool:
    """Rank 0 of a (possibly not yet launched) DDP job: Lightning reads the rank from the environment."""
    return rank_zero_only.rank == 0


PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT_DIR = PACKAGE_DIR.parent  # in a source checkout: conf/ and data/ beside the package


def is_checkout() -> bool:
    return (CHECKOUT_DIR / "conf" / "train.yaml").is_file()


def config_dir() -> Path:
    """The Hydra configs: a source checkout's conf/, else the copy `pip install .` ships in the package."""
    return CHECKOUT_DIR / "conf" if is_checkout() else PACKAGE_DIR / "conf"


def lock_explicit_run_dir(argv: list[str]) -> None:
    """`hydra.run.dir=<dir>` on the command line: hold that run dir before Hydra writes into it (its
    `.hydra/` and log), so a second run into a busy dir stops with one line and changes nothing."""
    if "-m" in argv or "--multirun" in argv or not is_rank_zero():
        return
    run_dirs = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    if run_dirs:
        try:
            runlock.acquire(run_dirs[-1])
        except (runlock.RunDirLockedError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


def setup_environment() -> None:
    """Defaults every run wants: W&B offline unless told otherwise; data and outputs under the
    checkout (any working directory), or, for an installed package, under the working directory
    with the latency tables it ships."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("NVIT_ROOT", str(CHECKOUT_DIR) if is_checkout() else os.getcwd())
    if not is_checkout():
        os.environ.setdefault("NVIT_TABLES", str(PACKAGE_DIR / "latency_tables"))
    torch.set_float32_matmul_precision("high")
    # our train loader skips the batches a mid-epoch checkpoint already trained on (ViTDataModule)
    warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


def build(cfg: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, re-raising the user's error (a missing file, a bad value) itself
    rather than Hydra's wrapper around it."""
    try:
        return instantiate(cfg, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, USER_ERRORS):
            raise err.__cause__ from None
        if isinstance(err.__cause__, TypeError) and "keyword argument" in str(err.__cause__):
            target = str(cfg.get("_target_", "")).rsplit(".", 1)[-1]
            raise ValueError(f"bad config option for {target}: {err.__cause__} (see its config file under "
                             f"conf/ for the options it takes)") from None
        raise


def build_all(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every `_target_` entry of a config group such as `callbacks` or `logger`."""
    return [build(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def model_tokens(model: PrunableViT) -> int:
    return model.patch_embed.num_patches + model.num_prefix_tokens


def model_shape(model: PrunableViT, latency_cfg: DictConfig) -> dict[str, Any]:
    """The model's shape for the keys a latency config leaves null (`latency=flops`: tokens, classes,
    patch size...), so an analytic latency model fits whichever ViT is pruned."""
    c = model.config
    shape = {"tokens": model_tokens(model), "num_classes": model.num_classes, "patch_size": c["patch_size"],
             "in_chans": c["in_chans"], "distilled": c.get("distilled", False),
             "prefix_tokens": model.num_prefix_tokens}
    return {k: v for k, v in shape.items() if k in latency_cfg and latency_cfg[k] is None}


def check_latency_model(latency_model: LatencyModel, model: PrunableViT) -> None:
    """Refuse a latency model made for another model (token count, or dims outside its grid)."""
    tokens = getattr(latency_model, "tokens", None) or getattr(latency_model, "meta", {}).get("tokens")
    if tokens is not None and tokens != model_tokens(model):
        raise ValueError(f"{latency_model.describe()} is for {tokens} tokens per image, but the model has "
                         f"{model_tokens(model)}; pick a latency table profiled for this model")
    try:
        latency_model.model_latency(model.live_dims())
    except ValueError as err:
        raise ValueError(f"the latency model does not cover this model: {err}") from None


def _pruner_class(pruner: DictConfig) -> type | None:
    """The class of a `_target_` pruner config (its class checks its own options); None for the
    structural pruner's options (`build_pruning`)."""
    if "_target_" not in pruner:
        return None
    try:
        return get_class(pruner._target_)
    except ImportError as err:
        raise ValueError(f"pruner._target_={pruner._target_} cannot be imported: {err}") from None


def is_sparsifier(pruner: DictConfig) -> bool:
    """`pruner=ovit | woodfisher | global_magnitude`: unstructured / N:M sparsity."""
    cls = _pruner_class(pruner)
    return cls is not None and issubclass(cls, Sparsifier)


def is_no_pruning(pruner: DictConfig) -> bool:
    """`pruner=none`: no pruning, train.py's stage 2 alone (`pruning.none.NoPruning`)."""
    cls = _pruner_class(pruner)
    return cls is not None and issubclass(cls, NoPruning)


def is_latency_search(pruner: DictConfig) -> bool:
    """`pruner=obs_search`: one-shot structured OBS + per-block width search (`pruning.search`)."""
    cls = _pruner_class(pruner)
    return cls is not None and issubclass(cls, LatencySearch)


def check_pruner_config(cfg: DictConfig) -> None:
    """Bad pruner values fail here, before any model or data is loaded."""
    p = cfg.pruner
    if "_target_" in p:
        return
    known = set(inspect.signature(build_pruning).parameters) - {"model", "latency_model", "targets"}
    unknown = sorted(set(p) - known - {"target", "snapshots", "interval"})
    if unknown:
        raise ValueError(f"unknown pruner key(s) {unknown}; the pruner takes "
                         f"{sorted(known | {'target', 'snapshots', 'interval'})}")
    for key in ("target", "eta"):
        _number(p[key], f"pruner.{key}")
    for t in p.snapshots:
        _number(t, "pruner.snapshots")
    for t in [p.target, *p.snapshots]:
        if not 0.0 < float(t) < 1.0:
            raise ValueError(f"latency targets must lie strictly between 0 and 1 (pruner.target, "
                             f"pruner.snapshots), got {t}")
    if float(p.eta) < 0:
        raise ValueError(f"pruner.eta must be >= 0, got {p.eta}")
    if any(float(t) <= float(p.target) for t in p.snapshots):
        raise ValueError(f"pruner.snapshots {list(p.snapshots)} must all be above pruner.target {p.target}")


def _number(value: Any, key: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None


def check_trainer_config(cfg: DictConfig) -> None:
    """Devices the trainer cannot get, caught before the dense evaluation rather than after it."""
    t = cfg.trainer
    if str(t.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={t.accelerator} but no CUDA GPU is visible: use trainer=cpu")
    devices = t.get("devices")
    if isinstance(devices, int) and (devices == 0 or devices < -1):
        raise ValueError(f"trainer.devices must be a positive count, -1 (all) or 'auto', got {devices}")


def check_data_fits_model(datamodule: Any, model: PrunableViT) -> None:
    """Image size and labels the model cannot take, caught before any evaluation or training: more
    labels than the head has, or named classes (class folders, the CIFAR-10 tar) of another count."""
    size = model.config.get("img_size")
    if getattr(datamodule, "img_size", size) != size:
        raise ValueError(f"data.img_size={datamodule.img_size} but the model takes {size}x{size} images: "
                         f"set data.img_size={size}")
    if model.num_classes == 0:  # a backbone, e.g. DINOv2: its features are pruned, no labels to fit
        log.warning("the model has no classifier (num_classes=0): top-1 is not measured, and only pruners that "
                    "need no labels work (the latency search + refit); model.num_classes=N adds a head")
        return
    classes = datamodule.classes() if hasattr(datamodule, "classes") else None
    if classes is not None and len(classes) != model.num_classes:
        raise ValueError(f"the data has {len(classes)} classes but the model's head has {model.num_classes}: "
                         f"set model.num_classes={len(classes)} (a new head, trained on the data)")
    labels = datamodule.num_labels() if hasattr(datamodule, "num_labels") else None
    if labels is not None and labels > model.num_classes:
        raise ValueError(f"the data has labels up to {labels - 1}, but the model has {model.num_classes} "
                         f"classes: set model.num_classes={labels} (a new head), or use data with this model's "
                         f"classes")


def make_output_dir(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output directory {path}: {err.strerror} "
                         f"(set hydra.run.dir=<dir> or paths.output_dir=<dir>)") from None
    return path


def check_distill_config(cfg: DictConfig) -> None:
    """The training-module options of both stages, checked at start-up rather than when each is built."""
    d = cfg.distill
    temperatures = {key: float(d[key]) for key in ("temperature", "finetune_temperature")}
    check_training_options(float(d.kl_weight), temperatures, int(cfg.get("max_nonfinite_skips", 0)))


def pruning_options(pruner: DictConfig) -> dict[str, Any]:
    """`build_pruning` keyword arguments from the `pruner` config group (its `interval` is train.py's)."""
    options = OmegaConf.to_container(pruner, resolve=True)
    options["targets"] = [options.pop("target"), *options.pop("snapshots")]
    options.pop("interval", None)
    return options


def work_device(cfg: DictConfig) -> str:
    """Where work outside the Lightning trainer runs (one-shot pruning, reconstruction, evaluation):
    this process's GPU (`LOCAL_RANK` under DDP) when the trainer uses GPUs, else the CPU."""
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def build_run(cfg: DictConfig) -> tuple[Any, PrunableViT, LatencyModel]:
    """Datamodule, model and latency model of a train/prune run, checked before any work starts."""
    check_pruner_config(cfg)
    check_distill_config(cfg)
    check_trainer_config(cfg)
    make_output_dir(cfg.paths.output_dir)
    if is_rank_zero():  # DDP's other ranks run in the same dir by design
        runlock.acquire(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    if cfg.data.get("img_size") is None:  # e.g. data=synthetic: images of the model's own input size
        model = build(cfg.model)
        datamodule = build(cfg.data, img_size=model.config["img_size"])
    else:  # the data's paths are checked before the model's weights are read
        datamodule = build(cfg.data)
        model = build(cfg.model)
    latency_model = build(cfg.latency, **model_shape(model, cfg.latency))
    check_latency_model(latency_model, model)
    datamodule.setup()
    check_data_fits_model(datamodule, model)
    return datamodule, model, latency_model


def save_config(cfg: DictConfig, out_dir: Path) -> None:
    make_output_dir(out_dir)
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
