"""torch.autograd.gradcheck (float64) through the generated op of every shipped spec's memory level,
at tiny sizes: gradients with respect to q, k, v, every gate and the initial state, through the
output and the final state; for the reference loop and, where the level has one, the chunk-parallel
form (whose own chunks are crossed: T > chunk)."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import nlc

SPECS = Path(__file__).resolve().parents[2] / "specs"
DT = torch.float64



# name -> (spec file, overrides, T, gate ranges, unit keys)
MATRIX = {
    "linear_attention": ("linear_attention", dict(d_key=4, d_value=4), 4, {}, False),
    "retnet": ("retnet", dict(d_key=4, d_value=4), 4, {"gamma": (0.8, 0.99)}, False),
    "gla": ("gla", dict(d_key=4, d_value=4), 4, {"a": (0.5, 0.99)}, False),
    "mamba2": ("mamba2", dict(d_state=4, d_head=4), 4, {"a": (0.5, 0.99), "dt": (0.1, 1.0)}, False),
    "deltanet": ("deltanet", dict(d_key=4, d_value=4), 4, {"beta": (0.1, 0.9)}, True),
    "gated_deltanet": ("gated_deltanet", dict(d_key=4, d_value=4), 4,
                       {"alpha": (0.5, 0.99), "beta": (0.1, 0.9)}, True),
    "longhorn": ("longhorn", dict(d_state=4, d_head=4), 4, {"beta": (0.1, 0.9)}, False),
    "titans_depth1": ("titans", dict(depth=1, d_head=4, chunk=2), 4,
                      {"alpha": (0.01, 0.2), "theta": (0.05, 0.5), "eta": (0.5, 0.95)}, True),
}

# The smallest sizes the params allow (one head, two channels), T = 3 with a chunk of 2 so that a
# chunk boundary is crossed. ttt_linear gets three channels: a layernorm over two channels is
# almost constant (+-1), which would make its check nearly vacuous.
SMALL = dict(d_model=2, heads=1, d_head=2, chunk=2)
ATLAS_GATES = {"gamma": (0.5, 1.0), "alpha": (0.8, 0.99), "eta": (0.01, 0.1), "theta": (0.5, 0.95)}
MLP = {
    "titans": ("titans", SMALL, 3, {"alpha": (0.01, 0.2), "theta": (0.05, 0.5), "eta": (0.5, 0.95)}, True),
    "ttt_linear": ("ttt_linear", dict(SMALL, d_head=3), 3, {"eta": (0.05, 0.5)}, False),
    "moneta": ("moneta", SMALL, 3, {"alpha": (0.8, 0.99), "eta": (0.05, 0.5)}, True),
    # delta: far above the error norm on tokens 0 and 2 (l2 branch), far below it on token 1
    # (l1 branch), so both branches are checked and no input sits near the switch.
    "yaad": ("yaad", SMALL, 3, {"delta": [10.0, 1e-2, 10.0], "alpha": (0.8, 0.99), "eta": (0.05, 0.5)}, True),
    "memora": ("memora", SMALL, 3, {"alpha": (0.5, 0.99), "eta": (0.05, 0.5)}, True),
    # beyond the five above: the other shipped deep memories, and the depth-1 (matrix) forms
    "ttt_mlp": ("ttt_mlp", dict(SMALL, d_head=3), 3, {"eta": (0.05, 0.5)}, False),
    "hope": ("hope", SMALL, 3, {"alpha": (0.8, 0.99), "eta": (0.05, 0.5)}, True),
    "miras_space": ("miras_space", SMALL, 3, {"alpha": (0.8, 0.99), "eta": (0.05, 0.5)}, True),
    "atlas": ("atlas", dict(SMALL, d_phi=2, window=2), 3, ATLAS_GATES, True),
    "moneta_depth1": ("moneta", dict(SMALL, depth=1), 3, {"alpha": (0.8, 0.99), "eta": (0.05, 0.5)}, True),
    "yaad_depth1": ("yaad", dict(SMALL, depth=1), 3,
                    {"delta": [10.0, 1e-2, 10.0], "alpha": (0.8, 0.99), "eta": (0.05, 0.5)}, True),
    "memora_depth1": ("memora", dict(SMALL, depth=1), 3, {"alpha": (0.5, 0.99), "eta": (0.05, 0.5)}, True),
    "atlas_depth1": ("atlas", dict(SMALL, d_phi=2, window=2, depth=1), 3, ATLAS_GATES, True),
}


@functools.lru_cache(maxsize=None)
def _op(spec, **overrides):
    """The memory op with chunks of 2 tokens, so that T = 3-4 crosses a chunk boundary."""
    if "chunk" in nlc.compile(SPECS / f"{spec}.nl").params:
        overrides = dict(overrides, chunk=2)
    return nlc.compile(SPECS / f"{spec}.nl", **overrides).op("memory")


def _inputs(op, T, ranges, unit_keys, seed):
    lv = op.level
    H, K, V = lv.heads, lv.d_key, lv.d_value
    g = torch.Generator().manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=DT)
    q, k = randn(1, T, H, K), randn(1, T, H, K)
    if unit_keys:
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    v = randn(1, T, H, V)
    assert set(ranges) == set(op.gates), (sorted(ranges), op.gates)
    gates = {}
    for name in op.gates:
        axis = lv.gate_axes[name]
        tail = () if axis == "scalar" else ((K,) if axis == "key" else (V,))
        spec = ranges[name]
        if isinstance(spec, list):                       # fixed values per token
            gates[name] = torch.tensor(spec, dtype=DT).reshape(1, T, *([1] * (1 + len(tail)))).expand(
                1, T, H, *tail).clone()
        else:
            low, high = spec
            gates[name] = low + (high - low) * torch.rand(1, T, H, *tail, generator=g, dtype=DT)
    return q, k, v, gates, g


def _initial_state(op, g, spec):
    """A random initial state of the right structure, near the op's own default one."""
    default = op.initial_state(1)
    default = (default,) if torch.is_tensor(default) else tuple(default)
    if spec == "memora":            # the KL retention needs positive weights
        return tuple(s * torch.exp(0.3 * torch.randn(s.shape, generator=g, dtype=DT)) for s in default)
    return tuple(s + 0.3 * torch.randn(s.shape, generator=g, dtype=DT) for s in default)


MODES = ("reference", "chunk")


def _gradcheck(op, q, k, v, gates, state, mode, **kwargs):
    if mode == "chunk" and op.chunked is None:
        pytest.skip(f"level {op.level.name!r} has no chunk-parallel form")
    names = list(gates)

    def run(q, k, v, *rest):
        given = dict(zip(names, rest[:len(names)]))
        init = rest[len(names):]
        init = init[0] if len(init) == 1 else tuple(init)
        o, final = op(q, k, v, **given, initial_state=init, output_final_state=True, mode=mode)
        final = (final,) if torch.is_tensor(final) else tuple(final)
        return (o, *final)

    inputs = tuple(x.detach().clone().requires_grad_(True) for x in (q, k, v, *gates.values(), *state))
    outputs = run(*inputs)
    assert all(torch.isfinite(x).all() for x in outputs)
    assert torch.autograd.gradcheck(run, inputs, **kwargs)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MATRIX))
def test_gradcheck_matrix_memory(name, mode):
    spec, overrides, T, ranges, unit = MATRIX[name]
    op = _op(spec, **overrides)
    lv = op.level
    assert lv.memory.kind == "matrix" or (spec == "titans" and lv.memory.kind == "mlp")
    q, k, v, gates, g = _inputs(op, T, ranges, unit, seed=len(name))
    _gradcheck(op, q, k, v, gates, _initial_state(op, g, spec), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MLP))
def test_gradcheck_mlp_memory(name, mode):
    spec, overrides, T, ranges, unit = MLP[name]
    op = _op(spec, **overrides)
    lv = op.level
    assert lv.memory.kind == "mlp" and lv.grad_chunk == 2
    q, k, v, gates, g = _inputs(op, T, ranges, unit, seed=len(name))
    _gradcheck(op, q, k, v, gates, _initial_state(op, g, spec), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("level", ["cms_mid", "cms_slow"])
def test_gradcheck_period_levels(level, mode):
    """CMS levels that update every 2 and every 4 tokens (the period family), over 5 tokens."""
    op = nlc.compile(SPECS / "cms.nl", d_model=2, chunk=2, chunk_slow=4, lr_mid=0.3,
                     lr_slow=0.3).op(level)
    assert op.level.period in (2, 4)
    q, k, v, gates, g = _inputs(op, 5, {}, False, seed=len(level))
    _gradcheck(op, q, k, v, gates, _initial_state(op, g, "cms"), mode)
