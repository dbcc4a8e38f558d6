"""Per-block architecture of a (pruned) ViT: the one description every other module reads."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class ViTDims:
    """Embedding width and per-block heads, QK/V width per head, and MLP width.

    All heads of a block share one qk and one v width (NViT's head alignment), so a block's attention
    is a plain batched matmul; qk and v widths are independent of each other.
    """

    emb: int
    heads: tuple[int, ...]
    qk: tuple[int, ...]
    v: tuple[int, ...]
    mlp: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("heads", "qk", "v", "mlp"):
            object.__setattr__(self, name, tuple(int(d) for d in getattr(self, name)))
        object.__setattr__(self, "emb", int(self.emb))
        lengths = {len(self.heads), len(self.qk), len(self.v), len(self.mlp)}
        if len(lengths) != 1:
            raise ValueError(f"ViTDims: heads/qk/v/mlp must have one entry per block, got {self}")
        # heads = 0 / mlp = 0: a removed attention / MLP sub-layer (depth pruning), only its bias is left
        if self.emb < 1 or min(self.qk + self.v) < 1 or min(self.heads + self.mlp) < 0:
            raise ValueError(f"ViTDims: emb, qk and v must be >= 1 and heads, mlp >= 0, got {self}")

    @classmethod
    def uniform(cls, emb: int, depth: int, heads: int, mlp_ratio: float = 4.0) -> ViTDims:
        """The dims of a standard (unpruned) ViT: head_dim = emb / heads for both qk and v."""
        if emb % heads:
            raise ValueError(f"emb {emb} is not divisible by heads {heads}")
        head_dim = emb // heads
        return cls(emb, (heads,) * depth, (head_dim,) * depth, (head_dim,) * depth,
                   (int(emb * mlp_ratio),) * depth)

    @property
    def depth(self) -> int:
        return len(self.heads)

    def block(self, i: int) -> tuple[int, int, int, int, int]:
        """(emb, heads, qk, v, mlp) of block i: the key of the latency lookup table."""
        return self.emb, self.heads[i], self.qk[i], self.v[i], self.mlp[i]

    # ---- size ---------------------------------------------------------------------------------
    def num_params(self, num_classes: int = 1000, patch_size: int = 16, in_chans: int = 3,
                   num_patches: int = 196, distilled: bool = False) -> int:
        """Exact parameter count of the PrunableViT built from these dims (biases included)."""
        e = self.emb
        n_prefix = 2 if distilled else 1
        total = in_chans * patch_size * patch_size * e + e  # patch embed conv
        total += n_prefix * e + (num_patches + n_prefix) * e  # cls/dist tokens, pos embed
        for h, qk, v, m in zip(self.heads, self.qk, self.v, self.mlp):
            total += 2 * 2 * e  # norm1, norm2
            total += 2 * (e * h * qk + h * qk)  # q, k
            total += e * h * v + h * v  # v
            total += h * v * e + e  # proj
            total += e * m + m + m * e + e  # fc1, fc2
        total += 2 * e  # final norm
        total += (2 if distilled else 1) * (e * num_classes + num_classes)  # head(s)
        return total

    def block_macs(self, i: int, tokens: int) -> int:
        """Multiply-accumulates of block i for one image of `tokens` tokens."""
        e, h, qk, v, m = self.block(i)
        linear = tokens * e * h * (2 * qk + v) + tokens * h * v * e + 2 * tokens * e * m
        attention = tokens * tokens * h * (qk + v)  # q @ k^T and attn @ v
        return linear + attention

    def macs(self, num_classes: int = 1000, patch_size: int = 16, in_chans: int = 3,
             num_patches: int = 196, distilled: bool = False, prefix_tokens: int | None = None) -> int:
        """Multiply-accumulates per image (the 'FLOPs' of DeiT/NViT tables, e.g. 17.6G for DeiT-B);
        `prefix_tokens` (class, distillation, register tokens) defaults to DeiT's 1 or 2."""
        tokens = num_patches + (prefix_tokens if prefix_tokens is not None else 2 if distilled else 1)
        total = num_patches * in_chans * patch_size * patch_size * self.emb
        total += sum(self.block_macs(i, tokens) for i in range(self.depth))
        total += (2 if distilled else 1) * self.emb * num_classes
        return total

    # ---- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> ViTDims:
        missing = {"emb", "heads", "qk", "v", "mlp"} - set(d)
        if missing:
            raise ValueError(f"ViTDims: missing keys {sorted(missing)} in {d}")
        return cls(d["emb"], d["heads"], d["qk"], d["v"], d["mlp"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> ViTDims:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def __str__(self) -> str:
        rows = [f"emb={self.emb}"] + [
            f"  block {i:2d}: heads={h:2d} qk={qk:3d} v={v:3d} mlp={m:4d}"
            for i, (h, qk, v, m) in enumerate(zip(self.heads, self.qk, self.v, self.mlp))
        ]
        return "\n".join(rows)


@dataclass(frozen=True)
class _ReViTRule:
    """NViT's redistribution rule (paper Sec. 5): dims of a 12-block ViT as a function of EMB only."""

    heads: tuple[int, ...] = field(default=(10, 2, 2, 4, 4, 4, 4, 4, 4, 2, 2, 10))  # x r except ends
    qk: tuple[int, ...] = field(default=(16, 8, 8, 16, 16, 16, 16, 16, 16, 8, 8, 16))  # x s
    mlp: tuple[int, ...] = field(default=(3, 3, 3, 6, 6, 6, 6, 6, 6, 3, 3, 3))  # x EMB


def revit_dims(emb: int, v_per_head: int = 64) -> ViTDims:
    """ReViT dims from EMB: heads [10, 2r, 2r, 4r x6, 2r, 2r, 10], r = round(EMB/200);
    QK per head [16s, 8s, 8s, 16s x6, 8s, 8s, 16s], s = round(EMB/160); V 64; MLP 3/6 x EMB."""
    rule = _ReViTRule()
    r = max(1, round(emb / 200))
    s = max(1, round(emb / 160))
    heads = [h if i in (0, 11) else h * r for i, h in enumerate(rule.heads)]
    qk = [q * s for q in rule.qk]
    mlp = [m * emb for m in rule.mlp]
    return ViTDims(emb, heads, qk, [v_per_head] * 12, mlp)
