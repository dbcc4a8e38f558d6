"""Latency: the models that predict it (a lookup table profiled on the target hardware, or FLOPs),
the profiler that builds the tables, and fresh-process timing that measures real models. Nothing
here depends on how models are pruned."""

from .models import CorruptTableError, FlopsLatency, LatencyModel, LookupTableLatency, build_latency_model

__all__ = ["CorruptTableError", "FlopsLatency", "LatencyModel", "LookupTableLatency", "build_latency_model"]
