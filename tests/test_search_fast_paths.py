"""The latency search's fast paths equal the plain computations they replace (issue #28 item 4): the
trace of single columns with gathered (lazy) downdates against the rank-1 update per removal, the
Gram matrix from its lower triangle against the whole product, the Cholesky inverse against the
general one, and the vectorised knapsack step against a loop over the options."""

from __future__ import annotations

import math

import pytest
import torch

from nvit_lightning.pruning.search import BlockOptions, _add_block, cheapest_under_budget
from nvit_lightning.pruning.structured_obs import (
    LayerStatistics,
    _add_gram,
    _symmetric,
    damped_inverse,
    removal_trace,
)


def _layer(n_in: int, n_out: int, tokens: int = 600, seed: int = 0):
    """A layer reading correlated, GELU-like inputs (an fc2), its weights and statistics."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    x = torch.nn.functional.gelu(x @ torch.randn(n_in, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5 + x)
    xb = torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], 1)
    weight = torch.randn(n_out, n_in, generator=g, dtype=torch.float64) / n_in ** 0.5
    bias = torch.randn(n_out, generator=g, dtype=torch.float64)
    rows = torch.rand(n_out, generator=g, dtype=torch.float64) + 0.5
    return weight, bias, LayerStatistics(xb.T @ xb / tokens, rows)


@pytest.mark.parametrize("row_weights", ["uniform", "fisher"])
@pytest.mark.parametrize(("lazy", "keep"), [(1, 1), (8, 1), (8, 0), (16, 5), (500, 1)])
def test_gathered_downdates_give_the_trace_of_one_update_per_removal(row_weights: str, lazy: int,
                                                                      keep: int) -> None:
    """The same removal order and the same costs (to float rounding) as the rank-1 update per removal,
    whether the downdates are applied after every removal, every 8 or 16 (with the removed columns
    dropped on the way), or never (lazy > the steps)."""
    weight, bias, stats = _layer(n_in=120, n_out=40)
    units = [torch.tensor([c]) for c in range(120)]
    reference = removal_trace(weight, bias, stats, units, keep, 0.01, row_weights, lazy=0)
    fast = removal_trace(weight, bias, stats, units, keep, 0.01, row_weights, lazy=lazy)
    assert torch.equal(fast.order, reference.order)
    assert torch.allclose(fast.cost, reference.cost, rtol=1e-10, atol=0.0)


def test_gathered_downdates_on_a_subset_of_columns_after_removed_ones() -> None:
    """Units that are not the layer's first columns (a gather), after columns removed beforehand."""
    weight, bias, stats = _layer(n_in=90, n_out=30, seed=1)
    units = [torch.tensor([c]) for c in range(10, 90, 2)]
    removed = torch.tensor([0, 3, 11])
    reference = removal_trace(weight, bias, stats, units, 2, 0.01, "fisher", removed=removed, lazy=0)
    fast = removal_trace(weight, bias, stats, units, 2, 0.01, "fisher", removed=removed, lazy=8)
    assert torch.equal(fast.order, reference.order)
    assert float(fast.cost[0]) > 0 and torch.allclose(fast.cost, reference.cost, rtol=1e-10, atol=0.0)


def test_the_gram_from_its_lower_triangle_is_the_whole_product() -> None:
    """Blocks below the diagonal, mirrored, summed over batches in float64: the float32 product of
    [x, 1] per batch (the same entries up to the order of the float32 sums)."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.nn.functional.gelu(torch.randn(300, 700, generator=g)) for _ in range(2)]
    gram = torch.zeros(701, 701, dtype=torch.float64)
    for x in batches:
        _add_gram(gram, x)
    gram = _symmetric(gram)
    expected = sum((xb.T @ xb).double() for xb in (torch.cat([x, torch.ones(300, 1)], 1) for x in batches))
    assert torch.equal(gram, gram.T)
    assert torch.allclose(gram, expected, rtol=1e-5, atol=1e-3)
    assert float(gram[-1, -1]) == 600.0


def test_the_damped_inverse_by_cholesky_is_the_inverse() -> None:
    _, _, stats = _layer(n_in=60, n_out=5)
    h = stats.gram.clone()
    h.diagonal()[:60] += 0.01 * h.diagonal()[:60].mean()
    assert torch.allclose(damped_inverse(stats.gram, 0.01) @ h, torch.eye(61, dtype=torch.float64), atol=1e-9)
    indefinite = torch.diag(torch.tensor([3.0, -1.0, 1.0], dtype=torch.float64))  # no Cholesky factor
    expected = torch.diag(1 / torch.tensor([3.001, -0.999, 1.0], dtype=torch.float64))  # λ = 1e-3 · mean(3, -1)
    assert torch.allclose(damped_inverse(indefinite, 1e-3), expected)


def _add_block_reference(best: torch.Tensor, steps: torch.Tensor, cost: torch.Tensor, mix: torch.Tensor):
    """`cheapest_under_budget`'s step as a loop over the options, keeping strict improvements."""
    bins = best.shape[0] - 1
    new = torch.full_like(best, math.inf)
    choice = torch.full((bins + 1, 2, 2), -1, dtype=torch.long)
    for j, (s, c, m) in enumerate(zip(steps.tolist(), cost.tolist(), mix.tolist())):
        if s > bins:
            continue
        for before in (0, 1):
            after = 1 if m else before
            candidate = torch.full((bins + 1,), math.inf, dtype=torch.float64)
            candidate[s:] = best[: bins + 1 - s, before] + c
            better = candidate < new[:, after]
            new[better, after] = candidate[better]
            choice[better, after, 0], choice[better, after, 1] = j, before
    return new, choice


@pytest.mark.parametrize("seed", range(6))
def test_the_vectorised_knapsack_step_is_the_loop_over_options(seed: int) -> None:
    """The same least costs and the same choices, ties included (integer costs, repeated step
    counts), options past the last bin, unreachable states, blocks with and without attention."""
    g = torch.Generator().manual_seed(seed)
    bins, n = 300, 150
    best = torch.randint(0, 40, (bins + 1, 2), generator=g).double()
    best[torch.rand(bins + 1, 2, generator=g) < 0.3] = math.inf
    best[: 20 * seed] = math.inf  # an unreachable start
    if seed == 5:
        best[:, 0] = math.inf
    steps = torch.randint(1, 60, (n,), generator=g)
    steps[:3] = torch.tensor([bins + 1, bins + 50, bins])
    cost = torch.randint(0, 10, (n,), generator=g).double()
    mix = torch.rand(n, generator=g) < (0.0 if seed == 4 else 0.7)
    new, choice = _add_block(best, steps, cost, mix, chunk=32)
    ref_new, ref_choice = _add_block_reference(best, steps, cost, mix)
    assert torch.equal(new, ref_new)
    assert torch.equal(choice, ref_choice)


def test_the_knapsack_picks_the_loops_widths_on_many_tied_options() -> None:
    g = torch.Generator().manual_seed(0)
    blocks = [BlockOptions([(j, 0) for j in range(40)], torch.randint(0, 5, (40,), generator=g).double(),
                           torch.randint(1, 20, (40,), generator=g).double(),
                           torch.arange(40) % 3 != 0) for _ in range(5)]
    picks = cheapest_under_budget(blocks, 45.0, bins=90)
    budget_steps = 45.0 / 90
    best = torch.full((91, 2), math.inf, dtype=torch.float64)
    best[0, 0] = 0.0
    choices = []
    for b in blocks:
        best, choice = _add_block_reference(best, torch.ceil(b.latency / budget_steps - 1e-9).long(), b.cost, b.mixes)
        choices.append(choice)
    at, state, expected = int(best[:, 1].argmin()), 1, []
    for b, choice in zip(reversed(blocks), reversed(choices)):
        j, previous = int(choice[at, state, 0]), int(choice[at, state, 1])
        expected.append(j)
        at -= int(torch.ceil(b.latency[j] / budget_steps - 1e-9))
        state = previous
    assert picks == expected[::-1]
