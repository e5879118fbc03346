"""Second derivatives (create_graph=True) through generated layers: forms built from differentiable
tensor ops give the reference loop's; a hand-written backward that is not differentiable again
(the sequential family, FrozenLinear) refuses with a clear error instead of a wrong result."""
import pytest
import torch

from .test_architectures import small


def _second_order(layer, x):
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), x)[0]


def _layer_and_input(name, **params):
    torch.manual_seed(0)
    layer = small(name, **params).layer().double()
    return layer, torch.randn(1, 9, layer.d_model, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("name", ["deltanet", "gla", "titans", "memora", "omeganet"])
def test_chunked_second_derivative_equals_the_reference(name):
    layer, x = _layer_and_input(name)
    layer.mode = "reference"
    want = _second_order(layer, x)
    layer.mode = "chunk"
    torch.testing.assert_close(_second_order(layer, x), want, rtol=1e-8, atol=1e-10)
    assert want.abs().max() > 0


@pytest.mark.parametrize("name,params,what", [("cms", {}, "sequential form"),
                                              ("titans", {"depth": 1}, "FrozenLinear")])
def test_hand_written_backward_refuses_a_second_derivative(name, params, what):
    layer, x = _layer_and_input(name, **params)
    layer.mode = "chunk"
    with pytest.raises(RuntimeError, match=f"{what}.*not differentiable twice"):
        _second_order(layer, x)
    layer.mode = "reference"
    assert torch.isfinite(_second_order(layer, x)).all()
