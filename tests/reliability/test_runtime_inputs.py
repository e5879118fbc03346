"""Hostile inputs at run time: the generated layer and `Program.op` check shapes, dtypes and devices
at their boundary, and name the argument and what they expected, before any generated kernel runs.
(tests/test_cache.py holds the op's shape table; these are the layer's checks and the dtype and
device checks of both.)"""
from __future__ import annotations

import pytest
import torch

import nlc

from .test_fuzz_frontend import level

D_MODEL = 16


@pytest.fixture(scope="module")
def program():
    return nlc.compile(level())


@pytest.fixture(scope="module")
def layer(program):
    torch.manual_seed(0)
    return program.layer()


LAYER_CALLS = [  # (case, x, exception, substrings of the message)
    ("not_a_tensor", [[0.0] * D_MODEL], TypeError, ["x must be a tensor", f"[B, T, {D_MODEL}]"]),
    ("rank_2", torch.randn(4, D_MODEL), ValueError, ["x has shape [4, 16]", f"[B, T, {D_MODEL}]"]),
    ("rank_4", torch.randn(1, 2, 4, D_MODEL), ValueError, ["x has shape [1, 2, 4, 16]"]),
    ("wrong_width", torch.randn(2, 5, D_MODEL + 1), ValueError, ["[2, 5, 17]", f"[B, T, {D_MODEL}]"]),
    ("integers", torch.ones(2, 5, D_MODEL, dtype=torch.long), TypeError, ["torch.int64", "floating"]),
    ("booleans", torch.ones(2, 5, D_MODEL, dtype=torch.bool), TypeError, ["torch.bool"]),
    ("other_device", torch.randn(2, 5, D_MODEL, device="meta"), ValueError,
     ["x is on meta", "parameters are on cpu"]),
    # no tokens: once torch.cat([]) inside the reference loop
    ("no_tokens", torch.randn(2, 0, D_MODEL), ValueError, ["[2, 0, 16]", "B, T >= 1"]),
    ("no_batch", torch.randn(0, 3, D_MODEL), ValueError, ["[0, 3, 16]", "B, T >= 1"]),
]


@pytest.mark.parametrize("case,x,error,needles", LAYER_CALLS, ids=[c[0] for c in LAYER_CALLS])
def test_layer_boundary(layer, case, x, error, needles):
    with pytest.raises(error) as info:
        layer(x)
    for needle in needles:
        assert needle in str(info.value), f"{case}: {needle!r} not in {info.value}"
    assert str(info.traceback[-1].frame.code.path).endswith("blocks.py"), "raised past the boundary"


def test_layer_accepts_every_float_dtype(program):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        layer = program.layer().to(dtype)
        assert layer(torch.randn(1, 3, D_MODEL, dtype=dtype)).dtype == dtype


B, T, H, K = 2, 5, 2, 8


def call(op, **changes):
    g = torch.Generator().manual_seed(0)
    args = dict(q=torch.randn(B, T, H, K, generator=g), k=torch.randn(B, T, H, K, generator=g),
                v=torch.randn(B, T, H, K, generator=g), alpha=torch.rand(B, T, H, generator=g),
                beta=torch.rand(B, T, H, generator=g))
    args.update(changes)
    return op(args.pop("q"), args.pop("k"), args.pop("v"), **args)


OP_CALLS = [
    ("no_tokens", dict(q=torch.randn(B, 0, H, K), k=torch.randn(B, 0, H, K), v=torch.randn(B, 0, H, K),
                       alpha=torch.rand(B, 0, H), beta=torch.rand(B, 0, H)), ValueError,
     ["q has shape [2, 0, 2, 8]", "B, T >= 1"]),
    ("integer_qkv", dict(q=torch.ones(B, T, H, K, dtype=torch.long),
                         k=torch.ones(B, T, H, K, dtype=torch.long),
                         v=torch.ones(B, T, H, K, dtype=torch.long)), TypeError, ["torch.int64"]),
    ("k_on_meta", dict(k=torch.randn(B, T, H, K, device="meta")), ValueError, ["k is on meta"]),
    ("gate_on_meta", dict(beta=torch.rand(B, T, H, device="meta")), ValueError,
     ["gate 'beta' is on meta"]),
    ("state_on_meta", dict(initial_state=torch.zeros(B, H, K, K, device="meta")), ValueError,
     ["initial_state", "is on meta"]),
]


@pytest.mark.parametrize("case,changes,error,needles", OP_CALLS, ids=[c[0] for c in OP_CALLS])
def test_op_dtype_and_device(program, case, changes, error, needles):
    with pytest.raises(error) as info:
        call(program.op("mem"), **changes)
    for needle in needles:
        assert needle in str(info.value), f"{case}: {needle!r} not in {info.value}"
