"""Latency models: lookup-table interpolation, persistence and guards, the profiler, the FLOPs proxy."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from nvit_lightning.latency.models import (
    AXES,
    FlopsLatency,
    LatencyModel,
    LookupTableLatency,
    build_latency_model,
)
from nvit_lightning.latency.profiler import check_table, load_arch, main, profile_lut
from nvit_lightning.latency.timing import TimingSetup
from nvit_lightning.models.dims import ViTDims
from nvit_lightning.models.vit import PrunableViT

LATENCY_DIR = Path(__file__).resolve().parents[1] / "data" / "latency"
GRID = {"emb": [16, 64, 128], "heads": [1, 2, 3], "qk": [8, 32, 64], "v": [8, 64], "mlp": [16, 256, 768]}


def multilinear(e, h, qk, v, m):
    """Multilinear in the 5 dims (each term has every axis at most once), like block MACs."""
    return 0.05 + 1e-3 * e + 2e-3 * h * qk + 3e-3 * h * v + 1e-5 * e * m + 1e-6 * e * h * qk * m


def synthetic_table(same_offset: float | None = None, tokens: int = 197) -> LookupTableLatency:
    points = itertools.product(*(GRID[a] for a in AXES))
    block_ms = torch.tensor([multilinear(*p) for p in points], dtype=torch.float64)
    same_grid = same_ms = None
    if same_offset is not None:  # the qk = v table: the same function, a constant faster
        same_grid = [8, 64]
        same_ms = torch.tensor([multilinear(e, h, d, d, m) - same_offset for e, h, d, m in itertools.product(
            GRID["emb"], GRID["heads"], same_grid, GRID["mlp"])], dtype=torch.float64)
    meta = {"model": "synthetic", "tokens": tokens, "batch_size": 1}
    return LookupTableLatency(GRID, block_ms, [16, 64, 128], [0.5, 1.0, 2.0], meta, same_grid, same_ms)


def random_rows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lo = torch.tensor([min(GRID[a]) for a in AXES], dtype=torch.float64)
    hi = torch.tensor([max(GRID[a]) for a in AXES], dtype=torch.float64)
    return lo + (hi - lo) * torch.rand(n, 5, generator=g, dtype=torch.float64)


# ---- lookup table ---------------------------------------------------------------------------------
def test_exact_at_grid_points() -> None:
    table = synthetic_table()
    rows = torch.tensor(list(itertools.product(*(GRID[a] for a in AXES))), dtype=torch.float64)
    expected = torch.tensor([multilinear(*r) for r in rows.tolist()], dtype=torch.float64)
    torch.testing.assert_close(table.block_latency(rows), expected, rtol=0, atol=1e-12)


def test_exact_between_grid_points_for_multilinear_function() -> None:
    table = synthetic_table()
    rows = random_rows(500)
    expected = torch.tensor([multilinear(*r) for r in rows.tolist()], dtype=torch.float64)
    torch.testing.assert_close(table.block_latency(rows), expected, rtol=1e-12, atol=1e-12)


def test_query_dtype_shape_and_single_row() -> None:
    table = synthetic_table()
    rows = torch.tensor([[64, 2, 32, 8, 256], [128, 3, 64, 64, 768]])
    out = table.block_latency(rows)  # integer rows -> float64
    assert out.shape == (2,) and out.dtype == torch.float64
    assert table.block_latency(rows.float()).dtype == torch.float32
    assert float(table.block_latency(torch.tensor([64, 2, 32, 8, 256]))[0]) == pytest.approx(float(out[0]))


def test_base_is_linear_in_emb_and_model_latency_sums_blocks() -> None:
    table = synthetic_table()
    assert table.base_latency(16) == pytest.approx(0.5)
    assert table.base_latency(96) == pytest.approx(1.5)
    dims = ViTDims(96, [1, 3], [8, 40], [64, 24], [16, 500])
    expected = sum(multilinear(*dims.block(i)) for i in range(2)) + 1.5
    assert table.model_latency(dims) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("row,axis", [([8, 1, 8, 8, 16], "emb=8"), ([16, 4, 8, 8, 16], "heads=4"),
                                      ([16, 1, 72, 8, 16], "qk=72"), ([16, 1, 8, 4, 16], "v=4"),
                                      ([16, 1, 8, 8, 1024], "mlp=1024")])
def test_outside_grid_raises(row: list[int], axis: str) -> None:
    table = synthetic_table()
    with pytest.raises(ValueError, match=axis) as err:
        table.block_latency(torch.tensor([[64, 2, 32, 8, 256], row]))
    assert "re-profile" in str(err.value)
    with pytest.raises(ValueError, match="emb"):
        table.base_latency(256)


def test_same_qk_v_table_serves_rows_with_equal_head_dims() -> None:
    table = synthetic_table(same_offset=0.01)
    rows = torch.tensor([[64, 2, 48, 48, 256], [64, 2, 48, 40, 256], [64, 2, 8, 8, 16], [64, 2, 64, 8, 16]],
                        dtype=torch.float64)
    plain = torch.tensor([multilinear(*r) for r in rows.tolist()], dtype=torch.float64)
    offset = torch.tensor([0.01, 0, 0.01, 0], dtype=torch.float64)  # only rows with qk == v
    torch.testing.assert_close(table.block_latency(rows), plain - offset, rtol=0, atol=1e-12)


def test_save_load_round_trip(tmp_path: Path) -> None:
    table = synthetic_table(same_offset=0.02)
    path = table.save(tmp_path / "sub" / "table.json")
    loaded = LookupTableLatency.load(path, expect_tokens=197, expect_model="synthetic")
    rows = random_rows(50, seed=1)
    rows[::2, 3] = rows[::2, 2] = 32.0  # some rows on the qk = v table
    torch.testing.assert_close(loaded.block_latency(rows), table.block_latency(rows), rtol=0, atol=0)
    assert loaded.meta == table.meta and loaded.base_latency(100) == table.base_latency(100)
    data = json.loads(path.read_text())
    assert set(data) >= {"meta", "grid", "block_ms", "base_ms"} and data["grid"]["emb"] == [16, 64, 128]
    assert "synthetic" in loaded.describe()


def test_load_guards(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        LookupTableLatency.load(tmp_path / "nope.json")
    path = synthetic_table().save(tmp_path / "t.json")
    with pytest.raises(ValueError, match=r"197 tokens.*198"):
        LookupTableLatency.load(path, expect_tokens=198)  # a distilled model has one more token
    with pytest.raises(ValueError, match="deit_base"):
        LookupTableLatency.load(path, expect_model="deit_base")
    (tmp_path / "bad.json").write_text(json.dumps({"meta": {}}))
    with pytest.raises(ValueError, match="not a latency table"):
        LookupTableLatency.load(tmp_path / "bad.json")


# ---- FLOPs proxy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", [False, True])
def test_flops_latency_is_proportional_to_macs(distilled: bool) -> None:
    tokens = 198 if distilled else 197
    model = FlopsLatency(tokens=tokens, ms_per_gmac=2.5, distilled=distilled)
    for dims in (ViTDims.uniform(192, 12, 3), ViTDims(128, [2, 1, 3], [32, 8, 64], [16, 64, 8], [384, 16, 768])):
        expected = dims.macs(distilled=distilled) * 2.5 / 1e9
        assert model.model_latency(dims) == pytest.approx(expected, rel=1e-12)
        rows = torch.tensor([dims.block(i) for i in range(dims.depth)])
        per_block = torch.tensor([dims.block_macs(i, tokens) * 2.5 / 1e9 for i in range(dims.depth)],
                                 dtype=torch.float64)
        torch.testing.assert_close(model.block_latency(rows), per_block)
    assert "FlopsLatency" in model.describe()


def test_build_latency_model(tmp_path: Path) -> None:
    assert isinstance(build_latency_model("flops", tokens=197), FlopsLatency)
    path = synthetic_table().save(tmp_path / "t.json")
    lut = build_latency_model("lut", path=path, expect_tokens=197)
    assert isinstance(lut, LookupTableLatency) and isinstance(lut, LatencyModel)
    with pytest.raises(ValueError, match="unknown latency model kind 'gpu'"):
        build_latency_model("gpu")
    with pytest.raises(ValueError, match="path"):
        build_latency_model("lut")


# ---- profiler ---------------------------------------------------------------------------------------
TINY_GRID = {"emb": [16, 32], "heads": [1, 2], "qk": [8], "v": [8], "mlp": [16, 32]}


def test_profile_lut_tiny_grid() -> None:
    threads = torch.get_num_threads()
    table = profile_lut(TINY_GRID, tokens=17, batch_size=2, repeats=2, warmup=1, rounds=1, stack=2,
                        num_classes=10, progress=False, model="tiny")
    assert torch.get_num_threads() == threads  # restored
    assert table.block_ms.shape == (2, 2, 1, 1, 2) and bool((table.block_ms > 0).all())
    assert table.same_qk_v_ms is not None and bool((table.same_qk_v_ms > 0).all())
    assert bool((table.base_ms > 0).all())
    meta = table.meta
    for key in ("device", "dtype", "batch_size", "tokens", "torch", "date", "grid", "model", "num_threads"):
        assert meta[key] not in (None, ""), key
    assert (meta["batch_size"], meta["tokens"], meta["model"], meta["dtype"]) == (2, 17, "tiny", "float32")
    assert isinstance(meta["steady_malloc"], bool) and meta["stack"] == 2
    dims = ViTDims(24, [1, 2], [8, 8], [8, 8], [20, 32])
    assert table.model_latency(dims) > table.base_latency(24) > 0


def test_profile_and_check_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "t.json"
    main(["profile", "--out", str(out), "--emb", "16,32", "--heads", "1", "--qk", "8,16", "--v", "8",
          "--mlp", "16", "--tokens", "17", "--batch-size", "2", "--repeats", "2", "--warmup", "1",
          "--rounds", "1", "--stack", "2", "--num-classes", "10", "--no-progress"])
    table = LookupTableLatency.load(out, expect_tokens=17)
    assert table.block_ms.shape == (2, 1, 2, 1, 1) and table.meta["model"] == "custom"

    # a masked checkpoint with pruned units: `check` times its compact (live) dims
    model = PrunableViT(ViTDims(32, [1], [16], [8], [16]), img_size=64, num_classes=10)
    model.emb_mask[16:] = 0
    model.blocks[0].attn.qk_mask[8:] = 0
    model.save_pretrained(tmp_path / "ckpt")
    dims, config = load_arch(tmp_path / "ckpt")
    assert dims == ViTDims(16, [1], [8], [8], [16]) and config["img_size"] == 64
    main(["check", "--table", str(out), "--dims", str(tmp_path / "ckpt" / "config.json"),
          "--repeats", "2", "--rounds", "1"])
    assert "relative error" in capsys.readouterr().out

    # plain ViTDims json; a table for another token count is refused
    ViTDims(16, [1], [8], [8], [16]).save(tmp_path / "d.json")
    result = check_table(table, *load_arch(tmp_path / "d.json"), repeats=2, rounds=1)
    assert result["measured_ms"] > 0 and result["predicted_ms"] > 0
    with pytest.raises(ValueError, match="tokens"):
        check_table(table, dims, {"img_size": 224, "patch_size": 16}, repeats=1, rounds=1)
    # an architecture outside the table's grid (2 heads; the grid has 1): one line from the CLI
    ViTDims(16, [2], [8], [8], [16]).save(tmp_path / "outside.json")
    with pytest.raises(SystemExit, match=r"^check: latency table: heads=2 is outside the profiled grid"):
        main(["check", "--table", str(out), "--dims", str(tmp_path / "outside.json"), "--repeats", "1",
              "--rounds", "1"])


# ---- shipped tables ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,timing", [("deit_tiny_cpu_b1.json", TimingSetup("cpu", "float32", 1, 2)),
                                         ("deit_tiny_cpu_b32.json", TimingSetup("cpu", "float32", 32, 2)),
                                         ("deit_tiny_cuda_b256_fp16.json", TimingSetup("cuda", "float16", 256, 16))])
def test_shipped_tables(name: str, timing: TimingSetup) -> None:
    table = LookupTableLatency.load(LATENCY_DIR / name, expect_tokens=197, expect_model="deit_tiny")
    assert table.timing == timing
    dense = ViTDims.uniform(192, 12, 3)
    smallest = ViTDims(16, [1] * 12, [8] * 12, [8] * 12, [16] * 12)  # one group of each kind left
    pruned = ViTDims(128, [2] * 12, [32] * 12, [32] * 12, [384] * 12)
    lat_dense, lat_pruned, lat_min = (table.model_latency(d) for d in (dense, pruned, smallest))
    assert lat_dense > lat_pruned > lat_min > 0
    assert bool((table.block_ms > 0).all())


def test_load_or_profile_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nvit_lightning.latency import profiler

    monkeypatch.setitem(profiler.PRESETS, "tiny_test", TINY_GRID)
    path = tmp_path / "cache.json"
    kwargs = dict(preset="tiny_test", tokens=17, batch_size=2, device="cpu", dtype="float32")
    table = profiler.load_or_profile(path, **kwargs, repeats=1, warmup=1, rounds=1, stack=2, num_classes=10,
                                     progress=False)
    assert path.is_file() and table.meta["model"] == "tiny_test"
    monkeypatch.setattr(profiler, "profile_lut", lambda *a, **k: pytest.fail("cached table not reused"))
    cached = profiler.load_or_profile(path, **kwargs)
    torch.testing.assert_close(cached.block_ms, table.block_ms)
    monkeypatch.undo()
    monkeypatch.setitem(profiler.PRESETS, "tiny_test", TINY_GRID)
    path.write_text(path.read_text()[:100])  # a truncated cache (e.g. an interrupted write) is rebuilt
    rebuilt = profiler.load_or_profile(path, **kwargs, repeats=1, warmup=1, rounds=1, stack=2, num_classes=10,
                                       progress=False)
    assert rebuilt.meta["model"] == "tiny_test" and profiler.LookupTableLatency.load(path).meta["tokens"] == 17
    assert not path.with_name(path.name + ".partial").exists()


def test_latency_penalty_with_layers_at_their_last_group() -> None:
    """η > 0 queries the table for every layer minus one group; a layer already at its last group
    (v = 8 with groups of 8) must not be queried at width 0, outside the grid."""
    from nvit_lightning.pruning import GlobalPruner, Structure, prune_to_targets
    from nvit_lightning.pruning.criteria import RandomCriterion

    model = PrunableViT(ViTDims(64, (2, 3), (32, 16), (8, 64), (256, 768)), img_size=32, patch_size=8,
                        num_classes=10)
    structure = Structure(model, {"emb": 16, "head": 1, "qk": 8, "v": 8, "mlp": 16})
    table = synthetic_table()
    pruner = GlobalPruner(structure, table, eta=1.0, groups_per_event=4, targets=[0.5])
    deltas = pruner.latency_deltas(structure.live_dims())
    assert deltas[("v", 0)] == 0.0  # unprunable: no latency to gain
    assert deltas[("v", 1)] > 0
    prune_to_targets(pruner, RandomCriterion(structure), calibrate=lambda: None)
    assert pruner.done and table.model_latency(structure.live_dims()) <= 0.5 * pruner.dense_latency
