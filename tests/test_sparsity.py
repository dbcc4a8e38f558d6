"""oViT: OBS updates against closed-form least squares, the block Fisher against explicit
per-sample gradients, global / uniform / N:M selection counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nvit_lightning.sparsity import (
    Blocks,
    MagnitudeSparsifier,
    OBSSparsifier,
    block_fisher,
    damped_inverse,
    is_n_m_sparse,
    obs_order,
    obs_prune,
    removal_counts,
    sparsifiable_layers,
)

from .conftest import tiny_vit


def _regression(n: int = 200, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.linalg.lstsq(x, y[:, None]).solution.squeeze(1)
    return x, y, w


@pytest.mark.parametrize("order", ["greedy", "static"])
def test_obs_update_equals_least_squares_on_the_kept_inputs(order: str) -> None:
    # linear regression: the loss ½‖Xw − y‖² is exactly quadratic with Hessian XᵀX, so OBS with the
    # exact inverse must land on the least-squares fit restricted to the kept inputs
    x, y, w = _regression()
    hinv = torch.linalg.inv(x.T @ x)
    idx, losses = obs_order(w[None].clone(), hinv[None].clone(), order)
    for k in (1, 3, 6):
        (pruned,) = obs_prune(w[None], hinv[None], idx, [torch.tensor([k])])
        removed = idx[0, :k]
        kept = torch.ones(8, dtype=torch.bool)
        kept[removed] = False
        expect = torch.zeros(8, dtype=torch.float64)
        expect[kept] = torch.linalg.lstsq(x[:, kept], y[:, None]).solution.squeeze(1)
        torch.testing.assert_close(pruned[0], expect, rtol=1e-6, atol=1e-8)
        assert bool((pruned[0, removed] == 0).all())
        if order == "greedy":  # each loss is the exact increase of the quadratic loss
            gained = 0.5 * ((x @ pruned[0] - y).square().sum() - (x @ w - y).square().sum())
            torch.testing.assert_close(losses[0, :k].sum(), gained, rtol=1e-6, atol=1e-8)


def test_greedy_order_sees_earlier_updates() -> None:
    x, _, w = _regression(seed=3)
    hinv = torch.linalg.inv(x.T @ x)
    idx, _ = obs_order(w[None].clone(), hinv[None].clone(), "greedy")
    assert int(idx[0, 0]) == int((w.square() / hinv.diagonal()).argmin())
    # the second choice is the cheapest after removing the first one and updating the rest
    (after,) = obs_prune(w[None], hinv[None], idx, [torch.tensor([1])])
    rest = [i for i in range(8) if i != int(idx[0, 0])]
    sub = torch.linalg.inv((x.T @ x)[rest][:, rest])
    second = rest[int((after[0, rest].square() / sub.diagonal()).argmin())]
    assert int(idx[0, 1]) == second


def test_block_fisher_matches_explicit_per_sample_gradients() -> None:
    model = tiny_vit()
    layers = {name: m for name, m in sparsifiable_layers(model, patch_embed=True, head=True).items()
              if name in ("blocks.0.attn.q", "blocks.1.mlp.fc2", "patch_embed.proj", "head")}
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    fisher = block_fisher(model, layers, batches, num_grads=5, block_size=16)
    for name, layer in layers.items():
        grads = []
        for i in range(5):
            model.zero_grad()
            F.cross_entropy(model(images[i:i + 1]), labels[i:i + 1]).backward()
            grads.append(Blocks(layer.weight.numel(), 16).view(layer.weight.grad))
        g = torch.stack(grads)  # m, rows, B
        explicit = torch.einsum("mki,mkj->kij", g, g) / 5
        torch.testing.assert_close(fisher[name], explicit, rtol=1e-4, atol=1e-9)


def test_damped_inverse_equals_explicit_inverse() -> None:
    g = torch.randn(3, 40, 16)  # rows, m, B
    fisher = torch.einsum("kmi,kmj->kij", g, g) / 40
    lam = 1e-2 * fisher.diagonal(dim1=-2, dim2=-1).mean()
    torch.testing.assert_close(damped_inverse(fisher, 1e-2), torch.linalg.inv(fisher + lam * torch.eye(16)),
                               rtol=1e-4, atol=1e-5)


def test_removal_counts_hit_the_sparsity_globally_and_per_layer() -> None:
    g = torch.Generator().manual_seed(0)
    losses = {"a": torch.rand(10, 8, generator=g).sort(1).values, "b": 5 * torch.rand(6, 8, generator=g)}
    forced = {"a": torch.zeros(10, dtype=torch.long), "b": torch.tensor([3, 0, 0, 0, 0, 0])}
    numels, zeros = {"a": 80, "b": 45}, {"a": 0, "b": 0}  # b: 3 padded entries in its first block
    for level in (0.3, 0.5, 0.9):
        counts = removal_counts(losses, forced, numels, zeros, level, "global")
        assert int(counts["a"].sum() + counts["b"].sum()) - 3 == round(level * 125)
        assert int(counts["b"][0]) >= 3  # padding always goes first
        per_layer = removal_counts(losses, forced, numels, zeros, level, "uniform")
        assert int(per_layer["a"].sum()) == round(level * 80)
        assert int(per_layer["b"].sum()) - 3 == round(level * 45)
    # the global threshold takes the cheapest removals: 'a' (losses < 1) goes before 'b' (up to 5)
    counts = removal_counts(losses, forced, numels, zeros, 0.3, "global")
    assert int(counts["a"].sum()) > int(counts["b"].sum()) - 3


def _zeros(model: nn.Module, names) -> tuple[int, int]:
    modules = dict(model.named_modules())
    ws = [modules[n].weight for n in names]
    return sum(int((w == 0).sum()) for w in ws), sum(w.numel() for w in ws)


def _batches(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("make", [
    lambda: OBSSparsifier(sparsities=[0.3, 0.6], num_grads=24, block_size=16),
    lambda: OBSSparsifier(sparsities=[0.3, 0.6], num_grads=24, block_size=16, order="static"),
    lambda: OBSSparsifier(sparsities=[0.5], num_grads=24, block_size=32, distribution="uniform"),
    lambda: MagnitudeSparsifier(sparsities=[0.3, 0.6]),
])
def test_sparsifiers_reach_each_level_and_leave_the_input_model(make) -> None:
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsifier = make()
    out = sparsifier(model, batches=_batches())
    names = list(sparsifiable_layers(model))
    assert sorted(out) == sparsifier.sparsities
    for level, sparse in out.items():
        zeros, total = _zeros(sparse, names)
        assert zeros == round(level * total)
        if sparsifier.distribution == "uniform":
            for name in names:
                z, n = _zeros(sparse, [name])
                assert z == round(level * n)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_obs_beats_magnitude_on_the_calibration_loss() -> None:
    model = tiny_vit()
    batches = _batches(4)
    obs = OBSSparsifier(sparsities=[0.5], num_grads=32, block_size=16)(model, batches=batches)[0.5]
    mag = MagnitudeSparsifier(sparsities=[0.5])(model, batches=batches)[0.5]

    def kl(m: nn.Module) -> float:  # distance to the dense model's outputs on the calibration images
        with torch.no_grad():
            return sum(float(F.kl_div(m(x).log_softmax(-1), model(x).log_softmax(-1), log_target=True,
                                      reduction="batchmean")) for x, _ in batches)

    assert kl(obs) < kl(mag)


@pytest.mark.parametrize("make", [
    lambda: OBSSparsifier(sparsities=None, pattern="2:4", num_grads=16, block_size=16),
    lambda: MagnitudeSparsifier(sparsities=None, pattern="2:4"),
])
def test_nm_masks_are_exact(make) -> None:
    model = tiny_vit()
    (sparse,) = make()(model, batches=_batches(2)).values()
    modules = dict(sparse.named_modules())
    for name in sparsifiable_layers(model):
        assert is_n_m_sparse(modules[name].weight, 2, 4), name
        assert int((modules[name].weight == 0).sum()) >= modules[name].weight.numel() // 2


@pytest.mark.parametrize("kwargs, message", [
    ({"pattern": "2:4", "sparsities": [0.6]}, "set pruner.sparsities=null"),
    ({"pattern": "4:2"}, "0 < N < M"),
    ({"pattern": "half"}, "'unstructured' or 'N:M'"),
    ({"sparsities": [1.2]}, "strictly between 0 and 1"),
    ({"distribution": "layerwise"}, "pruner.distribution"),
    ({"order": "random"}, "pruner.order"),
    ({"damp": 0}, "damp > 0"),
])
def test_bad_sparsifier_options_name_the_fix(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        OBSSparsifier(**kwargs)


def test_fisher_chunks_respect_the_budget() -> None:
    model = tiny_vit()
    sparsifier = OBSSparsifier(block_size=16, fisher_budget_gb=3 * 96 * 16 * 16 * 4 * 2 / 2**30)
    chunks = sparsifier.chunks(sparsifiable_layers(model))
    assert len(chunks) > 1 and sum(len(c) for c in chunks) == 12
    # several chunks (gradients collected again to update) give the same result as one
    one = OBSSparsifier(sparsities=[0.5], num_grads=16, block_size=16)(model, batches=_batches(2))[0.5]
    many = OBSSparsifier(sparsities=[0.5], num_grads=16, block_size=16,
                         fisher_budget_gb=sparsifier.fisher_budget_gb)(model, batches=_batches(2))[0.5]
    for (k, a), b in zip(one.state_dict().items(), many.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
