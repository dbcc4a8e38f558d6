"""Saliency: s_u equals the derivative of the loss w.r.t. a gate scaling the unit's slices."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from nvit_lightning.models import EMB, KINDS
from nvit_lightning.pruning.criteria import (
    DEFAULT_DIVISORS,
    FisherCriterion,
    HessianCriterion,
    MagnitudeCriterion,
    RandomCriterion,
    TaylorCriterion,
    build_criterion,
)
from nvit_lightning.pruning.groups import Structure

from .conftest import tiny_vit

UNIT_GROUPS = dict.fromkeys(("emb", "head", "qk", "v", "mlp"), 1)


def _unit_indicator(model, key, unit) -> dict[str, torch.Tensor]:
    """Hand-written slices of one unit, independent of models.structure (the code under test)."""
    params = dict(model.named_parameters())
    ind = {n: torch.zeros_like(p) for n, p in params.items()}
    kind, i = key
    if kind == "emb":
        c = unit
        for n in params:
            p = ind[n]
            if n in ("cls_token", "dist_token", "pos_embed"):
                p[..., c] = 1
            elif n.endswith(("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")) or n in (
                    "norm.weight", "norm.bias", "patch_embed.proj.weight", "patch_embed.proj.bias"):
                p[c] = 1
            elif n.endswith(("attn.q.weight", "attn.k.weight", "attn.v.weight", "fc1.weight")) or n in (
                    "head.weight", "head_dist.weight"):
                p[:, c] = 1
            elif n.endswith(("attn.proj.weight", "attn.proj.bias", "fc2.weight", "fc2.bias")):
                p[c] = 1
        return ind
    attn, prefix = model.blocks[i].attn, f"blocks.{i}."
    qk, v = attn.qk_dim, attn.v_dim
    if kind == "head":
        for n in ("q", "k"):
            ind[prefix + f"attn.{n}.weight"][unit * qk:(unit + 1) * qk] = 1
            ind[prefix + f"attn.{n}.bias"][unit * qk:(unit + 1) * qk] = 1
        ind[prefix + "attn.v.weight"][unit * v:(unit + 1) * v] = 1
        ind[prefix + "attn.v.bias"][unit * v:(unit + 1) * v] = 1
        ind[prefix + "attn.proj.weight"][:, unit * v:(unit + 1) * v] = 1
    elif kind == "qk":
        for n in ("q", "k"):
            ind[prefix + f"attn.{n}.weight"][unit::qk] = 1
            ind[prefix + f"attn.{n}.bias"][unit::qk] = 1
    elif kind == "v":
        ind[prefix + "attn.v.weight"][unit::v] = 1
        ind[prefix + "attn.v.bias"][unit::v] = 1
        ind[prefix + "attn.proj.weight"][:, unit::v] = 1
    elif kind == "mlp":
        ind[prefix + "mlp.fc1.weight"][unit] = 1
        ind[prefix + "mlp.fc1.bias"][unit] = 1
        ind[prefix + "mlp.fc2.weight"][:, unit] = 1
    return ind


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)


def _loss(model, x, y, scale: float = 1.0):
    logits, logits_dist = model.forward_heads(x)
    loss = F.cross_entropy(logits, y)
    if logits_dist is not None:
        loss = loss + F.cross_entropy(logits_dist, y)
    return scale * loss


def _gate_derivative(model, key, unit, x, y) -> float:
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    ind = _unit_indicator(model, key, unit)
    gate = torch.ones((), requires_grad=True)
    gated = {n: p * (1 + (gate - 1) * ind[n]) for n, p in params.items()}
    logits = functional_call(model, {**gated, **buffers}, (x,))
    loss = F.cross_entropy(logits, y)
    (grad,) = torch.autograd.grad(loss, gate)
    return grad.item()


@pytest.mark.parametrize("distilled", [False, True])
def test_saliency_equals_gate_derivative_for_every_kind(distilled: bool) -> None:
    model = tiny_vit(distilled=distilled)
    with torch.no_grad():  # some units already pruned: saliency must still match on live ones
        model.blocks[1].mlp.mask[3] = 0
    structure = Structure(model, UNIT_GROUPS)
    x, y = _batch()
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    criterion = HessianCriterion(structure)
    s = criterion.gate_derivatives()
    checked = 0
    keys = [EMB] + [(kind, i) for i in (0, 1) for kind in ("head", "qk", "v", "mlp")]
    for key in keys:
        for unit in (0, 1, structure.layers[key].size - 1):
            expected = _gate_derivative(model, key, unit, x, y)
            assert s[key][unit].item() == pytest.approx(expected, rel=1e-4, abs=1e-7), (key, unit)
            checked += 1
    assert checked == 27
    assert s[("mlp", 1)][3] == 0  # a pruned neuron carries no saliency


def test_hessian_and_taylor_scores_and_loss_scaling() -> None:
    model = tiny_vit()
    structure = Structure(model, {"head": 1})
    x, y = _batch()
    results = {}
    for scale in (1.0, 3.0):
        hessian, taylor = HessianCriterion(structure), TaylorCriterion(structure)
        model.zero_grad()
        _loss(model, x, y, scale).backward()
        s = hessian.gate_derivatives()
        for c in (hessian, taylor):
            c.accumulate()
            c.end_interval()
        results[scale] = hessian.scores(), taylor.scores()
        for key, values in s.items():
            divisor = DEFAULT_DIVISORS[key[0]]
            torch.testing.assert_close(results[scale][0][key], (values / divisor) ** 2)
            torch.testing.assert_close(results[scale][1][key], (values / divisor).abs())
    for key in results[1.0][0]:
        torch.testing.assert_close(results[3.0][0][key], 9 * results[1.0][0][key])  # i_u ∝ loss²
        torch.testing.assert_close(results[3.0][1][key], 3 * results[1.0][1][key])


def test_custom_divisors_are_used() -> None:
    model = tiny_vit()
    structure = Structure(model, {"head": 1})
    model.zero_grad()
    _loss(model, *_batch()).backward()
    default, custom = HessianCriterion(structure), HessianCriterion(structure, divisors={"mlp": 4.0})
    for c in (default, custom):
        c.accumulate()
        c.end_interval()
    torch.testing.assert_close(custom.scores()[("mlp", 0)], default.scores()[("mlp", 0)] / 16)
    torch.testing.assert_close(custom.scores()[EMB], default.scores()[EMB])


def test_interval_mean_and_bias_corrected_ema() -> None:
    model = tiny_vit()
    structure = Structure(model, {"head": 1})
    criterion = HessianCriterion(structure, ema_beta=0.9)
    step_scores = []
    for interval, seeds in enumerate([(0, 1), (2, 3, 4)]):
        for seed in seeds:
            model.zero_grad()
            _loss(model, *_batch(seed)).backward()
            step_scores.append((interval, {k: (v / DEFAULT_DIVISORS[k[0]]) ** 2
                                           for k, v in criterion.gate_derivatives().items()}))
            criterion.accumulate()
        criterion.end_interval()
    key = ("mlp", 0)
    m1 = torch.stack([s[key] for i, s in step_scores if i == 0]).mean(0)
    m2 = torch.stack([s[key] for i, s in step_scores if i == 1]).mean(0)
    expected = (0.9 * 0.1 * m1 + 0.1 * m2) / (1 - 0.9**2)
    torch.testing.assert_close(criterion.scores()[key], expected)


def test_criterion_state_round_trip() -> None:
    model = tiny_vit()
    structure = Structure(model, {"head": 1})
    a = HessianCriterion(structure)
    for seed in (0, 1):
        model.zero_grad()
        _loss(model, *_batch(seed)).backward()
        a.accumulate()
        if seed == 0:
            a.end_interval()
    state = a.state_dict()
    b = HessianCriterion(structure)
    b.load_state_dict(state)
    assert b.step_count == 1 and b.intervals == 1
    a.end_interval()
    b.end_interval()
    for key in a.scores():
        torch.testing.assert_close(a.scores()[key], b.scores()[key])
    r1, r2 = RandomCriterion(structure, seed=3), RandomCriterion(structure, seed=3)
    first = r1.scores()
    r2.load_state_dict(r1.state_dict())
    assert not torch.equal(r2.scores()[EMB], first[EMB])  # continues the sequence
    assert torch.equal(RandomCriterion(structure, seed=3).scores()[EMB], first[EMB])


def test_magnitude_is_rms_of_unit_weights() -> None:
    model = tiny_vit()
    structure = Structure(model, {"head": 1})
    scores = MagnitudeCriterion(structure).scores()
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    n = 5
    weights = torch.cat([fc1.weight[n], fc1.bias[n : n + 1], fc2.weight[:, n]])
    assert scores[("mlp", 0)][n].item() == pytest.approx(weights.pow(2).mean().sqrt().item(), rel=1e-5)


def test_build_criterion_by_name() -> None:
    structure = Structure(tiny_vit(), {"head": 1})
    assert isinstance(build_criterion("hessian", structure, ema_beta=0.5, seed=1), HessianCriterion)
    assert isinstance(build_criterion("random", structure, seed=1, ema_beta=0.5), RandomCriterion)
    assert isinstance(build_criterion("fisher", structure, ema_beta=0.5, seed=1), FisherCriterion)
    with pytest.raises(ValueError, match="unknown pruning criterion 'obs'"):
        build_criterion("obs", structure)


def test_scores_before_any_interval_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no saliency accumulated"):
        HessianCriterion(Structure(tiny_vit(), {"head": 1})).scores()


def test_group_size_must_divide_units() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        Structure(tiny_vit(), {"head": 2})  # block 0 has 3 heads
    with pytest.raises(ValueError, match="masked PrunableViT"):
        Structure(tiny_vit().compact())


def _per_image_loss_derivative(model, images, labels, n: int, scale_params) -> float:
    """d L_n / d g by central differences, with g scaling the unit's output-side parameters."""
    eps = 1e-3
    losses = []
    for g in (1 + eps, 1 - eps):
        trial = copy.deepcopy(model)
        with torch.no_grad():
            scale_params(trial, g)
            losses.append(F.cross_entropy(trial(images[n:n + 1]), labels[n:n + 1]).item())
    return (losses[0] - losses[1]) / (2 * eps)


@pytest.mark.parametrize("kind", ["mlp", "head", "v", "qk", "emb"])
def test_fisher_gates_give_every_images_own_derivative(kind: str) -> None:
    model = tiny_vit().double()
    structure = Structure(model, dict.fromkeys(KINDS, 1))
    criterion = FisherCriterion(structure)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    labels = torch.tensor([1, 4, 7])
    F.cross_entropy(model(images), labels).backward()
    derivatives = criterion.gate_derivatives()
    block, unit = 1, 1
    a = model.blocks[block].attn

    def scale(trial, g: float) -> None:
        b, ta = trial.blocks[block], trial.blocks[block].attn
        if kind == "mlp":
            b.mlp.fc2.weight[:, unit] *= g
        elif kind == "head":
            ta.proj.weight.view(-1, a.num_heads, a.v_dim)[:, unit] *= g
        elif kind == "v":
            ta.proj.weight.view(-1, a.num_heads, a.v_dim)[:, :, unit] *= g
        elif kind == "qk":
            ta.q.weight.view(a.num_heads, a.qk_dim, -1)[:, unit] *= g
            ta.q.bias.view(a.num_heads, a.qk_dim)[:, unit] *= g
        else:  # every write into the residual stream, channel `unit`
            for p in (trial.patch_embed.proj.weight, trial.patch_embed.proj.bias):
                p[unit] *= g
            trial.cls_token[..., unit] *= g
            trial.pos_embed[..., unit] *= g
            for tb in trial.blocks:
                for layer in (tb.attn.proj, tb.mlp.fc2):
                    layer.weight[unit] *= g
                    layer.bias[unit] *= g

    key = EMB if kind == "emb" else (kind, block)
    for n in range(3):
        expected = _per_image_loss_derivative(model, images, labels, n, scale)
        assert derivatives[key][n, unit].item() == pytest.approx(expected, rel=1e-4, abs=1e-8)


def test_fisher_scores_mean_squared_per_image_derivatives_and_no_gates_in_eval() -> None:
    model = tiny_vit()
    structure = Structure(model, dict.fromkeys(KINDS, 1))
    criterion = FisherCriterion(structure, ema_beta=0.0)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        model(images)
    assert criterion.gates == {}  # evaluation adds nothing
    F.cross_entropy(model(images), labels).backward()
    expected = {k: v.square().mean(0) for k, v in criterion.gate_derivatives().items()}
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    criterion.accumulate()
    criterion.end_interval()
    scores = criterion.scores()
    for key, value in expected.items():
        torch.testing.assert_close(scores[key], value)
    assert criterion.divisors == dict.fromkeys(KINDS, 1.0)
