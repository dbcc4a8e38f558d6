"""Block distillation of sparse (oViT / N:M) models: every zero stays exactly zero at every optimizer
step, N:M patterns stay N:M, and every block ends closer to the dense one than oViT left it."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from nvit_lightning.app import build
from nvit_lightning.models import PrunableViT
from nvit_lightning.pruning.block_distill import (
    SPARSE_LR,
    SPARSE_READOUT,
    STRUCTURED_LR,
    STRUCTURED_READOUT,
    BlockDistillation,
)
from nvit_lightning.sparsity import OBSSparsifier, is_n_m_sparse, sparsifiable_layers, weight_masks
from nvit_lightning.sparsity.distill import SparseReconstruction, distill_sparse
from nvit_lightning.sparsity.logit_distill import LogitDistillation
from nvit_lightning.sparsity.refit import masked_lstsq, masked_refit

from .conftest import block_outputs, tiny_vit


def _batches(n: int = 4, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(n)]


def _dense() -> PrunableViT:
    return tiny_vit().compact()  # mask-free, as prune.py and the sweep sparsify it


def _sparse(dense: PrunableViT, pattern: str) -> PrunableViT:
    # uniform: every layer keeps 40 % (globally, a random model's k of block 0 is emptied, and with it
    # every gradient of q: nothing left to train there)
    options = ({"sparsities": [0.6], "distribution": "uniform"} if pattern == "unstructured"
               else {"sparsities": None, "pattern": pattern})
    (sparse,) = OBSSparsifier(num_grads=32, block_size=16, **options)(dense, batches=_batches(2, seed=3)).values()
    return sparse



@contextmanager
def _check_every_step(model: PrunableViT, masks: dict[str, Tensor]) -> Iterator[list[int]]:
    """After every optimizer step (before the distillation re-masks the weights), each masked weight
    of `model` and both of Adam's moments there are exactly zero; yields the step count."""
    params = dict(model.named_parameters())
    held = {params[name]: mask == 0 for name, mask in masks.items()}
    steps = [0]

    def check(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        steps[0] += 1
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in held:
                    dead = held[p]
                    assert not p.detach()[dead].any(), "a pruned weight moved"
                    state = optimizer.state[p]
                    assert not state["exp_avg"][dead].any() and not state["exp_avg_sq"][dead].any()

    handle = register_optimizer_step_post_hook(check)
    try:
        yield steps
    finally:
        handle.remove()


@pytest.mark.parametrize(("pattern", "readout", "lr"), [("unstructured", 0.0, 3e-3), ("2:4", 0.0, 3e-3),
                                                        ("unstructured", 0.5, 1e-3)])
def test_distillation_holds_every_zero_at_every_step(pattern: str, readout: float, lr: float) -> None:
    dense = _dense()
    sparse = _sparse(dense, pattern)
    names = list(sparsifiable_layers(sparse))
    masks = weight_masks(sparse, names)
    before = copy.deepcopy(sparse.state_dict())
    images = [x for x, _ in _batches()]
    with _check_every_step(sparse, masks) as steps:
        results = BlockDistillation(epochs=3, lr=lr, batch_size=16, readout=readout)(
            sparse, dense, images, progress=False, masks=masks)
    assert steps[0] == 2 * 3 * 4  # every step of both blocks was checked
    assert all(r.error_after < r.error_before for r in results)  # trained, not reverted
    modules = dict(sparse.named_modules())
    for name in names:
        weight, old = modules[name].weight, before[f"{name}.weight"]
        assert torch.equal(weight == 0, old == 0), name  # the same zeros: none revived, none added
        assert not torch.equal(weight, old), name  # the kept weights were trained
        if pattern == "2:4":
            assert is_n_m_sparse(weight, 2, 4), name


def test_distillation_lowers_every_blocks_error_below_ovits() -> None:
    """Against the dense model's residual stream after each block: lower than oViT alone on the
    calibration images, and on images the distillation never saw."""
    dense = _dense()
    sparse = _sparse(dense, "unstructured")
    ovit = copy.deepcopy(sparse)
    batches, unseen = _batches(4), [x for x, _ in _batches(2, seed=11)]
    report = distill_sparse(BlockDistillation(epochs=8, lr=1e-3, batch_size=16, readout=0.0), sparse, dense, batches,
                            list(sparsifiable_layers(sparse)), progress=False)
    assert len(report["block_errors"]) == 2 and report["seconds"] >= 0
    assert all(after < before for before, after in report["block_errors"])
    for images in ([x for x, _ in batches], unseen):
        reference = block_outputs(dense, images)
        for o, s, r in zip(block_outputs(ovit, images), block_outputs(sparse, images), reference):
            assert (s - r).square().sum() < 0.9 * (o - r).square().sum()


def test_unset_settings_train_a_sparse_model_at_the_sparse_values() -> None:
    """A bare `BlockDistillation` handed a sparse model (from Python, or block_distill.yaml's unset
    `lr` / `readout`) trains it bit for bit as `SPARSE_LR` / `SPARSE_READOUT` given explicitly, and not
    at the structured models' values."""
    dense = _dense()
    ovit = _sparse(dense, "unstructured")
    tuned = {}
    for name, settings in {"unset": {}, "sparse": {"lr": SPARSE_LR, "readout": SPARSE_READOUT},
                           "structured": {"lr": STRUCTURED_LR, "readout": STRUCTURED_READOUT}}.items():
        sparse = copy.deepcopy(ovit)
        distill_sparse(BlockDistillation(epochs=2, batch_size=16, **settings), sparse, dense, _batches(2),
                       list(sparsifiable_layers(sparse)), progress=False)
        tuned[name] = sparse.state_dict()
    torch.testing.assert_close(tuned["unset"], tuned["sparse"], atol=0, rtol=0)
    assert any(not torch.equal(tuned["unset"][k], tuned["structured"][k]) for k in tuned["unset"])


@pytest.mark.parametrize("global_pool", ["token", "avg"])
def test_readout_trades_stream_error_for_what_the_head_reads(global_pool: str) -> None:
    """With `readout`, part of each block's loss is the error of what the head reads of the stream
    (the class token, or the patch mean): after the last block that error ends lower than with the
    plain stream loss, while the plain loss matches the whole stream better, as each was asked."""
    dense = tiny_vit(global_pool=global_pool).compact()
    ovit = _sparse(dense, "unstructured")
    batches = _batches(4)
    images = [x for x, _ in batches]
    reference = block_outputs(dense, images)[-1]
    errors = {}
    for readout in (0.0, 0.9):
        sparse = copy.deepcopy(ovit)
        distill_sparse(BlockDistillation(epochs=8, lr=1e-3, batch_size=16, readout=readout), sparse, dense,
                       batches, list(sparsifiable_layers(sparse)), progress=False)
        last = block_outputs(sparse, images)[-1]
        errors[readout] = [float((last - reference).square().sum() / reference.square().sum()),
                           float((dense.pool(last) - dense.pool(reference)).square().sum()
                                 / dense.pool(reference).square().sum())]
    (stream_plain, read_plain), (stream_readout, read_readout) = errors[0.0], errors[0.9]
    assert read_readout < 0.8 * read_plain
    assert stream_plain < stream_readout


def test_distillation_needs_masks_exactly_for_mask_free_models() -> None:
    dense, images = _dense(), [torch.randn(4, 3, 32, 32)]
    with pytest.raises(ValueError, match="weight masks"):
        BlockDistillation(epochs=1)(tiny_vit(), dense, images, masks={})  # structurally masked
    with pytest.raises(ValueError, match="masked"):
        BlockDistillation(epochs=1)(tiny_vit().compact(), dense, images)  # mask-free, no masks


def test_weight_masks_mark_the_nonzero_weights() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight[0, 1] = 0.0
    masks = weight_masks(model, ["0"])
    assert list(masks) == ["0.weight"] and int(masks["0.weight"].sum()) == 11 and masks["0.weight"][0, 1] == 0


@pytest.mark.slow  # a sweep stopped and resumed: ~15 s of CPU time, 50 s on a busy 2-core machine
@pytest.mark.parametrize("reconstruction", ["block_distill", "sparse_logits"])
def test_sweep_with_distillation_keeps_exact_zeros_through_a_resume(tmp_path, monkeypatch,
                                                                    reconstruction: str) -> None:
    """`+experiment=ovit_sweep reconstruction=block_distill` (or `sparse_logits`): every level is
    block-distilled, logit-distilled, then fine-tuned; stopped after the first level and resumed,
    every saved model and the checkpoint hold exactly the requested zeros, nested from level to
    level."""
    from nvit_lightning.callbacks import sparsity as sweep_module
    from nvit_lightning.cli import train

    from .test_app import QUIET_CALLBACKS, SWEEP, _zeros, compose_cfg

    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0])
        return distill_sparse(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "distill_sparse", counting)
    overrides = [*QUIET_CALLBACKS, *SWEEP, f"reconstruction={reconstruction}",
                 "reconstruction.batches=2", "reconstruction.distillation.epochs=2"]
    if reconstruction == "sparse_logits":
        overrides.append("reconstruction.logits.epochs=2")
    with pytest.raises(ValueError, match=r"the sweep stopped after \[0.3\]"):
        cfg = compose_cfg("train", overrides, tmp_path)
        train.sparsity_sweep(cfg, build(cfg.pruner), max_steps=3)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (state,) = [s for k, s in checkpoint["callbacks"].items() if "SparsitySweep" in k]
    for name, mask in state["masks"].items():  # the checkpointed weights hold exactly the masks' zeros
        assert torch.equal(checkpoint["state_dict"][f"student.{name}.weight"] != 0, mask.bool()), name
    cfg = compose_cfg("train", [*overrides, "ckpt_path=last"], tmp_path)
    report = train.sparsity_sweep(cfg, build(cfg.pruner))
    assert len(calls) == 2  # one distillation per level, none redone by the resume
    assert all(plan.logits is not None for plan in calls)  # block_distill: with its logit step too
    for entry in report["sparse"]:
        assert abs(entry["achieved"] - entry["sparsity"]) < 1e-3
    first, second = (_zeros(e["dir"]) for e in report["sparse"])
    for key, zero in first.items():
        assert bool((second[key] | ~zero).all()), key


def test_prune_py_sparsify_honours_the_reconstruction(tmp_path) -> None:
    """`prune.py pruner=ovit reconstruction=block_distill`: each level is distilled (zeros exact, the
    report holds the accuracy before and the block errors); `reconstruction=sparse_refit`: each level
    refit row by row (zeros exact, the layers' errors lower); the least-squares refit of whole layers
    does not apply to sparse models and changes nothing."""
    from nvit_lightning.cli import prune

    from .test_app import SPARSE_SMALL, compose_cfg

    ovit = [*SPARSE_SMALL, "pruner=ovit", "pruner.sparsities=[0.5]", "pruner.num_grads=16", "pruner.block_size=16",
            "data.batch_size=8"]
    distilled = prune.run(compose_cfg("prune", [*ovit, "reconstruction=block_distill", "reconstruction.batches=2",
                                                     "reconstruction.distillation.epochs=2"], tmp_path / "bd"))
    refit = prune.run(compose_cfg("prune", [*ovit, "reconstruction=sparse_refit", "reconstruction.batches=2"],
                                  tmp_path / "refit"))
    plain = prune.run(compose_cfg("prune", [*ovit, "reconstruction=least_squares"], tmp_path / "ls"))
    (entry,), (refit_entry,), (alone,) = distilled["sparse"], refit["sparse"], plain["sparse"]
    assert entry["achieved"] == refit_entry["achieved"] == alone["achieved"] and abs(entry["achieved"] - 0.5) < 1e-3
    for e in (entry, refit_entry):
        assert e["before_reconstruction"] == {k: alone[k] for k in ("top1", "top5")}  # the same oViT model
    assert all(after <= before for before, after in entry["distillation"]["block_errors"])
    assert "refit_errors" not in entry["distillation"]  # block_distill: no refit; the distillation, then
    assert entry["distillation"]["logit_kl"][1] <= entry["distillation"]["logit_kl"][0]  # the logit step
    errors = refit_entry["distillation"]["refit_errors"]  # proj, fc1, fc2 of both blocks
    assert sorted(errors) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in ("attn.proj", "mlp.fc1", "mlp.fc2"))
    assert all(after <= before for before, after in errors.values())
    assert "block_errors" not in refit_entry["distillation"]
    assert "distillation" not in alone and plain["reconstruction"] is None
    assert distilled["reconstruction"]["distillation"]["epochs"] == 2
    ovit_only = PrunableViT.from_pretrained(alone["dir"]).state_dict()
    for e in (entry, refit_entry):
        tuned = PrunableViT.from_pretrained(e["dir"]).state_dict()
        for name in sparsifiable_layers(PrunableViT.from_pretrained(e["dir"])):
            assert torch.equal(tuned[f"{name}.weight"] == 0, ovit_only[f"{name}.weight"] == 0), name
            if e is refit_entry and name in errors and errors[name][1] < errors[name][0]:  # the solution written
                assert not torch.equal(tuned[f"{name}.weight"], ovit_only[f"{name}.weight"]), name


def test_each_configured_reconstruction_maps_to_its_sparse_form() -> None:
    """sparse_refit: the masked refit of proj / fc1 / fc2 alone; block_distill: the distillation
    (16 passes, `readout` and `lr` unset, so a sparse model gets half of each block's loss on the
    class token and lr 1e-3; set ones are kept), then the logit step; sparse_logits: the same with its
    own settings (4 passes, every token alike); least_squares and none: nothing."""
    from hydra import compose, initialize_config_dir

    from nvit_lightning.app import config_dir
    from nvit_lightning.sparsity.distill import sparse_distillation

    plans = {}
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        for name in ("least_squares", "block_distill", "sparse_refit", "sparse_logits", "none"):
            cfg = compose("prune", overrides=["pruner=ovit", f"reconstruction={name}"])
            plans[name] = sparse_distillation(build(cfg.reconstruction) if cfg.reconstruction else None)
        structured = build(compose("prune", overrides=["reconstruction=block_distill"]).reconstruction)
        explicit = compose("prune", overrides=["pruner=ovit", "reconstruction=block_distill",
                                               "reconstruction.distillation.readout=0",
                                               "reconstruction.distillation.lr=3e-3"])
        plans["readout 0"] = sparse_distillation(build(explicit.reconstruction))
    assert plans["block_distill"].distillation == structured.distillation  # the same settings, read by model kind
    assert plans["block_distill"].distillation.for_model(sparse=True) == replace(
        structured.distillation, lr=SPARSE_LR, readout=SPARSE_READOUT)
    assert structured.distillation.for_model(sparse=False) == replace(
        structured.distillation, lr=STRUCTURED_LR, readout=STRUCTURED_READOUT)
    assert (SPARSE_LR, SPARSE_READOUT, STRUCTURED_LR, STRUCTURED_READOUT) == (1e-3, 0.5, 2e-3, 0.0)
    explicit = plans["readout 0"].distillation.for_model(sparse=True)
    assert (explicit.lr, explicit.readout) == (3e-3, 0.0)  # set values are kept
    assert plans["sparse_logits"].distillation.readout == 0
    assert plans["none"] is None and plans["least_squares"] is None
    assert plans["block_distill"].layers == () and plans["block_distill"].distillation.epochs == 16
    assert plans["block_distill"].logits == LogitDistillation()  # then the logit step, as measured
    assert plans["sparse_refit"] == SparseReconstruction(("proj", "fc1", "fc2"), "reference", 0.01, 16, None)
    logits = plans["sparse_logits"]  # block distillation as measured (4 passes), then the logit step
    assert logits.layers == () and logits.distillation.epochs == 4
    assert logits.logits == LogitDistillation(epochs=2, lr=1e-3, trainable="affine")
    with pytest.raises(ValueError, match=r"reconstruction\.layers: unknown"):
        SparseReconstruction(layers=("qkv", "mlp"))
    from nvit_lightning.oneshot import structured_reconstruction

    with pytest.raises(ValueError, match="repair sparse models"):  # structured runs refuse it up front
        structured_reconstruction(plans["sparse_refit"])


# ---- the masked least-squares refit (sparsity/refit.py) ---------------------------------------------
def test_masked_lstsq_is_exact_when_the_target_is_reachable_with_the_mask() -> None:
    """Y = X Wᵀ + b with W zero off a random mask: the per-row solve recovers W and b to 1e-9, and
    every weight off the mask is exactly zero (whatever the solve's batching)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, generator=g, dtype=torch.float64)
    mask = torch.rand(10, 24, generator=g) > 0.6
    weight = torch.randn(10, 24, generator=g, dtype=torch.float64) * mask
    bias = torch.randn(10, generator=g, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], 1)
    y = x @ weight.T + bias
    for rows in (3, 64):
        solution = masked_lstsq(xa.T @ xa, xa.T @ y, mask, torch.zeros(25, 10, dtype=torch.float64), 1e-12,
                                rows_per_solve=rows)
        assert (solution[:-1].T - weight).abs().max() < 1e-9 and (solution[-1] - bias).abs().max() < 1e-9
        assert not solution[:-1].T[~mask].any()
    no_bias = masked_lstsq(xa.T @ xa, xa.T @ (x @ weight.T), mask, torch.zeros(25, 10, dtype=torch.float64),
                           1e-12, bias=False)
    assert (no_bias[:-1].T - weight).abs().max() < 1e-9 and not no_bias[-1].any()


def test_masked_lstsq_beats_every_other_weight_on_the_mask() -> None:
    """Unreachable target: the solution's squared error is below the current weights' and below any
    perturbation of them on the mask (it is the least-squares optimum there)."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(300, 16, generator=g, dtype=torch.float64), torch.ones(300, 1, dtype=torch.float64)], 1)
    y = torch.randn(300, 6, generator=g, dtype=torch.float64)
    mask = torch.rand(6, 16, generator=g) > 0.5
    free = torch.cat([mask.T, torch.ones(1, 6, dtype=torch.bool)])  # in+1, out: the weights on the mask, the bias
    current = torch.randn(17, 6, generator=g, dtype=torch.float64) * free
    solution = masked_lstsq(x.T @ x, x.T @ y, mask, current, 1e-12)

    def sse(w: Tensor) -> float:
        return float((x @ w - y).square().sum())

    assert sse(solution) < sse(current)
    for _ in range(5):
        nudge = 1e-3 * torch.randn(17, 6, generator=g, dtype=torch.float64) * free
        assert sse(solution) <= sse(solution + nudge)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_masked_refit_keeps_the_zeros_and_lowers_every_layers_error(pattern: str) -> None:
    dense = _dense()
    sparse = _sparse(dense, pattern)
    names = list(sparsifiable_layers(sparse))
    before = copy.deepcopy(sparse.state_dict())
    images = [x for x, _ in _batches()]
    results = masked_refit(sparse, dense, images, ("qkv", "proj", "fc1", "fc2"), names, damping=1e-3,
                           progress=False)
    assert [r.layer for r in results] == [f"blocks.{i}.{n}" for i in range(2) for n in
                                         ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert all(r.error_after <= r.error_before for r in results)
    assert sum(r.error_after < 0.99 * r.error_before for r in results) >= 10  # most layers move
    modules = dict(sparse.named_modules())
    for name in names:
        weight = modules[name].weight
        assert torch.equal(weight == 0, before[f"{name}.weight"] == 0), name
        if pattern == "2:4":
            assert is_n_m_sparse(weight, 2, 4), name


def test_sparse_reconstruction_refits_then_distils_with_exact_zeros() -> None:
    """The refit, then the distillation (every step checked): zeros exact throughout, the report holds
    both, and every block ends closer to the dense stream than oViT left it."""
    dense = _dense()
    sparse = _sparse(dense, "unstructured")
    ovit = copy.deepcopy(sparse)
    names = list(sparsifiable_layers(sparse))
    masks = weight_masks(sparse, names)
    plan = SparseReconstruction(layers=("qkv", "proj", "fc1", "fc2"), damping=1e-3,
                                distillation=BlockDistillation(epochs=4, lr=1e-3, batch_size=16))
    batches = _batches(4)
    with _check_every_step(sparse, masks) as steps:
        report = distill_sparse(plan, sparse, dense, batches, names, progress=False)
    assert steps[0] == 2 * 4 * 4
    assert len(report["refit_errors"]) == 12 and len(report["block_errors"]) == 2
    assert all(after <= before for before, after in report["refit_errors"].values())
    images = [x for x, _ in batches]
    for o, s, r in zip(block_outputs(ovit, images), block_outputs(sparse, images), block_outputs(dense, images)):
        assert (s - r).square().sum() < 0.9 * (o - r).square().sum()
    for name, mask in masks.items():
        assert torch.equal(dict(sparse.named_parameters())[name] != 0, mask.bool()), name


# ---- the end-to-end logit distillation (sparsity/logit_distill.py) -------------------------------------
def _confident() -> PrunableViT:
    """`_dense()` with its logits scaled up: a random model's are all near zero, so its KL is ~1e-4."""
    dense = _dense()
    with torch.no_grad():
        dense.head.weight.mul_(30)
        dense.head.bias.mul_(30)
    return dense


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_logit_distillation_holds_every_zero_at_every_step(pattern: str) -> None:
    """Every step of the KL fine-tune of the whole model: each pruned weight and both Adam moments
    exactly zero; at the end the same zeros (and 2:4), the kept weights trained."""
    dense = _confident()
    sparse = _sparse(dense, pattern)
    names = list(sparsifiable_layers(sparse))
    masks = weight_masks(sparse, names)
    before = copy.deepcopy(sparse.state_dict())
    with _check_every_step(sparse, masks) as steps:
        step = LogitDistillation(epochs=8, lr=1e-4, batch_size=24, trainable="all")
        kl = step(sparse, dense, [x for x, _ in _batches()], progress=False, masks=masks)
    assert steps[0] == 8 * 3  # 64 images in batches of 24, eight passes
    assert kl[1] < kl[0]
    modules = dict(sparse.named_modules())
    for name in names:
        weight, old = modules[name].weight, before[f"{name}.weight"]
        assert torch.equal(weight == 0, old == 0), name
        assert not torch.equal(weight, old), name
        if pattern == "2:4":
            assert is_n_m_sparse(weight, 2, 4), name


def test_logit_distillation_lowers_the_kl_left_by_block_distillation() -> None:
    """Block distillation, then the logit step (every step of both checked): the KL to the dense
    logits ends below what block distillation alone left, on the calibration images and on others,
    with the zeros exact."""
    dense = _confident()
    sparse = _sparse(dense, "unstructured")
    names = list(sparsifiable_layers(sparse))
    masks = weight_masks(sparse, names)
    plan = SparseReconstruction(layers=(), distillation=BlockDistillation(epochs=4, lr=1e-3, batch_size=16),
                                logits=LogitDistillation(epochs=8, lr=1e-4, batch_size=16, trainable="all"))
    batches, unseen = _batches(4), torch.cat([x for x, _ in _batches(2, seed=11)])
    block_only = copy.deepcopy(sparse)
    distill_sparse(plan.distillation, block_only, dense, batches, names, progress=False)
    with _check_every_step(sparse, masks) as steps:
        report = distill_sparse(plan, sparse, dense, batches, names, progress=False)
    assert steps[0] == 2 * 4 * 4 + 8 * 4
    assert report["logit_kl"][1] < 0.9 * report["logit_kl"][0]
    step = plan.logits
    with torch.no_grad():
        images = torch.cat([x for x, _ in batches])
        assert abs(float(step._divergence(block_only(images), dense(images))) - report["logit_kl"][0]) < 1e-5
        assert step._divergence(sparse(unseen), dense(unseen)) < step._divergence(block_only(unseen), dense(unseen))
    for name, mask in masks.items():
        assert torch.equal(dict(sparse.named_parameters())[name] != 0, mask.bool()), name


def test_logit_distillation_refuses_bad_settings() -> None:
    for bad in ({"epochs": 0}, {"lr": 0.0}, {"temperature": -1.0}, {"batch_size": 0}):
        with pytest.raises(ValueError, match="logit distillation"):
            LogitDistillation(**bad)
    with pytest.raises(ValueError, match="at least one"):
        LogitDistillation()(_dense(), _dense(), [])


@pytest.mark.parametrize("options", [{"trainable": "affine", "lr": 1e-5}, {"trainable": "all", "lr": 1e-4}])
def test_logit_distillation_variants_hold_the_zeros(options: dict) -> None:
    """`trainable=affine` trains biases and norms only (every weight matrix bit for bit as it was);
    `trainable=all` keeps every zero through every step too."""
    dense = _confident()
    sparse = _sparse(dense, "unstructured")
    names = list(sparsifiable_layers(sparse))
    masks = weight_masks(sparse, names)
    before = copy.deepcopy(sparse.state_dict())
    with _check_every_step(sparse, masks) as steps:
        LogitDistillation(epochs=2, batch_size=16, **options)(sparse, dense, [x for x, _ in _batches()],
                                                              progress=False, masks=masks)
    assert steps[0] == 2 * 4
    after = sparse.state_dict()
    assert all(p.requires_grad for p in sparse.parameters())  # what was frozen for the step is trainable again
    for name, mask in masks.items():
        assert torch.equal(after[name] != 0, mask.bool()), name
        if options.get("trainable") == "affine":
            assert torch.equal(after[name], before[name]), name
    if options.get("trainable") == "affine":
        assert any(not torch.equal(after[k], before[k]) for k in after if after[k].dim() == 1)


def test_prune_py_reports_the_logit_step(tmp_path) -> None:
    """`prune.py pruner=ovit reconstruction=sparse_logits`: block distillation, then the logit step;
    the report holds both, and the zeros are oViT's."""
    from nvit_lightning.cli import prune

    from .test_app import SPARSE_SMALL, compose_cfg

    ovit = [*SPARSE_SMALL, "pruner=ovit", "pruner.sparsities=[0.5]", "pruner.num_grads=16", "pruner.block_size=16",
            "data.batch_size=8"]
    report = prune.run(compose_cfg("prune", [*ovit, "reconstruction=sparse_logits", "reconstruction.batches=2",
                                             "reconstruction.distillation.epochs=2", "reconstruction.logits.epochs=2",
                                             "reconstruction.logits.trainable=all", "reconstruction.logits.lr=1e-4"],
                                   tmp_path))
    (entry,) = report["sparse"]
    assert abs(entry["achieved"] - 0.5) < 1e-3 and len(entry["distillation"]["block_errors"]) == 2
    before, after = entry["distillation"]["logit_kl"]
    assert after <= before
    assert report["reconstruction"]["logits"]["epochs"] == 2
