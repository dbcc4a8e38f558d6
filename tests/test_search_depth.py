"""Depth pruning in the latency search: a whole attention or MLP sub-layer removed (0 heads / 0 neurons),
its price in the latency models, its removal cost and refit, compaction, and the path from input to head."""

from __future__ import annotations

import pytest
import torch

from nvit_lightning.latency import FlopsLatency
from nvit_lightning.latency.models import LookupTableLatency
from nvit_lightning.models import PrunableViT, ViTDims
from nvit_lightning.pruning import Structure, UnreachableTargetError
from nvit_lightning.pruning.reconstruct import reconstruct
from nvit_lightning.pruning.search import BlockOptions, LatencySearch, cheapest_under_budget
from nvit_lightning.pruning.structured_obs import LayerStatistics, removal_trace

from .conftest import tiny_vit


def _batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _remove(model: PrunableViT, block: int, kind: str) -> None:
    layer = Structure(model, {"head": 1, "mlp": 1}).layers[(kind, block)]
    Structure(model, {"head": 1, "mlp": 1}).prune([((kind, block), layer.live())], removable=("head", "mlp"))


def test_a_removed_sub_layer_adds_its_bias_only_and_compacts_exactly() -> None:
    """0 heads / 0 neurons: the block adds the writers' biases to the stream (the residual path
    intact), the masked and the compact model agree, and the compact block has empty q/k/v/fc1."""
    model = tiny_vit().with_masks()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.bias.normal_()
            block.mlp.fc2.bias.normal_()
    _remove(model, 0, "head")
    _remove(model, 1, "mlp")
    dims = model.live_dims()
    assert dims.heads == (0, 2) and dims.mlp == (64, 0) and dims.qk == (16, 8)
    compact = model.compact()
    assert compact.blocks[0].attn.q.weight.shape == (0, 48) and compact.blocks[1].mlp.fc1.weight.shape == (0, 48)
    x = torch.randn(3, 17, 48)
    with torch.no_grad():
        b0 = compact.blocks[0]
        mid = x + b0.attn.proj.bias
        expected = mid + b0.mlp(b0.norm2(mid))
        assert torch.allclose(b0(x), expected, atol=1e-6)
        assert torch.allclose(model.blocks[0](x, model.emb_mask), expected, atol=1e-6)
        b1 = compact.blocks[1]
        mid = x + b1.attn(b1.norm1(x))
        assert torch.allclose(b1(x), mid + b1.mlp.fc2.bias, atol=1e-6)
        images = torch.randn(2, 3, 32, 32)
        assert torch.allclose(compact(images), model(images), atol=1e-5)


def test_without_any_attention_the_logits_ignore_the_image_so_the_search_keeps_one() -> None:
    """Every sub-layer removed: the class token never reads a patch (the logits are constant); the
    search's dynamic program keeps an attention somewhere even when dropping all would be cheapest."""
    model = tiny_vit().with_masks()
    for i in range(2):
        _remove(model, i, "head")
        _remove(model, i, "mlp")
    compact = model.compact()
    assert compact.dims.heads == (0, 0) and compact.dims.mlp == (0, 0)
    assert sum(p.numel() for p in compact.blocks.parameters()) == 2 * (4 * 48 + 48 + 48)  # norms + biases
    a, b = torch.randn(2, 3, 32, 32).chunk(2)
    with torch.no_grad():
        assert torch.allclose(compact(a), model(a), atol=1e-5)
        assert torch.equal(compact(a), compact(b))
    with pytest.raises(ValueError, match="no attention"):
        LatencySearch(depth=True).check(model, FlopsLatency(tokens=17, num_classes=10, patch_size=8))
    # costs that favour removing every attention, latencies that allow it: one block still keeps one
    blocks = [BlockOptions([(0, 0), (3, 0)], torch.tensor([5.0, 0.0], dtype=torch.float64),
                           torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([True, False]))
              for _ in range(3)]
    picks = cheapest_under_budget(blocks, budget=10.0, bins=100)
    assert sorted(picks) == [0, 1, 1]
    with pytest.raises(UnreachableTargetError):
        cheapest_under_budget(blocks, budget=3.5, bins=100)  # 3 ms without attention, 4 ms with one


def test_the_trace_to_zero_units_ends_at_the_bias_only_refit() -> None:
    """With keep=0 the last cost is the error of replacing the layer's output by its (refit) mean:
    the row-weighted variance of the output around its mean."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    rows = torch.rand(4, generator=g, dtype=torch.float64) + 0.5
    xb = torch.cat([x, torch.ones(300, 1, dtype=torch.float64)], 1)
    trace = removal_trace(weight, bias, LayerStatistics(xb.T @ xb, rows), [torch.tensor([c]) for c in range(6)],
                          keep=0, damping=1e-12)
    y = x @ weight.T + bias
    assert len(trace.order) == 6 and len(trace.cost) == 7
    assert float(trace.cost[-1]) == pytest.approx(float(((y - y.mean(0)).square().sum(0) * rows).sum()), rel=1e-6)


def _table(no_attn: bool = True) -> LookupTableLatency:
    grid = {"emb": [16, 32], "heads": [1, 2], "qk": [8, 16], "v": [8, 16], "mlp": [16, 32]}
    e, h, q, v, m = torch.meshgrid(*(torch.tensor(g, dtype=torch.float64) for g in grid.values()), indexing="ij")
    block = 1.0 + 0.01 * e * h * (q + v) + 0.02 * e * m  # attention + MLP, exactly multilinear
    no_attn_ms = (0.5 + 0.02 * torch.tensor([16.0, 32.0])[:, None] * torch.tensor([16.0, 32.0])).tolist()
    return LookupTableLatency(grid, block, [16, 32], [1.0, 2.0], {"tokens": 17},
                              no_attn_ms=no_attn_ms if no_attn else None)


def test_the_table_prices_removed_sub_layers() -> None:
    table = _table()
    rows = torch.tensor([[32, 0, 16, 16, 24], [32, 2, 16, 8, 0], [16, 0, 8, 8, 0], [32, 2, 16, 8, 24]])
    got = table.block_latency(rows)
    assert float(got[0]) == pytest.approx(0.5 + 0.02 * 32 * 24)  # the no-attention table
    # no MLP: the full block at mlp = 16 minus the no-attention block there
    assert float(got[1]) == pytest.approx(1.0 + 0.01 * 32 * 2 * 24 + 0.02 * 32 * 16 - (0.5 + 0.02 * 32 * 16))
    assert float(got[2]) == 0.0
    assert float(got[3]) == pytest.approx(1.0 + 0.01 * 32 * 2 * 24 + 0.02 * 32 * 24)
    # without the table: the 5-D table extrapolated linearly (keeps the removed sub-layer's fixed cost)
    old = _table(no_attn=False).block_latency(rows)
    assert float(old[0]) == pytest.approx(1.0 + 0.02 * 32 * 24)
    assert float(old[1]) == pytest.approx(1.0 + 0.01 * 32 * 2 * 24)
    # saved and loaded with its no-attention part
    again = LookupTableLatency.from_dict(table.to_dict())
    assert torch.equal(again.block_latency(rows), got)


def test_flops_latency_of_a_removed_sub_layer_is_the_other_one() -> None:
    flops = FlopsLatency(tokens=17, num_classes=10, patch_size=8)
    full, no_attn, no_mlp, none = flops.block_latency(torch.tensor(
        [[48, 3, 16, 8, 64], [48, 0, 16, 8, 64], [48, 3, 16, 8, 0], [48, 0, 16, 8, 0]], dtype=torch.float64))
    assert float(none) == 0.0 and float(no_attn + no_mlp) == pytest.approx(float(full))
    assert float(no_attn) == pytest.approx(2 * 17 * 48 * 64 * 1e-9)


def test_search_with_depth_meets_every_budget_removes_sub_layers_and_compacts_exactly() -> None:
    model = tiny_vit().with_masks()
    latency = FlopsLatency(tokens=17, num_classes=10, patch_size=8)
    dense = latency.model_latency(model.live_dims())
    with pytest.raises(UnreachableTargetError, match="depth=true"):  # without depth, the floor is 0.42
        LatencySearch(target=0.31, group_sizes={"mlp": 8}).check(model, latency)
    search = LatencySearch(target=0.31, snapshots=[0.4, 0.5, 0.7], group_sizes={"mlp": 8}, depth=True)
    search.check(model, latency)
    pruned = search(model, latency, _batches(), progress=False)
    assert sorted(pruned) == [0.31, 0.4, 0.5, 0.7]
    removed = 0
    x, y = torch.randn(2, 3, 32, 32).chunk(2)
    for target, masked in pruned.items():
        dims = masked.live_dims()
        assert latency.model_latency(dims) <= target * dense + 1e-9
        assert all(m % 8 == 0 for m in dims.mlp)
        removed += dims.heads.count(0) + dims.mlp.count(0)
        reconstruct(masked, model, [b[0] for b in _batches(seed=1)], ("proj", "fc1", "fc2"), progress=False)
        compact = masked.compact()
        with torch.no_grad():
            assert torch.allclose(compact(x), masked(x), atol=1e-4)
            assert float((compact(x) - compact(y)).abs().max()) > 1e-4  # a path from input to head
        assert any(dims.heads)  # an attention is kept: the class token reads the patches
    assert removed >= 3  # at 0.31 three of the four sub-layers are gone


def test_depth_options_and_cost_factor() -> None:
    search = LatencySearch(group_sizes={"mlp": 8}, depth=True, depth_cost=3.0)
    model = tiny_vit().with_masks()
    latency = FlopsLatency(tokens=17, num_classes=10, patch_size=8)
    traces = search.traces(model, _batches(1), progress=False)
    blocks = search.options(model, latency, traces)
    assert (3, 8, 0) in blocks[0].removed and (2, 96, 0) in blocks[1].removed  # whole sub-layers on the table
    j = blocks[0].removed.index((3, 64, 0))
    expected = 3.0 * (float(traces[0]["head"][1].cost[3]) + float(traces[0]["mlp"][1].cost[64]))
    assert float(blocks[0].cost[j]) == pytest.approx(expected)
    assert float(blocks[0].latency[j]) == 0.0
    with pytest.raises(ValueError, match="depth_cost"):
        LatencySearch(depth=True, depth_cost=0)


def test_no_attention_blocks_are_profiled_against_the_table() -> None:
    """`profile_no_attn` times blocks without attention beside full ones and stores them scaled to
    the table: a table whose full blocks match this machine gets no-attention blocks below them."""
    from nvit_lightning.latency.profiler import profile_lut

    grid = {"emb": [16, 32], "heads": [1, 2], "qk": [8], "v": [8], "mlp": [16, 64]}
    table = profile_lut(grid, tokens=17, batch_size=2, warmup=1, repeats=2, rounds=1, stack=2, num_classes=10,
                        patch_size=8, progress=False, num_threads=1, same_qk_v=False)
    assert table.no_attn_ms is not None and table.no_attn_ms.shape == (2, 2)
    assert bool((table.no_attn_ms > 0).all())
    full = table.block_latency(torch.tensor([[32, 2, 8, 8, 64]], dtype=torch.float64))
    assert float(table.block_latency(torch.tensor([[32, 0, 8, 8, 64]]))[0]) < float(full[0])
    assert ViTDims(16, (0,), (8,), (8,), (0,)).macs(10, 8, 3, 16) > 0


def test_the_shipped_cpu_table_prices_removed_sub_layers_below_the_full_block() -> None:
    from pathlib import Path

    table = LookupTableLatency.load(Path(__file__).resolve().parents[1] / "data/latency/deit_tiny_cpu_b32.json")
    assert table.no_attn_ms is not None
    rows = torch.tensor([[192, h, 64, 64, m] for h in (3, 0) for m in (16, 256, 512, 768)]
                        + [[192, h, 64, 64, 0] for h in (1, 2, 3)], dtype=torch.float64)
    full, no_attn, no_mlp = table.block_latency(rows).split([4, 4, 3])
    assert bool((no_attn < full).all()) and bool((no_attn[1:] > no_attn[:-1]).all())  # linear in mlp
    assert bool((no_mlp > 0).all()) and bool((no_mlp[1:] > no_mlp[:-1]).all()) and bool((no_mlp < full[0]).all())
    # the two halves of a dense block add up to it, up to the fixed costs they share (within 15 %)
    assert float(no_attn[-1] + no_mlp[-1]) == pytest.approx(float(full[-1]), rel=0.15)
