"""Structural pruning of PrunableViTs, independent of Lightning: structure (groups), importance
(criteria), latency (models + profiler) and the global pruner."""

from .criteria import CRITERIA, Criterion, build_criterion
from .groups import DEFAULT_GROUP_SIZES, Structure
from .latency import FlopsLatency, LatencyModel, LookupTableLatency, build_latency_model
from .pruner import GlobalPruner, PruningEvent, UnreachableTargetError, build_pruning, prune_to_targets

__all__ = ["CRITERIA", "DEFAULT_GROUP_SIZES", "Criterion", "FlopsLatency", "GlobalPruner", "LatencyModel",
           "LookupTableLatency", "PruningEvent", "Structure", "UnreachableTargetError", "build_criterion",
           "build_latency_model", "build_pruning", "prune_to_targets"]
