from . import registry  # noqa: F401  (registers the timm entry points)
from .convert import from_timm, load_state_dict_file
from .dims import ViTDims, revit_dims
from .structure import EMB, KINDS, LayerKey, ParamAxes, mask_names, param_axes
from .vit import NonFiniteWeightsError, PrunableViT, check_finite

PrunableViT.from_timm = staticmethod(from_timm)

__all__ = ["EMB", "KINDS", "LayerKey", "NonFiniteWeightsError", "ParamAxes", "PrunableViT", "ViTDims",
           "check_finite", "from_timm", "load_state_dict_file", "mask_names", "param_axes", "revit_dims"]
