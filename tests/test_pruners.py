"""Every pruner config behind one call shape: built from its `_target_`, called as
`pruner(model, latency_model, batches, device)`, one pruned copy per target, the input untouched."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nvit_lightning.app import build
from nvit_lightning.latency import FlopsLatency
from nvit_lightning.pruning import Pruner
from nvit_lightning.pruning.base import OUTPUTS
from nvit_lightning.sparsity import layer_sparsity

from .conftest import tiny_vit

ROOT = Path(__file__).resolve().parents[1]
PRUNERS = sorted(p.stem for p in (ROOT / "conf" / "pruner").glob("*.yaml"))
# small enough for a 2-block model with 3 and 2 heads (single heads), quick Fisher blocks
SMALL_OPTIONS = {"num_grads": 16, "block_size": 16}


def _pruner_cfg(name: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("prune", overrides=[f"pruner={name}"])
    pruner = cfg.pruner
    OmegaConf.set_struct(pruner, False)
    for key in [k for k in SMALL_OPTIONS if k in pruner]:
        pruner[key] = SMALL_OPTIONS[key]
    if pruner.get("group_sizes"):
        pruner.group_sizes.head = 1
    if "sparsities" in pruner and pruner.sparsities is not None:
        pruner.sparsities = [0.5, 0.7]
    if pruner.get("target", 1.0) < 1.0:
        pruner.target, pruner.snapshots = 0.6, [0.8]
    return pruner


def _batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def test_every_pruner_config_is_found() -> None:
    assert {"obs_search", "oneshot", "gradual", "hessian", "ovit", "woodfisher", "global_magnitude",
            "none"} <= set(PRUNERS)


@pytest.mark.parametrize("name", PRUNERS)
def test_every_pruner_has_one_call_shape(name: str) -> None:
    pruner = build(_pruner_cfg(name))
    assert isinstance(pruner, Pruner) and pruner.output in OUTPUTS and isinstance(pruner.name, str)
    model = tiny_vit().with_masks() if pruner.output == "masked" else tiny_vit()
    latency = FlopsLatency(tokens=17, num_classes=10, patch_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner.check(model, latency)
    batches = _batches()[: max(1, pruner.calibration_batches(2, 8))]
    pruned = pruner(model, latency, batches, "cpu", False)

    assert sorted(pruned) == sorted(pruner.targets)
    if pruner.output == "masked":
        assert pruner.target in pruned
        dense = latency.model_latency(model.live_dims())
        for target, masked in pruned.items():  # each target met by the latency model
            assert latency.model_latency(masked.live_dims()) <= target * dense + 1e-6, (name, target)
            x = batches[0][0]
            with torch.no_grad():  # the masked copy and its compaction compute the same function
                assert torch.allclose(masked(x), masked.compact()(x), atol=1e-4)
    else:
        for level, sparse in pruned.items():
            achieved, _ = layer_sparsity(sparse, list(pruner.layers(sparse)))
            assert achieved == pytest.approx(level, abs=0.02), (name, level)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "the input model was changed"
    assert isinstance(pruner.describe()["criterion"], str) and isinstance(pruner.history, list)
