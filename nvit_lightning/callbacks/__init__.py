from .architecture import ArchitectureReport, plot_architecture
from .pruning import GlobalPruning

__all__ = ["ArchitectureReport", "GlobalPruning", "plot_architecture"]
