"""Fresh-process timing: what is timed is the architecture the report names, on the latency model's
setup; no wall-clock values are asserted (timed tests are not benchmarks)."""

from __future__ import annotations

import torch

from nvit_lightning.models import PrunableViT
from nvit_lightning.pruning import FlopsLatency, LookupTableLatency
from nvit_lightning.timing import TimingSetup, _build, prunable_spec, time_in_fresh_process, timm_spec

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


def test_latency_models_state_their_timing_setup() -> None:
    flops = FlopsLatency(tokens=17, batch_size=4, num_threads=2)
    assert flops.timing == TimingSetup("cpu", "float32", 4, 2) and flops.tokens == 17
    grid = {"emb": [16, 64], "heads": [1, 2], "qk": [8, 16], "v": [8, 16], "mlp": [16, 64]}
    table = LookupTableLatency(grid, torch.ones(2, 2, 2, 2, 2), [16, 64], [1.0, 2.0],
                               meta={"device_type": "cuda", "dtype": "float16", "batch_size": 256,
                                     "num_threads": 8, "tokens": 198})
    assert table.timing == TimingSetup("cuda", "float16", 256, 8) and table.tokens == 198
