"""Every timm ViT family in `models.families.FAMILIES`: import equal to timm, exact compaction under
random masks of every kind the family allows, a saved model that timm itself loads, timm's
classifier API, and the latency search + least-squares refit. Unsupported features: one-line errors."""

from __future__ import annotations

import copy
import json
import os

import pytest
import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from nvit_lightning.latency import FlopsLatency
from nvit_lightning.models import FAMILIES, KIND_SPECS, PrunableViT, from_timm, write_model_card
from nvit_lightning.models.compact import load_compact_into
from nvit_lightning.models.structure import mask_names
from nvit_lightning.pruning import Structure
from nvit_lightning.pruning.block_distill import BlockDistillation
from nvit_lightning.pruning.reconstruct import Reconstruction, reconstruct
from nvit_lightning.pruning.search import LatencySearch

from .conftest import assert_pruned_slices_zero, family_timm_model

FAMILY_NAMES = list(FAMILIES)


def _data_config(model: nn.Module) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in resolve_data_config(model=model).items()}


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _mask_every_kind(model: PrunableViT, kinds: tuple[str, ...], seed: int = 0, keep: float = 0.6) -> None:
    """Random masks on every layer of the given kinds (one unit always kept), slices zeroed."""
    g = torch.Generator().manual_seed(seed)
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for (kind, _), name in mask_names(model).items():
            if kind in kinds:
                mask = buffers[name]
                drop = torch.rand(mask.numel(), generator=g) > keep
                drop[torch.randint(mask.numel(), (1,), generator=g)] = False
                mask[drop] = 0
    Structure(model, group_sizes=dict.fromkeys(kinds, 1)).zero_pruned()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_import_equals_timm(family: str) -> None:
    reference = family_timm_model(family)
    ours = from_timm(reference).eval()
    x = _images()
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() < 1e-4
        torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x), atol=1e-4, rtol=1e-4)
    assert ours.num_params() == sum(p.numel() for p in reference.parameters())
    assert FAMILIES[family].features.items() <= {**ours.config, "distilled": ours.distilled}.items()
    assert resolve_data_config(model=ours)["mean"] == tuple(reference.pretrained_cfg["mean"])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_compaction_is_exact_for_every_allowed_kind(family: str) -> None:
    model = from_timm(family_timm_model(family)).eval()
    kinds = FAMILIES[family].kinds
    _mask_every_kind(model, kinds, seed=1)
    compact = model.compact().eval()
    x = _images(3, seed=1)
    with torch.no_grad():
        assert (model(x) - compact(x)).abs().max() < 1e-5
    assert compact.dims == model.live_dims() and compact.num_params() == model.size_of()["params"]
    for spec in KIND_SPECS:  # every allowed kind really was cut
        assert (getattr(compact.dims, spec.dims_field) != getattr(model.dims, spec.dims_field)) == (spec.name in kinds)
    with torch.no_grad():  # and back: a changed compact model written into the masked one
        for p in compact.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    load_compact_into(model, compact)
    with torch.no_grad():
        torch.testing.assert_close(model(x), compact(x), atol=1e-5, rtol=1e-5)
    assert_pruned_slices_zero(model)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_timm_loads_the_saved_model(family: str, tmp_path) -> None:
    model = from_timm(family_timm_model(family)).eval()
    _mask_every_kind(model, FAMILIES[family].kinds, seed=2)
    x = _images()
    for saved in (model, model.compact().eval()):
        directory = saved.save_pretrained(tmp_path / ("masked" if saved.masked else "compact"))
        loaded = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
        assert isinstance(loaded, PrunableViT) and loaded.masked == saved.masked
        with torch.no_grad():
            assert torch.equal(loaded(x), saved(x))
        assert _data_config(loaded) == _data_config(saved)
        for name in ("config.json", "model.safetensors"):
            assert os.stat(directory / name).st_mode & 0o777 == 0o644
    by_file = timm.create_model("nvit_vit", pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(directory / "model.safetensors"))).eval()
    with torch.no_grad():
        assert torch.equal(by_file(x), saved(x))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_new_classifier_and_timm_api(family: str, tmp_path) -> None:
    model = from_timm(family_timm_model(family), num_classes=10).eval()
    assert model.num_classes == 10 and model.pretrained_cfg["num_classes"] == 10
    x = _images()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 16 + model.num_prefix_tokens, model.num_features)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.embed_dim)
        assert model.forward_head(features).shape == (2, 10)
        assert torch.equal(model.forward_head(features), model(x))
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_classes"] == config["model_args"]["num_classes"] == 10
    loaded = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.embed_dim)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_latency_search_and_refit(family: str) -> None:
    dense = from_timm(family_timm_model(family), num_classes=10).eval()
    g = torch.Generator().manual_seed(3)
    calib = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(3)]
    latency = FlopsLatency(tokens=16 + dense.num_prefix_tokens, num_classes=10, patch_size=8)
    pruned = LatencySearch(target=0.6, group_sizes={"mlp": 16})(dense, latency, calib, progress=False)[0.6]
    assert latency.model_latency(pruned.live_dims()) <= 0.6 * latency.model_latency(dense.dims) + 1e-9
    x = torch.cat([b[0] for b in calib])

    def error(m: PrunableViT) -> float:
        with torch.no_grad():
            return float((m(x) - dense(x)).square().mean())

    before = error(pruned)
    results = reconstruct(pruned, dense, [b[0] for b in calib], ("qkv", "proj", "fc1", "fc2"), progress=False)
    assert all(r.error_after <= r.error_before for r in results)
    assert error(pruned) < before
    with torch.no_grad():
        assert (pruned.compact()(x) - pruned(x)).abs().max() < 1e-4


@pytest.mark.parametrize("family", ["dinov2", "clip"])
def test_block_distillation_runs_on_family(family: str) -> None:
    dense = from_timm(family_timm_model(family)).eval()
    pruned = copy.deepcopy(dense)
    _mask_every_kind(pruned, ("head", "v", "mlp"), seed=4)
    images = [_images(8, seed=s) for s in range(2)]
    results = Reconstruction(batches=2, distillation=BlockDistillation(epochs=2, batch_size=8))(
        pruned, dense, images, progress=False)
    assert [r.layer for r in results[-2:]] == ["blocks.0", "blocks.1"]
    assert all(r.error_after <= r.error_before for r in results)
    with torch.no_grad():
        assert (pruned.compact()(images[0]) - pruned(images[0])).abs().max() < 1e-4


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    model = from_timm(family_timm_model("dinov2")).train()
    x = _images()
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        model(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_model_card(tmp_path) -> None:
    model = from_timm(family_timm_model("deit")).compact()
    model.save_pretrained(tmp_path)
    path = write_model_card(tmp_path, dict(source="deit_tiny_patch16_224", target=0.5, speedup=1.93,
                                           device="NVIDIA H100, batch 256, fp16", top1=71.234))
    text = path.read_text()
    assert "deit_tiny_patch16_224" in text and "1.93x" in text and "71.23 %" in text and "| 1 | 3 |" in text
    assert os.stat(path).st_mode & 0o777 == 0o644


def _unsupported() -> list[tuple[str, object]]:
    from timm.layers import SwiGLUPacked
    from timm.models.vision_transformer import ResPostBlock, VisionTransformer

    small = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    return [
        ("rotary position embeddings", lambda: timm.create_model("eva02_tiny_patch14_224", img_size=28, depth=1)),
        ("SwiGLU MLP", lambda: VisionTransformer(**small, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)),
        ("attention pooling", lambda: VisionTransformer(**small, global_pool="map")),
        ("block type ResPostBlock", lambda: VisionTransformer(**small, block_fn=ResPostBlock)),
        ("norm layer RmsNorm", lambda: VisionTransformer(**small, norm_layer="rmsnorm")),
        ("dynamic_img_size", lambda: VisionTransformer(**small, dynamic_img_size=True)),
        ("activation", lambda: VisionTransformer(**small, act_layer="quick_gelu")),
    ]


@pytest.mark.parametrize("feature,factory", _unsupported(), ids=[f for f, _ in _unsupported()])
def test_unsupported_feature_is_one_line_naming_it(feature: str, factory) -> None:
    with pytest.raises(ValueError, match=feature) as err:
        from_timm(factory())
    assert "\n" not in str(err.value)
