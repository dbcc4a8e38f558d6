"""The embedding width (EMB) in the latency search: the exact change of basis of the residual stream
(every supported family), the narrowed stream exact when the stream lies in a subspace, compaction
exact with EMB, heads and MLP pruned, and the search's choice of width under a latency budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nvit_lightning.latency import FlopsLatency
from nvit_lightning.latency.models import LookupTableLatency
from nvit_lightning.models import FAMILIES, PrunableViT, from_timm
from nvit_lightning.pruning import Structure
from nvit_lightning.pruning.reconstruct import reconstruct
from nvit_lightning.pruning.search import LatencySearch
from nvit_lightning.pruning.stream_basis import (
    fold_layer_scales,
    helmert,
    in_basis,
    measure_basis,
    narrow_stream,
    stream_writers,
)

from .conftest import family_timm_model, tiny_vit

ROTATABLE = [name for name in FAMILIES if name != "clip"]  # CLIP's pre_norm LayerNorm writes the stream


def _family_model(family: str) -> PrunableViT:
    """The family's small model, every parameter moved off its init (LayerScale gains near 1)."""
    return from_timm(family_timm_model(family, num_classes=10)).eval()


def _images(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 32, 32, generator=g) for _ in range(n)]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_helmert_basis_nests_the_zero_sum_vectors_of_every_width() -> None:
    h = helmert(7)
    assert torch.allclose(h.T @ h, torch.eye(7, dtype=torch.float64), atol=1e-12)
    for n in range(2, 8):
        cols = h[:, 1:n]
        assert bool((cols[n:] == 0).all()) and float(cols.sum(0).abs().max()) < 1e-12
        assert torch.allclose(h[:n, n:], h[:1, n:].expand(n, -1))  # the other columns: constant on the first n


@pytest.mark.parametrize("family", ROTATABLE)
def test_the_rotated_model_computes_the_same_function(family: str) -> None:
    model = _family_model(family)
    basis = measure_basis(model, _images())
    q = basis.rotation
    assert torch.allclose(q @ q.T, torch.eye(len(q), dtype=torch.float64), atol=1e-10)
    assert torch.allclose(q.sum(1), torch.ones(len(q), dtype=torch.float64), atol=1e-10)  # Q 1 = 1
    rotated = in_basis(model, basis)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _relative(rotated(x), model(x)) < 1e-5
    assert rotated.state_dict().keys() == model.state_dict().keys()  # a plain PrunableViT, same shapes


def test_a_family_whose_layernorm_writes_the_stream_is_refused() -> None:
    with pytest.raises(ValueError, match="pre_norm"):
        measure_basis(_family_model("clip"), _images())
    with pytest.raises(ValueError, match="max"):
        measure_basis(tiny_vit(global_pool="avgmax", class_token=True), _images())
    model = tiny_vit().with_masks()
    model.emb_mask[3] = 0
    with pytest.raises(ValueError, match="already pruned"):
        measure_basis(model, _images())


def _in_subspace(model: PrunableViT, rank: int, scale: float = 10.0) -> PrunableViT:
    """`model` changed so that its stream lies in a random `rank`-dim subspace of the centred
    hyperplane: every writer projected onto it (LayerScale folded first: the gain acts after the writer).
    `scale` enlarges the stream so the LayerNorms' eps is negligible."""
    fold_layer_scales(model)
    d = model.dims.emb
    g = torch.Generator().manual_seed(1)
    s = torch.randn(d, rank, generator=g, dtype=torch.float64)
    s, _ = torch.linalg.qr(s - s.mean(0))
    with torch.no_grad():
        for t, axis in stream_writers(model):
            moved = t.double().movedim(axis, -1)
            t.copy_((moved @ (scale * s @ s.T)).movedim(-1, axis).to(t.dtype))
    return model


@pytest.mark.parametrize("family", ROTATABLE)
def test_a_narrowed_stream_is_exact_when_the_stream_lies_in_a_subspace(family: str) -> None:
    """The stream in an 11-dim subspace: the rotated model narrowed to 12 channels (the 11 principal
    directions, zero-sum over the live channels, plus the constant the LayerNorms remove) computes the
    same function, and its compact form too; one channel fewer does not."""
    model = _in_subspace(_family_model(family), rank=11)
    basis = measure_basis(model, _images())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
    narrowed = in_basis(model, basis)
    narrow_stream(narrowed, 12)
    assert narrowed.live_dims().emb == 12
    compact = narrowed.compact()
    assert compact.dims.emb == 12
    with torch.no_grad():
        assert _relative(narrowed(x), dense) < 1e-5
        assert _relative(compact(x), dense) < 1e-5
    too_narrow = in_basis(model, basis)
    narrow_stream(too_narrow, 11)
    with torch.no_grad():
        assert _relative(too_narrow(x), dense) > 1e-2


def test_the_basis_energy_is_what_the_writers_put_in_each_channel() -> None:
    """Narrowing to n channels drops `energy[n:]` of the writers' output energy: zero past the subspace."""
    model = _in_subspace(tiny_vit().with_masks(), rank=5)
    basis = measure_basis(model, _images())
    assert float(basis.energy[6:].sum()) < 1e-8 * float(basis.energy.sum())
    assert float(basis.energy[1:6].min()) > 0


def test_compaction_is_exact_with_emb_heads_and_mlp_pruned_and_refit() -> None:
    model = tiny_vit().with_masks()
    rotated = in_basis(model, measure_basis(model, _images()))
    Structure(rotated, {"head": 1, "mlp": 1}).prune([(("head", 0), torch.tensor([1])),
                                                     (("mlp", 1), torch.arange(40, 96))])
    narrow_stream(rotated, 32)
    dims = rotated.live_dims()
    assert (dims.emb, dims.heads, dims.mlp) == (32, (2, 2), (64, 40))
    reconstruct(rotated, in_basis(model, measure_basis(model, _images())), _images(seed=1),
                ("qkv", "proj", "fc1", "fc2"), progress=False)
    compact = rotated.compact()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compact(x), rotated(x), atol=1e-5)
    assert isinstance(compact.head, nn.Linear) and compact.head.in_features == 32


def test_the_saved_compact_model_loads_back() -> None:
    model = tiny_vit().with_masks()
    rotated = in_basis(model, measure_basis(model, _images()))
    narrow_stream(rotated, 24)
    compact = rotated.compact()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        again = PrunableViT.from_pretrained(compact.save_pretrained(tmp))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), compact(x))


# ---- the search ------------------------------------------------------------------------------------------
def _batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def _cheap_emb_table() -> LookupTableLatency:
    """A table where the stream width is most of the cost: narrowing it buys the most latency."""
    grid = {"emb": [8, 48], "heads": [1, 3], "qk": [8, 16], "v": [8, 16], "mlp": [8, 96]}
    e, h, q, v, m = torch.meshgrid(*(torch.tensor(g, dtype=torch.float64) for g in grid.values()), indexing="ij")
    block = 0.1 + 0.05 * e + 1e-4 * e * h * (q + v) + 1e-4 * e * m
    return LookupTableLatency(grid, block, [8, 48], [0.1, 0.5], {"tokens": 17})


def test_search_with_emb_meets_every_budget_and_narrows_the_stream_where_it_is_cheap() -> None:
    model = tiny_vit().with_masks()
    table = _cheap_emb_table()
    dense = table.model_latency(model.live_dims())
    search = LatencySearch(target=0.5, snapshots=[0.7, 0.9], group_sizes={"mlp": 8, "emb": 8}, emb=True)
    search.check(model, table)
    pruned = search(model, table, _batches(), progress=False)
    assert search.pruned_from is not None
    x, y = torch.randn(2, 3, 32, 32).chunk(2)
    with torch.no_grad():
        assert torch.allclose(search.pruned_from(x), model(x), atol=1e-5)  # the same function, rotated
    for target, masked in pruned.items():
        dims = masked.live_dims()
        assert table.model_latency(dims) <= target * dense + 1e-9
        assert dims.emb % 8 == 0
        reconstruct(masked, search.pruned_from, [b[0] for b in _batches(seed=1)], ("proj", "fc1", "fc2"),
                    progress=False)
        compact = masked.compact()
        with torch.no_grad():
            assert torch.allclose(compact(x), masked(x), atol=1e-4)
            assert float((compact(x) - compact(y)).abs().max()) > 1e-4
    assert pruned[0.5].live_dims().emb < 48  # the table makes the stream width the way to the budget
    # without emb the same budget is out of reach: heads and neurons alone cannot get there
    with pytest.raises(Exception, match="unreachable"):
        LatencySearch(target=0.5, group_sizes={"mlp": 8}).check(model, table)


def test_emb_costs_order_the_widths_and_scale_with_emb_cost() -> None:
    model = tiny_vit().with_masks()
    search = LatencySearch(group_sizes={"mlp": 8, "emb": 8}, emb=True, emb_cost=2.0)
    basis = measure_basis(model, _images())
    costs = search._emb_costs(basis, [48, 40, 16])
    assert costs[48] == 0.0 and 0 < costs[40] < costs[16]
    assert costs[16] == pytest.approx(2.0 * float(basis.energy[16:].sum()))
    assert search._emb_widths(model, FlopsLatency(tokens=17, num_classes=10, patch_size=8)) == [48, 40, 32, 24, 16, 8]
    assert search._emb_widths(model, _cheap_emb_table()) == [48, 40, 32, 24, 16, 8]
    assert LatencySearch()._emb_widths(model, _cheap_emb_table()) == [48]  # emb=false: the full width only


def test_emb_is_not_searched_on_a_model_it_cannot_rotate() -> None:
    model = PrunableViT(tiny_vit().dims, img_size=32, patch_size=8, num_classes=10, pre_norm=True).with_masks()
    search = LatencySearch(group_sizes={"mlp": 8, "emb": 8}, emb=True)
    assert search._emb_widths(model, FlopsLatency(tokens=17, num_classes=10, patch_size=8)) == [48]
    with pytest.raises(ValueError, match="emb_cost"):
        LatencySearch(emb_cost=-1)


def test_prune_run_with_emb_refits_against_the_rotated_model_and_writes_a_plain_vit(tmp_path) -> None:
    """prune.py with the search narrowing the stream: the refit's reference is the rotated dense model
    (same basis as the pruned copies), and the written model loads back as a plain ViT."""
    from .test_app import run_prune

    overrides = ["model=small_random", "data=synthetic", "latency=flops", "latency.tokens=17", "logger=none",
                 "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "evaluate=false",
                 "measure_latency=false", "pruner=obs_search", "pruner.group_sizes.mlp=16",
                 "pruner.group_sizes.emb=16", "pruner.emb=true", "pruner.emb_cost=0.0", "calib_batches=2",
                 "pruner.target=0.6", "reconstruction=least_squares", "reconstruction.batches=2"]
    calls = []
    from nvit_lightning.pruning import reconstruct as reconstruct_module

    original = reconstruct_module.reconstruct

    def spy(model, reference, *args, **kwargs):
        calls.append(reference)
        return original(model, reference, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reconstruct_module, "reconstruct", spy)
        report = run_prune(overrides, tmp_path)
    model = PrunableViT.from_pretrained(tmp_path / "model")
    assert model.dims.emb < 64  # free EMB: the search narrows the stream first
    # the reference is the rotated dense model: its writers centred (a random model's are not)
    assert calls and all(float(r.patch_embed.proj.weight.detach().mean(0).abs().max()) < 1e-6 for r in calls)
    assert report["pruned"]["dims"]["emb"] == model.dims.emb
