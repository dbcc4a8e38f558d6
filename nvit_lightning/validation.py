"""Every value of train.py's and prune.py's configs checked for type and range at start-up, before
any model or data is loaded: a bad value is one line naming the key and what it takes (a ValueError,
which `errors.cli_errors` turns into exit code 2).

Where the types come from:

- a node with a `_target_` (the pruner, data, model, trainer, latency model, optimizers, callbacks,
  loggers...) takes the keys and the types of its target's signature: an unknown key, or a value its
  annotation does not allow (`evaluate=maybe`, `lr=fast`), is refused naming the key;
- the nodes a run builds from a registry rather than a `_target_` (`data.train` / `data.val` by their
  `kind`, `distill.cnn_teacher`) are resolved the same way
  (`RESOLVERS`);
- the nodes no class takes whole (the top level, `schedule`, `distill`, `onnx`, `sweep`) are
  declared in `SCHEMA` with their types, and take no other key;
- `SCHEMA` also declares the ranges (`calib_batches` >= 1, `pruner.target` in (0, 1)...) and the
  special rules (`trainer.devices`); `RELATIONS` the checks between keys (snapshots above the target,
  an image a whole number of patches).
"""

from __future__ import annotations

import collections.abc as cabc
import fnmatch
import inspect
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

Tree = dict[str, Any]
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
SEED_MAX = 2**32 - 1  # numpy's and Lightning's seed range


@dataclass(frozen=True)
class Spec:
    """What one config key takes. `type`: an annotation (int, float, bool, str, `X | None`,
    `list[float]`, `Literal[...]`); None takes the annotation of the parameter it feeds. The bounds
    apply to a number, or to every item of a list / value of a mapping. `rule` is a further test,
    `allowed` what it (or a custom range) allows, for the message."""

    type: Any = None
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    rule: Callable[[Any], bool] | None = None
    allowed: str = ""

    def range_text(self) -> str:
        if self.allowed:
            return self.allowed
        if self.gt is not None and self.lt is not None:
            return f"strictly between {_num(self.gt)} and {_num(self.lt)}"
        lo = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}" if self.gt is not None else None
        hi = f"{_num(self.le)}]" if self.le is not None else f"{_num(self.lt)})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        parts = [f"{op} {_num(v)}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
                 if v is not None]
        return " and ".join(parts)

    def in_range(self, x: Any) -> bool:
        if isinstance(x, bool) or not isinstance(x, int | float):
            return True  # not a number (None, a string the type allows): no bounds apply
        return ((self.ge is None or x >= self.ge) and (self.gt is None or x > self.gt)
                and (self.le is None or x <= self.le) and (self.lt is None or x < self.lt))


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _devices_ok(value: Any) -> bool:
    """Lightning's `devices`: a count >= 1, -1 (all), 'auto', a list of indices or '0,1'."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1 or value == -1
    if isinstance(value, str):
        s = value.strip()
        return s in ("auto", "-1") or (re.fullmatch(r"\d+", s) is not None and int(s) >= 1) or \
            (re.fullmatch(r"\d+(\s*,\s*\d+)*\s*,?", s) is not None and "," in s)
    if isinstance(value, list):
        return bool(value) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    return False


def _accelerator_ok(value: Any) -> bool:
    from lightning.pytorch.accelerators import AcceleratorRegistry

    return not isinstance(value, str) or value in {"auto", "gpu", *AcceleratorRegistry.available_accelerators()}


INT, NUMBER, BOOL, STR = int, float, bool, str
OPT_INT, OPT_NUMBER, OPT_STR = int | None, float | None, str | None
NODE, OPT_NODE = dict, dict | None
POSITIVE = {"ge": 1}  # counts
UNIT = {"ge": 0, "le": 1}  # probabilities

# config path -> what it takes; `*` matches any key (fnmatch). Types left out come from the signature
# of the `_target_` the key feeds. A node listed in CLOSED takes only the keys declared here.
SCHEMA: dict[str, Spec] = {
    # the top level (train.py and prune.py; each key is checked where its config has it)
    **{k: Spec(NODE) for k in ("model", "data", "pruner", "latency", "schedule", "distill", "trainer", "paths")},
    **{k: Spec(OPT_NODE) for k in ("reconstruction", "logger", "callbacks", "hydra", "sweep")},
    "task_name": Spec(STR),
    "seed": Spec(INT, ge=0, le=SEED_MAX),
    "optimized_metric": Spec(OPT_STR),
    "log_model": Spec(BOOL),
    "evaluate": Spec(BOOL),
    "measure_latency": Spec(BOOL),
    "max_nonfinite_skips": Spec(INT, ge=0),
    "ckpt_path": Spec(OPT_STR),
    "calib_batches": Spec(INT, **POSITIVE),
    "rescore": Spec(BOOL),
    "rescore_batches": Spec(INT, **POSITIVE),
    "recovery_steps": Spec(INT, ge=0),
    "mode": Spec(Literal["prune", "export", "onnx"]),
    "checkpoint": Spec(OPT_STR),
    "model_dir": Spec(OPT_STR),
    "onnx": Spec(NODE),
    "onnx.batch_size": Spec(INT, **POSITIVE),
    "onnx.threads": Spec(OPT_INT, **POSITIVE),
    "onnx.rounds": Spec(INT, **POSITIVE),
    "onnx.opset": Spec(OPT_INT, ge=7),
    "sweep.steps_per_level": Spec(INT, **POSITIVE),
    "paths.*": Spec(STR),
    # schedule (train.py's stages; prune.py's recovery fine-tune uses finetune_optimizer)
    "schedule.prune_max_epochs": Spec(INT, **POSITIVE),
    "schedule.finetune_epochs": Spec(INT, ge=0),
    "schedule.optimizer": Spec(NODE),
    "schedule.finetune_optimizer": Spec(NODE),
    "schedule.scheduler": Spec(OPT_NODE),
    "schedule.finetune_scheduler": Spec(OPT_NODE),
    "schedule.*optimizer.lr": Spec(NUMBER, gt=0),
    "schedule.*optimizer.weight_decay": Spec(NUMBER, ge=0),
    "schedule.*scheduler.warmup_steps": Spec(ge=0),
    "schedule.*scheduler.cycle_steps": Spec(**POSITIVE),
    "schedule.*scheduler.min_lr_ratio": Spec(**UNIT),
    # distillation
    "distill.kl_weight": Spec(NUMBER, ge=0),
    "distill.temperature": Spec(NUMBER, gt=0),
    "distill.finetune_temperature": Spec(NUMBER, gt=0),
    "distill.label_smoothing": Spec(NUMBER, ge=0, lt=1),
    "distill.mixup": Spec(OPT_NODE),
    "distill.mixup.*_alpha": Spec(NUMBER, ge=0),
    "distill.mixup.label_smoothing": Spec(NUMBER, ge=0, lt=1),
    "distill.mixup.*prob": Spec(NUMBER, **UNIT),
    "distill.cnn_teacher": Spec(OPT_NODE),
    "distill.cnn_alpha": Spec(NUMBER, **UNIT),
    # trainer (lightning.Trainer's own annotations give the rest, e.g. precision)
    "trainer.devices": Spec(rule=_devices_ok, allowed="a positive count, -1 (all), 'auto' or a list of device "
                                                       "indices such as [0,1]"),
    "trainer.accelerator": Spec(rule=_accelerator_ok, allowed="one of cpu, gpu, cuda, mps, tpu, auto"),
    "trainer.num_nodes": Spec(**POSITIVE),
    "trainer.log_every_n_steps": Spec(**POSITIVE),
    "trainer.limit_*_batches": Spec(ge=0),
    "trainer.accumulate_grad_batches": Spec(**POSITIVE),
    "trainer.gradient_clip_val": Spec(ge=0),
    "trainer.max_steps": Spec(ge=-1),
    "trainer.num_sanity_val_steps": Spec(ge=-1),
    # data (ViTDataModule) and its dataset specs (data.train / data.val: by `kind`)
    "data.batch_size": Spec(**POSITIVE),
    "data.val_batch_size": Spec(**POSITIVE),
    "data.num_workers": Spec(ge=0),
    "data.img_size": Spec(OPT_INT, **POSITIVE),  # null: the model's
    "data.crop_pct": Spec(gt=0, le=1),
    "data.hflip": Spec(**UNIT),
    "data.re_prob": Spec(**UNIT),
    "data.scale": Spec(gt=0, le=1),
    "data.*_limit": Spec(**POSITIVE),
    "data.seed": Spec(ge=0, le=SEED_MAX),
    "data.*.num_samples": Spec(**POSITIVE),
    "data.*.num_classes": Spec(**POSITIVE),
    "data.*.img_size": Spec(**POSITIVE),
    "data.*.holdout_per_class": Spec(**POSITIVE),
    # model (build_model; its **model_kwargs go to the ViT)
    "model.img_size": Spec(OPT_INT, **POSITIVE),
    "model.patch_size": Spec(INT, **POSITIVE),
    "model.in_chans": Spec(INT, **POSITIVE),
    "model.num_classes": Spec(OPT_INT, **POSITIVE),
    "model.drop_path_rate": Spec(NUMBER, ge=0, lt=1),
    "model.drop_rate": Spec(NUMBER, ge=0, lt=1),
    "model.distilled": Spec(BOOL),
    "model.dims": Spec(OPT_NODE),
    # latency models (null: the model's own, filled in by the run)
    "latency.tokens": Spec(OPT_INT, ge=2),
    "latency.num_classes": Spec(OPT_INT, ge=0),
    "latency.patch_size": Spec(OPT_INT, **POSITIVE),
    "latency.in_chans": Spec(OPT_INT, **POSITIVE),
    "latency.prefix_tokens": Spec(OPT_INT, ge=0),
    "latency.distilled": Spec(bool | None),
    "latency.batch_size": Spec(**POSITIVE),
    # pruners (whichever class `pruner._target_` names; each key is checked where the config has it)
    "pruner.target": Spec(NUMBER, gt=0, le=1,
                          allowed="a latency ratio strictly between 0 and 1, or 1.0 for pruner=none"),
    "pruner.snapshots": Spec(list[float], gt=0, lt=1),
    "pruner.interval": Spec(INT, **POSITIVE),
    "pruner.eta": Spec(ge=0),
    "pruner.groups_per_event": Spec(**POSITIVE),
    "pruner.latency_step": Spec(gt=0, lt=1),
    "pruner.group_sizes": Spec(**POSITIVE),
    "pruner.divisors": Spec(gt=0),
    "pruner.ema_beta": Spec(ge=0, lt=1),
    "pruner.seed": Spec(ge=0, le=SEED_MAX),
    "pruner.damping": Spec(gt=0),
    "pruner.bins": Spec(**POSITIVE),
    "pruner.sparsities": Spec(gt=0, lt=1),
    "pruner.block_size": Spec(**POSITIVE),
    "pruner.num_grads": Spec(**POSITIVE),
    "pruner.steps": Spec(**POSITIVE),
    "pruner.damp": Spec(gt=0),
    "pruner.fisher_budget_gb": Spec(gt=0),
    "pruner.rescore_batches": Spec(**POSITIVE),
    "pruner.depth_cost": Spec(gt=0),
    "pruner.qk_cost": Spec(ge=0),
    "pruner.calib_batches": Spec(**POSITIVE),
    # Lightning callbacks (checkpoints, the progress bar)
    "callbacks.*.every_n_*": Spec(ge=0),
    "callbacks.*.save_top_k": Spec(ge=-1),
    "callbacks.*.refresh_rate": Spec(ge=0),
    # reconstruction
    "reconstruction.damping": Spec(gt=0),
    "reconstruction.batches": Spec(**POSITIVE),
    "reconstruction.distillation": Spec(OPT_NODE),
    "reconstruction.distillation.epochs": Spec(**POSITIVE),
    "reconstruction.distillation.lr": Spec(gt=0),
    "reconstruction.distillation.batch_size": Spec(**POSITIVE),
    "reconstruction.distillation.seed": Spec(ge=0, le=SEED_MAX),
    "reconstruction.distillation.readout": Spec(ge=0, lt=1),
}
# nodes that take only the keys SCHEMA declares under them ("" is the top level)
CLOSED = ("", "schedule", "distill", "onnx", "sweep")


def _dataset_kind(node: Tree) -> tuple[Callable, set[str], set[str]]:
    """`data.train` / `data.val`: the dataset class its `kind` names (`data/datamodule.py`)."""
    from .data.datamodule import _KEY_ALIASES, DATASET_KINDS

    kind = node.get("kind")
    if kind not in DATASET_KINDS:
        raise _BadKeyError("kind", f"must be one of {sorted(DATASET_KINDS)}, got {kind!r}")
    aliases = {v: k for k, v in _KEY_ALIASES.items()}
    cls = DATASET_KINDS[kind]
    return _Aliased(cls, aliases), {"self", "transform"}, {"kind"}


def _cnn_teacher(node: Tree) -> tuple[Callable, set[str], set[str]]:
    from .build import build_cnn_teacher

    return build_cnn_teacher, set(), set()


# nodes without `_target_` that a run builds from a known callable: path -> (callable, parameters
# the run supplies itself, extra keys the run reads)
RESOLVERS: dict[str, Callable[[Tree], tuple[Callable, set[str], set[str]] | None]] = {
    "data.train": _dataset_kind,
    "data.val": _dataset_kind,
    "distill.cnn_teacher": _cnn_teacher,
}


@dataclass(frozen=True)
class _Aliased:
    """A callable whose config keys differ from its parameter names (`path` -> `tar_path`)."""

    target: Callable
    aliases: Mapping[str, str]  # parameter -> config key


class _BadKeyError(Exception):
    """A bad value at a key relative to the node being checked."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key, self.message = key, message


# ---- the checks ----------------------------------------------------------------------------------

def check_config(cfg: DictConfig | Mapping, sections: typing.Iterable[str] | None = None) -> None:
    """Check every value of a composed train.py / prune.py config (or only the top-level
    `sections`, e.g. ("pruner",)) and the relations between them; raise a one-line ValueError
    naming the first bad key."""
    tree = resolved(cfg)
    if sections is None:
        _check_node(tree, "")
    else:
        for key in sections:
            if key in tree:
                _check_value(tree[key], key, _spec(key), None)
    for relation in RELATIONS:
        relation(tree)


def resolved(cfg: DictConfig | Mapping) -> Tree:
    """The config as plain containers, interpolations resolved (a mandatory `???` value stays '???')."""
    if not isinstance(cfg, DictConfig):
        return dict(cfg)
    try:
        tree = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "the config"
        raise ValueError(f"{key}: cannot resolve its value ({str(err).splitlines()[0]})") from None
    tree.pop("hydra", None)  # Hydra checks its own node
    return tree


def _spec(path: str) -> Spec | None:
    if path in SCHEMA:
        return SCHEMA[path]
    for pattern, spec in SCHEMA.items():
        if "*" in pattern and fnmatch.fnmatchcase(path, pattern):
            return spec
    return None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def _check_node(node: Tree, path: str) -> None:
    """One mapping: its keys against what it feeds, then every value."""
    target, supplied, extra = _node_callable(node, path)
    hints: dict[str, Any] = {}
    if target is not None:
        params, hints, open_ended = _parameters(target)
        allowed = (params - supplied) | extra
        if not open_ended:
            _refuse_unknown(node, path, allowed, _name(target))
    elif path in CLOSED:
        prefix = f"{path}." if path else ""
        declared = {p[len(prefix):] for p in SCHEMA if p.startswith(prefix) and "." not in p[len(prefix):]}
        _refuse_unknown(node, path, declared, None)
    # plain values first: `seed=abc` is named as `seed`, not as a node's `${seed}` (data.seed)
    for key, value in sorted(node.items(), key=lambda item: isinstance(item[1], dict)):
        if key in HYDRA_KEYS:
            continue
        child = _join(path, key)
        _check_value(value, child, _spec(child), hints.get(key))


def _check_value(value: Any, path: str, spec: Spec | None, annotation: Any) -> None:
    if value == "???":
        raise ValueError(f"{path} must be set: add {path}=<value> to the command line")
    kind = spec.type if spec is not None and spec.type is not None else annotation
    if kind is not None and not _conforms(value, kind):
        allowed = f" ({spec.range_text()})" if spec is not None and spec.range_text() else ""
        raise ValueError(f"{path} must be {_describe(kind)}{allowed}, got {value!r}")
    if spec is not None:
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        if isinstance(value, dict) and any(isinstance(v, dict) for v in items):
            items = []  # a node: its own keys carry the bounds
        if not all(spec.in_range(x) for x in items):
            every = "all be " if isinstance(value, dict | list) else "be "
            raise ValueError(f"{path} must {every}{spec.range_text()}, got {value!r}")
        if spec.rule is not None and not spec.rule(value):
            raise ValueError(f"{path} must be {spec.range_text()}, got {value!r}")
    if isinstance(value, dict):
        try:
            _check_node(value, path)
        except _BadKeyError as bad:
            raise ValueError(f"{_join(path, bad.key)} {bad.message}") from None


def _refuse_unknown(node: Tree, path: str, allowed: set[str], owner: str | None) -> None:
    unknown = sorted(set(node) - allowed - HYDRA_KEYS)
    if unknown:
        where = f"{path} key(s)" if path else "top-level key(s)"
        takes = f"{owner} takes" if owner else f"{path or 'the config'} takes"
        raise ValueError(f"unknown {where} {unknown}; {takes} {sorted(allowed)}")


def _node_callable(node: Tree, path: str) -> tuple[Any, set[str], set[str]]:
    """What a node is built into: its `_target_`, or a registry's callable (RESOLVERS)."""
    if "_target_" in node:
        from hydra.utils import get_object

        try:
            target = get_object(str(node["_target_"]))
        except Exception as err:  # ImportError, AttributeError, ValueError: all "cannot import"
            reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise ValueError(f"{_join(path, '_target_')}={node['_target_']} cannot be imported ({reason})") from None
        return target, set(), set()
    resolved_by = RESOLVERS[path](node) if path in RESOLVERS else None
    return resolved_by or (None, set(), set())


def _name(target: Any) -> str:
    target = target.target if isinstance(target, _Aliased) else target
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)


def _parameters(target: Any) -> tuple[set[str], dict[str, Any], bool]:
    """A callable's config keys, their annotations (unresolvable ones left out) and whether it takes
    any keyword (`**kwargs`)."""
    aliases: Mapping[str, str] = {}
    if isinstance(target, _Aliased):
        target, aliases = target.target, target.aliases
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return set(), {}, True
    fn = target.__init__ if inspect.isclass(target) else target
    hints = _hints(fn)
    params, annotations, open_ended = set(), {}, False
    for name, p in signature.parameters.items():
        if p.kind is p.VAR_KEYWORD:
            open_ended = True
        elif p.kind is not p.VAR_POSITIONAL:
            key = aliases.get(name, name)
            params.add(key)
            if name in hints:
                annotations[key] = hints[name]
    return params, annotations, open_ended


def _hints(fn: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # a name only imported for type checking: resolve what can be resolved
        raw = getattr(fn, "__annotations__", {}) or {}
        scope = getattr(fn, "__globals__", {})
        hints = {}
        for name, ann in raw.items():
            try:
                hints[name] = eval(ann, scope) if isinstance(ann, str) else ann
            except Exception:
                continue
        return hints


# ---- types ---------------------------------------------------------------------------------------

_SEQUENCES = (list, tuple, cabc.Sequence, cabc.MutableSequence, cabc.Iterable, cabc.Collection)
_MAPPINGS = (dict, cabc.Mapping, cabc.MutableMapping)


def _conforms(value: Any, kind: Any) -> bool:
    """Whether a plain config value can be what `kind` (an annotation) says."""
    if kind is Any or kind is object or isinstance(kind, typing.TypeVar | str):
        return True
    if kind is None or kind is type(None):
        return value is None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args) or \
            any(value == a and isinstance(value, int | float) and isinstance(a, int | float)
                and not isinstance(value, bool) and not isinstance(a, bool) for a in args)
    if isinstance(value, dict) and "_target_" in value:
        return True  # a nested config, instantiated into whatever is asked for
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if (origin is not None and origin in _MAPPINGS) or kind in _MAPPINGS:
        if not isinstance(value, dict):
            return False
        return len(args) != 2 or all(_conforms(v, args[1]) for v in value.values())
    if (origin is not None and origin in _SEQUENCES) or kind in _SEQUENCES:
        if not isinstance(value, list | tuple):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_conforms(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_conforms(v, args[0]) for v in value)
    if (origin is not None and origin in (cabc.Callable, typing.Callable)) or kind in (cabc.Callable, type):
        return True
    if inspect.isclass(kind):
        if issubclass(kind, PurePath | os.PathLike):
            return isinstance(value, str | PurePath)
        return isinstance(value, kind | dict)
    return True


_PLURAL = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}


def _describe(kind: Any) -> str:
    if kind is None or kind is type(None):
        return "null"
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        literals = [v for a in args if typing.get_origin(a) is Literal for v in typing.get_args(a)]
        parts = [_describe(Literal[tuple(dict.fromkeys(str(v) for v in literals))])] if literals else []
        parts += [_describe(a) for a in args if a is not type(None) and typing.get_origin(a) is not Literal]
        parts = list(dict.fromkeys(parts)) + (["null"] if type(None) in args else [])
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if kind is bool:
        return "true or false"
    if kind is int:
        return "an integer"
    if kind is float:
        return "a number"
    if kind is str:
        return "a string"
    if origin in _MAPPINGS or kind in _MAPPINGS:
        return "a mapping" + (f" of {_PLURAL.get(args[1], '')}" if len(args) == 2 and args[1] in _PLURAL else "")
    if origin in _SEQUENCES or kind in _SEQUENCES:
        item = _PLURAL.get(args[0]) if args else None
        return "a list" + (f" of {item}" if item else "") + " such as [a,b]"
    if inspect.isclass(kind):
        if issubclass(kind, PurePath | os.PathLike):
            return "a path"
        return f"a {kind.__name__} config"
    return str(kind)


# ---- between keys --------------------------------------------------------------------------------

def _get(tree: Tree, path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _snapshots_above_target(tree: Tree) -> None:
    target, snapshots = _get(tree, "pruner.target"), _get(tree, "pruner.snapshots")
    if _number(target) and isinstance(snapshots, list) and any(_number(s) and s <= target for s in snapshots):
        raise ValueError(f"pruner.snapshots {snapshots} must all be above pruner.target {target} (extra, "
                         f"milder ratios written beside the target's model)")


def _whole_patches(tree: Tree) -> None:
    size, patch = _get(tree, "model.img_size"), _get(tree, "model.patch_size")
    if _number(size) and _number(patch) and patch > 0 and size % patch:
        fits = [p for p in range(2, int(size) + 1) if size % p == 0]
        raise ValueError(f"model.patch_size={patch} does not divide model.img_size={size}: an image must be a whole "
                         f"number of patches (patch sizes that fit: {fits})")


def _gpu_visible(tree: Tree) -> None:
    accelerator = _get(tree, "trainer.accelerator")
    if str(accelerator) in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={accelerator} but no CUDA GPU is visible: use trainer=cpu")


def _pruner_names_its_class(tree: Tree) -> None:
    pruner = tree.get("pruner")
    if isinstance(pruner, dict) and "_target_" not in pruner:
        raise ValueError("the pruner config names no class: every pruner is built from its _target_ (see "
                         "conf/pruner/*.yaml, e.g. _target_: nvit_lightning.pruning.GlobalRanking)")


RELATIONS: list[Callable[[Tree], None]] = [_pruner_names_its_class, _snapshots_above_target, _whole_patches,
                                           _gpu_visible]


# ---- outside the config --------------------------------------------------------------------------

def check_run_dir_args(argv: list[str]) -> None:
    """`hydra.run.dir=<dir>` on the command line that cannot be a directory (under a file, in a
    read-only or virtual file system such as /proc): one line naming the key, before Hydra starts."""
    for arg in argv:
        if arg.startswith("hydra.run.dir="):
            run_dir = Path(arg.split("=", 1)[1]).expanduser()
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                probe = run_dir / f".nvit_write_test_{os.getpid()}"
                probe.touch()
                probe.unlink()
            except OSError as err:
                raise ValueError(f"hydra.run.dir={run_dir} cannot be used as a run directory "
                                 f"({_os_reason(err, run_dir)}): choose another hydra.run.dir") from None


def _os_reason(err: OSError, path: Path) -> str:
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return f"{blocker} is a file, not a directory"
    return err.strerror or str(err)


def check_model_weights(model: Any) -> None:
    """A model whose weights hold NaN or inf (a broken checkpoint or save): one line naming the
    first such tensor, before any evaluation (otherwise every later step fails in obscure ways)."""
    import torch

    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"the model's {name} holds NaN/inf values: its checkpoint is broken (model.checkpoint / "
                             f"model.pretrained_dir); load another one")
