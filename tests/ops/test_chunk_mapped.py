"""The mapped family (codegen/torch_chunk_mapped.py, MATH.md §3.6-3.8) against the reference loop, in
float64, on what the shared equivalence tests do not reach: reads before the write, two heads,
softmax columns and mass, omega windows wider than a chunk and sequences shorter than a window,
streaming, and the planner's choices."""
from pathlib import Path

import pytest
import torch

import nlc

from .test_chunked import _assert_same, _compare, _run, _stable_inputs

SPECS = Path(__file__).resolve().parents[2] / "specs"

TEMPLATE = """
model mapped_point
param d_model = 8
param heads = 2
let q[heads, 3] = l2norm(linear(x))
let k[heads, 3] = l2norm(linear(x))
let v[heads, 3] = linear(x)
gate alpha[heads] = sigmoid(linear(x))
gate eta[heads] = 0.5 * sigmoid(linear(x))
gate theta[heads] = 0.5 * sigmoid(linear(x))
gate gamma[heads] = sigmoid(linear(x))
level memory {{
  memory {memory}
  bias {bias}
  retention {retention}
  algorithm {algorithm}
  gradient chunk_start({chunk})
  read {read}
  init learned
}}
output = linear(memory)
"""

# (memory, bias, retention, algorithm): one point per map, read before the write
READ_BEFORE = [
    ("matrix", "lp(p = 3)", "lq(q = 3, decay = alpha, map = miras)", "gd(lr = eta)"),
    ("mlp(depth = 2, expand = 1)", "huber(delta = 0.5)", "elastic(l1 = 20, l2 = 2)", "ftrl(lr = eta)"),
    ("mlp(depth = 2, expand = 1)", "l2", "kl(decay = alpha, axis = column, mass = 2)",
     "momentum(lr = eta, beta = theta)"),
    ("matrix", "l2", "kl(global = 2)", "gd(lr = eta)"),
    ("mlp(depth = 2, expand = 1, bias = true)", "l2", "elastic(l1 = 20, l2 = 2)",
     "momentum(lr = eta, beta = theta)"),
    ("mlp(depth = 2, expand = 1, bias = true)", "l2", "dgd(decay = alpha)", "gd(lr = eta)"),
    ("matrix", "l2", "dgd(decay = alpha)", "gd(lr = eta)"),
    ("mlp(depth = 2, expand = 1)", "omega(window = 3, gamma = gamma) of l2", "decay(alpha)",
     "muon(lr = eta, beta = theta, steps = 3)"),
]


def _op(memory, bias, retention, algorithm, chunk=3, read="before"):
    program = nlc.compile(TEMPLATE.format(memory=memory, bias=bias, retention=retention,
                                          algorithm=algorithm, chunk=chunk, read=read))
    assert program.plans["memory"].family == "mapped", program.plans["memory"].reason
    return program.op("memory")


@pytest.mark.parametrize("T", (1, 7, 20))
@pytest.mark.parametrize("point", READ_BEFORE, ids=[f"{r}-{a}" for _, _, r, a in READ_BEFORE])
def test_read_before_equals_reference(point, T):
    _compare(_op(*point), T)


@pytest.mark.parametrize("window,chunk,T", [(5, 2, 13), (4, 2, 3), (4, 3, 2), (3, 4, 1), (2, 4, 9)])
def test_omega_windows_across_chunks_and_short_sequences(window, chunk, T):
    """Windows wider than a chunk reach back over several chunks; a sequence shorter than the window
    never reaches before its first token."""
    _compare(_op("mlp(depth = 2, expand = 1)", f"omega(window = {window}, gamma = gamma) of l2",
                 "decay(alpha)", "muon(lr = eta, beta = theta, steps = 3)", chunk=chunk, read="after"), T)


def _shipped(spec):
    return nlc.compile(SPECS / f"{spec}.nl", chunk=5)


@pytest.mark.parametrize("spec", ["atlas", "hope"])
def test_planner_picks_mapped_for_shipped_levels(spec):
    plan = _shipped(spec).plans["memory"]
    assert plan.family == "mapped" and plan.chunk == 5, plan.reason


def test_lq_map_at_chunk_boundaries_is_the_frozen_family_and_every_token_the_mapped():
    """Moneta ships with its map at chunk boundaries (linear within a chunk: frozen family); the
    same spec with the map at every token needs the per-token maps of the mapped family."""
    text = (SPECS / "moneta.nl").read_text()
    assert "apply = chunk" in text
    chunked = nlc.compile(text, chunk=5).plans["memory"]
    assert chunked.family == "frozen" and chunked.chunk == 5, chunked.reason
    per_token = nlc.compile(text.replace("apply = chunk", "apply = token"), chunk=5).plans["memory"]
    assert per_token.family == "mapped" and per_token.chunk == 5, per_token.reason


def test_kl_lag_token_is_the_frozen_family_and_every_token_the_mapped():
    """Memora ships with KL's lag token (the softmax at each chunk's first token, a scan of W after
    it: frozen family); the softmax at every token needs the mapped family's per-token maps."""
    text = (SPECS / "memora.nl").read_text()
    assert "apply = chunk" in text
    lag = nlc.compile(text, chunk=5).plans["memory"]
    assert lag.family == "frozen" and lag.chunk == 5 and "lag token" in lag.reason, lag.reason
    per_token = nlc.compile(text.replace("apply = chunk", "apply = token"), chunk=5).plans["memory"]
    assert per_token.family == "mapped" and per_token.chunk == 5, per_token.reason


@pytest.mark.parametrize("T", (1, 7, 20))
@pytest.mark.parametrize("memory", ["matrix", "mlp(depth = 2, expand = 1, bias = true)"])
def test_kl_lag_token_read_before_momentum_and_global_form(memory, T):
    """The lag token reads the state entering its chunk (read before); momentum's step there is
    taken apart from the scan (c = 0 on it); kl(global) derives both coefficients."""
    program = nlc.compile(TEMPLATE.format(
        memory=memory, bias="l2", retention="kl(global = 2, axis = column, mass = 2, apply = chunk)",
        algorithm="momentum(lr = eta, beta = theta)", chunk=3, read="before"))
    assert program.plans["memory"].family == "frozen", program.plans["memory"].reason
    _compare(program.op("memory"), T)


def test_per_channel_gates_stay_on_the_reference():
    text = TEMPLATE.format(memory="matrix", bias="l2", retention="lq(q = 4, decay = alpha)",
                           algorithm="gd(lr = eta)", chunk=3, read="after")
    text = text.replace("gate alpha[heads] = sigmoid(linear(x))", "gate alpha[heads, 3] = sigmoid(linear(x))")
    plan = nlc.compile(text).plans["memory"]
    assert plan.family == "reference" and "per-channel gates (alpha)" in plan.reason


def _pieces(op, T, cut, mode):
    (q, k, v, gates, state), _ = _stable_inputs(op, T, seed=3)

    def part(lo, hi, start):
        return op(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], **{n: g[:, lo:hi] for n, g in gates.items()},
                  initial_state=start, output_final_state=True, mode=mode)
    o1, s1 = part(0, cut, state)
    o2, s2 = part(cut, None, s1)
    return torch.cat([o1, o2], dim=1), s2


def test_omega_window_restarts_at_each_call_as_in_the_reference():
    """The reference keeps an omega window only within one call (it is not part of the state), so two
    pieces equal the reference on the same two pieces, not on the whole sequence."""
    op = _shipped("atlas").op("memory")
    (o_chunk, s_chunk), (o_ref, s_ref) = (_pieces(op, 23, 10, mode) for mode in ("chunk", "reference"))
    torch.testing.assert_close(o_chunk, o_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(s_chunk, s_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# dgd with gd steps runs in closed form (codegen/torch_chunk_mapped_dgd.py): (memory, retention, read)
DGD = [
    ("mlp(depth = 2, expand = 1, bias = true)", "dgd(decay = alpha)", "after"),
    ("mlp(depth = 2, expand = 2, gated = true, bias = true)", "dgd(decay = alpha)", "before"),
    ("mlp(depth = 3, expand = 1, act = gelu, residual = false)", "dgd(decay = 0.9)", "after"),
    ("matrix", "dgd(decay = alpha)", "after"),
]


@pytest.mark.parametrize("T", (1, 8, 20))
@pytest.mark.parametrize("memory,retention,read", DGD, ids=[f"{m}-{r}-{w}" for m, r, w in DGD])
def test_dgd_closed_form_equals_reference(memory, retention, read, T):
    op = _op(memory, "l2", retention, "gd(lr = eta)", chunk=4, read=read)
    assert "_pieces" in op.chunked.__dict__  # the closed form, not the token loop
    _compare(op, T)


def test_dgd_closed_form_with_zero_decay():
    """A decay of exactly 0 wipes the old weights; the closed form never divides by it."""
    op = _op("mlp(depth = 2, expand = 1, bias = true)", "l2", "dgd(decay = alpha)", "gd(lr = eta)", chunk=4)
    (q, k, v, gates, state), _ = _stable_inputs(op, 11, seed=5)
    gates = dict(gates, alpha=gates["alpha"].clone().index_fill_(1, torch.tensor([0, 2, 5, 6]), 0.0))
    inputs = (q, k, v, gates, state)
    _assert_same(_run(op, inputs, "chunk"), _run(op, inputs, "reference"))


def test_dgd_streams_in_pieces():
    op = _shipped("hope").op("memory")
    (o_chunk, s_chunk), (o_ref, s_ref) = (_pieces(op, 23, 7, mode) for mode in ("chunk", "reference"))
    torch.testing.assert_close(o_chunk, o_ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(s_chunk, s_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_dgd_closed_form_takes_bf16_inputs():
    """torch has no half-precision triangular solve: the closed form solves in fp32 and gives bf16
    results within bf16's rounding of the float64 reference on the same (bf16-rounded) inputs."""
    op = _shipped("hope").op("memory")
    inputs, _ = _stable_inputs(op, 12, seed=3)
    q, k, v, gates, state = (x.to(torch.bfloat16).double() if torch.is_tensor(x) else
                             {n: g.to(torch.bfloat16).double() for n, g in x.items()} if isinstance(x, dict) else
                             tuple(s.to(torch.bfloat16).double() for s in x) for x in inputs)
    want, _ = op(q, k, v, **gates, initial_state=state, mode="reference")
    low = lambda x: x.to(torch.bfloat16)
    got, _ = op(low(q), low(k), low(v), **{n: low(g) for n, g in gates.items()},
                initial_state=tuple(low(s) for s in state), mode="chunk")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2)
