"""Structural pruning of PrunableViTs, independent of Lightning: structure (groups), importance
(criteria), latency (models + profiler) and the global pruner."""

from .base import Pruner
from .criteria import CRITERIA, Criterion, build_criterion
from .groups import DEFAULT_GROUP_SIZES, Structure
from .latency import FlopsLatency, LatencyModel, LookupTableLatency, build_latency_model
from .pruner import (
    GlobalPruner,
    PruningEvent,
    UnreachableTargetError,
    build_pruning,
    event_record,
    prune_to_targets,
)
from .ranking import GlobalRanking

__all__ = [
    "CRITERIA",
    "DEFAULT_GROUP_SIZES",
    "Criterion",
    "FlopsLatency",
    "GlobalPruner",
    "GlobalRanking",
    "LatencyModel",
    "LookupTableLatency",
    "Pruner",
    "PruningEvent",
    "Structure",
    "UnreachableTargetError",
    "build_criterion",
    "build_latency_model",
    "build_pruning",
    "event_record",
    "prune_to_targets",
]
