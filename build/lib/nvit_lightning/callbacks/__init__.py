from .architecture import ArchitectureReport, plot_architecture
from .pruning import GlobalPruning
from .sparsity import SparsitySweep

__all__ = ["ArchitectureReport", "GlobalPruning", "SparsitySweep", "plot_architecture"]
