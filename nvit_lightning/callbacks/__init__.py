from .interrupt import InterruptCheckpoint, TrainingInterrupted
from .pruning import GlobalPruning
from .sparsity import SparsitySweep

__all__ = ["GlobalPruning", "InterruptCheckpoint", "SparsitySweep", "TrainingInterrupted"]
