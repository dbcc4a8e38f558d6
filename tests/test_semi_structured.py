"""2:4 weights as GPU semi-structured sparse tensors: pattern check, clear errors, exact conversion."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.sparse import SparseSemiStructuredTensor

from nvit_lightning.sparsity import MagnitudeSparsifier
from nvit_lightning.sparsity.layers import sparsifiable_layers
from nvit_lightning.sparsity.semi_structured import check_semi_structured_device, is_n_m_sparse, to_semi_structured

from .conftest import tiny_vit

sparse_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                                reason="needs a CUDA GPU with sparse tensor cores (sm80+)")


def test_is_n_m_sparse_checks_every_group_of_m_consecutive_inputs() -> None:
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0]])
    assert is_n_m_sparse(w, 2, 4) and is_n_m_sparse(w, 1, 4) is False
    w[0, 5] = 4.0  # the second group still holds 2 nonzeros
    assert is_n_m_sparse(w, 2, 4)
    w[0, 1] = 5.0  # the first group now holds 3
    assert not is_n_m_sparse(w, 2, 4)
    assert not is_n_m_sparse(torch.zeros(2, 6), 2, 4), "6 inputs do not split into groups of 4"


def test_magnitude_two_four_models_pass_the_pattern_check() -> None:
    model = tiny_vit(masked=False)
    sparse = MagnitudeSparsifier(sparsities=None, pattern="2:4")(model)
    (pruned,) = sparse.values()
    layers = sparsifiable_layers(pruned)
    assert all(is_n_m_sparse(layer.weight) for layer in layers.values())
    assert not any(is_n_m_sparse(layer.weight) for layer in sparsifiable_layers(model).values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_conversion_without_a_gpu_is_a_one_line_error() -> None:
    with pytest.raises(RuntimeError, match=r"need a CUDA GPU .* none is visible"):
        to_semi_structured(tiny_vit(masked=False))


@sparse_gpu
def test_conversion_on_cpu_model_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"the model is on cpu: move it with model.cuda\(\).half\(\)"):
        check_semi_structured_device("cpu")
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        to_semi_structured(tiny_vit(masked=False).cuda())


@sparse_gpu
def test_converted_deit_computes_the_masked_dense_function() -> None:
    from nvit_lightning.models import PrunableViT, ViTDims

    torch.manual_seed(0)
    model = PrunableViT(ViTDims.uniform(192, 2, 3), masked=False).eval()
    (masked,) = MagnitudeSparsifier(sparsities=None, pattern="2:4")(model).values()
    dense = masked.cuda().half()
    sparse = copy.deepcopy(dense)
    left_dense = to_semi_structured(sparse)
    assert left_dense == {}
    assert all(isinstance(layer.weight, SparseSemiStructuredTensor) for layer in sparsifiable_layers(sparse).values())
    x = torch.randn(8, 3, 224, 224, device="cuda", dtype=torch.half)
    with torch.inference_mode():
        ref, out = dense(x).float(), sparse(x).float()
    assert torch.allclose(out, ref, atol=2e-2 * ref.abs().max().item())
    untouched = tiny_vit(masked=False).cuda().half()  # dense weights: nothing to compress
    assert set(to_semi_structured(untouched).values()) == {"not 2:4 sparse"}
    assert not any(isinstance(layer.weight, SparseSemiStructuredTensor)
                   for layer in sparsifiable_layers(untouched).values())
