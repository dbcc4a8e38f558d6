"""Wall-clock latency of models, measured the way a user will see it.

Measured latency depends on the process as much as on the model: after a training run the same
compact DeiT-Tiny timed ~10 % slower than in a fresh process (allocator state, thread pools). Every
latency a report calls "measured" therefore comes from `time_in_fresh_process`: a new Python process
builds the models from their architecture alone (weights do not change the time of dense kernels)
and times them interleaved, round by round, so a slow spell of a shared machine hits all of them.
The dense model is timed alongside, both as timm's own module and as our PrunableViT.

    python -m nvit_lightning.latency.worker < job.json     # the worker (`main`); prints {"ms", "spread", "rounds"}
"""

from __future__ import annotations

import ctypes
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

_MALLOC_PINNED: bool | None = None


def steady_malloc() -> bool:
    """Keep glibc malloc from handing activation memory back to the OS between forwards (CPU timing).

    glibc's mmap threshold adapts to the sizes a process has freed so far, so whether the largest
    activations of a forward are page-faulted in afresh every time depends on the process's history:
    on the reference machine DeiT-Tiny at batch 32 runs in ~320 ms or ~450 ms (110k page faults per
    forward) depending on the process. Fixed thresholds keep freed memory in the heap, as tcmalloc or
    jemalloc would, so profiling and every later measurement see the same steady state. Applied once
    per process (the process then keeps its peak heap); returns False where it cannot (not glibc).
    """
    global _MALLOC_PINNED
    if _MALLOC_PINNED is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
            # 32 MiB is glibc's largest mmap threshold; 2 GiB - 1 the largest int mallopt accepts
            _MALLOC_PINNED = bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                                  and libc.mallopt(m_trim_threshold, 2**31 - 1))
        except (OSError, AttributeError):
            _MALLOC_PINNED = False
    return _MALLOC_PINNED


def measure_ms(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 3,
               repeats: int = 10, rounds: int = 1) -> float:
    """Wall time of `fn()` in ms: the median over `rounds` of the median of `repeats` calls.

    On a shared (virtual) machine the speed drifts both ways over seconds to minutes: other processes
    slow a run down by up to 5x (OpenMP threads wait for a descheduled sibling), and a busy or idle
    hyper-thread sibling on the host moves it by ~30 %. The median of rounds spread out in time is the
    typical latency, which is what a later measurement of the whole model most likely sees.
    CUDA events on a GPU (kernels are asynchronous). On a CPU the allocator is pinned first
    (`steady_malloc`).
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if device.type == "cpu":
        steady_malloc()
    medians = []
    with torch.inference_mode():
        for _ in range(rounds):
            for _ in range(warmup):
                fn()
            if cuda:
                torch.cuda.synchronize(device)
            times = []
            for _ in range(repeats):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t0) * 1e3)
            medians.append(statistics.median(times))
    return statistics.median(medians)



@dataclass(frozen=True)
class TimingSetup:
    """Where and how a latency is measured: what a latency model was profiled for."""

    device: str = "cpu"  # device type: cpu | cuda
    dtype: str = "float32"
    batch_size: int = 32
    num_threads: int | None = None  # CPU threads (None: torch's default)


def prunable_spec(model: Any) -> dict[str, Any]:
    """A JSON description of a PrunableViT's compact architecture (its live dims, no weights)."""
    config = {**model.config, "dims": model.live_dims().to_dict(), "masked": False}
    return {"prunable": config}


def timm_spec(name: str, **kwargs: Any) -> dict[str, Any]:
    """A timm model by registry name (random weights: nothing is downloaded)."""
    return {"timm": name, "kwargs": kwargs}


def _build(spec: Mapping[str, Any]) -> torch.nn.Module:
    if "timm" in spec:
        import timm

        return timm.create_model(spec["timm"], pretrained=False, **spec.get("kwargs", {}))
    from ..models import PrunableViT

    return PrunableViT(**spec["prunable"])


def time_models(specs: Mapping[str, Mapping[str, Any]], setup: TimingSetup, rounds: int = 25,
                repeats: int = 1, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """`time_modules` of the models built from `specs` (architectures, random weights)."""
    return time_modules({name: _build(spec) for name, spec in specs.items()}, setup, rounds, repeats, warmup, seed)


def time_modules(models: Mapping[str, torch.nn.Module], setup: TimingSetup, rounds: int = 25,
                 repeats: int = 1, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Median ms per model over `rounds`, each round timing every model (in a fresh random order)
    for `repeats` calls, after `warmup` calls of each model at the start. Many short rounds, because
    the speed of a shared machine changes within seconds: a model's time in a round is compared with
    the others' times in the same round (`paired_ratio`). `spread` = slowest / fastest round;
    `rounds` = every round's time per model."""
    if setup.num_threads:
        torch.set_num_threads(setup.num_threads)
    device, dtype = torch.device(setup.device), getattr(torch, setup.dtype)
    models = {name: model.eval().to(device, dtype) for name, model in models.items()}
    size = {name: m.patch_embed.img_size for name, m in models.items()}
    images = {name: torch.randn(setup.batch_size, 3, *size[name], device=device, dtype=dtype) for name in models}
    calls = {name: (lambda m=model, x=images[name]: m(x)) for name, model in models.items()}
    for call in calls.values():
        measure_ms(call, device, warmup=warmup, repeats=1)
    order, rng = list(models), random.Random(seed)
    per_round: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            per_round[name].append(measure_ms(calls[name], device, warmup=0, repeats=repeats))
    return {"ms": {n: statistics.median(t) for n, t in per_round.items()},
            "spread": {n: max(t) / min(t) for n, t in per_round.items()},
            "rounds": per_round}


def round_ratios(result: Mapping[str, Any], model: str, reference: str) -> list[float]:
    """`model`'s time over `reference`'s in each round of a `time_modules` result."""
    rounds = result["rounds"]
    return [m / r for m, r in zip(rounds[model], rounds[reference])]


def paired_ratio(result: Mapping[str, Any], model: str, reference: str) -> float:
    """`model`'s latency relative to `reference`'s in a `time_models` result: the median over rounds
    of their ratio in the same round. A slow spell of a shared machine then scales both sides of each
    ratio, where a ratio of overall medians can pair a slow round with a fast one."""
    if not result.get("rounds"):  # a result without rounds: the ratio of overall medians
        return result["ms"][model] / result["ms"][reference]
    return statistics.median(round_ratios(result, model, reference))


def ratio_uncertainty(result: Mapping[str, Any], model: str, reference: str) -> float:
    """How much the per-round ratios of `paired_ratio` disagree: their interquartile range relative
    to their median (0 where every round agrees)."""
    ratios = round_ratios(result, model, reference)
    if len(ratios) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(ratios)


def time_in_fresh_process(specs: Mapping[str, Mapping[str, Any]], setup: TimingSetup, rounds: int = 25,
                          repeats: int = 1, warmup: int = 2, timeout: float = 1800) -> dict[str, Any]:
    """`time_models` in a new Python process (see the module docstring for why)."""
    job = {"specs": dict(specs), "setup": asdict(setup), "rounds": rounds, "repeats": repeats, "warmup": warmup}
    done = subprocess.run([sys.executable, "-m", "nvit_lightning.latency.worker"], input=json.dumps(job),
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"latency measurement in a fresh process failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """The fresh process's job (`nvit_lightning.latency.worker`): a JSON job on stdin, the timing out."""
    job = json.loads(sys.stdin.read())
    result = time_models(job["specs"], TimingSetup(**job["setup"]), job["rounds"], job["repeats"], job["warmup"])
    print(json.dumps(result))
