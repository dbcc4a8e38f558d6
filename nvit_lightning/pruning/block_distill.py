"""Block-wise distillation after the closed-form refit: each block of the pruned model is trained, by
gradient descent on calibration images, to map the pruned model's residual stream entering it to the
dense model's residual stream after the same block.

The least-squares refit (`reconstruct.py`) solves one linear layer at a time; it cannot move the
weights *inside* the nonlinearities (q and k before the softmax, fc1 before the GELU) towards what
the pruned block needs. Training a whole block against its dense counterpart can, and its target is
every token of every calibration image (197 x 192 numbers per image for DeiT-Tiny), far more signal
than one logit vector per image: on the 1000-image sample an end-to-end KL fine-tune overfits within
about 2000 images, while this keeps improving (README, "Choosing the defaults"). Blocks are done in
order, each on the stream the already-tuned blocks before it produce, so later blocks also absorb the
error left by earlier ones (BRECQ-style block reconstruction, here for structured pruning).

The blocks are trained in their compact form (a third fewer FLOPs at 0.65x latency than the masked
ones) and written back into the live slices of the masked model, whose pruned slices stay zero: the
tuned model still compacts exactly.

A sparse model (oViT / WoodFisher / magnitude, unstructured or N:M: mask-free, zeros in place) is
tuned the same way with its weight masks held: the gradients of pruned weights are zeroed before
every Adam step (so both of Adam's moments stay exactly zero there and the step cannot move them)
and the weights re-masked after it, so every zero, and with it an N:M pattern, survives exactly.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..models import PrunableViT
from ..models.compact import load_compact_into
from .interrupt import Checkpoint, cpu_state, raise_if_stop_requested
from .reconstruct import FitResult

# The values an unset `lr` / `readout` takes, by the kind of model tuned. A structurally pruned one is
# under-fitted at the far end and wants larger steps (held-out top-1 / KL to the dense logits at 0.65
# and 0.5 of the dense latency: lr 1e-3 65.1 / 0.696 and 34.7 / 2.43, 2e-3 65.3 / 0.683 and 35.5 / 2.27,
# 3e-3 64.0 / 0.708 and 38.0 / 2.24: docs/research_log.md). A sparse one over-fits its calibration
# images (KL to the dense logits 0.02 there, 0.20 held out at 50 %) and keeps the lr every sparse
# result was measured with, with half of each block's loss on what the head reads (held-out KL after
# the whole reconstruction at 50 / 70 %: 0.255 / 0.772 -> 0.199 / 0.753, top-1 71.7 / 59.7 -> 73.2 /
# 58.9: docs/sparsity_reconstruction.md, round five).
STRUCTURED_LR = 2e-3
STRUCTURED_READOUT = 0.0  # 0.5 at 0.5 of the latency: held-out KL 2.43 -> 2.02, top-1 34.7 -> 32.4
SPARSE_LR = 1e-3
SPARSE_READOUT = 0.5


@dataclass(frozen=True)
class BlockDistillation:
    """Train each block for `epochs` passes over the calibration tokens (Adam, cosine-decayed `lr`,
    mini-batches of `batch_size` images drawn with a generator seeded by `seed`) to minimise the mean
    squared error between its output residual stream and the dense model's; with `readout` > 0, that
    share of each block's loss is the relative error of what the head reads of the stream (the class
    token, or the patch mean for average pooling: `PrunableViT.pool`), the rest that of every token.
    Unset, `lr` and `readout` take the measured values for the kind of model tuned (`for_model`):
    `STRUCTURED_*` for a structurally masked one, `SPARSE_*` for a sparse one. A block that ends
    worse on the calibration images than it started (e.g. at too high an lr) keeps its refit
    weights."""

    epochs: int = 16
    lr: float | None = None
    batch_size: int = 32
    seed: int = 0
    readout: float | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"block distillation: epochs must be >= 1, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"block distillation: lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"block distillation: batch_size must be >= 1, got {self.batch_size}")
        if self.readout is not None and not 0 <= self.readout < 1:
            raise ValueError(f"block distillation: readout must be in [0, 1), got {self.readout}")

    def for_model(self, sparse: bool) -> BlockDistillation:
        """These settings with an unset `lr` / `readout` filled in for a `sparse` (or a structurally
        pruned) model; set ones are kept."""
        lr, readout = (SPARSE_LR, SPARSE_READOUT) if sparse else (STRUCTURED_LR, STRUCTURED_READOUT)
        return replace(self, lr=lr if self.lr is None else self.lr,
                       readout=readout if self.readout is None else self.readout)

    def __call__(self, model: PrunableViT, reference: PrunableViT, images: Sequence[Tensor],
                 device: str | torch.device = "cpu", progress: bool = True,
                 masks: Mapping[str, Tensor] | None = None, checkpoint: Checkpoint | None = None) -> list[FitResult]:
        """Tune the blocks of `model` in place against `reference` on `images` (batches of images);
        returns every block's relative error `‖ours − dense‖² / ‖dense‖²` before and after.

        `model` is either structurally masked (trained in compact form, written back) or, with
        `masks` (parameter name -> 1 where the weight may be nonzero, e.g. `sparsity.weight_masks`),
        a mask-free sparse model whose masked weights stay exactly zero.

        With `checkpoint`, every tuned block is saved (the student's weights, the generator's state)
        and a stop requested (`interrupt.py`) takes effect after it; a call with a saved state goes
        on from the next block with the same mini-batches, as if never stopped. With `readout`, the
        errors (and the check that a block improved) are those of the loss: `readout` x the error of
        the pooled stream + (1 - `readout`) x that of the whole stream."""
        if model.masked == (masks is not None):
            raise ValueError("block distillation works on the masked model (before compact()), or on a mask-free "
                             "sparse model with its weight masks (masks=...)")
        if not images:
            raise ValueError("block distillation needs at least one calibration batch")
        device = torch.device(device)
        modes = [m.training for m in (model, reference)]
        reference.to(device).eval()  # no dropout / drop path: the function being compressed
        student = model.to(device).compact().eval() if model.masked else model.to(device).eval()
        settings = self.for_model(sparse=masks is not None)
        try:
            results = settings._distill(student, reference, images, device, progress,
                                        model.emb_mask.nonzero().flatten() if model.masked else None,
                                        masks or {}, checkpoint or Checkpoint(None))
        finally:
            model.train(modes[0])
            reference.train(modes[1])
        if model.masked:
            load_compact_into(model, student)
        return results

    def _distill(self, student: PrunableViT, reference: PrunableViT, images: Sequence[Tensor],
                 device: torch.device, progress: bool, live_emb: Tensor | None,
                 masks: Mapping[str, Tensor], checkpoint: Checkpoint) -> list[FitResult]:
        """Every block of `student` in order, on the stream its tuned predecessors produce; `live_emb`:
        the dense stream's channels the student has (None: all)."""
        ref_mask = reference.emb_mask_or_none
        start, results, generator = self._resume(student, checkpoint.load())
        if start == len(student.blocks):
            return results
        with torch.no_grad():
            ours = torch.cat([student.embed(x.to(device).float()) for x in images])  # n, tokens, live emb
            theirs = torch.cat([reference.embed(x.to(device).float()) for x in images])  # n, tokens, emb
        bar = tqdm(list(zip(student.blocks, reference.blocks)), desc="block distillation", leave=False,
                   disable=not progress)
        for i, (block, dense_block) in enumerate(bar):
            with torch.no_grad():
                theirs = _chunked(functools.partial(dense_block, emb_mask=ref_mask), theirs, self.batch_size)
                target = theirs if live_emb is None else theirs[..., live_emb]
                if i < start:  # tuned before a stop: its output, from its saved weights
                    ours = _chunked(block, ours, self.batch_size)
                    continue
                before = self._error(_chunked(block, ours, self.batch_size), target, student.pool)
            held = {p: masks[f"blocks.{i}.{name}"].to(p.device, p.dtype)
                    for name, p in block.named_parameters() if f"blocks.{i}.{name}" in masks}
            refit = copy.deepcopy(block.state_dict())
            self._train(block, ours, target, held, generator, student.pool)
            with torch.no_grad():
                tuned = _chunked(block, ours, self.batch_size)
                after = self._error(tuned, target, student.pool)
                if not after < before:
                    block.load_state_dict(refit)
                    tuned, after = _chunked(block, ours, self.batch_size), before
                ours = tuned
            results.append(FitResult(f"blocks.{i}", before, after))
            bar.set_postfix(error=f"{results[-1].error_before:.3f}->{results[-1].error_after:.3f}")
            if checkpoint.active:  # saved, then stopped if asked: nothing done is lost
                checkpoint.save({"blocks_done": i + 1, "student": cpu_state(student),
                                 "generator": generator.get_state(), "results": [asdict(r) for r in results]})
                raise_if_stop_requested(f"block {i + 1} of {len(student.blocks)} of block distillation")
        return results

    def _error(self, ours: Tensor, theirs: Tensor, pool: Callable[[Tensor], Tensor]) -> float:
        """The relative error the block is trained to lower: of the stream, and with `readout` that
        share of it of what the head reads."""
        error = _relative_error(ours, theirs)
        if self.readout:
            error = (1 - self.readout) * error + self.readout * _relative_error(pool(ours), pool(theirs))
        return error

    def _resume(self, student: PrunableViT, saved: dict | None) -> tuple[int, list[FitResult], torch.Generator]:
        """The blocks done, their results and the generator, fresh or as a saved state left them (its
        weights loaded into `student`)."""
        generator = torch.Generator().manual_seed(self.seed)
        if saved is None:
            return 0, [], generator
        student.load_state_dict(saved["student"])
        generator.set_state(saved["generator"])
        return saved["blocks_done"], [FitResult(**r) for r in saved["results"]], generator

    def _train(self, block: nn.Module, inputs: Tensor, target: Tensor, held: Mapping[nn.Parameter, Tensor],
               generator: torch.Generator, pool: Callable[[Tensor], Tensor]) -> None:
        """`epochs` passes of Adam (cosine-decayed lr) on mini-batches of the block's inputs; the
        parameters in `held` keep their zeros (gradient masked before each step, weight after it)."""
        steps = self.epochs * math.ceil(len(inputs) / self.batch_size)
        optimizer, schedule = cosine_adam(block.parameters(), self.lr, steps)
        share = self.readout
        if share:
            read = pool(target)  # n, emb: what the head would read of the dense stream
            # per-element weight that gives the readout term its share of the loss (Adam ignores the scale)
            weight = share / (1 - share) * float(target.square().mean() / read.square().mean().clamp_min(1e-30))
        with torch.enable_grad():
            for _ in range(steps):
                idx = torch.randint(len(inputs), (self.batch_size,), generator=generator).to(inputs.device)
                out = block(inputs[idx])
                loss = F.mse_loss(out, target[idx])
                if share:
                    loss = loss + weight * F.mse_loss(pool(out), read[idx])
                step_holding_zeros(loss, optimizer, schedule, held)
        optimizer.zero_grad(set_to_none=True)


def cosine_adam(params: Iterable[nn.Parameter], lr: float, steps: int
                ) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam with its learning rate cosine-decayed from `lr` to 0 over `steps` steps."""
    optimizer = torch.optim.Adam(params, lr=lr)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))


def step_holding_zeros(loss: Tensor, optimizer: torch.optim.Optimizer, schedule: torch.optim.lr_scheduler.LRScheduler,
                       held: Mapping[nn.Parameter, Tensor]) -> None:
    """One optimizer step on `loss` in which every parameter in `held` keeps the zeros of its mask
    (1 where it may be nonzero): its gradient is masked before the step, its weight after it."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for param, mask in held.items():  # zero gradients keep Adam's moments, so its step, at zero
        param.grad.mul_(mask)
    optimizer.step()
    schedule.step()
    with torch.no_grad():  # exact zeros whatever the step did (e.g. a weight-decaying optimizer)
        for param, mask in held.items():
            param.mul_(mask)


def _chunked(fn: Callable[[Tensor], Tensor], x: Tensor, size: int) -> Tensor:
    return torch.cat([fn(x[i:i + size]) for i in range(0, len(x), size)])


def _relative_error(ours: Tensor, theirs: Tensor) -> float:
    return float((ours - theirs).double().square().sum() / theirs.double().square().sum().clamp_min(1e-30))
