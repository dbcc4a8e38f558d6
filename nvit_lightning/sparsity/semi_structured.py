"""2:4 weights as GPU semi-structured sparse tensors, so that the zeros buy speed.

NVIDIA's sparse tensor cores (compute capability 8.0+: A100, H100, ...) multiply a weight with at
most 2 nonzeros in every 4 consecutive input weights at up to twice the dense rate; PyTorch reaches
them through `torch.sparse.to_sparse_semi_structured` (cuSPARSELt or CUTLASS), in float16 / bfloat16.
A `pattern=2:4` model from `prune.py` has exactly that structure; `to_semi_structured` swaps its
linears' weights for the compressed form in place, and `nn.Linear` then dispatches to the sparse
kernel with no other change to the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layers import sparsifiable_layers

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


def is_n_m_sparse(weight: Tensor, n: int = 2, m: int = 4) -> bool:
    """True if every `m` consecutive input weights (along the last dim) hold at most `n` nonzeros."""
    if weight.shape[-1] % m:
        return False
    return bool(((weight != 0).reshape(-1, m).sum(1) <= n).all())


def check_semi_structured_device(device: torch.device | str) -> None:
    """One-line error unless `device` is a CUDA GPU with sparse tensor cores."""
    device = torch.device(device)
    if not torch.cuda.is_available():
        raise RuntimeError("semi-structured 2:4 kernels need a CUDA GPU (compute capability 8.0+); none is visible")
    if device.type != "cuda":
        raise RuntimeError(f"semi-structured 2:4 kernels run on a CUDA GPU; the model is on {device.type}: "
                           "move it with model.cuda().half() first")
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise RuntimeError(f"semi-structured 2:4 kernels need compute capability 8.0+; "
                           f"{torch.cuda.get_device_name(device)} has {major}.{minor}")


def to_semi_structured(model: nn.Module, head: bool = False) -> dict[str, str]:
    """Compress, in place, every 2:4 linear of `model`'s blocks (plus the classifier with `head`).

    The model must already be on a sm80+ GPU in float16 or bfloat16. Returns {layer name: why it was
    left dense} for the layers that stay dense: not 2:4, or a shape the sparse kernels reject (they
    need, e.g., both weight dims multiples of 64 in float16); every other layer was converted.
    """
    from torch.sparse import to_sparse_semi_structured

    layers = sparsifiable_layers(model, head=head)  # linears only: the patch embedding is a convolution
    first = next(iter(layers.values())).weight
    check_semi_structured_device(first.device)
    if first.dtype not in SPARSE_DTYPES:
        raise TypeError(f"semi-structured 2:4 kernels run in float16 or bfloat16, the model is {first.dtype}: "
                        "convert it with model.half() or model.bfloat16() first")
    dense: dict[str, str] = {}
    for name, layer in layers.items():
        weight = layer.weight.detach()
        if not is_n_m_sparse(weight):
            dense[name] = "not 2:4 sparse"
            continue
        try:
            compressed = to_sparse_semi_structured(weight)
        except (RuntimeError, ValueError) as err:  # shapes the kernels do not support
            dense[name] = str(err).splitlines()[0]
            continue
        layer.weight = nn.Parameter(compressed, requires_grad=False)
    return dense
