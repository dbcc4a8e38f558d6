"""ONNX export (`python prune.py mode=onnx`): ONNX Runtime's logits match torch at several batch sizes,
the report, the TorchScript fallback, the CLI end to end and its one-line errors. Needs the [export]
extra; without it only the "install the extra" message is tested."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nvit_lightning import export as onnx_export
from nvit_lightning.models import PrunableViT
from nvit_lightning.models.vit import ViTDims

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"emb": 64, "heads": [2, 2], "qk": [16, 16], "v": [16, 16], "mlp": [128, 128]}  # conf/model/small_random


@pytest.fixture
def onnx_packages() -> None:
    for name in onnx_export.EXTRA:
        pytest.importorskip(name)


def small_model(masked: bool = False) -> PrunableViT:
    torch.manual_seed(0)
    return PrunableViT(ViTDims.from_dict(SMALL), img_size=32, patch_size=8, num_classes=10, masked=masked).eval()


def pruned_model() -> PrunableViT:
    """Uneven blocks, as pruning leaves them: a head, QK / V width, MLP neurons and channels removed."""
    model = small_model(masked=True)
    with torch.no_grad():
        model.blocks[0].attn.head_mask[1] = 0
        model.blocks[1].attn.qk_mask[:4] = 0
        model.blocks[1].attn.v_mask[8:] = 0
        model.blocks[0].mlp.mask[:48] = 0
        model.blocks[1].mlp.mask[::2] = 0
        model.emb_mask[:16] = 0
    return model.compact().eval()


@pytest.mark.parametrize("make", [small_model, pruned_model], ids=["dense", "pruned"])
def test_onnx_logits_match_torch_at_two_batch_sizes(make, onnx_packages: None, tmp_path: Path) -> None:
    model = make()
    info = onnx_export.export_onnx(model, tmp_path / "model.onnx")
    assert info["exporter"] == "dynamo" and info["opset"] >= 17
    assert isinstance(info["input_shape"][0], str) and info["input_shape"][1:] == [3, 32, 32]  # dynamic batch
    check = onnx_export.check_against_torch(model, tmp_path / "model.onnx", (1, 5))  # traced at batch 2
    assert check["passed"] and check["max_abs_diff"] < 1e-4 and check["tolerance"] == 1e-4
    assert set(check["max_abs_diff_per_batch"]) == {"1", "5"}
    logits = onnx_export.OrtModule(tmp_path / "model.onnx", threads=1)(torch.randn(5, 3, 32, 32))
    assert logits.shape == (5, 10) and logits.abs().max() > 1e-3  # not a degenerate comparison


def test_masked_model_dir_is_exported_compact(tmp_path: Path) -> None:
    masked = small_model(masked=True)
    with torch.no_grad():
        masked.blocks[0].mlp.mask[:64] = 0
    loaded = onnx_export.load_for_export(masked.save_pretrained(tmp_path / "model"))
    assert not loaded.masked and list(loaded.dims.mlp) == [64, 128] and not loaded.training
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), masked.eval()(images), atol=1e-5, rtol=1e-5)


def test_export_and_check_writes_the_report_and_times_both(onnx_packages: None, tmp_path: Path) -> None:
    model_dir = pruned_model().save_pretrained(tmp_path / "model")
    report = onnx_export.export_and_check(model_dir, tmp_path / "run", batch_size=4, threads=1, rounds=3)
    assert json.loads((tmp_path / "run" / "export_report.json").read_text()) == report
    assert (tmp_path / "run" / "model.onnx").is_file() and report["model_dir"] == str(model_dir)
    assert report["dims"]["heads"] == [1, 2] and report["exporter"] == "dynamo" and report["opset"] >= 17
    assert report["check"]["batch_sizes"] == [1, 4] and report["check"]["max_abs_diff"] < 1e-4
    timing = report["timing"]
    assert timing["setup"]["batch_size"] == 4 and timing["setup"]["num_threads"] == 1
    assert all(len(timing["rounds"][name]) == 3 and timing["ms"][name] > 0 for name in ("torch", "onnxruntime"))
    assert 0.05 < timing["ratio"] < 20 and set(report["versions"]) >= {"torch", "onnx", "onnxruntime"}
    summary = onnx_export.export_summary(report)
    assert "ORT / torch" in summary and f"{timing['ratio']:.3f}" in summary and "batch 4, 1 threads" in summary


def test_falls_back_to_torchscript_when_dynamo_fails(onnx_packages: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = torch.onnx.export

    def dynamo_broken(*args, dynamo: bool = True, **kwargs):
        if dynamo:
            raise RuntimeError("simulated torch.export failure")
        return real_export(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_broken)
    model = pruned_model()
    info = onnx_export.export_onnx(model, tmp_path / "model.onnx")
    assert info["exporter"] == "torchscript" and "simulated" in info["dynamo_error"] and info["opset"] >= 17
    check = onnx_export.check_against_torch(model, tmp_path / "model.onnx", (1, 3))
    assert check["passed"] and check["max_abs_diff"] < 1e-4


def test_logit_mismatch_fails_with_the_difference(onnx_packages: None, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real_export = onnx_export.export_onnx

    def export_other_weights(model: PrunableViT, path: Path, opset: int | None = None) -> dict:
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.head.bias += 1e-3
        return real_export(other, path, opset)

    monkeypatch.setattr(onnx_export, "export_onnx", export_other_weights)
    model_dir = small_model().save_pretrained(tmp_path / "model")
    with pytest.raises(onnx_export.ExportMismatchError, match=r"differ from torch by 0\.001 \(tolerance 0\.0001\)"):
        onnx_export.export_and_check(model_dir, tmp_path / "run", batch_size=2, measure_latency=False)
    check = json.loads((tmp_path / "run" / "export_report.json").read_text())["check"]
    assert not check["passed"] and check["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)


def test_bad_model_dir_is_a_user_error(onnx_packages: None, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mode=onnx needs model_dir="):
        onnx_export.export_and_check(None, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not found: expected a directory written by"):
        onnx_export.export_and_check(tmp_path / "empty", tmp_path)
    with pytest.raises(ValueError, match="must be >= 1"):
        onnx_export.export_and_check(small_model().save_pretrained(tmp_path / "m"), tmp_path, batch_size=0)


def test_missing_packages_name_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ImportError, match=r"onnxruntime: pip install 'nvit-lightning\[export\]'"):
        onnx_export.require_export_packages()
    with pytest.raises(SystemExit) as exit_info:
        onnx_export.onnx_mode({"model_dir": str(tmp_path)})
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: ONNX export needs onnxruntime: pip install 'nvit-lightning[export]'"]


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, str(ROOT / "prune.py"), "mode=onnx", "logger=none", *overrides],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_cli_exports_and_checks(onnx_packages: None, tmp_path: Path) -> None:
    model_dir = pruned_model().save_pretrained(tmp_path / "model")
    done = run_cli(f"model_dir={model_dir}", f"hydra.run.dir={tmp_path / 'run'}", "measure_latency=false",
                   "onnx.batch_size=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "export_report.json").read_text())
    assert report["check"]["batch_sizes"] == [1, 3] and report["check"]["max_abs_diff"] < 1e-4
    assert report["timing"] is None and report["onnx"] == str(tmp_path / "run" / "model.onnx")
    assert "max |logit difference| ORT vs torch" in done.stdout and "export_report.json" in done.stdout


def test_cli_bad_model_dir_is_one_line(onnx_packages: None, tmp_path: Path) -> None:
    done = run_cli("model_dir=/nowhere/model", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors == ["error: model_dir not found: /nowhere/model (a directory written by save_pretrained)"]
