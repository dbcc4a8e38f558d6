"""Fresh-process timing: what is timed is the architecture the report names, on the latency model's
setup; no wall-clock values are asserted (timed tests are not benchmarks)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nvit_lightning import measure
from nvit_lightning.latency import FlopsLatency, LookupTableLatency
from nvit_lightning.latency.timing import (
    TimingSetup,
    _build,
    paired_ratio,
    prunable_spec,
    ratio_uncertainty,
    time_in_fresh_process,
    timm_spec,
)
from nvit_lightning.models import PrunableViT
from nvit_lightning.report import summary_table, write_report

from .conftest import tiny_vit


def test_prunable_spec_is_the_compact_architecture() -> None:
    model = tiny_vit()
    with torch.no_grad():
        model.blocks[0].mlp.mask[:16] = 0
        model.blocks[1].attn.head_mask[0] = 0
    spec = prunable_spec(model)
    built = _build(spec)
    assert isinstance(built, PrunableViT) and not built.masked
    assert built.dims == model.live_dims() == model.compact().dims
    assert built.config["img_size"] == 32 and built.num_classes == 10


def test_fresh_process_times_every_model_including_timm() -> None:
    specs = {"ours": prunable_spec(tiny_vit()),
             "timm": timm_spec("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2)}
    result = time_in_fresh_process(specs, TimingSetup("cpu", "float32", batch_size=2, num_threads=1),
                                   rounds=2, repeats=2, warmup=1)
    assert set(result["ms"]) == set(specs) == set(result["spread"])
    assert all(ms > 0 for ms in result["ms"].values())
    assert all(spread >= 1.0 for spread in result["spread"].values())
    assert all(len(result["rounds"][name]) == 2 for name in specs)


def test_speedups_pair_each_round(tmp_path: Path) -> None:
    """A slow spell hits every model of a round: the speed-up is the median of per-round ratios,
    not the ratio of overall medians (which pairs the pruned model's fast round with a slow one)."""
    rounds = {"timm_dense": [100.0, 300.0, 110.0], "dense": [105.0, 310.0, 112.0], "pruned": [45.0, 160.0, 60.0]}
    timing = {"ms": {k: sorted(v)[1] for k, v in rounds.items()}, "spread": {}, "rounds": rounds,
              "setup": {"device": "cpu", "dtype": "float32", "batch_size": 32}}
    assert paired_ratio(timing, "pruned", "timm_dense") == pytest.approx(160 / 300)  # median of .45, .533, .545
    assert timing["ms"]["pruned"] / timing["ms"]["timm_dense"] == pytest.approx(60 / 110)
    assert paired_ratio({"ms": timing["ms"]}, "pruned", "timm_dense") == pytest.approx(60 / 110)  # no rounds
    q1, q3 = (0.45 + 160 / 300) / 2, (160 / 300 + 60 / 110) / 2
    assert ratio_uncertainty(timing, "pruned", "timm_dense") == pytest.approx((q3 - q1) / (160 / 300))
    assert ratio_uncertainty({"rounds": {"a": [1.0, 2.0], "b": [2.0, 4.0]}}, "a", "b") == 0.0

    def entry() -> dict:
        return {"params": 1, "flops": 1, "latency_pred_ms": 1.0, "latency_measured_ms": None,
                "top1": None, "top5": None}

    table = FlopsLatency(tokens=17, batch_size=32)
    report = write_report(tmp_path / "report.json", entry(), entry(), 0.5, "obs_search", None, table, timing=timing)
    assert report["pruned"]["speedup_vs_timm"] == pytest.approx(300 / 160)
    assert report["pruned"]["speedup"] == pytest.approx(1 / statistics.median([45 / 105, 160 / 310, 60 / 112]))
    assert f"{300 / 160:.2f}x" in summary_table(report)


def test_latency_models_state_their_timing_setup() -> None:
    flops = FlopsLatency(tokens=17, batch_size=4, num_threads=2)
    assert flops.timing == TimingSetup("cpu", "float32", 4, 2) and flops.tokens == 17
    grid = {"emb": [16, 64], "heads": [1, 2], "qk": [8, 16], "v": [8, 16], "mlp": [16, 64]}
    table = LookupTableLatency(grid, torch.ones(2, 2, 2, 2, 2), [16, 64], [1.0, 2.0],
                               meta={"device_type": "cuda", "dtype": "float16", "batch_size": 256,
                                     "num_threads": 8, "tokens": 198})
    assert table.timing == TimingSetup("cuda", "float16", 256, 8) and table.tokens == 198


def test_a_noisy_measurement_is_taken_again_and_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    def result(pruned: list[float]) -> dict:
        rounds = {"dense": [100.0] * 4, "timm_dense": [100.0] * 4, "pruned": pruned}
        return {"ms": {k: statistics.median(v) for k, v in rounds.items()}, "spread": {}, "rounds": rounds}

    calm, busy = result([60.0, 61.0, 60.0, 59.0]), result([40.0, 90.0, 60.0, 75.0])
    answers = []
    monkeypatch.setattr(measure, "time_in_fresh_process", lambda specs, setup: answers.pop(0))
    cfg = OmegaConf.create({"measure_latency": True, "model": {"timm_name": "deit_tiny_patch16_224"}})
    table = FlopsLatency(tokens=17, batch_size=2)
    answers[:] = [busy, calm]
    timing = measure.measure_side_by_side(tiny_vit(), tiny_vit(), table, cfg)
    assert timing["rounds"] is calm["rounds"] and not timing["noisy"] and not answers
    assert paired_ratio(timing, "pruned", "timm_dense") == pytest.approx(0.6)
    answers[:] = [busy, busy]
    assert measure.measure_side_by_side(tiny_vit(), tiny_vit(), table, cfg)["noisy"]
    answers[:] = [calm]
    assert not measure.measure_side_by_side(tiny_vit(), tiny_vit(), table, cfg)["noisy"] and not answers
