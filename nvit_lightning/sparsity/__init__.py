"""oViT: second-order (OBS) unstructured and N:M sparsity of a ViT's linears, with baselines."""

from .fisher import block_fisher, damped_inverse
from .layers import Blocks, layer_sparsity, sparsifiable_layers, weight_masks
from .obs import obs_order, obs_prune, obs_scores
from .select import removal_counts
from .semi_structured import is_n_m_sparse, to_semi_structured
from .sparsifier import MagnitudeSparsifier, OBSSparsifier, Sparsifier, parse_pattern

__all__ = [
           "Blocks",
           "MagnitudeSparsifier",
           "OBSSparsifier",
           "Sparsifier",
           "block_fisher",
           "damped_inverse",
           "is_n_m_sparse",
           "layer_sparsity",
           "obs_order",
           "obs_prune",
           "obs_scores",
           "parse_pattern",
           "removal_counts",
           "sparsifiable_layers",
           "to_semi_structured",
           "weight_masks",
]
