"""What train.py and prune.py share before any work: the environment, building configs
(`_target_`), the config checks, and the run's data, model and latency model."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from . import runlock
from .errors import USER_ERRORS
from .latency.models import LatencyModel
from .models import PrunableViT
from .validation import check_config, check_model_weights

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


def compose_before_hydra(config_name: str, argv: list[str]) -> DictConfig | None:
    """The run's config as Hydra will compose it from the command line `argv` (`paths.output_dir`: the
    run dir), for the checks that must pass before Hydra writes into the run dir; None for a command
    line that is Hydra's business (-m, --help, a bad override) and on DDP's other ranks."""
    from hydra import compose, initialize_config_dir

    if any(a.startswith("-") for a in argv) or not is_rank_zero():
        return None
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=argv, return_hydra_config=True)
        run_dir = os.path.abspath(str(cfg.hydra.run.dir))
        with open_dict(cfg):
            del cfg["hydra"]
            if not any(a.split("=", 1)[0] == "paths.output_dir" for a in argv):
                cfg.paths.output_dir = run_dir  # as Hydra sets it (${hydra:runtime.output_dir})
        return cfg
    except Exception:  # a bad override: Hydra reports it in its own words
        return None


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


def check_trainer_config(cfg: DictConfig) -> None:
    """The trainer's values (`validation.py`: devices, precision, a GPU that is not there...), caught
    before the dense evaluation rather than after it. The CLIs check the whole config at start-up
    (`errors.cli_errors`); this covers `build_run` called directly."""
    check_config(cfg, sections=("trainer",))


def check_data_fits_model(datamodule: Any, model: PrunableViT) -> None:
    """Image size and labels the model cannot take, caught before any evaluation or training: more
    labels than the head has, or named classes (class folders, the CIFAR-10 tar) of another count;
    and a model with NaN / inf weights (a broken checkpoint), named by its first such tensor."""
    check_model_weights(model)
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


def check_teacher(cfg: DictConfig) -> None:
    """The distillation teacher is the starting model: refuse KL (`distill.kl_weight > 0`) to it when
    `model.num_classes` gives a loaded model a new, untrained head (its logits mean nothing)."""
    new_head = cfg.model.get("num_classes") is not None and cfg.model.get("dims") is None
    if cfg.distill.kl_weight > 0 and new_head:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} gives the loaded model a new, untrained head, "
                         f"and the distillation teacher is that model: add distill=none, or fine-tune on the new "
                         f"classes first and prune the fine-tuned model (docs/transfer.md)")


def check_distill_config(cfg: DictConfig) -> None:
    """The training-module options of both stages (`distill.*`, `max_nonfinite_skips`; `validation.py`),
    checked at start-up rather than when each is built."""
    check_config(cfg, sections=("distill", "max_nonfinite_skips"))


def work_device(cfg: DictConfig) -> str:
    """Where work outside the Lightning trainer runs (one-shot pruning, reconstruction, evaluation):
    this process's GPU (`LOCAL_RANK` under DDP) when the trainer uses GPUs, else the CPU."""
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("gpu", "cuda", "auto"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def build_run(cfg: DictConfig) -> tuple[Any, PrunableViT, LatencyModel]:
    """Datamodule, model and latency model of a train/prune run, checked before any work starts."""
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
