from . import registry  # noqa: F401  (registers the timm entry points)
from .convert import from_timm, load_state_dict_file
from .dims import ViTDims, revit_dims
from .families import FAMILIES, Family
from .structure import (
    DEFAULT_DIVISORS,
    DEFAULT_GROUP_SIZES,
    EMB,
    KIND_SPECS,
    KINDS,
    LayerKey,
    ParamAxes,
    mask_names,
    param_axes,
)
from .vit import NonFiniteWeightsError, PrunableViT, check_finite, write_model_card

PrunableViT.from_timm = staticmethod(from_timm)

__all__ = ["DEFAULT_DIVISORS", "DEFAULT_GROUP_SIZES", "EMB", "FAMILIES", "KINDS", "KIND_SPECS", "Family",
           "LayerKey", "NonFiniteWeightsError", "ParamAxes", "PrunableViT", "ViTDims", "check_finite", "from_timm",
           "load_state_dict_file", "mask_names", "param_axes", "revit_dims", "write_model_card"]
