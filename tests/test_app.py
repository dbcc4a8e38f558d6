"""The application: real Hydra configs composed, train.py / prune.py end to end on tiny models,
resume, and one-line errors for bad input."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict
from safetensors.torch import load_file

from nvit_lightning.app import build, build_run, model_shape, setup_environment, work_device
from nvit_lightning.models import NonFiniteWeightsError, PrunableViT
from nvit_lightning.module import NonFiniteLossError, NViTModule
from nvit_lightning.validation import check_config

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")
setup_environment()

# a downsized model on synthetic data, a FLOPs latency model, no logging: seconds per run
# every structure kind competes in fixed-size events (the small model's floor with the demo's MLP +
# heads alone is 0.40 of its FLOPs latency)
ALL_KINDS = ["pruner.kinds=[emb,head,qk,v,mlp]", "pruner.latency_step=null", "pruner.groups_per_event=8"]
BASE = ["model=small_random", "data=synthetic", "latency=flops", "latency.tokens=17", "logger=none",
        "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true", "evaluate=true",
        "measure_latency=false", "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]
SMALL = ["pruner=gradual", *ALL_KINDS, *BASE]  # the saliency pruner, every kind competing
QUIET_CALLBACKS = ["~callbacks.progress_bar"]


def compose_cfg(config: str, overrides: list[str], out_dir: Path) -> DictConfig:
    """The config of `python <config>.py <overrides>`, with Hydra's runtime set as in a real run (the
    `${hydra:...}` interpolations of e.g. the W&B run name resolve)."""
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name=config, overrides=[*overrides, f"paths.output_dir={out_dir}"],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def run_train(overrides: list[str], out_dir: Path) -> dict:
    """train.py's job as its CLI runs it (the config check first), minus Hydra's process handling."""
    from nvit_lightning.cli import train

    cfg = compose_cfg("train", [*QUIET_CALLBACKS, *overrides], out_dir)
    check_config(cfg)
    return train.train(cfg)


def run_prune(overrides: list[str], out_dir: Path) -> dict:
    from nvit_lightning.cli import prune

    cfg = compose_cfg("prune", overrides, out_dir)
    check_config(cfg)
    return prune.run(cfg)


def test_default_config_is_the_demo(tmp_path: Path) -> None:
    default = compose_cfg("train", [], tmp_path)
    demo = compose_cfg("train", ["+experiment=demo"], tmp_path)
    assert default == demo
    assert default.model.timm_name == "deit_tiny_patch16_224"
    assert default.pruner.target == 0.65 and default.pruner._target_.endswith("search.LatencySearch")
    assert dict(default.pruner.group_sizes) == {"head": 1, "mlp": 16, "dim": 8, "emb": 32}
    assert default.reconstruction is not None and not default.pruner.emb
    assert default.pruner.head_dims and not default.pruner.depth  # head widths searched; whole sub-layers not
    assert default.reconstruction.distillation.epochs == 16 and default.schedule.finetune_epochs == 0
    assert compose_cfg("prune", [], tmp_path).reconstruction.get("distillation") is None  # the faster refit
    assert default.latency.path.endswith("deit_tiny_cpu_b32.json")
    assert default.trainer.accelerator == "cpu"


@pytest.mark.parametrize("experiment,target", [("nvit_base", 0.54), ("nvit_hybrid", 0.50),
                                               ("nvit_small", 0.39), ("nvit_tiny", 0.19)])
def test_paper_experiments_compose_and_run(experiment: str, target: float, tmp_path: Path) -> None:
    """The real recipes, downsized: a few optimizer steps, pruning events, compaction, fine-tuning."""
    recipe = compose_cfg("train", [f"+experiment={experiment}"], tmp_path)
    assert recipe.pruner.target == target and recipe.pruner.eta == 5e-4
    assert recipe.model.timm_name == "deit_base_distilled_patch16_224"
    assert recipe.trainer.strategy == "ddp" and recipe.schedule.optimizer.lr == 1e-4
    assert recipe.distill.kl_weight == 1e5 and recipe.data.train.kind == "folder"

    report = run_train([f"+experiment={experiment}", *SMALL, "trainer.strategy=auto",
                        "trainer.devices=1", "pruner.interval=2", "pruner.groups_per_event=64",
                        "pruner.eta=5e-8", "schedule.prune_max_epochs=3", "schedule.finetune_epochs=1",
                        "schedule.finetune_scheduler.warmup_steps=1"], tmp_path)
    assert report["pruned"]["latency_pred_ms"] <= target * report["dense"]["latency_pred_ms"] + 1e-12
    assert report["pruned"]["params"] < report["dense"]["params"]
    model = PrunableViT.from_pretrained(tmp_path / "model")
    assert model.dims.to_dict() == report["pruned"]["dims"] and not model.masked
    assert (tmp_path / "architecture.png").stat().st_size > 1000


def test_train_writes_report_snapshots_and_history(tmp_path: Path) -> None:
    report = run_train([*SMALL, "pruner.interval=2", "pruner.groups_per_event=3", "pruner.target=0.5",
                        "pruner.snapshots=[0.8]", "pruner.group_sizes.emb=8", "schedule.prune_max_epochs=20",
                        "schedule.finetune_epochs=0"], tmp_path)
    assert set(report) >= {"dense", "pruned", "target_latency", "criterion", "eta", "latency_model"}
    for entry in ("dense", "pruned"):
        assert set(report[entry]) >= {"params", "flops", "latency_pred_ms", "latency_measured_ms", "top1", "top5"}
    assert "dims" in report["pruned"]
    assert sorted(float(t) for t in report["snapshots"]) == [0.5, 0.8]
    snap = PrunableViT.from_pretrained(tmp_path / "snapshots" / "target_0.80")
    final = PrunableViT.from_pretrained(tmp_path / "model")
    assert snap.num_params() > final.num_params()
    history = json.loads((tmp_path / "pruning_history.json").read_text())
    ratios = [h["latency_ratio"] for h in history]
    assert ratios == sorted(ratios, reverse=True) and ratios[-1] <= 0.5 < ratios[-2]
    assert all(h["step"] % 2 == 0 for h in history)


def test_prune_one_shot_with_recovery_and_export(tmp_path: Path) -> None:
    report = run_prune([*SMALL, "calib_batches=2", "recovery_steps=2", "pruner.group_sizes.emb=8",
                        "pruner.target=0.6", "pruner=taylor"], tmp_path / "prune")
    assert report["criterion"] == "taylor" and report["recovery_steps"] == 2
    assert report["pruned"]["latency_pred_ms"] <= 0.6 * report["dense"]["latency_pred_ms"]
    assert PrunableViT.from_pretrained(tmp_path / "prune" / "model").dims.to_dict() == report["pruned"]["dims"]


def test_prune_latency_search_writes_each_target_refit_and_exact(tmp_path: Path) -> None:
    """`pruner=obs_search`: every target met from one set of traces, heads / MLP only, refit models."""
    report = run_prune([*BASE, "pruner=obs_search", "pruner.target=0.7", "pruner.snapshots=[0.85]",
                        "pruner.group_sizes.mlp=8", "calib_batches=2", "reconstruction.batches=2"], tmp_path)
    assert report["criterion"] == "obs_search" and report["pruner"]["row_weights"] == "uniform"
    dense_ms = report["dense"]["latency_pred_ms"]
    assert report["pruned"]["latency_pred_ms"] <= 0.7 * dense_ms + 1e-9
    final = PrunableViT.from_pretrained(tmp_path / "model")
    assert final.dims.to_dict() == report["pruned"]["dims"] and final.dims.emb == 64
    assert all(m % 8 == 0 and m >= 8 for m in final.dims.mlp) and min(final.dims.heads) >= 1
    snapshot = PrunableViT.from_pretrained(tmp_path / "snapshots" / "target_0.85")
    assert snapshot.num_params() > final.num_params()
    # the refit changed the weights that read the pruned units (fc2 of block 0 differs from dense)
    dense = build_run(compose_cfg("prune", BASE, tmp_path / "dense"))[1]  # same seed
    kept = final.dims.mlp[0]
    assert final.blocks[0].mlp.fc2.weight.shape == (64, kept)
    assert not any(torch.allclose(final.blocks[0].mlp.fc2.weight, dense.blocks[0].mlp.fc2.weight[:, idx])
                   for idx in [torch.arange(kept)])
    with pytest.raises(ValueError, match=r"unknown pruner key\(s\) \['eta'\]; LatencySearch takes"):
        run_prune([*BASE, "pruner=obs_search", "+pruner.eta=1"], tmp_path / "bad")
    with pytest.raises(ValueError, match="unreachable: removing heads and MLP neurons alone"):
        run_prune([*BASE, "pruner=obs_search", "pruner.target=0.3"], tmp_path / "floor")  # floor 0.40


def test_train_with_latency_search_prunes_once_then_finetunes(tmp_path: Path) -> None:
    report = run_train([*BASE, "pruner=obs_search", "pruner.target=0.75", "pruner.group_sizes.mlp=8",
                        "calib_batches=2", "schedule.finetune_epochs=1"], tmp_path)
    assert report["criterion"] == "obs_search" and report["events"] == 0
    assert report["pruned"]["latency_pred_ms"] <= 0.75 * report["dense"]["latency_pred_ms"] + 1e-9
    snapshot = PrunableViT.from_pretrained(tmp_path / "snapshots" / "target_0.75")
    final = PrunableViT.from_pretrained(tmp_path / "model")
    assert snapshot.dims == final.dims  # stage 2 fine-tunes the searched architecture
    assert not torch.equal(snapshot.blocks[0].mlp.fc2.weight, final.blocks[0].mlp.fc2.weight)
    with pytest.raises(ValueError, match="no stage-1 checkpoint"):
        run_train([*BASE, "pruner=obs_search", "ckpt_path=last"], tmp_path / "resume")


def test_export_mode_compacts_a_train_checkpoint(tmp_path: Path) -> None:
    run_train([*SMALL, "pruner.interval=2", "pruner.groups_per_event=100", "pruner.group_sizes.emb=8",
               "schedule.prune_max_epochs=2", "schedule.finetune_epochs=0"], tmp_path / "train")
    from nvit_lightning.cli import prune

    ckpt = tmp_path / "train" / "checkpoints" / "last.ckpt"
    cfg = compose_cfg("prune", [*SMALL, "mode=export", f"checkpoint={ckpt}"], tmp_path / "export")
    prune.export(cfg)
    exported = PrunableViT.from_pretrained(tmp_path / "export" / "model")
    masked = prune.load_train_checkpoint(str(ckpt))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (exported.eval()(x) - masked.eval()(x)).abs().max() < 1e-4


def _fit_stage1(tmp_path: Path, max_epochs: int, ckpt_path: str | None, overrides: list[str],
                extra_callbacks: tuple = ()) -> dict:
    from hydra.utils import instantiate

    from nvit_lightning.callbacks import GlobalPruning
    from nvit_lightning.cli import train

    cfg = compose_cfg("train", [*QUIET_CALLBACKS, *SMALL, *overrides], tmp_path)
    L.seed_everything(cfg.seed, workers=True)
    model = instantiate(cfg.model)
    pruning = GlobalPruning(instantiate(cfg.pruner), instantiate(cfg.latency, **model_shape(model, cfg.latency)))
    module = train.make_module(cfg, model, "prune")
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=max_epochs, logger=False,
                        callbacks=[pruning, checkpoint, *extra_callbacks],
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=instantiate(cfg.data, img_size=model.config["img_size"]), ckpt_path=ckpt_path)
    return {"masks": {k: v.clone() for k, v in model.masks().items()}, "history": pruning.history,
            "weights": {k: v.clone() for k, v in model.state_dict().items()}, "steps": trainer.global_step}


@pytest.mark.parametrize("criterion", ["hessian", "random"])
def test_resume_mid_pruning_continues_exactly(criterion: str, tmp_path: Path) -> None:
    # 4 steps per epoch, an event every 3 steps: the checkpoint after epoch 2 sits mid-interval
    overrides = [f"pruner={criterion}", "pruner.interval=3", "pruner.groups_per_event=2", "pruner.target=0.2",
                 "pruner.group_sizes.emb=8", "data.train.num_samples=32", "data.batch_size=8"]
    full = _fit_stage1(tmp_path / "full", 4, None, overrides)
    _fit_stage1(tmp_path / "part", 2, None, overrides)
    resumed = _fit_stage1(tmp_path / "part", 4, str(tmp_path / "part" / "ckpt" / "last.ckpt"), overrides)
    assert len(full["history"]) == 5 and resumed["history"] == full["history"]
    for key, mask in full["masks"].items():
        assert torch.equal(resumed["masks"][key], mask), key
    for key, value in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], value)


# 4 steps per epoch, an event every 3 steps; the stopping step sits mid-epoch and mid-interval
MID_EPOCH = ["pruner=hessian", "pruner.interval=3", "pruner.groups_per_event=2", "pruner.target=0.2",
             "pruner.group_sizes.emb=8", "data.train.num_samples=32", "data.batch_size=8",
             "data.augment=true"]
_INTERRUPTED_RUN = """
import os, signal, sys
from pathlib import Path
import lightning as L
from nvit_lightning.callbacks import InterruptCheckpoint
from tests.test_app import MID_EPOCH, _fit_stage1

class SignalAt(L.Callback):  # the signal arrives while the run is busy with a batch
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 7:
            os.kill(os.getpid(), getattr(signal, sys.argv[2]))

out = Path(sys.argv[1])
_fit_stage1(out, 4, None, MID_EPOCH, (SignalAt(), InterruptCheckpoint(out / "ckpt")))
"""


@pytest.mark.parametrize("signal_name,status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_mid_epoch_checkpoints_and_resumes_exactly(signal_name: str, status: int, tmp_path: Path) -> None:
    from nvit_lightning.callbacks import InterruptCheckpoint

    full = _fit_stage1(tmp_path / "full", 4, None, MID_EPOCH)
    done = subprocess.run([sys.executable, "-c", _INTERRUPTED_RUN, str(tmp_path / "part"), signal_name],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == status, done.stderr[-3000:]
    assert f"{signal_name} at step 7: checkpoint written to" in done.stderr
    ckpt = tmp_path / "part" / "ckpt" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 7  # epoch 1, 3 of its 4 batches done
    resumed = _fit_stage1(tmp_path / "part", 4, str(ckpt), MID_EPOCH, (InterruptCheckpoint(tmp_path / "part"),))
    assert resumed["steps"] == full["steps"] == 16 and resumed["history"] == full["history"]
    for key, mask in full["masks"].items():
        assert torch.equal(resumed["masks"][key], mask), key
    for key, value in full["weights"].items():
        torch.testing.assert_close(resumed["weights"][key], value, rtol=0, atol=0, msg=key)


def test_signal_during_the_epoch_end_stops_with_an_epoch_end_checkpoint(tmp_path: Path) -> None:
    from nvit_lightning.callbacks import InterruptCheckpoint, TrainingInterrupted

    interrupt = InterruptCheckpoint(tmp_path / "stop")

    class SignalAtEpochEnd(L.Callback):  # e.g. Ctrl-C during the epoch-end validation
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            interrupt.signal_name = "SIGINT"

    with pytest.raises(TrainingInterrupted, match="SIGINT at step 4") as stopped:
        _fit_stage1(tmp_path, 3, None, MID_EPOCH, (SignalAtEpochEnd(), interrupt))
    assert stopped.value.code == 130
    assert torch.load(tmp_path / "stop" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_every_pruning_event_writes_a_checkpoint(tmp_path: Path) -> None:
    from nvit_lightning.callbacks import InterruptCheckpoint

    events = InterruptCheckpoint(tmp_path / "events", filename="event.ckpt")
    run = _fit_stage1(tmp_path, 1, None, MID_EPOCH, (events,))  # 4 steps, the event at step 3
    assert [h["step"] for h in run["history"]] == [3]
    saved = torch.load(tmp_path / "events" / "event.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    assert torch.equal(saved["state_dict"]["student.blocks.0.mlp.mask"], run["masks"]["blocks.0.mlp.mask"])


def test_mid_epoch_resume_skips_the_batches_already_trained_on() -> None:
    from nvit_lightning.data.datamodule import EpochShuffleSampler

    sampler = EpochShuffleSampler(10, seed=3)
    sampler.set_epoch(2)
    order = list(sampler)
    sampler.skip = 4
    assert list(sampler) == order[4:]
    assert list(sampler) == order, "the skip applies to the resumed pass only"


def test_ckpt_path_last_resumes_the_finetuning_stage_where_it_stopped(tmp_path: Path) -> None:
    from nvit_lightning.cli import train

    assert train.finetune_resume_path("last", tmp_path) is None  # stage 2 never checkpointed: afresh
    torch.save({"global_step": 1, "state_dict": {}}, tmp_path / "last.ckpt")
    assert train.finetune_resume_path("last", tmp_path) == str(tmp_path / "last.ckpt")
    assert train.finetune_resume_path(None, tmp_path) is None


def test_resume_after_every_target_skips_the_pruning_stage(tmp_path: Path) -> None:
    overrides = ["pruner.interval=2", "pruner.groups_per_event=4", "pruner.target=0.5", "pruner.group_sizes.emb=8"]
    first = _fit_stage1(tmp_path, 6, None, overrides)
    assert first["history"][-1]["latency_ratio"] <= 0.5 and first["steps"] < 6 * 4  # stopped at the target
    resumed = _fit_stage1(tmp_path, 12, str(tmp_path / "ckpt" / "last.ckpt"), overrides)
    assert resumed["steps"] == first["steps"] and resumed["history"] == first["history"]
    for key, value in first["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key


def test_ckpt_path_last_resolves_the_newest_checkpoint(tmp_path: Path) -> None:
    from nvit_lightning.cli import train

    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no checkpoint in"):
        train.resume_path("last", tmp_path)
    torch.save({"global_step": 1, "state_dict": {}}, tmp_path / "epoch=0.ckpt")
    os.utime(tmp_path / "epoch=0.ckpt", (1, 1))
    torch.save({"global_step": 2, "state_dict": {}}, tmp_path / "last.ckpt")
    assert train.resume_path("last", tmp_path) == str(tmp_path / "last.ckpt")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path /nowhere\.ckpt not found"):
        train.resume_path("/nowhere.ckpt", tmp_path)


def test_resume_from_another_config_is_refused(tmp_path: Path) -> None:
    overrides = ["pruner.interval=3", "pruner.groups_per_event=2", "pruner.target=0.2", "pruner.group_sizes.emb=8"]
    _fit_stage1(tmp_path, 1, None, overrides)
    with pytest.raises(ValueError, match="another pruning config"):
        _fit_stage1(tmp_path, 2, str(tmp_path / "ckpt" / "last.ckpt"), [*overrides, "pruner.eta=1.0"])


@pytest.mark.parametrize("overrides,message", [
    (["pruner.target=0"], "strictly between 0 and 1"),
    (["pruner.target=1.5"], "strictly between 0 and 1"),
    (["pruner.eta=-1"], "pruner.eta must be >= 0"),
    (["pruner.criterion=obs"], "unknown pruner.criterion 'obs'"),
    (["pruner.group_sizes.mlp=48"], "does not divide"),
    (["pruner.target=0.001"], "unreachable"),
    (["data=imagenet_sample", "paths.data_dir=/nonexistent"], "/nonexistent/imagenet_sample_1000"),
    (["pruner.divisors.emb=0"], r"pruner.divisors must all be > 0, got \{'emb': 0"),
    (["distill.temperature=0"], "distill.temperature must be > 0"),
    (["distill.finetune_temperature=-1"], "distill.finetune_temperature must be > 0"),
    (["max_nonfinite_skips=-1"], "max_nonfinite_skips must be >= 0"),
    (["pruner.target=abc"], r"pruner.target must be a number \(.*\), got 'abc'"),
    (["distill=none", "reconstruction=least_squares"], r"reconstruction at pruning events needs the dense teacher"),
    (["+pruner.etaa=1"], r"unknown pruner key\(s\) \['etaa'\]; GlobalRanking takes"),
    (["data.img_size=64"], "data.img_size=64 but the model takes 32x32 images: set data.img_size=32"),
    (["data.train.num_classes=20"], "the data has labels up to 19, but the model has 10 classes"),
    (["trainer.devices=0"], "trainer.devices must be a positive count"),
    pytest.param(["trainer.accelerator=gpu"], "no CUDA GPU is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_input_errors(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        replaced = {o.split("=")[0] for o in overrides if o.startswith("data=")}
        run_train([*[o for o in SMALL if o.split("=")[0] not in replaced], *overrides], tmp_path)


@pytest.mark.parametrize("stage_lr", ["schedule.optimizer.lr=1e12", "schedule.finetune_optimizer.lr=1e12"])
def test_diverging_run_stops_and_writes_no_model(stage_lr: str, tmp_path: Path) -> None:
    """A NaN loss in either stage stops the run with a one-line error; no model, snapshot or report."""
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* at optimizer step"):
        run_train([*SMALL, "pruner.criterion=random", "pruner.snapshots=[0.9]", "schedule.prune_max_epochs=3",
                   "schedule.finetune_epochs=3", stage_lr], tmp_path)
    assert not (tmp_path / "model").exists() and not (tmp_path / "report.json").exists()
    for snapshot in (tmp_path / "snapshots").glob("*/model.safetensors"):  # written before the NaN, if any
        assert all(torch.isfinite(t).all() for t in load_file(snapshot).values())


def test_nonfinite_batches_are_skipped_up_to_the_limit(tmp_path: Path) -> None:
    model = build(compose_cfg("train", SMALL, tmp_path).model)
    module = NViTModule(model, optimizer=torch.optim.SGD, max_nonfinite_skips=2)
    images, labels = torch.full((2, 3, 32, 32), float("nan")), torch.zeros(2, dtype=torch.long)
    assert module.training_step((images, labels), 0) is None
    assert module.training_step((images, labels), 1) is None
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_skips"):
        module.training_step((images, labels), 2)


def test_mixup_mixes_what_the_teacher_scores_and_leaves_odd_batches(tmp_path: Path) -> None:
    model = build(compose_cfg("train", SMALL, tmp_path).model)
    module = NViTModule(model, optimizer=torch.optim.SGD, kl_weight=1.0, kl_from_start=True,
                        mixup={"mixup_alpha": 0.8, "cutmix_alpha": 0.0, "label_smoothing": 0.0})
    seen = []
    module.teacher.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    torch.manual_seed(0)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    mixed, soft = module.mix(images, labels)
    assert torch.equal(module.mix(images, labels)[0], mixed)  # seeded by the step: a resumed run mixes alike
    lam = float(soft[0, 0])  # image i is mixed with image 3 - i: lam of its own label
    assert 0.0 < lam < 1.0 and torch.allclose(soft.sum(-1), torch.ones(4))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    _, _, terms = module.compute_loss(mixed, soft)
    assert "kl" in terms and torch.equal(seen[-1], mixed)
    odd_images, odd_labels = module.mix(images[:3], labels[:3])  # timm needs pairs: left as it is
    assert torch.equal(odd_images, images[:3]) and torch.equal(odd_labels, labels[:3])


def test_model_with_nan_weights_is_never_saved(tmp_path: Path) -> None:
    model = build(compose_cfg("train", SMALL, tmp_path).model)
    with torch.no_grad():
        model.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"blocks\.0\.mlp\.fc1\.weight holds NaN"):
        model.save_pretrained(tmp_path / "nan_model")
    assert not (tmp_path / "nan_model").exists()


@pytest.mark.parametrize("logger", ["csv", "tensorboard"])
def test_stages_log_under_their_prefix_on_one_step_axis(logger: str, tmp_path: Path) -> None:
    run_train([*[o for o in SMALL if not o.startswith("logger=")], f"logger={logger}", "pruner.interval=2",
               "schedule.prune_max_epochs=2", "schedule.finetune_epochs=1",
               "trainer.log_every_n_steps=1", "trainer.limit_val_batches=2"], tmp_path)
    if logger == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(next((tmp_path / "tensorboard").rglob("events.out.*")).parent)).Reload()
        steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    else:
        import csv

        with open(next((tmp_path / "csv").rglob("metrics.csv"))) as f:
            rows = list(csv.DictReader(f))
        steps = {tag: [int(r["step"]) for r in rows if r.get(tag)] for tag in rows[0] if tag != "step"}
    prune, finetune = steps["prune/train/loss"], steps["finetune/train/loss"]
    assert prune == sorted(prune) and finetune == sorted(finetune) and len(finetune) > 0
    assert min(finetune) > max(prune)  # stage 2 continues the step axis
    assert max(steps["prune/val/top1"]) <= min(finetune) <= max(finetune) <= max(steps["finetune/val/top1"])
    assert "train/loss" not in steps


def test_validation_after_lightning_sanity_check_logs_the_step(tmp_path: Path) -> None:
    # a Trainer left at Lightning's defaults runs 2 sanity-check validation batches before training
    import csv

    from nvit_lightning.oneshot import recover

    cfg = compose_cfg("prune", BASE, tmp_path)
    datamodule, dense, _ = build_run(cfg)
    start = dense.compact()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, max_epochs=-1, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=2, val_check_interval=2)  # 4 batches per epoch
    student = recover(copy.deepcopy(start).train(), start.eval(), datamodule, trainer,
                      build(cfg.schedule.finetune_optimizer), kl_weight=1.0, temperature=3.0)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        val_steps = [int(float(r["step"])) for r in csv.DictReader(f) if r.get("recover/val/top1")]
    assert val_steps == [2, 4]
    assert not torch.equal(student.head.weight, start.head.weight)


def test_reconstruction_without_teacher_fails_before_training(tmp_path: Path) -> None:
    from nvit_lightning.callbacks import GlobalPruning
    from nvit_lightning.cli import train

    cfg = compose_cfg("train", [*SMALL, "distill=none"], tmp_path)
    pruning = GlobalPruning(build(cfg.pruner), build(cfg.latency), reconstruction=build(cfg.reconstruction))
    module = train.make_module(cfg, build(cfg.model), "prune")
    with pytest.raises(ValueError, match="needs the dense teacher"):
        pruning.setup(None, module, "fit")  # Lightning's first callback hook, before any step


def test_unwritable_output_dir_is_refused_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"cannot create the output directory .*file/run"):
        run_train(SMALL, tmp_path / "file" / "run")


@pytest.mark.parametrize("broken", ["config.json", "model.safetensors"])
def test_corrupt_model_directory_names_the_file(broken: str, tmp_path: Path) -> None:
    build(compose_cfg("train", SMALL, tmp_path).model).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / broken).write_bytes(b'{"truncated": ')
    with pytest.raises(ValueError, match=f"{tmp_path / 'model' / broken} (is corrupt|is not a readable)"):
        run_train([*SMALL, "model=from_dir", f"model.pretrained_dir={tmp_path / 'model'}"], tmp_path / "run")


def test_garbage_checkpoint_for_export_is_one_error(tmp_path: Path) -> None:
    from nvit_lightning.cli import prune

    (tmp_path / "x.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"x\.ckpt is not a readable Lightning checkpoint"):
        prune.export(compose_cfg("prune", ["mode=export", f"checkpoint={tmp_path / 'x.ckpt'}"], tmp_path))


def test_corrupt_latency_table_names_the_file(tmp_path: Path) -> None:
    table = tmp_path / "table.json"
    table.write_text('{"grid": [1, 2')
    with pytest.raises(ValueError, match=f"latency table {table} is corrupt .*delete it"):
        run_train([*[o for o in SMALL if not o.startswith("latency")], "latency=lut", f"latency.path={table}"],
                  tmp_path / "run")


def test_latency_table_for_another_model_is_refused(tmp_path: Path) -> None:
    table = ROOT / "data" / "latency" / "deit_tiny_cpu_b1.json"
    with pytest.raises(ValueError, match="tokens per image"):
        run_train([*[o for o in SMALL if not o.startswith("latency")], "latency=lut", f"latency.path={table}"],
                  tmp_path)


def test_cli_prints_one_line_error_for_missing_checkpoint(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model.checkpoint=/nowhere/deit.pth", "logger=none",
         f"hydra.run.dir={tmp_path}"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: checkpoint not found: /nowhere/deit.pth")
    assert "model.checkpoint" in errors[-1] and "Traceback" not in result.stderr


@pytest.mark.parametrize("script", ["train.py", "prune.py"])
def test_help_describes_the_application(script: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith(f"{script}: ") and f"python {script}" in result.stdout
    groups = ("pruner: demo, global_magnitude, gradual, hessian, magnitude, none, obs_search, oneshot, ovit, random, "
              "taylor, woodfisher")
    assert groups in result.stdout  # the config groups
    assert "target:" in result.stdout and "README.md" in result.stdout


def test_multirun_sweep_writes_one_report_per_job(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", "pruner.eta=0,1e-6", "pruner.target=0.5,0.7",
         *[o for o in SMALL if not o.startswith("+trainer")], "pruner.interval=2", "pruner.groups_per_event=50",
         "pruner.group_sizes.emb=8", "schedule.finetune_epochs=0", "evaluate=false",
         f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    reports = sorted(tmp_path.glob("*/report.json"))
    assert len(reports) == 4
    seen = {(json.loads(r.read_text())["eta"], json.loads(r.read_text())["target_latency"]) for r in reports}
    assert seen == {(0.0, 0.5), (0.0, 0.7), (1e-6, 0.5), (1e-6, 0.7)}


SPARSE_SMALL = BASE


def run_sparsify(overrides: list[str], out_dir: Path) -> dict:
    from nvit_lightning.cli import prune

    return prune.run(compose_cfg("prune", [*SPARSE_SMALL, *overrides], out_dir))


@pytest.mark.parametrize("pruner", ["ovit", "woodfisher", "global_magnitude"])
def test_prune_sparsify_writes_one_model_per_level(pruner: str, tmp_path: Path) -> None:
    report = run_sparsify([f"pruner={pruner}", "pruner.sparsities=[0.4,0.7]", "data.batch_size=8",
                           *(["pruner.num_grads=16", "pruner.block_size=16"] if pruner != "global_magnitude" else [])],
                          tmp_path)
    assert [e["sparsity"] for e in report["sparse"]] == [0.4, 0.7]
    dense = build_run(compose_cfg("prune", SPARSE_SMALL, tmp_path / "dense"))[1].compact()  # same seed
    for entry in report["sparse"]:
        model = PrunableViT.from_pretrained(entry["dir"])
        assert model.dims == dense.dims and not model.masked
        weights = [m.weight for n, m in model.named_modules() if n.startswith("blocks.") and n.endswith(
            ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2"))]
        zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
        assert abs(zeros - entry["sparsity"]) < 1e-3 and abs(entry["achieved"] - zeros) < 1e-9
        assert set(entry["layers"]) == {f"blocks.{i}.{n}" for i in range(2) for n in
                                        ("attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc1", "mlp.fc2")}
        assert 0.0 <= entry["top1"] <= 100.0 and entry["top5"] >= entry["top1"]
        # the layers outside the sparsified set keep the dense weights exactly
        torch.testing.assert_close(model.head.weight, dense.head.weight)
    assert json.loads((tmp_path / "report.json").read_text())["sparse"][0]["dir"] == report["sparse"][0]["dir"]


def test_prune_sparsify_a_compact_nvit_model(tmp_path: Path) -> None:
    """NViT + oViT: a compacted structurally pruned model (model=from_dir) is sparsified as it is."""
    compact = run_prune([*SMALL, "calib_batches=2", "pruner.group_sizes.emb=8", "pruner.target=0.6",
                         "reconstruction=none"], tmp_path / "nvit")
    report = run_sparsify(["pruner=ovit", "pruner.sparsities=[0.5]", "pruner.num_grads=16", "pruner.block_size=16",
                           "model=from_dir", f"model.pretrained_dir={tmp_path / 'nvit' / 'model'}"],
                          tmp_path / "ovit")
    model = PrunableViT.from_pretrained(report["sparse"][0]["dir"])
    assert model.dims.to_dict() == compact["pruned"]["dims"]
    assert abs(report["sparse"][0]["achieved"] - 0.5) < 1e-3


@pytest.mark.parametrize("overrides,message", [
    (["pruner=ovit", "pruner.pattern=2:4"], "set pruner.sparsities=null"),
    (["pruner=ovit", "pruner.sparsities=[0.5,1.0]"], "strictly between 0 and 1"),
    (["pruner=global_magnitude", "pruner.distribution=per_layer"], "pruner.distribution must be one of"),
    (["pruner=ovit", "recovery_steps=5"], "recovery_steps works with structural pruning only"),
    (["pruner=ovit", "+pruner.blocksize=4"], "bad config option for OBSSparsifier: .*blocksize"),
])
def test_bad_sparsifier_config_errors(overrides: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        run_sparsify(overrides, tmp_path)


def test_train_with_a_sparsifier_needs_the_sweep_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"runs a sparsity sweep: use \+experiment=ovit_sweep"):
        run_train([*SPARSE_SMALL, "pruner=ovit"], tmp_path)


SWEEP = ["+experiment=ovit_sweep", *SPARSE_SMALL, "pruner.sparsities=[0.3,0.5]", "pruner.num_grads=16",
         "pruner.block_size=16", "sweep.steps_per_level=3", "data.batch_size=8", "data.train.num_samples=64"]


def test_sweep_demo_block_distils_each_level_instead_of_kl_steps(tmp_path: Path) -> None:
    """`+experiment=ovit_sweep` ships `reconstruction=sweep_distill` (chosen on held-out images,
    docs/sparsity_reconstruction.md): one block-distillation pass per block on 8 calibration batches,
    no logit step, one Fisher and one KL step per level (the lr schedule's cycle with it);
    `reconstruction=none` (the KL steps alone) and `block_distill` on the command line still mean
    what they say."""
    from nvit_lightning.sparsity.distill import sparse_distillation

    def plan(*extra: str):
        cfg = compose_cfg("train", ["+experiment=ovit_sweep", *extra], tmp_path)
        return cfg, sparse_distillation(build(cfg.reconstruction) if cfg.reconstruction else None)

    cfg, demo = plan()
    assert demo.layers == () and demo.batches == 8 and demo.logits is None
    assert (demo.distillation.epochs, demo.distillation.lr, demo.distillation.batch_size) == (1, 1e-3, 32)
    assert cfg.sweep.steps_per_level == 1 and cfg.schedule.finetune_scheduler.cycle_steps == 1
    assert list(cfg.pruner.sparsities) == [0.5, 0.6, 0.7] and cfg.pruner.num_grads == 128
    assert build(cfg.pruner).steps == 1  # one Fisher per level, as measured (the levels are the steps)
    assert plan("reconstruction=none")[1] is None
    full = plan("reconstruction=block_distill")[1]
    assert (full.batches, full.distillation.epochs) == (16, 16) and full.logits is not None
    assert plan("sweep.steps_per_level=16")[0].schedule.finetune_scheduler.cycle_steps == 16


def test_sweep_demo_distils_on_calibration_images_then_fine_tunes(tmp_path: Path, monkeypatch) -> None:
    """The demo's default on a small model: each level is distilled once, on `reconstruction.batches`
    calibration batches of the training data, with its zeros exact in the saved model."""
    from nvit_lightning.callbacks import sparsity as sweep_module
    from nvit_lightning.sparsity.distill import distill_sparse

    seen = []

    def recording(plan, sparse, dense, batches, layers, *args, **kwargs):
        batches = list(batches)
        seen.append((plan, [len(b[0]) for b in batches]))
        report = distill_sparse(plan, sparse, dense, batches, layers, *args, **kwargs)
        seen[-1] += (report,)
        return report

    monkeypatch.setattr(sweep_module, "distill_sparse", recording)
    report = run_train([*SWEEP, "reconstruction.batches=2"], tmp_path)
    assert len(seen) == 2  # one per level
    for plan, sizes, distilled in seen:
        assert plan.logits is None and plan.distillation.epochs == 1 and sizes == [8, 8]
        assert "logit_kl" not in distilled and len(distilled["block_errors"]) == 2
        assert all(after <= before for before, after in distilled["block_errors"])
    for entry in report["sparse"]:
        assert abs(entry["achieved"] - entry["sparsity"]) < 1e-3
    first, second = (_zeros(e["dir"]) for e in report["sparse"])
    for key, zero in first.items():
        assert bool((second[key] | ~zero).all()), key


def _zeros(path: str) -> dict[str, torch.Tensor]:
    state = load_file(str(Path(path) / "model.safetensors"))
    return {k: v == 0 for k, v in state.items() if k.startswith("blocks.") and k.endswith(".weight") and v.dim() == 2}


def test_sparsity_sweep_fine_tunes_each_level_with_fixed_zeros(tmp_path: Path) -> None:
    report = run_train(SWEEP, tmp_path)
    levels = report["sparse"]
    assert [e["sparsity"] for e in levels] == [0.3, 0.5]
    for entry in levels:  # fine-tuning after pruning revived no zero: exactly the requested sparsity
        assert abs(entry["achieved"] - entry["sparsity"]) < 1e-3
        assert 0.0 <= entry["top1"] <= 100.0
    first, second = (_zeros(e["dir"]) for e in levels)
    for key, zero in first.items():  # the 50 % model was pruned further from the fine-tuned 30 % one
        assert bool((second[key] | ~zero).all()), key
    dense = build_run(compose_cfg("train", SWEEP, tmp_path / "dense"))[1]
    changed = [k for k, v in load_file(str(Path(levels[0]["dir"]) / "model.safetensors")).items()
               if k == "head.weight" and not torch.equal(v, dense.state_dict()[k])]
    assert changed == ["head.weight"]  # fine-tuned (not only sparsified) between the levels


def test_sparsity_sweep_resumes_mid_sweep(tmp_path: Path) -> None:
    """Stopped after the first level (its model saved, the second level's pruning checkpointed), the
    resumed run does not redo the first level and ends with the same second-level zeros."""
    full = run_train(SWEEP, tmp_path / "full")
    from nvit_lightning.cli import train

    cfg = compose_cfg("train", [*QUIET_CALLBACKS, *SWEEP], tmp_path / "part")
    with pytest.raises(ValueError, match=r"the sweep stopped after \[0.3\] of \[0.3, 0.5\]"):
        train.sparsity_sweep(cfg, build(cfg.pruner), max_steps=3)  # as if interrupted right after the first level
    first_model = Path(tmp_path / "part" / "sparse" / "sparsity_0.30" / "model.safetensors")
    written = first_model.stat().st_mtime_ns
    cfg = compose_cfg("train", [*QUIET_CALLBACKS, *SWEEP, "ckpt_path=last"], tmp_path / "part")
    resumed = train.sparsity_sweep(cfg, build(cfg.pruner))
    assert first_model.stat().st_mtime_ns == written  # level 0.3 not redone
    for a, b in zip(full["sparse"], resumed["sparse"]):
        assert a["sparsity"] == b["sparsity"] and a["achieved"] == b["achieved"]
    full_zeros, resumed_zeros = _zeros(full["sparse"][1]["dir"]), _zeros(resumed["sparse"][1]["dir"])
    for key in full_zeros:
        assert torch.equal(full_zeros[key], resumed_zeros[key]), key


def test_work_device_follows_the_trainer_and_the_local_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg("train", [], tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert work_device(cfg) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert work_device(cfg) == "cpu"  # trainer=cpu: the GPU stays unused
    gpu = compose_cfg("train", ["trainer=gpu"], tmp_path)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert work_device(gpu) == "cuda:0"
    monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child process works on its own GPU
    assert work_device(gpu) == "cuda:1"
