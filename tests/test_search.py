"""Structured OBS traces (exact against least squares) and the latency-constrained width search
(exact against brute force, budget met, no layer emptied, compaction exact after the refit)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from nvit_lightning.latency import FlopsLatency
from nvit_lightning.pruning import UnreachableTargetError
from nvit_lightning.pruning.reconstruct import reconstruct
from nvit_lightning.pruning.search import BlockOptions, LatencySearch, cheapest_under_budget
from nvit_lightning.pruning.structured_obs import LayerStatistics, collect_statistics, removal_trace

from .conftest import tiny_vit


def _regression(n_in: int = 12, n_out: int = 5, tokens: int = 400, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64)
    x = x @ torch.randn(n_in, n_in, generator=g, dtype=torch.float64) * 0.5 + x  # correlated inputs
    weight = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    bias = torch.randn(n_out, generator=g, dtype=torch.float64)
    xb = torch.cat([x, torch.ones(tokens, 1, dtype=torch.float64)], 1)
    return x, xb, weight, bias, LayerStatistics(xb.T @ xb, torch.rand(n_out, generator=g, dtype=torch.float64) + 0.5)


def _refit_error(x: torch.Tensor, y: torch.Tensor, kept: list[int], rows: torch.Tensor) -> float:
    """Row-weighted squared error of the least-squares refit of y on the kept columns (+ bias)."""
    xk = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=x.dtype)], 1)
    residual = y - xk @ torch.linalg.lstsq(xk, y).solution
    return float((residual.square().sum(0) * rows).sum())


@pytest.mark.parametrize(("n_in", "unit_size"), [(12, 1), (12, 3), (40, 1), (40, 2)])
def test_trace_cost_equals_the_least_squares_refit_error(n_in: int, unit_size: int) -> None:
    """After k removals the trace's cost is exactly the output error left by refitting the kept
    columns (OBS = least squares on the kept inputs), for single columns and for heads of 2 or 3;
    40 inputs: the trace drops the removed columns from its products several times on the way."""
    x, xb, weight, bias, stats = _regression(n_in=n_in)
    y = xb @ torch.cat([weight, bias[:, None]], 1).T
    units = [torch.arange(u * unit_size, (u + 1) * unit_size) for u in range(n_in // unit_size)]
    trace = removal_trace(weight, bias, stats, units, keep=1, damping=1e-12)
    assert len(trace.order) == len(units) - 1 and len(set(trace.order.tolist())) == len(trace.order)
    for k in range(1, len(units)):
        gone = set(trace.order[:k].tolist())
        kept = [c for u, cols in enumerate(units) if u not in gone for c in cols.tolist()]
        assert trace.cost[k] == pytest.approx(_refit_error(x, y, kept, stats.row_sensitivity), rel=1e-6,
                                              abs=1e-8 * float(trace.cost[-1]))


def test_trace_removes_the_cheapest_unit_first_and_uniform_rows_ignore_sensitivity() -> None:
    x, xb, weight, bias, stats = _regression(seed=1)
    y = xb @ torch.cat([weight, bias[:, None]], 1).T
    units = [torch.tensor([c]) for c in range(12)]
    first = removal_trace(weight, bias, stats, units, keep=11, damping=1e-12)
    errors = [_refit_error(x, y, [c for c in range(12) if c != u], stats.row_sensitivity) for u in range(12)]
    assert int(first.order[0]) == min(range(12), key=errors.__getitem__)
    ones = LayerStatistics(stats.gram, torch.ones(5, dtype=torch.float64))
    assert torch.allclose(removal_trace(weight, bias, stats, units, 11, 1e-12, row_weights="uniform").cost,
                          removal_trace(weight, bias, ones, units, 11, 1e-12).cost)


def test_a_duplicate_column_costs_nothing() -> None:
    """A unit that copies another is removed first, at no cost: the refit moves its weight over."""
    x, xb, weight, bias, stats = _regression(seed=2)
    x[:, 7] = x[:, 2]
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    trace = removal_trace(weight, bias, LayerStatistics(xb.T @ xb, stats.row_sensitivity),
                          [torch.tensor([c]) for c in range(12)], keep=10, damping=1e-9)
    assert int(trace.order[0]) in (2, 7) and float(trace.cost[1]) < 1e-6 * float(trace.cost[2])


def test_statistics_match_explicit_inputs_and_gradients() -> None:
    model = tiny_vit()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    stats = collect_statistics(model, [(images, labels)], progress=False)
    captured = {}
    block = model.blocks[1]
    block.mlp.fc2.register_forward_hook(lambda m, i, o: captured.update(x=i[0], y=o))
    out = model(images)
    captured["y"].retain_grad()
    torch.nn.functional.cross_entropy(out, labels, reduction="sum").backward()
    x = torch.cat([captured["x"].flatten(0, 1), torch.ones(4 * 17, 1)], 1).double()
    s = stats["blocks.1.mlp.fc2"]
    assert torch.allclose(s.gram, x.T @ x / 4, rtol=1e-4, atol=1e-5)
    grad = captured["y"].grad.double().square().flatten(0, 1).sum(0) / 4
    assert torch.allclose(s.row_sensitivity, grad, rtol=1e-4, atol=1e-10)
    assert set(stats) == {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.proj", "mlp.fc2")}


def _brute_force(blocks: list[BlockOptions], budget: float) -> float:
    best = math.inf
    for picks in itertools.product(*(range(len(b.cost)) for b in blocks)):
        if sum(float(b.latency[j]) for b, j in zip(blocks, picks)) <= budget:
            best = min(best, sum(float(b.cost[j]) for b, j in zip(blocks, picks)))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_search_matches_brute_force_within_the_budget(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(4):
        n = 5
        latency = torch.rand(n, generator=g, dtype=torch.float64) * 10 + 1
        cost = (11 - latency) ** 2 * torch.rand(n, generator=g, dtype=torch.float64)  # cheaper = costlier
        blocks.append(BlockOptions([(j, 0) for j in range(n)], cost, latency))
    budget = float(sum(b.latency.min() for b in blocks)) + 8.0
    picks = cheapest_under_budget(blocks, budget, bins=20000)
    assert sum(float(b.latency[j]) for b, j in zip(blocks, picks)) <= budget
    # latencies are rounded up to 1/20000 of the budget: the optimum may differ only within that slack
    assert sum(float(b.cost[j]) for b, j in zip(blocks, picks)) <= _brute_force(blocks, budget * (1 - 4 / 20000)) + 1e-9
    with pytest.raises(UnreachableTargetError, match="budget"):
        cheapest_under_budget(blocks, float(sum(b.latency.min() for b in blocks)) - 0.1)


def _batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def test_search_meets_each_target_keeps_a_group_per_layer_and_compacts_exactly() -> None:
    model = tiny_vit().with_masks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    latency = FlopsLatency(tokens=17, num_classes=10, patch_size=8)
    search = LatencySearch(target=0.6, snapshots=[0.8], group_sizes={"mlp": 8})
    pruned = search(model, latency, _batches(), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # input untouched
    dense = latency.model_latency(model.live_dims())
    assert sorted(pruned) == [0.6, 0.8]
    for target, masked in pruned.items():
        dims = masked.live_dims()
        assert latency.model_latency(dims) <= target * dense + 1e-9
        assert min(dims.heads) >= 1 and min(dims.mlp) >= 8 and all(m % 8 == 0 for m in dims.mlp)
        assert dims.emb == 48 and dims.qk == model.dims.qk and dims.v == model.dims.v
    assert pruned[0.6].size_of()["macs"] < pruned[0.8].size_of()["macs"]
    refit = pruned[0.6]
    reconstruct(refit, model, [b[0] for b in _batches(seed=1)], ("proj", "fc1", "fc2"), progress=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(refit.compact()(x), refit(x), atol=1e-4)
    with pytest.raises(UnreachableTargetError):
        LatencySearch(target=0.05)(model, latency, _batches(1), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_search_on_the_gpu_prunes_what_it_prunes_on_the_cpu() -> None:
    """Statistics are kept on the CPU while the model sits on the GPU: the traces must still run (they
    once mixed devices) and choose the same units."""
    latency = FlopsLatency(tokens=17, num_classes=10, patch_size=8)
    search = LatencySearch(target=0.6, group_sizes={"mlp": 8})
    on_cpu = search(tiny_vit().with_masks(), latency, _batches(), progress=False)[0.6]
    on_gpu = search(tiny_vit().with_masks().cuda(), latency, _batches(), "cuda", progress=False)[0.6]
    assert on_gpu.live_dims() == on_cpu.live_dims()
    for (name, a), b in zip(on_cpu.state_dict().items(), on_gpu.state_dict().values()):
        if name.endswith("mask"):
            assert torch.equal(a, b.cpu()), name


def test_search_beats_random_widths_on_the_calibration_output_error() -> None:
    """At equal latency, the searched widths + refit reproduce the dense logits better than a random
    choice of units with the same widths + the same refit."""
    model = tiny_vit().with_masks()
    latency = FlopsLatency(tokens=17, num_classes=10, patch_size=8)
    calib = _batches(4)
    pruned = LatencySearch(target=0.7, group_sizes={"mlp": 8})(model, latency, calib, progress=False)[0.7]
    dims = pruned.live_dims()
    rand = model.__class__(**{**model.config, "masked": True})
    rand.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, block in enumerate(rand.blocks):
            block.attn.head_mask[torch.randperm(len(block.attn.head_mask), generator=g)[dims.heads[i]:]] = 0
            block.mlp.mask[torch.randperm(len(block.mlp.mask), generator=g)[dims.mlp[i]:]] = 0
    from nvit_lightning.pruning import Structure

    Structure(rand, {"head": 1, "mlp": 1}).zero_pruned()
    images = [b[0] for b in calib]
    x = torch.cat(images)
    errors = []
    for m in (pruned, rand.eval()):
        reconstruct(m, model, images, ("proj", "fc1", "fc2"), progress=False)
        with torch.no_grad():
            errors.append(float((m(x) - model(x)).square().mean()))
    assert errors[0] < errors[1]


@pytest.mark.parametrize("options,match", [
    (dict(target=1.2), "between 0 and 1"), (dict(group_sizes={"qk": 8}), "prunes"),
    (dict(damping=0), "damping"), (dict(row_weights="l2"), "row_weights"), (dict(bins=3), "bins"),
])
def test_bad_search_options_fail_clearly(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LatencySearch(**options)
