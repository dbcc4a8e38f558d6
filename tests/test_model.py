"""The prunable ViT: parity with timm, exact compaction, save/load, dims arithmetic."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from nvit_lightning.models import KINDS, PrunableViT, ViTDims, from_timm, revit_dims
from nvit_lightning.models.compact import load_compact_into
from nvit_lightning.models.structure import mask_names
from nvit_lightning.pruning import Structure

from .conftest import DEIT_TINY_CKPT, assert_pruned_slices_zero, needs_deit_tiny, random_masks, tiny_vit


def _images(n: int = 2, size: int = 224, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_timm_parity_random_init(name: str) -> None:
    reference = timm.create_model(name).eval()
    ours = from_timm(reference).eval()
    x = _images()
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() < 1e-4
    assert ours.num_params() == sum(p.numel() for p in reference.parameters())


def _slice_linear(linear: torch.nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> torch.nn.Linear:
    weight = linear.weight.data
    weight = weight if rows is None else weight[rows]
    weight = weight if cols is None else weight[:, cols]
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    out.weight.data.copy_(weight)
    if linear.bias is not None:
        out.bias.data.copy_(linear.bias.data if rows is None else linear.bias.data[rows])
    return out


def test_timm_parity_structurally_pruned_model() -> None:
    """A timm ViT pruned by another tool (as Torch-Pruning leaves it: fewer heads, narrower heads,
    narrower MLP per block) converts to the same function, dims read off the modules."""
    reference = timm.create_model("deit_tiny_patch16_224").eval()
    kept = {0: (3, 40), 1: (2, 64)}  # block: (heads kept, head dim kept)
    for i, (heads, head_dim) in kept.items():
        attn = reference.blocks[i].attn
        per_head = torch.arange(head_dim)
        rows = torch.cat([h * 64 + per_head for h in range(heads)])  # one of q/k/v
        attn.qkv = _slice_linear(attn.qkv, torch.cat([rows + part * 192 for part in range(3)]))
        attn.proj = _slice_linear(attn.proj, cols=rows)
        attn.num_heads, attn.head_dim, attn.attn_dim = heads, head_dim, heads * head_dim
    mlp = reference.blocks[2].mlp
    mlp.fc1, mlp.fc2 = _slice_linear(mlp.fc1, torch.arange(500)), _slice_linear(mlp.fc2, cols=torch.arange(500))
    ours = from_timm(reference).eval()
    assert (ours.dims.heads[:2], ours.dims.qk[:2], ours.dims.v[:2]) == ((3, 2), (40, 64), (40, 64))
    assert ours.dims.mlp[2] == 500
    x = _images()
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max() < 1e-4
    assert ours.num_params() == sum(p.numel() for p in reference.parameters())


@needs_deit_tiny
def test_timm_parity_real_checkpoint() -> None:
    reference = timm.create_model("deit_tiny_patch16_224", checkpoint_path=str(DEIT_TINY_CKPT)).eval()
    ours = from_timm("deit_tiny_patch16_224", checkpoint_path=DEIT_TINY_CKPT).eval()
    via_registry = timm.create_model("nvit_deit_tiny_patch16_224", checkpoint_path=str(DEIT_TINY_CKPT)).eval()
    x = _images()
    with torch.no_grad():
        expected = reference(x)
        assert (ours(x) - expected).abs().max() < 1e-4
        assert (via_registry(x) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("distilled", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compaction_equivalence_small(distilled: bool, seed: int) -> None:
    model = tiny_vit(distilled, seed)
    random_masks(model, seed)
    compact = model.compact().eval()
    x = _images(4, 32, seed)
    with torch.no_grad():
        assert (model(x) - compact(x)).abs().max() < 1e-4
    assert compact.dims == model.live_dims()
    assert compact.num_params() == compact.dims.num_params(
        num_classes=10, patch_size=8, num_patches=16, distilled=distilled)
    assert compact.num_params() < model.num_params()
    assert not compact.masks()


@pytest.mark.parametrize("distilled", [False, True])
def test_load_compact_into_inverts_compaction(distilled: bool) -> None:
    """Changed weights of a compact model, written back into its masked original, give the same
    function there; pruned slices stay zero."""
    model = tiny_vit(distilled, seed=4)
    random_masks(model, seed=4)
    Structure(model, group_sizes=dict.fromkeys(KINDS, 1)).zero_pruned()
    compact = model.compact()
    with torch.no_grad():
        for param in compact.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    load_compact_into(model, compact)
    x = _images(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), compact(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.compact().state_dict(), compact.state_dict())
    assert_pruned_slices_zero(model)
    with pytest.raises(ValueError, match="dims"):
        load_compact_into(model, tiny_vit(distilled).compact())


def test_compaction_removes_whole_heads_and_emb() -> None:
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].attn.head_mask[1] = 0
        model.emb_mask[::2] = 0
    compact = model.compact()
    assert compact.dims.heads == (2, 2) and compact.dims.emb == 24
    x = _images(2, 32)
    with torch.no_grad():
        assert (model(x) - compact(x)).abs().max() < 1e-4


def test_compaction_equivalence_deit_tiny() -> None:
    model = from_timm(timm.create_model("deit_tiny_patch16_224")).eval()
    random_masks(model, seed=3, keep=0.7)
    compact = model.compact().eval()
    x = _images(2)
    with torch.no_grad():
        assert (model(x) - compact(x)).abs().max() < 1e-4
    assert compact.num_params() == compact.dims.num_params()


def test_masked_layernorm_uses_live_channels_only() -> None:
    """A dead EMB channel holding garbage must not change the output (the official code's bug)."""
    model = tiny_vit()
    with torch.no_grad():
        model.emb_mask[5] = 0
        x = _images(2, 32)
        before = model(x)
        model.blocks[0].norm1.weight[5] = 100.0
        model.blocks[1].mlp.fc2.bias[5] = 50.0
        model.patch_embed.proj.bias[5] = -7.0
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("masked", [True, False])
def test_inference_qkv_product_matches_separate_layers(masked: bool) -> None:
    """At inference q, k, v run as one product (qk != v here); it must compute what the three layers
    compute (the path training, saliency hooks and 2:4 weights use), and skip no hook."""
    model = tiny_vit()  # block 0: qk 16, v 8 per head
    model = (model if masked else model.compact()).eval()
    x = _images(2, 32)
    with torch.no_grad():
        assert model.blocks[0].attn._one_gemm()
        fused = model(x)
    assert not model.blocks[0].attn._one_gemm()  # autograd on: the three layers
    separate = model(x)
    torch.testing.assert_close(fused, separate.detach(), rtol=1e-5, atol=1e-5)
    seen = []
    model.blocks[1].attn.k.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused, rtol=1e-5, atol=1e-5)
    attn = model.blocks[1].attn
    assert seen == [torch.Size([2, 17, attn.num_heads * attn.qk_dim])]  # 16 patches + class token


def test_attention_scale_survives_pruning() -> None:
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].attn.qk_mask[8:] = 0
    compact = model.compact()
    assert compact.blocks[0].attn.qk_dim == 8
    assert compact.blocks[0].attn.scale == pytest.approx(16**-0.5)


def test_save_load_round_trip(tmp_path) -> None:
    model = tiny_vit(distilled=True)
    random_masks(model, seed=5)
    for m in (model, model.compact()):
        m.save_pretrained(tmp_path / str(m.masked))
        loaded = PrunableViT.from_pretrained(tmp_path / str(m.masked)).eval()
        x = _images(2, 32)
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x))
        assert loaded.dims == m.dims and loaded.masked == m.masked
    config = json.loads((tmp_path / "True" / "config.json").read_text())
    assert config["architecture"] == "nvit_vit" and config["num_classes"] == 10
    assert config["model_args"]["dims"]["heads"] == [3, 2] and config["model_args"]["img_size"] == 32
    assert not list(tmp_path.rglob("*.pt*")), "no pickles"


def test_legacy_dims_json_still_loads(tmp_path) -> None:
    """Directories written before config.json (dims.json: the config dict itself) load as before."""
    model = tiny_vit(distilled=True)
    random_masks(model, seed=6)
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "dims.json").write_text(json.dumps({"architecture": "PrunableViT", **model.config,
                                                    "masked": True}))
    loaded = PrunableViT.from_pretrained(tmp_path).eval()
    x = _images(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_load_rejects_other_architecture(tmp_path) -> None:
    tiny_vit().compact().save_pretrained(tmp_path)
    other = PrunableViT(ViTDims(32, (2,), (8,), (8,), (32,)), img_size=32, patch_size=8, num_classes=10)
    from safetensors.torch import load_file

    from nvit_lightning.models.vit import load_checked_state_dict

    with pytest.raises(ValueError, match="does not match the model's architecture"):
        load_checked_state_dict(other, load_file(str(tmp_path / "model.safetensors")), "ckpt")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        PrunableViT.from_pretrained(tmp_path / "missing")


def test_from_timm_errors() -> None:
    with pytest.raises(ValueError, match="unknown timm model"):
        from_timm("deit_gigantic_patch3")
    with pytest.raises(ValueError, match="num_heads"):
        from_timm(timm.create_model("deit_tiny_patch16_224").state_dict())
    with pytest.raises(ValueError, match="attention pooling"):
        from_timm(timm.create_model("vit_base_patch16_siglip_224", depth=1, embed_dim=32, num_heads=2))


def test_wrong_checkpoint_for_timm_name(tmp_path) -> None:
    path = tmp_path / "small.pth"
    torch.save(timm.create_model("deit_small_patch16_224").state_dict(), path)
    with pytest.raises(ValueError, match="does not fit timm model"):
        from_timm("deit_tiny_patch16_224", checkpoint_path=path)


def test_registry_entry_points() -> None:
    for name in ("nvit_deit_tiny_patch16_224", "nvit_deit_small_patch16_224",
                 "nvit_deit_base_distilled_patch16_224"):
        assert timm.is_model(name)
    model = timm.create_model("nvit_deit_small_patch16_224", num_classes=10)
    assert isinstance(model, PrunableViT) and model.dims.emb == 384 and model.num_classes == 10
    revit = timm.create_model("nvit_revit_patch16_224", emb=176)
    assert revit.dims == revit_dims(176)


def test_dims_counts_match_built_models() -> None:
    for name in ("nvit_deit_tiny_patch16_224", "nvit_deit_base_distilled_patch16_224"):
        model = timm.create_model(name)
        assert model.dims.num_params(distilled=model.distilled) == model.num_params()
    assert ViTDims.uniform(768, 12, 12).macs() == pytest.approx(17.58e9, rel=0.01)  # DeiT-B: 17.6G
    assert ViTDims.uniform(192, 12, 3).macs() == pytest.approx(1.26e9, rel=0.01)  # DeiT-Ti: 1.3G


def test_revit_rule() -> None:
    d = revit_dims(176)  # r = round(0.88) = 1, s = round(1.1) = 1
    assert d.heads == (10, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 10)
    assert d.qk == (16, 8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 16)
    assert d.v == (64,) * 12
    assert d.mlp == (528,) * 3 + (1056,) * 6 + (528,) * 3
    d = revit_dims(384)  # r = 2, s = 2
    assert d.heads == (10, 4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 10)
    assert d.qk == (32, 16, 16, 32, 32, 32, 32, 32, 32, 16, 16, 32)
    assert d.mlp == (1152,) * 3 + (2304,) * 6 + (1152,) * 3


def test_dims_round_trip_and_validation(tmp_path) -> None:
    d = ViTDims(64, (2, 1), (16, 8), (8, 8), (32, 48))
    assert ViTDims.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    d.save(tmp_path / "d.json")
    assert ViTDims.load(tmp_path / "d.json") == d
    with pytest.raises(ValueError, match="one entry per block"):
        ViTDims(64, (2, 1), (16,), (8, 8), (32, 48))
    with pytest.raises(ValueError, match=">= 1"):  # 0 heads / 0 MLP neurons are allowed (depth), 0 qk is not
        ViTDims(64, (2, 1), (0, 8), (8, 8), (32, 48))


def test_masks_cover_every_kind() -> None:
    model = tiny_vit()
    assert set(mask_names(model).values()) == set(model.masks())
