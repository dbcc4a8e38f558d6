"""Structural pruning of PrunableViTs, independent of Lightning: the pruner call shape (base),
structure (groups), importance (criteria), the global pruner and NViT's ranking, the latency search,
the refit. Latency models, the profiler and timing live in `nvit_lightning.latency`."""

from .base import Pruner
from .criteria import CRITERIA, Criterion, build_criterion
from .groups import DEFAULT_GROUP_SIZES, Structure
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
    "GlobalPruner",
    "GlobalRanking",
    "Pruner",
    "PruningEvent",
    "Structure",
    "UnreachableTargetError",
    "build_criterion",
    "build_pruning",
    "event_record",
    "prune_to_targets",
]
