from .architecture import ArchitectureReport, plot_architecture
from .interrupt import InterruptCheckpoint, TrainingInterrupted
from .pruning import GlobalPruning
from .sparsity import SparsitySweep

__all__ = ["ArchitectureReport", "GlobalPruning", "InterruptCheckpoint", "SparsitySweep", "TrainingInterrupted",
           "plot_architecture"]
