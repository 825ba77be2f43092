"""chatforge.nf4: the plain-torch NF4 path equals bitsandbytes' own dequantisation and matmul."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from chatforge.training import nf4  # noqa: E402
from conftest import nf4_linear  # noqa: E402


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(256, 512), (96, 320), (3, 64 * 300)])
def test_dequantize_equals_bitsandbytes(quant_type, nested, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.05
    packed, state = bnb.functional.quantize_4bit(w, quant_type=quant_type, compress_statistics=nested)
    param = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, quant_type=quant_type, bnb_quantized=True)
    t = nf4.tables(param)
    assert t is not None
    want = bnb.functional.dequantize_4bit(packed, state)
    assert torch.equal(nf4.dequantize(*t[0], t[1]), want)


def _layer(bias: bool):
    torch.manual_seed(1)
    return nf4_linear(torch.nn.Linear(128, 192, bias=bias))


@pytest.mark.parametrize("bias", [True, False])
def test_patched_layer_matches_bitsandbytes(bias):
    ref, ours = _layer(bias), _layer(bias)
    assert nf4.patch(ours) == 1 and nf4.patch(ours) == 0  # patched once
    x = torch.randn(2, 5, 128, requires_grad=True)
    y_ref = ref(x)
    g = torch.randn_like(y_ref)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    x2 = x.detach().clone().requires_grad_(True)
    y = ours(x2)
    (gx,) = torch.autograd.grad(y, x2, g)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(gx, gx_ref, atol=1e-5)
    if bias:  # the bias still trains when asked to
        ours.bias.requires_grad_(True)
        ours(x2).sum().backward()
        assert ours.bias.grad is not None


def test_backward_saves_no_dense_weight():
    layer = _layer(False)
    nf4.patch(layer)
    x = torch.randn(4, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert not any(t.shape == (192, 128) for t in saved)
