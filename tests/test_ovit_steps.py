"""Multi-step oViT (`pruner.steps`): the Fisher recomputed on the sparse model at each step, earlier
zeros kept; the levels nest, each is exact, N:M stays exact, and steps=1 is the one-Fisher path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nvit_lightning.sparsity import (
    Blocks,
    OBSSparsifier,
    block_fisher,
    damped_inverse,
    is_n_m_sparse,
    layer_sparsity,
    obs_order,
    obs_prune,
    removal_counts,
    sparsifiable_layers,
)
from nvit_lightning.sparsity import sparsifier as sparsifier_module

from .conftest import tiny_vit


def _batches(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {name: modules[name].weight == 0 for name in sparsifiable_layers(model)}


@pytest.mark.parametrize("steps, distribution", [(2, "global"), (3, "global"), (4, "uniform")])
def test_levels_nest_and_each_is_exact(steps: int, distribution: str) -> None:
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    levels = [0.3, 0.5, 0.6, 0.8]
    out = OBSSparsifier(sparsities=levels, num_grads=24, block_size=16, distribution=distribution,
                        steps=steps)(model, batches=_batches())
    assert sorted(out) == levels
    previous = None
    for level in levels:
        zeros = _zero_masks(out[level])
        total = sum(z.numel() for z in zeros.values())
        assert sum(int(z.sum()) for z in zeros.values()) == round(level * total)
        if distribution == "uniform":
            for z in zeros.values():
                assert int(z.sum()) == round(level * z.numel())
        if previous is not None:  # every zero of the lower level is a zero here
            for name, z in zeros.items():
                assert bool(z[previous[name]].all()), (level, name)
        previous = zeros
    for k, v in model.state_dict().items():  # the input model is left as it was
        assert torch.equal(v, before[k]), k


def fisher_sparsities(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """From now on, the sparsity of the block linears of each model a Fisher is computed on."""
    seen: list[float] = []
    fisher = sparsifier_module.block_fisher

    def spy(model, layers, *args, **kwargs):
        seen.append(layer_sparsity(model, list(layers))[0])
        return fisher(model, layers, *args, **kwargs)

    monkeypatch.setattr(sparsifier_module, "block_fisher", spy)
    return seen


def test_each_step_recomputes_the_fisher_on_the_sparse_model(monkeypatch) -> None:
    seen = fisher_sparsities(monkeypatch)
    sparsifier = OBSSparsifier(sparsities=[0.5, 0.6, 0.7, 0.8], num_grads=16, block_size=16, steps=4)
    assert sparsifier.schedule() == [(0.0, 0.2, []), (0.2, 0.4, []), (0.4, 0.6, [0.5, 0.6]), (0.6, 0.8, [0.7, 0.8])]
    sparsifier(tiny_vit(), batches=_batches(2))
    assert seen == pytest.approx([0.0, 0.2, 0.4, 0.6], abs=1e-3)  # one Fisher per step, at the step's start


@pytest.mark.parametrize("steps", [2, 3])
def test_nm_stays_exact_in_steps(steps: int) -> None:
    model = tiny_vit()
    (sparse,) = OBSSparsifier(sparsities=None, pattern="2:4", num_grads=16, block_size=16,
                              steps=steps)(model, batches=_batches(2)).values()
    modules = dict(sparse.named_modules())
    for name in sparsifiable_layers(model):
        weight = modules[name].weight
        assert is_n_m_sparse(weight, 2, 4), name
        assert int((weight == 0).sum()) == weight.numel() // 2, name


def _one_fisher_reference(model: nn.Module, levels: list[float], batches, num_grads: int, block_size: int,
                          damp: float = 1e-4) -> dict[float, dict[str, torch.Tensor]]:
    """oViT as it was before `steps`: one Fisher at the dense weights, every level cut from it."""
    layers = sparsifiable_layers(model)
    fisher = block_fisher(model, layers, batches, num_grads, block_size)
    blocks = {name: Blocks(layer.weight.numel(), block_size) for name, layer in layers.items()}
    views = {name: blocks[name].view(layer.weight) for name, layer in layers.items()}
    first = {name: blocks[name].padding_mask() | (views[name] == 0) for name in layers}
    finv = {name: damped_inverse(fisher[name], damp) for name in layers}
    orders, losses = {}, {}
    for name in layers:
        orders[name], losses[name] = obs_order(views[name], finv[name], "greedy", block_size, first[name])
    forced = {name: f.sum(1) for name, f in first.items()}
    zeros = {name: int(f.sum()) - blocks[name].pad for name, f in first.items()}
    numels = {name: layer.weight.numel() for name, layer in layers.items()}
    counts = {s: removal_counts(losses, forced, numels, zeros, s, "global") for s in levels}
    out: dict[float, dict[str, torch.Tensor]] = {s: {} for s in levels}
    for name, layer in layers.items():
        for s, w in zip(levels, obs_prune(views[name], finv[name], orders[name], [counts[s][name] for s in levels])):
            out[s][name] = blocks[name].unview(w, layer.weight)
    return out


def test_one_step_is_the_one_fisher_path_bit_for_bit() -> None:
    model, batches = tiny_vit(), _batches()
    levels = [0.3, 0.6]
    out = OBSSparsifier(sparsities=levels, num_grads=24, block_size=16, steps=1)(model, batches=batches)
    reference = _one_fisher_reference(model, levels, batches, 24, 16)
    for level in levels:
        modules = dict(out[level].named_modules())
        for name, weight in reference[level].items():
            assert torch.equal(modules[name].weight, weight), (level, name)


def test_more_steps_change_the_result() -> None:
    model, batches = tiny_vit(), _batches()
    one = OBSSparsifier(sparsities=[0.7], num_grads=24, block_size=16)(model, batches=batches)[0.7]
    two = OBSSparsifier(sparsities=[0.7], num_grads=24, block_size=16, steps=2)(model, batches=batches)[0.7]
    assert any(not torch.equal(a, b) for a, b in zip(one.parameters(), two.parameters()))


@pytest.mark.parametrize("steps", [0, -2, 1.5, "2", True, None])
def test_bad_steps_are_refused(steps) -> None:
    with pytest.raises(ValueError, match=r"pruner\.steps must be an integer >= 1"):
        OBSSparsifier(steps=steps)


def test_steps_start_from_the_models_own_sparsity(monkeypatch) -> None:
    """A model that is already sparse (the sweep's next level) takes its k steps from there, its zeros kept."""
    sparse = OBSSparsifier(sparsities=[0.4], num_grads=16, block_size=16)(tiny_vit(), batches=_batches(2))[0.4]
    seen = fisher_sparsities(monkeypatch)
    sparsifier = OBSSparsifier(sparsities=[0.8], num_grads=16, block_size=16, steps=2)
    assert sparsifier.schedule(0.4) == [(0.4, 0.6, []), (0.6, 0.8, [0.8])]
    assert sparsifier.schedule(0.9) == [(0.9, 0.8, [0.8])]  # nothing left to step through: one Fisher
    out = sparsifier(sparse, batches=_batches(2))[0.8]
    assert seen == pytest.approx([0.4, 0.6], abs=1e-3)
    before, after = _zero_masks(sparse), _zero_masks(out)
    for name, z in before.items():
        assert bool(after[name][z].all()), name
    total = sum(z.numel() for z in after.values())
    assert sum(int(z.sum()) for z in after.values()) == round(0.8 * total)
