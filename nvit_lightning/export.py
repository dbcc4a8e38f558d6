"""ONNX export of a saved PrunableViT, checked against torch and timed next to it.

    python prune.py mode=onnx model_dir=outputs/prune/<run>/model   # -> <this run>/model.onnx, export_report.json
    python -m nvit_lightning.export < job.json                      # the timing worker (a fresh process)

onnx, onnxscript and onnxruntime are an optional extra (`pip install 'nvit-lightning[export]'`), imported
only here, inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from .latency.timing import TimingSetup, paired_ratio, ratio_uncertainty, time_modules
from .models import PrunableViT

log = logging.getLogger(__name__)

EXTRA = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = "pip install 'nvit-lightning[export]'"
TOLERANCE = 1e-4  # max |logit| difference ORT vs torch (fp32; DeiT-Tiny measured ~4e-6)
INPUT, OUTPUT = "images", "logits"
EXAMPLE_BATCH = 2  # the traced batch: the check runs at other sizes, so a batch baked into the graph fails it
NOISY_IQR = 0.2  # per-round ratios spread (IQR / median) above which a timing is flagged, as in app.py


class ExportMismatchError(ValueError):
    """ONNX Runtime's logits differ from torch's by more than the tolerance (a one-line CLI error)."""


def require_export_packages() -> None:
    """Fail with one line naming the extra when onnx / onnxscript / onnxruntime are missing."""
    missing = []
    for name in EXTRA:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")


def load_for_export(model_dir: str | Path) -> PrunableViT:
    """The model saved by `save_pretrained` in eval mode, compacted if it still carries masks (the
    deployable form computes the same function without the mask multiplications)."""
    model = PrunableViT.from_pretrained(model_dir)  # FileNotFoundError / ValueError: one-line CLI errors
    return (model.compact() if model.masked else model).eval()


def input_shape(model: PrunableViT) -> tuple[int, int, int]:
    """(channels, height, width) of one image the model takes."""
    height, width = model.patch_embed.img_size
    return model.config.get("in_chans", 3), height, width


def export_onnx(model: PrunableViT, path: str | Path, opset: int | None = None) -> dict[str, Any]:
    """Write `model` to `path` with a dynamic batch axis: the torch.export-based exporter (dynamo), or
    the TorchScript one if that fails. Returns which exporter ran, the opset and the graph's input shape."""
    require_export_packages()
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in ("onnxscript", "onnx_ir"):  # their INFO lines (one per graph rewrite) drown the run's log
        logging.getLogger(name).setLevel(logging.WARNING)
    model = model.eval()
    example = (torch.randn(EXAMPLE_BATCH, *input_shape(model)),)
    names = {"input_names": [INPUT], "output_names": [OUTPUT], "opset_version": opset}
    info: dict[str, Any] = {"exporter": "dynamo"}
    # no_grad as at inference (the fallback's torch.jit.trace needs it too). torch.export traces the
    # parameters as fake tensors, so the attention keeps three q/k/v GEMMs there; `check_against_torch`
    # compares the graph with the model's own (fused) inference path.
    with torch.no_grad():
        try:
            torch.onnx.export(model, example, str(path), dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
        except Exception as err:  # any failure of the new exporter falls back to the old one
            log.warning(f"dynamo ONNX export failed ({type(err).__name__}: {err}); using the TorchScript exporter")
            info = {"exporter": "torchscript", "dynamo_error": f"{type(err).__name__}: {err}"[:1000]}
            with warnings.catch_warnings():  # its deprecation notice and tracer warnings on shape asserts
                warnings.simplefilter("ignore")
                torch.onnx.export(model, example, str(path), dynamo=False,
                                  dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, **names)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    info["opset"] = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    info["input_shape"] = [d.dim_param or d.dim_value for d in dims]
    return info


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session; `threads` intra-op threads (None: ONNX Runtime's default)."""
    require_export_packages()
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_against_torch(model: PrunableViT, path: str | Path, batch_sizes: Sequence[int] = (1, 4),
                        tolerance: float = TOLERANCE, seed: int = 0) -> dict[str, Any]:
    """Max |logit| difference of ONNX Runtime vs torch on random images at each batch size (more than
    one size: the batch axis really is dynamic). `passed` says whether it is within `tolerance`; only
    logits of the wrong shape raise ExportMismatchError."""
    session, generator = ort_session(path), torch.Generator().manual_seed(seed)
    diffs = {}
    for batch in batch_sizes:
        images = torch.randn(batch, *input_shape(model), generator=generator)
        with torch.no_grad():
            expected = model.eval()(images).numpy()
        got = session.run([OUTPUT], {INPUT: images.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportMismatchError(f"ONNX logits have shape {got.shape} at batch {batch}, torch {expected.shape}")
        diffs[str(batch)] = float(abs(got - expected).max())
    worst = max(diffs.values())
    return {"batch_sizes": list(batch_sizes), "max_abs_diff": worst, "max_abs_diff_per_batch": diffs,
            "tolerance": tolerance, "passed": worst <= tolerance}


class OrtModule(torch.nn.Module):
    """An ONNX Runtime session behind the interface `timing.time_modules` times (module, `patch_embed.img_size`)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.session = ort_session(path, threads)
        height, width = self.session.get_inputs()[0].shape[2:]
        self.patch_embed = SimpleNamespace(img_size=(height, width))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: images.numpy()})[0])


def time_ort_vs_torch(model_dir: str | Path, onnx_path: str | Path, batch_size: int = 32,
                      threads: int | None = None, rounds: int = 25, timeout: float = 1800) -> dict[str, Any]:
    """Median ms per batch of torch and ONNX Runtime, timed interleaved in one fresh process
    (`timing.time_modules`), and the median per-round ratio ORT / torch. `threads`: both runtimes'
    intra-op threads (None: torch's default in that process)."""
    job = {"model_dir": str(model_dir), "onnx": str(onnx_path), "batch_size": batch_size, "threads": threads,
           "rounds": rounds}
    done = subprocess.run([sys.executable, "-m", "nvit_lightning.export"], input=json.dumps(job),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ORT vs torch timing in a fresh process failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["ratio"] = paired_ratio(result, "onnxruntime", "torch")
    result["ratio_iqr"] = ratio_uncertainty(result, "onnxruntime", "torch")
    result["noisy"] = result["ratio_iqr"] > NOISY_IQR
    return result


def _timing_worker(job: dict[str, Any]) -> dict[str, Any]:
    threads = job["threads"] or torch.get_num_threads()  # read before time_modules sets it
    models = {"torch": load_for_export(job["model_dir"]), "onnxruntime": OrtModule(job["onnx"], threads)}
    setup = TimingSetup(batch_size=job["batch_size"], num_threads=threads)
    return {**time_modules(models, setup, rounds=job["rounds"]), "setup": asdict(setup)}


def export_and_check(model_dir: str | Path, out_dir: str | Path, opset: int | None = None,
                     batch_size: int = 32, threads: int | None = None, rounds: int = 25,
                     measure_latency: bool = True) -> dict[str, Any]:
    """`<out_dir>/model.onnx` from the model in `model_dir`, checked against torch and (optionally) timed;
    writes `<out_dir>/export_report.json` and returns it. ExportMismatchError if the logits disagree."""
    require_export_packages()
    if model_dir is None or not str(model_dir).strip():
        raise ValueError("mode=onnx needs model_dir=<a directory written by save_pretrained, e.g. <run>/model>")
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model_dir not found: {model_dir} (a directory written by save_pretrained)")
    if batch_size < 1 or rounds < 1 or (threads is not None and threads < 1):
        raise ValueError(f"onnx.batch_size, onnx.rounds and onnx.threads must be >= 1 "
                         f"(got {batch_size}, {rounds}, {threads})")
    import onnx
    import onnxruntime
    import onnxscript

    model, out_dir = load_for_export(model_dir), Path(out_dir)
    onnx_path = out_dir / "model.onnx"
    report: dict[str, Any] = {"model_dir": str(model_dir), "onnx": str(onnx_path),
                              "params": model.num_params(), "dims": model.dims.to_dict(),
                              **export_onnx(model, onnx_path, opset)}
    report["check"] = check_against_torch(model, onnx_path, (1, max(2, batch_size)))
    report["timing"] = time_ort_vs_torch(model_dir, onnx_path, batch_size, threads, rounds) if measure_latency else None
    report["versions"] = {m.__name__: m.__version__ for m in (torch, onnx, onnxscript, onnxruntime)}
    (out_dir / "export_report.json").write_text(json.dumps(report, indent=1))
    check = report["check"]
    if not check["passed"]:
        raise ExportMismatchError(f"ONNX Runtime logits differ from torch by {check['max_abs_diff']:.3g} "
                                  f"(tolerance {check['tolerance']:g}); see {out_dir / 'export_report.json'}")
    return report


def export_summary(report: dict[str, Any]) -> str:
    """A few lines: what was written, the check, and the timing table."""
    check, timing = report["check"], report["timing"]
    diffs = ", ".join(f"{d:.1e} at batch {b}" for b, d in check["max_abs_diff_per_batch"].items())
    lines = [f"{report['onnx']} · exporter {report['exporter']} · opset {report['opset']} · "
             f"input {report['input_shape']} · {report['params'] / 1e6:.2f}M params",
             f"max |logit difference| ORT vs torch: {diffs} (tolerance {check['tolerance']:g}): ok"]
    if timing:
        setup, ms = timing["setup"], timing["ms"]
        rows = [("", "torch", "onnxruntime", "ORT / torch"),
                ("latency (ms)", f"{ms['torch']:.1f}", f"{ms['onnxruntime']:.1f}", f"{timing['ratio']:.3f}")]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        cells = [[cell.ljust(width) for cell, width in zip(row, widths)] for row in rows]
        lines += ["", " | ".join(cells[0]), "-+-".join("-" * w for w in widths), " | ".join(cells[1]),
                  f"(one fresh process, cpu float32 batch {setup['batch_size']}, {setup['num_threads']} threads; "
                  f"median of {len(timing['rounds']['torch'])} interleaved rounds; ratio: median per-round ratio"
                  + (f", NOISY: per-round ratios spread {timing['ratio_iqr']:.0%})" if timing["noisy"] else ")")]
    return "\n".join(lines)


def onnx_mode(cfg: Any) -> dict[str, Any]:
    """`python prune.py mode=onnx model_dir=...`: export_and_check with the `onnx` options, then the summary."""
    try:
        require_export_packages()
    except ImportError as err:  # one line and exit 2, as cli_errors does for other bad input
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    options = cfg.get("onnx") or {}
    report = export_and_check(cfg.get("model_dir"), cfg.paths.output_dir, options.get("opset"),
                              options.get("batch_size", 32), options.get("threads"), options.get("rounds", 25),
                              bool(cfg.get("measure_latency", True)))
    print(f"\n{export_summary(report)}\n\nreport: {Path(cfg.paths.output_dir) / 'export_report.json'}")
    return report


def main() -> None:
    print(json.dumps(_timing_worker(json.loads(sys.stdin.read()))))


if __name__ == "__main__":
    main()
