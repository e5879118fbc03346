"""Training under bf16 autocast (what `nlc train` does on CUDA), here on the CPU: every shipped spec's
layer, in its default mode and chunk-parallel, runs forward and backward under torch.autocast, with
finite gradients close to the float32 ones of the reference loop. The hand-written backwards
(FrozenLinear, the sequential family) compute in the forward's autocast state (nlc.runtime.amp)."""
import pytest
import torch

from .test_architectures import SHIPPED, small

# FrozenLinear runs for a linear memory (depth 1) only: with momentum (titans) and without (yaad)
LINEAR = [("titans", {"depth": 1}), ("yaad", {"depth": 1})]
CASES = [pytest.param(name, {}, mode, id=f"{name}-{mode}") for mode in ("auto", "chunk") for name in SHIPPED] + \
    [pytest.param(name, params, "chunk", id=f"{name}-depth1-chunk") for name, params in LINEAR]


def _gradients(layer, x, mode: str, autocast: bool) -> dict:
    """The gradients of a loss on layer(x), run in `mode` under bf16 autocast or not, of x and every
    parameter."""
    layer.mode = mode
    layer.zero_grad()
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = layer(x)
    y.float().pow(2).mean().backward()
    return {"input": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("name,params,mode", CASES)
def test_bf16_autocast_gradients_are_close_to_float32(name, params, mode):
    program = small(name, **params)
    if mode == "chunk" and not all(f"level_{lv.name}_chunk.py" in program.sources for lv in program.levels):
        pytest.skip("a level has no chunk-parallel form")
    torch.manual_seed(0)
    layer = program.layer()
    x = torch.randn(2, 19, layer.d_model)  # several chunks of 4 and 8 tokens, and a short last one
    want, got = _gradients(layer, x, "reference", False), _gradients(layer, x, mode, True)
    assert got.keys() == want.keys()
    largest = max(g.norm() for g in want.values())
    for key, g in got.items():
        assert torch.isfinite(g).all(), key
        # bf16 keeps 2-3 digits: a gradient a thousandth of the largest is within its round-off
        if want[key].norm() >= 1e-3 * largest:
            cosine = torch.nn.functional.cosine_similarity(g.flatten(), want[key].flatten(), dim=0)
            assert cosine > 0.9, (key, cosine.item())
