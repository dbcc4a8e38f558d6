"""Least-squares reconstruction after pruning: it lowers the error, is exact where the removed units
are linear combinations of kept ones, and leaves a model that still compacts exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from nvit_lightning.models import PrunableViT
from nvit_lightning.pruning import Structure
from nvit_lightning.pruning.block_distill import STRUCTURED_LR, BlockDistillation
from nvit_lightning.pruning.reconstruct import Reconstruction, reconstruct

from .conftest import assert_pruned_slices_zero, block_outputs, random_masks, tiny_vit


def _images(n: int = 4, batch: int = 16, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(n)]


def _pruned(model: PrunableViT, seed: int = 0) -> PrunableViT:
    """A copy with random masks on heads, V dims and MLP neurons (EMB and QK kept), slices zeroed."""
    pruned = copy.deepcopy(model)
    random_masks(pruned, seed=seed, keep=0.6)
    with torch.no_grad():
        pruned.emb_mask.fill_(1)
        for block in pruned.blocks:
            block.attn.qk_mask.fill_(1)
    Structure(pruned, group_sizes=dict.fromkeys(("emb", "head", "qk", "v", "mlp"), 1)).zero_pruned()
    return pruned



@pytest.mark.parametrize("target", ["reference", "local"])
def test_refit_lowers_every_blocks_output_error(target: str) -> None:
    dense = tiny_vit()
    pruned = _pruned(dense)
    images = _images()
    reference_out = block_outputs(dense, images)
    before = [(p - r).square().sum() for p, r in zip(block_outputs(pruned, images), reference_out)]
    results = reconstruct(pruned, dense, images, target=target, progress=False)
    after = [(p - r).square().sum() for p, r in zip(block_outputs(pruned, images), reference_out)]
    assert [r.layer for r in results] == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.proj", "mlp.fc2")]
    assert all(r.error_after <= r.error_before for r in results)
    for b, a in zip(before, after):
        assert a < 0.9 * b  # every block's output is strictly closer to the dense one


def test_refit_is_exact_when_removed_units_are_combinations_of_kept_ones() -> None:
    """MLP neuron 5 duplicates neuron 3 and V dim 2 of block 0 duplicates V dim 0: after removing the
    duplicates, the refit of fc2 / proj reproduces the dense model exactly."""
    dense = tiny_vit()
    with torch.no_grad():
        block = dense.blocks[0]
        block.mlp.fc1.weight[5] = block.mlp.fc1.weight[3]
        block.mlp.fc1.bias[5] = block.mlp.fc1.bias[3]
        a = block.attn
        v = a.v.weight.view(a.num_heads, a.v_dim, -1)
        v[:, 2] = v[:, 0]
        a.v.bias.view(a.num_heads, a.v_dim)[:, 2] = a.v.bias.view(a.num_heads, a.v_dim)[:, 0]
    pruned = copy.deepcopy(dense)
    structure = Structure(pruned, group_sizes=dict.fromkeys(("emb", "head", "qk", "v", "mlp"), 1))
    structure.prune([(("mlp", 0), torch.tensor([5])), (("v", 0), torch.tensor([2]))])
    images = _images()
    x = torch.cat(images)
    with torch.no_grad():
        assert (pruned(x) - dense(x)).abs().max() > 1e-3  # plain pruning changes the function
    reconstruct(pruned, dense, images, damping=1e-9, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), dense(x), atol=2e-4, rtol=1e-4)


def test_reconstructed_model_compacts_exactly() -> None:
    dense = tiny_vit()
    pruned = _pruned(dense, seed=3)
    reconstruct(pruned, dense, _images(), progress=False)
    assert sum(int((m == 0).sum()) for m in pruned.masks().values()) > 10
    assert_pruned_slices_zero(pruned)  # the refit revives nothing
    compact = pruned.compact()
    x = torch.cat(_images(1, seed=7))
    with torch.no_grad():
        torch.testing.assert_close(compact(x), pruned(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("prune_emb", "factor"), [(False, 0.6), (True, 0.99)])
def test_block_distillation_lowers_every_blocks_error_after_the_refit(prune_emb: bool, factor: float) -> None:
    """Training each block on top of the least-squares refit brings every block's output closer to
    the dense model's (on images it did not train on too, where the pruned channels' information is
    not what the error is made of), and the result still compacts exactly."""
    dense = tiny_vit()
    pruned = copy.deepcopy(dense)
    random_masks(pruned, seed=5, keep=0.6)
    if not prune_emb:
        with torch.no_grad():
            pruned.emb_mask.fill_(1)
    Structure(pruned, group_sizes=dict.fromkeys(("emb", "head", "qk", "v", "mlp"), 1)).zero_pruned()
    images, unseen = _images(8), _images(4, seed=11)
    reconstruct(pruned, dense, images, layers=("proj", "fc1", "fc2"), progress=False)
    refit = copy.deepcopy(pruned)
    results = BlockDistillation(epochs=20, lr=1e-3, batch_size=16)(pruned, dense, images, progress=False)
    assert [r.layer for r in results] == ["blocks.0", "blocks.1"]
    assert all(r.error_after < factor * r.error_before for r in results)
    live = pruned.emb_mask.bool()
    for out in (images,) if prune_emb else (images, unseen):
        reference = block_outputs(dense, out)
        for b, a, r in zip(block_outputs(refit, out), block_outputs(pruned, out), reference):
            assert (a - r)[..., live].square().sum() < factor * (b - r)[..., live].square().sum()
    assert_pruned_slices_zero(pruned)
    x = torch.cat(unseen)
    with torch.no_grad():
        torch.testing.assert_close(pruned.compact()(x), pruned(x), atol=1e-5, rtol=1e-5)


def test_block_distillation_is_reproducible_and_leaves_the_reference_alone() -> None:
    dense = tiny_vit()
    dense_state = copy.deepcopy(dense.state_dict())
    runs = []
    for _ in range(2):
        pruned = _pruned(dense, seed=2)
        Reconstruction(layers=("proj", "fc2"), batches=4,
                       distillation=BlockDistillation(epochs=2, seed=3))(pruned, dense, _images(), progress=False)
        runs.append(pruned.state_dict())
    torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
    torch.testing.assert_close(dense.state_dict(), dense_state, atol=0, rtol=0)
    assert not dense.training and not pruned.training


def test_block_distillation_without_an_lr_trains_at_the_structured_default() -> None:
    """`lr=None` (block_distill.yaml's default) is `STRUCTURED_LR`: the same weights, bit for bit, as
    that lr given explicitly, and not those of the sparse models' 1e-3."""
    dense = tiny_vit()
    images = _images()
    tuned = {}
    for lr in (None, STRUCTURED_LR, 1e-3):
        pruned = _pruned(dense, seed=2)
        reconstruct(pruned, dense, images, progress=False)
        BlockDistillation(epochs=2, lr=lr)(pruned, dense, images, progress=False)
        tuned[lr] = pruned.state_dict()
    assert STRUCTURED_LR == 2e-3
    torch.testing.assert_close(tuned[None], tuned[STRUCTURED_LR], atol=0, rtol=0)
    assert any(not torch.equal(tuned[None][k], tuned[1e-3][k]) for k in tuned[None])
    with pytest.raises(ValueError, match="lr must be > 0"):
        BlockDistillation(lr=0.0)


def test_block_distillation_never_leaves_a_block_worse_than_the_refit() -> None:
    """At an absurd learning rate training ruins the blocks; each then keeps its refit weights."""
    dense = tiny_vit()
    pruned = _pruned(dense, seed=6)
    images = _images()
    reconstruct(pruned, dense, images, progress=False)
    refit = copy.deepcopy(pruned.state_dict())
    results = BlockDistillation(epochs=2, lr=10.0)(pruned, dense, images, progress=False)
    assert all(r.error_after == r.error_before for r in results)
    torch.testing.assert_close(pruned.state_dict(), refit, atol=0, rtol=0)


def test_input_side_refit_recovers_pruned_emb_channels() -> None:
    """With EMB channels pruned, refitting q/k/v and fc1 as well brings the model closer than
    refitting the output side alone."""
    dense = tiny_vit()
    pruned = copy.deepcopy(dense)
    structure = Structure(pruned, group_sizes=dict.fromkeys(("emb", "head", "qk", "v", "mlp"), 1))
    structure.prune([(("emb", -1), torch.arange(0, 48, 6))])
    images, x = _images(), torch.cat(_images(2, seed=9))

    def error(model: PrunableViT) -> float:
        with torch.no_grad():
            return float((model(x) - dense(x)).square().mean())

    output_side, both_sides = copy.deepcopy(pruned), copy.deepcopy(pruned)
    reconstruct(output_side, dense, images, layers=("proj", "fc2"), progress=False)
    reconstruct(both_sides, dense, images, layers=("qkv", "proj", "fc1", "fc2"), progress=False)
    assert error(both_sides) < error(output_side) < error(pruned)


def test_reconstruction_config_checks_values() -> None:
    with pytest.raises(ValueError, match="unknown"):
        Reconstruction(layers=("fc3",))
    with pytest.raises(ValueError, match="target"):
        Reconstruction(target="global")
    with pytest.raises(ValueError, match="damping"):
        Reconstruction(damping=0)
    with pytest.raises(ValueError, match="batches"):
        Reconstruction(batches=0)
    with pytest.raises(ValueError, match="masked"):
        reconstruct(tiny_vit().compact(), tiny_vit(), _images(1))
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"batch_size": 0}, {"readout": 1.0}, {"readout": -0.1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BlockDistillation(**bad)
    with pytest.raises(ValueError, match="masked"):
        BlockDistillation()(tiny_vit().compact(), tiny_vit(), _images(1))
