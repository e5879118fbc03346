"""`check_finite`: off, a NaN flows through silently and nothing is checked (no cost); on, the first
NaN or Inf raises nlc.NonFiniteError naming the level, the tensor and the time step."""
from __future__ import annotations

import pytest
import torch

import nlc
from nlc.runtime import dispatch

from .test_fuzz_frontend import level

TWO_LEVELS = level().replace("output = linear(mem)", """let o[heads, 8] = linear(mem)
level second {
  memory matrix
  bias l2
  retention decay(alpha)
  algorithm gd(lr = beta)
  key o
}
output = linear(second)""")


@pytest.fixture(scope="module")
def program():
    return nlc.compile(TWO_LEVELS)


def poisoned(T=12, step=7, value=float("nan")):
    torch.manual_seed(0)
    x = torch.randn(2, T, 16)
    x[1, step, 3] = value
    return x


def test_off_costs_nothing_and_nan_flows_through(program):
    unchecked = dispatch.pick
    y = program.layer()(poisoned())
    assert dispatch.pick is unchecked
    assert torch.isnan(y).any()


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_layer_option_names_the_first_level_tensor_and_step(program, mode):
    layer = program.layer(mode, check_finite=True)
    with pytest.raises(nlc.NonFiniteError) as info:
        layer(poisoned(T=70, step=41))  # 70 tokens: the chunked form runs whole chunks too
    err = info.value
    assert (err.level, err.step) == ("mem", 41) and err.tensor.startswith(("input", "gate"))
    assert "level 'mem'" in str(err) and "time step 41" in str(err)
    assert dispatch.pick.__name__ == "pick", "the checking pick stayed in place after the error"
    assert layer(poisoned(value=0.0)).shape == (2, 12, 16)  # a finite input still runs


def test_a_level_that_makes_the_nan_is_named(program):
    """Finite inputs, a gate that turns infinite mid-sequence: the level's output is the culprit."""
    op = program.op("second")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 8, generator=g) for _ in range(3))
    beta = torch.full((1, 9, 2), 0.5)
    beta[0, 4, 1] = float("inf")
    with nlc.check_finite(), pytest.raises(nlc.NonFiniteError) as info:
        op(q, k, v, alpha=0.9, beta=beta)
    assert (info.value.level, info.value.tensor, info.value.step) == ("second", "gate beta", 4)
    beta[0, 4, 1] = 1e30  # finite, but the state overflows: the output is named
    with nlc.check_finite(), pytest.raises(nlc.NonFiniteError) as info:
        op(q * 1e30, k * 1e30, v * 1e30, alpha=0.9, beta=beta)
    assert info.value.level == "second" and info.value.tensor in ("output", "input q")


def test_contexts_nest_and_restore(program):
    unchecked = dispatch.pick
    with nlc.check_finite():
        with nlc.check_finite():
            assert dispatch.pick is not unchecked
        assert dispatch.pick is not unchecked
    assert dispatch.pick is unchecked


def test_nested_levels_are_checked_too():
    """cms_nested: its slow and mid levels also return their period states; check_finite passes them
    on, and names the level whose output first turns non-finite (at learning rates of 0.01 on every
    level, unit-variance inputs diverge within 40 tokens)."""
    from pathlib import Path
    program = nlc.compile(Path(__file__).resolve().parents[2] / "specs" / "cms_nested.nl",
                          lr_fast=0.01, lr_mid=0.01, lr_slow=0.01)
    torch.manual_seed(0)
    layer = program.layer("reference", check_finite=True)
    y = layer(0.1 * torch.randn(2, 40, program.d_model))
    assert torch.isfinite(y).all()
    with pytest.raises(nlc.NonFiniteError) as info:
        layer(torch.randn(2, 40, program.d_model))
    assert info.value.level in ("cms_slow", "cms_mid", "cms_fast") and info.value.tensor == "output"
