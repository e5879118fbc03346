"""Every shipped layer under PyTorch's activation checkpointing (`torch.utils.checkpoint`, not
reentrant: saved-tensor hooks) gives the gradients it gives without it, in float64."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from .test_architectures import SHIPPED, small


@pytest.mark.parametrize("name", SHIPPED)
def test_layer_under_activation_checkpointing(name):
    torch.manual_seed(0)
    layer = small(name).layer().double()
    x = torch.randn(2, 13, layer.d_model, dtype=torch.float64, requires_grad=True)
    leaves = [x, *layer.parameters()]
    plain = torch.autograd.grad(layer(x).pow(2).sum(), leaves, allow_unused=True)
    hooked = torch.autograd.grad(checkpoint(layer, x, use_reentrant=False).pow(2).sum(), leaves,
                                 allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 for g in plain[1:])
    for a, b in zip(hooked, plain, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
