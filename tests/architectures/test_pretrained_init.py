"""CMS blocks initialised from pretrained MLPs (Nested Learning's ad-hoc stacking, MATH.md §4.2):
`Program.init_from_mlp` copies nn.Linear layers into a level's learned initial state, so that with a
learning rate of 0 the CMS layer computes exactly the pretrained stack, and a level that cannot take
them says why."""
import pytest
import torch
from torch import nn

import nlc

from ..test_specs import SPECS

D = 8


def _pretrained(bias=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 2 * D, bias=bias), nn.GELU(), nn.Linear(2 * D, D, bias=bias)).double()


def test_a_cms_layer_with_lr_zero_is_the_pretrained_stack():
    program = nlc.compile(SPECS / "cms.nl", d_model=D, chunk=4, chunk_slow=8, lr_fast=0, lr_mid=0, lr_slow=0)
    layer = program.layer("reference").double()
    mlps = {level: _pretrained(seed=i) for i, level in enumerate(("cms_fast", "cms_mid", "cms_slow"))}
    for level, mlp in mlps.items():
        program.init_from_mlp(layer, level, mlp)
    (out,) = [w for name, w in layer.state_dict().items() if name.startswith("out_") and name.endswith(".weight")]
    x = torch.randn(2, 19, D, dtype=torch.float64)
    u = x
    for mlp in mlps.values():
        u = u + mlp(u)  # each block is a residual MLP
    torch.testing.assert_close(layer(x), x + u @ out.T, rtol=1e-12, atol=1e-12)


def test_before_its_first_update_a_learning_level_reads_the_pretrained_mlp():
    """With a learning rate, the tokens before the level's first period boundary (read before write)
    still see exactly the pretrained block."""
    program = nlc.compile(SPECS / "cms.nl", d_model=D, chunk=4, chunk_slow=8, lr_slow=0.5)
    layer = program.layer("reference").double()
    mlp = _pretrained()
    program.init_from_mlp(layer, "cms_slow", mlp)
    op = program.op("cms_slow")
    u = torch.randn(1, 12, 1, D, dtype=torch.float64)
    state = tuple(p.expand(1, *p.shape) for p in layer.init_cms_slow)
    y, _ = op(u, u, torch.randn_like(u), initial_state=state)
    torch.testing.assert_close(y[:, :8], u[:, :8] + mlp(u[:, :8]), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y[:, 8:], u[:, 8:] + mlp(u[:, 8:]))


BIASED = """model m
param d_model = 8
param heads = 1
level memory {{
  memory mlp(depth = 2, expand = 2, act = gelu, bias = {bias})
  bias l2  algorithm gd(lr = 0)  init {init}
  key x  value x  query x
}}
output = memory
"""


def test_layer_biases_are_copied_and_missing_ones_are_zero():
    program = nlc.compile(BIASED.format(bias="true", init="learned"))
    layer = program.layer("reference").double()
    x = torch.randn(1, 5, D, dtype=torch.float64)
    for mlp in (_pretrained(bias=True), _pretrained(bias=False)):
        program.init_from_mlp(layer, "memory", mlp)
        torch.testing.assert_close(layer(x), x + mlp(x), rtol=1e-12, atol=1e-12)  # a residual MLP memory


@pytest.mark.parametrize("text, level, mlp, message", [
    (BIASED.format(bias="false", init="zero"), "memory", _pretrained(), "write `init learned`"),
    (BIASED.format(bias="false", init="learned"), "memory", _pretrained(bias=True), "bias = true"),
    (BIASED.format(bias="false", init="learned"), "memory", [nn.Linear(D, 2 * D, bias=False)],
     "has 2 layers, the pretrained MLP 1"),
    (BIASED.format(bias="false", init="learned"), "memory",
     nn.Sequential(nn.Linear(D, 3 * D, bias=False), nn.Linear(3 * D, D, bias=False)),
     r"layer 1: expected an nn.Linear\(8, 16\), got weight \(24, 8\)"),
    (BIASED.format(bias="false", init="learned"), "nope", _pretrained(), "no level 'nope'; levels: memory"),
])
def test_a_level_that_cannot_take_the_mlp_says_why(text, level, mlp, message):
    program = nlc.compile(text)
    with pytest.raises(ValueError, match=message):
        program.init_from_mlp(program.layer(), level, mlp)
