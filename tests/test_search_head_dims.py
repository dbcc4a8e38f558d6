"""Head widths in the latency search: q/k dims by a low-rank fit of each head's logits, V dims by an
OBS trace through proj (after the dropped heads), both cut together (qk = v) and aligned across a
block's heads; costs, fits and compaction checked where the answer is known."""

from __future__ import annotations

import pytest
import torch

from nvit_lightning.latency import FlopsLatency
from nvit_lightning.models import PrunableViT, ViTDims
from nvit_lightning.pruning.reconstruct import reconstruct
from nvit_lightning.pruning.search import LatencySearch
from nvit_lightning.pruning.structured_obs import LayerStatistics, low_rank_logits, removal_trace


def _model(seed: int = 0) -> PrunableViT:
    torch.manual_seed(seed)
    return PrunableViT(ViTDims(48, (3, 2), (16, 16), (16, 16), (64, 96)), img_size=32, patch_size=8,
                       num_classes=10).eval().with_masks()


def _batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _tokens(n: int = 500, dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) @ torch.randn(dim, dim, generator=g, dtype=torch.float64)
    xb = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    return x, xb


def test_a_low_rank_fit_is_exact_when_the_logits_have_that_rank() -> None:
    """q·k of 6 dims whose bilinear form has rank 3: the rank-3 fit reproduces every logit and costs
    nothing; lower ranks cost exactly the discarded energy of the logits."""
    g = torch.Generator().manual_seed(1)
    _, xb = _tokens()
    a, b = torch.randn(13, 3, generator=g, dtype=torch.float64), torch.randn(13, 3, generator=g, dtype=torch.float64)
    mix = torch.randn(3, 6, generator=g, dtype=torch.float64)
    wq, wk = (a @ mix).T, (b @ torch.linalg.pinv(mix).T).T  # 6 x 13 each (weights + bias column), rank 3
    logits = (xb @ wq.T) @ (xb @ wk.T).T
    fit = low_rank_logits(wq[:, :12], wq[:, 12], wk[:, :12], wk[:, 12], xb.T @ xb, damping=1e-12)
    approx = (xb @ fit.q_factor[:, :3]) @ (xb @ fit.k_factor[:, :3]).T
    assert torch.allclose(approx, logits, rtol=1e-6, atol=1e-6 * float(logits.abs().max()))
    assert float(fit.cost[3]) == pytest.approx(0.0, abs=1e-6 * float(fit.cost[0]))
    assert float(fit.cost[0]) == pytest.approx(float(logits.square().sum()), rel=1e-6)
    for r in (1, 2):
        approx = (xb @ fit.q_factor[:, :r]) @ (xb @ fit.k_factor[:, :r]).T
        assert float((approx - logits).square().sum()) == pytest.approx(float(fit.cost[r]), rel=1e-6)


def test_a_trace_after_removed_columns_equals_the_refit_without_them() -> None:
    """`removed` columns are refit away first (cost[0]), then the trace goes on from there: each cost
    is the least-squares error of the kept columns."""
    x, xb = _tokens(dim=8, seed=2)
    g = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(5, 8, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    y = x @ weight.T + bias
    stats = LayerStatistics(xb.T @ xb, torch.ones(5, dtype=torch.float64))
    trace = removal_trace(weight, bias, stats, [torch.tensor([c, c + 1]) for c in (2, 4, 6)], keep=1,
                          damping=1e-12, row_weights="uniform", removed=torch.tensor([0, 1]))

    def error(kept: list[int]) -> float:
        xk = torch.cat([x[:, kept], torch.ones(len(x), 1, dtype=torch.float64)], 1)
        return float((y - xk @ torch.linalg.lstsq(xk, y).solution).square().sum())

    assert float(trace.cost[0]) == pytest.approx(error(list(range(2, 8))), rel=1e-6)
    gone = [2 + 2 * int(u) for u in trace.order[:1]]
    kept = [c for c in range(2, 8) if c not in (gone[0], gone[0] + 1)]
    assert float(trace.cost[1]) == pytest.approx(error(kept), rel=1e-6)


def test_search_with_head_widths_and_depth_meets_every_budget_and_compacts_exactly() -> None:
    model = _model()
    latency = FlopsLatency(tokens=17, num_classes=10, patch_size=8)
    dense = latency.model_latency(model.live_dims())
    search = LatencySearch(target=0.35, snapshots=[0.5, 0.7, 0.9], group_sizes={"mlp": 8, "dim": 4}, depth=True,
                           head_dims=True, qk_cost=0.0)  # free q/k: the search narrows heads wherever it helps
    pruned = search(model, latency, _batches(), progress=False)
    narrowed = 0
    x, y = torch.randn(2, 3, 32, 32).chunk(2)
    for target, masked in pruned.items():
        dims = masked.live_dims()
        assert latency.model_latency(dims) <= target * dense + 1e-9
        assert dims.qk == dims.v and all(d % 4 == 0 for d in dims.qk) and any(dims.heads)
        narrowed += sum(d < 16 for h, d in zip(dims.heads, dims.qk) if h)
        reconstruct(masked, model, [b[0] for b in _batches(seed=1)], ("proj", "fc1", "fc2"), progress=False)
        compact = masked.compact()
        assert compact.dims == dims
        with torch.no_grad():
            assert torch.allclose(compact(x), masked(x), atol=1e-4)
            assert float((compact(x) - compact(y)).abs().max()) > 1e-4
    assert narrowed >= 2


def test_a_narrowed_head_keeps_its_logits_where_they_have_low_rank() -> None:
    """Block 0's heads get q/k of rank 4 (of 16 dims): narrowed to 4 dims by the search, the block's
    attention logits are unchanged (the fit is written into the kept q/k dims)."""
    model = _model(seed=3)
    a = model.blocks[0].attn
    with torch.no_grad():
        for h in range(3):
            rows = slice(16 * h, 16 * h + 16)
            a.q.weight[rows][4:] = 0
            a.q.bias[rows][4:] = 0
            a.q.weight[rows] = torch.randn(16, 4) @ a.q.weight[rows][:4] * 0.5  # rank 4 mixed over 16 dims
            a.q.bias[rows] = 0
    search = LatencySearch(target=0.9, group_sizes={"mlp": 8, "dim": 4}, head_dims=True)
    traces = search.traces(model, _batches(), progress=False)
    fits = traces[0]["qk"][1]
    assert all(float(fits[h].cost[4]) < 1e-8 * float(fits[h].cost[0]) for h in range(3))
    pruned = _model(seed=3)
    pruned.load_state_dict(model.state_dict())
    from nvit_lightning.pruning import Structure

    Structure(pruned, {"head": 1, "mlp": 1}).prune(search._narrow(pruned.blocks[0].attn, 0, traces[0], 0, 12))
    h = torch.randn(2, 17, 48)
    with torch.no_grad():
        def logits(att):
            q, k, _ = att.project_qkv(h)
            q = q.view(2, 17, 3, 16).transpose(1, 2) * att.qk_mask
            k = k.view(2, 17, 3, 16).transpose(1, 2) * att.qk_mask
            return q @ k.transpose(-1, -2)
        assert torch.allclose(logits(pruned.blocks[0].attn), logits(a), rtol=1e-3, atol=1e-3)
    assert pruned.live_dims().qk == (4, 16) and pruned.live_dims().v == (4, 16)


def test_head_widths_stay_on_a_tables_profiled_qk_v_widths() -> None:
    from nvit_lightning.latency.models import LookupTableLatency

    grid = {"emb": [48], "heads": [1, 3], "qk": [8, 16], "v": [8, 16], "mlp": [8, 96]}
    table = LookupTableLatency(grid, torch.ones(1, 2, 2, 2, 2), [48], [1.0], {"tokens": 17},
                               same_qk_v_grid=[8, 16], same_qk_v_ms=torch.ones(1, 2, 2, 2))
    search = LatencySearch(group_sizes={"dim": 4}, head_dims=True)
    assert search._dim_widths(table, 16) == [16, 8]  # 12 and 4 lie between or outside profiled widths
    assert search._dim_widths(FlopsLatency(tokens=17, num_classes=10, patch_size=8), 16) == [16, 12, 8, 4]


def _same(a: object, b: object) -> bool:
    """Equal, tensors included, through the containers and dataclasses a search's traces hold."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(_same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


def test_traces_with_head_widths_stop_after_a_block_and_resume_to_the_same_traces(tmp_path) -> None:
    """A stop after the first block's traces (V traces by heads dropped, logit fits and their costs
    included) saves them; the resumed call traces only the rest and returns what an uninterrupted
    call does."""
    from nvit_lightning.pruning.interrupt import Checkpoint, StopRequested, request_stop, stop_on_signals

    model, batches = _model(), _batches()
    search = LatencySearch(head_dims=True, group_sizes={"mlp": 16, "dim": 4}, qk_images=4)
    uninterrupted = search.traces(model, batches, progress=False)
    checkpoint = Checkpoint(tmp_path / "search.pt")
    for where in ("the search's layer statistics", "block 1 of 2 of the search's removal traces"):
        with stop_on_signals(), pytest.raises(StopRequested) as stopped:
            request_stop()
            search.traces(model, batches, progress=False, checkpoint=checkpoint)
        assert stopped.value.where == where
    assert (tmp_path / "search.statistics.pt").is_file()
    assert len(torch.load(tmp_path / "search.pt", weights_only=True)["blocks"]) == 1
    with pytest.MonkeyPatch.context() as patch:
        from nvit_lightning.pruning import search as search_module

        patch.setattr(search_module, "collect_statistics", lambda *a, **k: pytest.fail("statistics collected again"))
        resumed = search.traces(model, batches, progress=False, checkpoint=checkpoint)
    assert set(resumed[0]) == {"head", "mlp", "v", "qk"}
    assert _same(resumed, uninterrupted)
