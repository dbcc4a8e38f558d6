"""Importance criteria: one interface, per-unit scores for every layer of a `Structure`.

Gradient criteria read `param.grad` after backward, i.e. after DDP's all-reduce (and after AMP's
unscale when called from `on_before_optimizer_step`), so every rank computes identical scores and
makes identical pruning decisions without communicating.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

from ..models import DEFAULT_DIVISORS, EMB, KIND_SPECS, LayerKey
from .groups import Structure

# NViT's per-kind divisors (models/structure.py): s_u is divided by c_kind before squaring, making kinds comparable


class Criterion(ABC):
    """Scores every unit (higher = more important = kept longer)."""

    name: str
    needs_gradients = False

    def __init__(self, structure: Structure) -> None:
        self.structure = structure

    def accumulate(self) -> None:
        """Called once per optimizer step, after backward (no-op for weight-only criteria)."""

    def end_interval(self) -> None:
        """Called right before a pruning event (no-op for stateless criteria)."""

    @abstractmethod
    def scores(self) -> dict[LayerKey, Tensor]:
        """Per-unit importance of every layer; pruned units may hold any value."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        pass


class GradientCriterion(Criterion):
    """Accumulates a per-step unit score from s_u = Σ θ·∂L/∂θ: the mean over the steps of an interval,
    then an EMA across intervals (bias-corrected, as in Adam)."""

    needs_gradients = True

    def __init__(self, structure: Structure, divisors: Mapping[str, float] | None = None,
                 ema_beta: float = 0.9) -> None:
        super().__init__(structure)
        self.divisors = {**DEFAULT_DIVISORS, **(divisors or {})}
        bad = {k: v for k, v in self.divisors.items() if not float(v) > 0}
        if bad:
            raise ValueError(f"pruner.divisors must all be > 0, got {bad}")
        if not 0.0 <= ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {ema_beta}")
        self.ema_beta = ema_beta
        self.step_sum: dict[LayerKey, Tensor] = {}
        self.step_count = 0
        self.ema: dict[LayerKey, Tensor] = {}
        self.intervals = 0

    @abstractmethod
    def step_score(self, s: Tensor) -> Tensor:
        """Per-step unit score from the (divided) gate derivative s_u / c_kind."""

    def gate_derivatives(self) -> dict[LayerKey, Tensor]:
        """s_u = dL/dg_u for a virtual gate g_u scaling all of unit u's parameter slices."""
        grads = {}
        for name, p in self.structure.model.named_parameters():
            if p.grad is not None:
                grads[name] = p.detach() * p.grad.detach()
        return self.structure.unit_sums(grads)

    @torch.no_grad()
    def accumulate(self) -> None:
        for key, s in self.gate_derivatives().items():
            score = self.step_score(s.float() / self.divisors[key[0]])
            self.step_sum[key] = self.step_sum[key] + score if key in self.step_sum else score
        self.step_count += 1

    @torch.no_grad()
    def end_interval(self) -> None:
        if self.step_count == 0:
            return
        beta = self.ema_beta
        for key, total in self.step_sum.items():
            mean = total / self.step_count
            self.ema[key] = beta * self.ema[key] + (1 - beta) * mean if key in self.ema else (1 - beta) * mean
        self.intervals += 1
        self.step_sum, self.step_count = {}, 0

    def scores(self) -> dict[LayerKey, Tensor]:
        if self.intervals == 0:
            raise RuntimeError(f"{self.name}: no saliency accumulated yet (call accumulate() after "
                               f"backward and end_interval() before pruning)")
        correction = 1 - self.ema_beta**self.intervals
        return {key: ema / correction for key, ema in self.ema.items()}

    def state_dict(self) -> dict:
        return {"step_sum": _keyed(self.step_sum), "step_count": self.step_count,
                "ema": _keyed(self.ema), "intervals": self.intervals}

    def load_state_dict(self, state: Mapping) -> None:
        device = self.structure.model.emb_mask.device
        self.step_sum = _unkeyed(state["step_sum"], device)
        self.step_count = int(state["step_count"])
        self.ema = _unkeyed(state["ema"], device)
        self.intervals = int(state["intervals"])


class HessianCriterion(GradientCriterion):
    """NViT: i_u = (s_u / c)^2, the Fisher approximation of the loss change when removing u."""

    name = "hessian"

    def step_score(self, s: Tensor) -> Tensor:
        return s.square()


class TaylorCriterion(GradientCriterion):
    """First-order Taylor: |s_u / c|."""

    name = "taylor"

    def step_score(self, s: Tensor) -> Tensor:
        return s.abs()


class FisherCriterion(GradientCriterion):
    """Per-sample Fisher of output gates: i_u = mean over images of (∂L_n/∂g_u)², g_u a gate on the
    unit's output (1 = kept, 0 = removed), so ½·i_u estimates the loss increase of removing u.

    The gates are multiplied in by forward hooks, one per image, so one backward gives every image's
    derivative: hundreds of samples per calibration pass instead of one squared batch mean per step
    (NViT's estimate, which at a converged model is dominated by noise). Units of every kind are in
    the loss's own units, so no per-kind divisors are needed (they default to 1). Gates: where each
    kind declares them (`models.structure.KIND_SPECS`: MLP neurons on fc2's input, heads and V dims
    on proj's input, QK dims on the queries), EMB channels on the residual stream (after the
    embedding and on every sublayer's output, one shared gate).
    """

    name = "fisher"

    def __init__(self, structure: Structure, divisors: Mapping[str, float] | None = None,
                 ema_beta: float = 0.9) -> None:
        super().__init__(structure, {k: 1.0 for k in DEFAULT_DIVISORS} | dict(divisors or {}), ema_beta)
        self.gates: dict[LayerKey, list[Tensor]] = {}
        self.handles = self._add_gate_hooks(structure.model)

    def step_score(self, s: Tensor) -> Tensor:  # (images, units) per-image derivatives
        return s.square().mean(0)

    def _add_gate_hooks(self, model) -> list:
        """Forward hooks multiplying a per-image gate of ones into each unit's output."""

        def gated(key: LayerKey, split: tuple[int, int] | None, axis: int, pre: bool):
            # split: the (heads, dims) layout of a flat last axis; axis: which of them the gate indexes
            def hook(module, args, output=None):
                x = args[0] if pre else output
                if not torch.is_grad_enabled():
                    return None  # evaluation: no gates
                units = x.shape[-1] if split is None else split[axis]
                gate = torch.ones(x.shape[0], units, dtype=x.dtype, device=x.device, requires_grad=True)
                self.gates.setdefault(key, []).append(gate)
                if split is None:
                    y = x * gate[:, None, :]  # B, N, units
                else:
                    shape = [x.shape[0], 1, 1, 1]
                    shape[2 + axis] = units
                    y = (x.unflatten(-1, split) * gate.view(shape)).flatten(-2)  # B, N, heads * dims
                return (y, *args[1:]) if pre else y
            return hook

        handles = []
        for i, block in enumerate(model.blocks):
            for spec in KIND_SPECS:  # where each kind's gate sits is declared with the kind
                if spec.gate is None:
                    continue
                g, layer = spec.gate, block.get_submodule(spec.gate.layer)
                split = tuple(getattr(block.attn, name) for name in g.split) if g.split else None
                register = layer.register_forward_pre_hook if g.pre else layer.register_forward_hook
                handles.append(register(gated((spec.name, i), split, g.axis, pre=g.pre)))
        # one EMB gate per channel, shared by every write into the residual stream
        for module in [model.pos_drop, *(m for b in model.blocks for m in (b.attn, b.mlp))]:
            handles.append(module.register_forward_hook(gated(EMB, None, 0, pre=False)))
        return handles

    def remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def gate_derivatives(self) -> dict[LayerKey, Tensor]:
        """Per-image ∂L/∂g (images, units), times the batch size (the loss is a batch mean)."""
        out = {}
        for key, gates in self.gates.items():
            grads = [g.grad for g in gates if g.grad is not None]
            if grads:
                stacked = torch.stack(grads).sum(0)  # a shared gate (EMB) was used several times
                out[key] = stacked * stacked.shape[0]
        self.gates = {}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for key in sorted(out):  # every rank: the images of all ranks
                parts = [torch.empty_like(out[key]) for _ in range(torch.distributed.get_world_size())]
                torch.distributed.all_gather(parts, out[key].contiguous())
                out[key] = torch.cat(parts)
        return out


class MagnitudeCriterion(Criterion):
    """RMS of the unit's weights (L2 norm over sqrt(#weights), so kinds of different slice sizes
    compete fairly in one global ranking)."""

    name = "magnitude"

    @torch.no_grad()
    def scores(self) -> dict[LayerKey, Tensor]:
        params = dict(self.structure.model.named_parameters())
        squares = self.structure.unit_sums({n: p.detach().float().square() for n, p in params.items()})
        counts = self.structure.unit_sums({n: torch.ones_like(p, dtype=torch.float32)
                                          for n, p in params.items()})
        return {key: (squares[key] / counts[key]).sqrt() for key in squares}


class RandomCriterion(Criterion):
    """Uniform random scores, reproducible from (seed, event number)."""

    name = "random"

    def __init__(self, structure: Structure, seed: int = 0) -> None:
        super().__init__(structure)
        self.seed, self.calls = seed, 0

    def scores(self) -> dict[LayerKey, Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.calls)
        self.calls += 1
        device = self.structure.model.emb_mask.device
        return {layer.key: torch.rand(layer.size, generator=generator).to(device)
                for layer in self.structure}

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: Mapping) -> None:
        self.calls = int(state["calls"])


CRITERIA = {c.name: c for c in (HessianCriterion, FisherCriterion, TaylorCriterion, MagnitudeCriterion,
                                RandomCriterion)}


def build_criterion(name: str, structure: Structure, **kwargs: object) -> Criterion:
    """A criterion by name; kwargs a criterion does not take (e.g. divisors for random) are ignored."""
    if name not in CRITERIA:
        raise ValueError(f"unknown pruning criterion '{name}'; choose one of {sorted(CRITERIA)}")
    cls = CRITERIA[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(structure, **{k: v for k, v in kwargs.items() if k in accepted})


# LayerKey tuples -> "kind:block" strings, so the state survives torch.save(weights_only=True)
def _keyed(d: Mapping[LayerKey, Tensor]) -> dict[str, Tensor]:
    return {f"{k}:{b}": v.detach().cpu() for (k, b), v in d.items()}


def _unkeyed(d: Mapping[str, Tensor], device: torch.device) -> dict[LayerKey, Tensor]:
    out = {}
    for name, value in d.items():
        kind, block = name.split(":")
        out[(kind, int(block))] = value.to(device)
    return out
