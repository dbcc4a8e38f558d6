"""Latency models for the latency-aware pruning penalty (DESIGN.md §1).

`score_S = I_S − η · (Lat(W) − Lat(W∖S))` needs `Lat` for many candidate architectures per pruning
event, so a latency model predicts rather than measures:

- `LookupTableLatency`: per-block latency profiled on the target device over a grid of
  (emb, heads, qk per head, v per head, mlp), multilinearly interpolated, plus a measured constant
  for everything outside the blocks (patch embed, final norm, head) interpolated over emb;
- `FlopsLatency`: multiply-accumulates as a proxy, the fallback that needs no profiling.

Both predict per-block latency for a batch of (emb, heads, qk, v, mlp) rows at once, so the pruner
can score every candidate group of every block in one call.
"""

from __future__ import annotations

import itertools
import json
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from torch import Tensor

from ..models.dims import ViTDims
from ..models.structure import KIND_SPECS
from .timing import TimingSetup

AXES = tuple(k.dims_field for k in KIND_SPECS)  # ("emb", "heads", "qk", "v", "mlp"): a table's axes


def _as_rows(block_dims: Tensor | list | tuple) -> Tensor:
    rows = torch.as_tensor(block_dims)
    if rows.ndim == 1:
        rows = rows[None]
    if rows.ndim != 2 or rows.shape[1] != len(AXES):
        raise ValueError(f"block_dims must have shape (n, 5) with columns {AXES}, got {tuple(rows.shape)}")
    return rows


def block_rows(dims: ViTDims) -> Tensor:
    """(depth, 5) float64 rows of (emb, heads, qk, v, mlp): the latency models' view of `dims`."""
    return torch.tensor([dims.block(i) for i in range(dims.depth)], dtype=torch.float64)


def dims_from_block_rows(rows: Tensor) -> ViTDims:
    """The inverse of `block_rows`."""
    cols = rows.long().T.tolist()
    return ViTDims(cols[0][0], cols[1], cols[2], cols[3], cols[4])


def _out_dtype(rows: Tensor) -> torch.dtype:
    return rows.dtype if rows.is_floating_point() else torch.float64


class LatencyModel(ABC):
    """Predicted latency in milliseconds of a (pruned) ViT and of its blocks, on the device, dtype,
    batch size and thread count in `timing` (what every measurement to compare with must use) for
    images of `tokens` tokens."""

    timing: TimingSetup
    tokens: int | None

    @abstractmethod
    def block_latency(self, block_dims: Tensor) -> Tensor:
        """(n, 5) rows of (emb, heads, qk, v, mlp) -> (n,) predicted latency of one block in ms."""

    @abstractmethod
    def base_latency(self, emb: int) -> float:
        """ms of everything but the blocks (patch embed, tokens, final norm, head) at this emb."""

    def model_latency(self, dims: ViTDims) -> float:
        return float(self.block_latency(block_rows(dims)).sum()) + self.base_latency(dims.emb)

    @abstractmethod
    def describe(self) -> str:
        """One line for logs."""

    def __repr__(self) -> str:
        return self.describe()


# ---- lookup table ---------------------------------------------------------------------------------
def _cell(axis: str, grid: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lower and upper grid index of the cell holding each x, and x's position t in [0, 1] in it."""
    lo_val, hi_val = float(grid[0]), float(grid[-1])
    bad = (x < lo_val) | (x > hi_val)
    if bool(bad.any()):
        value = x[bad][0].item()
        points = [int(g) if g.is_integer() else g for g in grid.tolist()]
        raise ValueError(
            f"latency table: {axis}={value:g} is outside the profiled grid [{lo_val:g}, {hi_val:g}] "
            f"(grid {points}); re-profile with a grid covering it "
            f"(python -m nvit_lightning.latency.profiler profile ...)")
    if len(grid) == 1:
        zero = torch.zeros_like(x, dtype=torch.long)
        return zero, zero, torch.zeros_like(x)
    lo = (torch.searchsorted(grid, x.contiguous(), right=True) - 1).clamp(0, len(grid) - 2)
    t = (x - grid[lo]) / (grid[lo + 1] - grid[lo])
    return lo, lo + 1, t


def _interpolate(table: Tensor, grids: list[Tensor], x: Tensor, names: list[str]) -> Tensor:
    """Multilinear interpolation of a k-D `table` on `grids` at the rows of x (n, k)."""
    cells = [_cell(name, g, x[:, d]) for d, (name, g) in enumerate(zip(names, grids))]
    flat, strides = table.reshape(-1), table.stride()
    result = torch.zeros(len(x), dtype=torch.float64)
    # a Python loop over the 2^k cell corners, never over rows
    for corner in itertools.product((0, 1), repeat=len(grids)):
        index = torch.zeros(len(x), dtype=torch.long)
        weight = torch.ones(len(x), dtype=torch.float64)
        for bit, (lo, hi, t), stride in zip(corner, cells, strides):
            index += (hi if bit else lo) * stride
            weight *= t if bit else 1 - t
        result += weight * flat[index]
    return result


def _floats(values: Tensor | list) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float64)


def _json_numbers(t: Tensor) -> list:
    return [int(v) if float(v).is_integer() else float(v) for v in t.tolist()]


class CorruptTableError(ValueError):
    """A latency-table file that cannot be parsed."""


class LookupTableLatency(LatencyModel):
    """Per-block latency on a 5-D grid, multilinearly interpolated (exact at grid points).

    Block MACs are multilinear in (emb, heads, qk, v, mlp) (e.g. tokens·emb·heads·qk), so multilinear
    interpolation is exact for a compute-bound block and only has to absorb the hardware's deviations
    from that between grid points. Queries outside the grid raise instead of extrapolating: a pruned
    dim below the profiled minimum would otherwise get a made-up (possibly negative) latency.

    One deviation is a jump, not a curve: fused attention kernels (PyTorch's flash SDPA) need equal
    q/k and v head dims, so a block with qk == v runs a faster kernel than its neighbours (2-4x faster
    attention on a CPU). No interpolation across qk ≠ v can represent that, so the optional
    `same_qk_v_ms` table (emb, heads, d, mlp), profiled at qk = v = d, serves rows with qk == v, and
    `block_ms` holds the latency with the kernels that accept qk ≠ v (profiled with the equal-dims-only
    kernels disabled, so its grid points with qk == v are smooth with their neighbours).

    Depth pruning (heads = 0 or mlp = 0: a removed attention / MLP sub-layer, which runs no norm and
    no product, only adds its writer's bias) is priced from the optional `no_attn_ms` table (emb, mlp):
    a block without attention. A block without MLP is the full block at the grid's smallest mlp minus
    the no-attention block there; a block with neither costs 0. Without that table, both are the
    linear extrapolation of the 5-D table to heads = 0 / mlp = 0 (which keeps the removed sub-layer's
    fixed costs: an overestimate).
    """

    def __init__(self, grid: dict[str, list[int | float]], block_ms: Tensor | list,
                 base_emb: list[int | float], base_ms: list[float], meta: dict | None = None,
                 same_qk_v_grid: list[int | float] | None = None,
                 same_qk_v_ms: Tensor | list | None = None, no_attn_ms: Tensor | list | None = None) -> None:
        missing = set(AXES) - set(grid)
        if missing:
            raise ValueError(f"latency table grid misses axes {sorted(missing)}; needs {AXES}")
        self.grid = {a: _floats(grid[a]) for a in AXES}
        for a, g in self.grid.items():
            if len(g) == 0 or bool((g[1:] <= g[:-1]).any()):
                raise ValueError(f"latency table grid axis {a!r} must be non-empty and strictly "
                                 f"increasing, got {g.tolist()}")
        self.block_ms = torch.as_tensor(block_ms, dtype=torch.float64).reshape(
            tuple(len(self.grid[a]) for a in AXES))
        self.base_emb, self.base_ms = _floats(base_emb), _floats(base_ms)
        if self.base_emb.shape != self.base_ms.shape or len(self.base_emb) == 0:
            raise ValueError(f"base_ms: emb and ms lists must have one equal length, got "
                             f"{len(self.base_emb)} and {len(self.base_ms)}")
        self.same_qk_v_grid = self.same_qk_v_ms = None
        if same_qk_v_ms is not None:
            if same_qk_v_grid is None:
                raise ValueError("same_qk_v_ms needs its grid of head dims (same_qk_v_grid)")
            self.same_qk_v_grid = _floats(same_qk_v_grid)
            self.same_qk_v_ms = torch.as_tensor(same_qk_v_ms, dtype=torch.float64).reshape(
                len(self.grid["emb"]), len(self.grid["heads"]), len(self.same_qk_v_grid),
                len(self.grid["mlp"]))
        self.no_attn_ms = None
        if no_attn_ms is not None:
            self.no_attn_ms = torch.as_tensor(no_attn_ms, dtype=torch.float64).reshape(
                len(self.grid["emb"]), len(self.grid["mlp"]))
        self.meta = dict(meta or {})
        m = self.meta
        self.tokens = m.get("tokens")
        self.timing = TimingSetup(device=m.get("device_type", "cpu"), dtype=m.get("dtype", "float32"),
                                  batch_size=int(m.get("batch_size", 1)), num_threads=m.get("num_threads"))

    # ---- queries --------------------------------------------------------------------------------
    def block_latency(self, block_dims: Tensor) -> Tensor:
        rows = _as_rows(block_dims)
        out_dtype, device = _out_dtype(rows), rows.device
        x = rows.detach().to("cpu", torch.float64)
        removed = (x[:, 1] == 0) | (x[:, 4] == 0)
        if bool(removed.any()):  # depth pruning: a removed attention and / or MLP sub-layer
            result = torch.empty(len(x), dtype=torch.float64)
            if bool((~removed).any()):
                result[~removed] = self._full_blocks(x[~removed])
            result[removed] = self._removed_sublayers(x[removed])
            return result.to(device=device, dtype=out_dtype)
        return self._full_blocks(x).to(device=device, dtype=out_dtype)

    def _removed_sublayers(self, x: Tensor) -> Tensor:
        """Rows with heads == 0 and / or mlp == 0 (see the class doc)."""
        out = torch.zeros(len(x), dtype=torch.float64)
        no_attn, no_mlp = (x[:, 1] == 0) & (x[:, 4] > 0), (x[:, 4] == 0) & (x[:, 1] > 0)
        mlp = self.grid["mlp"]
        if bool(no_attn.any()):
            r = x[no_attn]
            if self.no_attn_ms is not None:
                out[no_attn] = _interpolate(self.no_attn_ms, [self.grid["emb"], mlp], r[:, [0, 4]], ["emb", "mlp"])
            else:
                out[no_attn] = self._extrapolate_to_zero(r, 1)
        if bool(no_mlp.any()):
            r = x[no_mlp]
            if self.no_attn_ms is not None:
                at = r.clone()
                at[:, 4] = mlp[0]
                mlp_part = _interpolate(self.no_attn_ms, [self.grid["emb"], mlp], at[:, [0, 4]], ["emb", "mlp"])
                out[no_mlp] = (self._full_blocks(at) - mlp_part).clamp_min(0)
            else:
                out[no_mlp] = self._extrapolate_to_zero(r, 4)
        return out

    def _extrapolate_to_zero(self, x: Tensor, axis: int) -> Tensor:
        """The 5-D table extended linearly from its two smallest grid points on `axis` to 0 there."""
        grid = self.grid[AXES[axis]]
        if len(grid) < 2:
            raise ValueError(f"latency table: cannot price {AXES[axis]}=0 from a one-point grid; re-profile "
                             f"with depth pruning (python -m nvit_lightning.latency.profiler depth ...)")
        lo, hi = x.clone(), x.clone()
        lo[:, axis], hi[:, axis] = grid[0], grid[1]
        f_lo, f_hi = self._full_blocks(lo), self._full_blocks(hi)
        return (f_lo - float(grid[0]) * (f_hi - f_lo) / float(grid[1] - grid[0])).clamp_min(0)

    def _full_blocks(self, x: Tensor) -> Tensor:
        """Float64 rows of blocks with both sub-layers."""
        result = _interpolate(self.block_ms, [self.grid[a] for a in AXES], x, list(AXES))
        if self.same_qk_v_ms is not None:
            d = self.same_qk_v_grid
            same = (x[:, 2] == x[:, 3]) & (x[:, 2] >= d[0]) & (x[:, 2] <= d[-1])
            if bool(same.any()):
                grids = [self.grid["emb"], self.grid["heads"], d, self.grid["mlp"]]
                result[same] = _interpolate(self.same_qk_v_ms, grids, x[same][:, [0, 1, 2, 4]],
                                            ["emb", "heads", "qk=v", "mlp"])
        return result

    def base_latency(self, emb: int | float) -> float:
        x = torch.tensor([[float(emb)]], dtype=torch.float64)
        return float(_interpolate(self.base_ms, [self.base_emb], x, ["emb (base)"])[0])

    def describe(self) -> str:
        m = self.meta
        sizes = "x".join(str(len(self.grid[a])) for a in AXES)
        same = ("" if self.same_qk_v_ms is None else " + qk=v table") + (
            "" if self.no_attn_ms is None else " + no-attention table")
        return (f"LookupTableLatency({m.get('model', '?')} on {m.get('device', '?')}, {m.get('dtype', '?')}, "
                f"batch {m.get('batch_size', '?')}, tokens {m.get('tokens', '?')}, "
                f"threads {m.get('num_threads', '?')}, grid {sizes}{same})")

    # ---- persistence ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {"meta": self.meta, "grid": {a: _json_numbers(self.grid[a]) for a in AXES},
                "block_ms": self.block_ms.tolist(),
                "base_ms": {"emb": _json_numbers(self.base_emb), "ms": self.base_ms.tolist()}}
        if self.same_qk_v_ms is not None:
            data["same_qk_v_ms"] = {"axes": ["emb", "heads", "qk=v", "mlp"],
                                    "qk_v": _json_numbers(self.same_qk_v_grid),
                                    "ms": self.same_qk_v_ms.tolist()}
        if self.no_attn_ms is not None:
            data["no_attn_ms"] = {"axes": ["emb", "mlp"], "ms": self.no_attn_ms.tolist()}
        return data

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")  # an interrupted write never leaves a truncated table
        partial.write_text(_dumps_compact(self.to_dict()) + "\n")
        partial.replace(path)
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> LookupTableLatency:
        missing = {"grid", "block_ms", "base_ms"} - set(data)
        if missing:
            raise ValueError(f"{source} is not a latency table: missing keys {sorted(missing)}")
        same = data.get("same_qk_v_ms") or {}
        return cls(data["grid"], data["block_ms"], data["base_ms"]["emb"], data["base_ms"]["ms"],
                   data.get("meta", {}), same.get("qk_v"), same.get("ms"),
                   (data.get("no_attn_ms") or {}).get("ms"))

    @classmethod
    def load(cls, path: str | Path, expect_tokens: int | None = None,
             expect_model: str | None = None) -> LookupTableLatency:
        """Load a table; `expect_*` guard against using a table profiled for another model."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"latency table {path} not found; profile one with "
                                    f"`python -m nvit_lightning.latency.profiler profile --out {path} ...`")
        try:
            table = cls.from_dict(json.loads(path.read_text()), str(path))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, IndexError) as err:
            raise CorruptTableError(f"latency table {path} is corrupt ({type(err).__name__}: {err}); delete it (a "
                             f"profiled table is rebuilt at the next run) or set latency.path") from None
        except (RuntimeError, ValueError) as err:  # torch's reshape: values that do not fit the grid; a bad grid
            what = "its block_ms (or same_qk_v_ms / no_attn_ms) does not fit its grid: " \
                if isinstance(err, RuntimeError) else ""
            raise CorruptTableError(f"latency table {path} is corrupt ({what}{str(err).splitlines()[0]}); delete it "
                                    f"(a profiled table is rebuilt at the next run) or set latency.path") from None
        tokens = table.meta.get("tokens")
        if expect_tokens is not None and tokens != expect_tokens:
            raise ValueError(
                f"latency table {path} was profiled for {tokens} tokens per image, but the model has "
                f"{expect_tokens} (a distilled DeiT has one more token than a plain one); "
                f"profile a table with --tokens {expect_tokens}")
        model = table.meta.get("model")
        if expect_model is not None and model != expect_model:
            raise ValueError(f"latency table {path} was profiled for model family {model!r}, "
                             f"expected {expect_model!r}")
        return table


def _dumps_compact(obj: object, indent: int = 0) -> str:
    """JSON with dicts indented and the two innermost list levels on one line: readable, yet a 5-D
    table stays a few dozen lines."""
    pad = " " * indent
    if isinstance(obj, dict) and obj:
        items = [f'{pad} {json.dumps(k)}: {_dumps_compact(v, indent + 1).lstrip()}' for k, v in obj.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and isinstance(obj[0], dict | list) and _depth(obj) > 2:
        items = [_dumps_compact(v, indent + 1) for v in obj]
        return pad + "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return pad + json.dumps(obj, separators=(", ", ": "))


def _depth(obj: object) -> int:
    return 1 + max(map(_depth, obj), default=0) if isinstance(obj, list) else 0


# ---- FLOPs proxy ----------------------------------------------------------------------------------
class _BlockColumns:
    """Quacks like a one-block ViTDims whose dims are tensor columns, so `ViTDims.block_macs` (plain
    arithmetic) evaluates every row at once and the MAC formula lives in one place."""

    def __init__(self, rows: Tensor) -> None:
        self.rows = rows

    def block(self, i: int) -> tuple[Tensor, ...]:
        return tuple(self.rows.unbind(1))


class FlopsLatency(LatencyModel):
    """Latency proxy: per-image multiply-accumulates (GMAC) times `ms_per_gmac`."""

    def __init__(self, tokens: int = 197, num_classes: int = 1000, patch_size: int = 16, in_chans: int = 3,
                 ms_per_gmac: float = 1.0, distilled: bool = False, device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 1, num_threads: int | None = None,
                 prefix_tokens: int | None = None) -> None:
        self.timing = TimingSetup(device, dtype, batch_size, num_threads)
        self.tokens, self.num_classes = tokens, num_classes
        self.patch_size, self.in_chans = patch_size, in_chans
        self.ms_per_gmac, self.distilled = ms_per_gmac, distilled
        # class / distillation / register tokens; the default is DeiT's
        self.prefix_tokens = prefix_tokens if prefix_tokens is not None else 2 if distilled else 1
        self.num_patches = tokens - self.prefix_tokens
        if self.num_patches < 1:
            raise ValueError(f"FlopsLatency: tokens={tokens} leaves no patch tokens")

    def block_latency(self, block_dims: Tensor) -> Tensor:
        rows = _as_rows(block_dims)
        macs = ViTDims.block_macs(_BlockColumns(rows.to(torch.float64)), 0, self.tokens)
        return (macs * (self.ms_per_gmac / 1e9)).to(_out_dtype(rows))

    def base_latency(self, emb: int) -> float:
        # the non-block MACs of a one-block model: its total minus its single block
        dims = ViTDims(emb, (1,), (1,), (1,), (1,))
        base = dims.macs(self.num_classes, self.patch_size, self.in_chans, self.num_patches, self.distilled,
                         self.prefix_tokens)
        base -= dims.block_macs(0, self.tokens)
        return base * self.ms_per_gmac / 1e9

    def describe(self) -> str:
        return (f"FlopsLatency(tokens {self.tokens}, {self.ms_per_gmac:g} ms/GMAC"
                f"{', distilled' if self.distilled else ''})")


def build_latency_model(kind: str, **kwargs: object) -> LatencyModel:
    """Factory for configs: "lut" (path=..., expect_tokens=..., expect_model=...) or "flops"
    (the `FlopsLatency` arguments)."""
    kind = kind.lower()
    if kind in ("lut", "lookup", "table"):
        if "path" not in kwargs:
            raise ValueError("latency model 'lut' needs path=<table.json>")
        path = kwargs.pop("path")
        return LookupTableLatency.load(path, **kwargs)  # type: ignore[arg-type]
    if kind == "flops":
        return FlopsLatency(**kwargs)  # type: ignore[arg-type]
    raise ValueError(f"unknown latency model kind {kind!r}; choose 'lut' (profiled lookup table) or 'flops'")
