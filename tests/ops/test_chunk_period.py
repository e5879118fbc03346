"""The chunk-parallel period form (codegen/torch_chunk_period.py, MATH.md §4.1-4.2: `update every P`,
reads see the state at the last period boundary) against the reference per-token loop, in float64:
outputs, final state and the gradients of every input, for lengths that are not multiples of the
period, gradient chunks equal to, inside and around the period, both read points, and streaming."""
import itertools
from pathlib import Path

import pytest
import torch

import nlc
from nlc.plan import ONE_TOKEN

SPECS = Path(__file__).resolve().parents[2] / "specs"
TOL = dict(rtol=1e-9, atol=1e-10)

SPEC = """
model period_point
param d_model = 8
param heads = 2
let q[heads, 3] = l2norm(linear(x))
let k[heads, 3] = l2norm(linear(x))
let v[heads, 3] = linear(x)
gate alpha[heads] = sigmoid(linear(x))
gate eta[heads] = 0.5 * sigmoid(linear(x))
gate theta[heads] = sigmoid(linear(x))
level memory {{
  memory {memory}
  bias {bias}
  retention {retention}
  algorithm {algorithm}
  update every {period}
  {gradient}
  read {read}
  init learned
}}
output = linear(memory)
"""
MEMORIES = ("matrix", "mlp(depth = 2, expand = 2)")
ALGORITHMS = ("gd(lr = eta)", "momentum(lr = eta, beta = theta)")
RETENTIONS = ("none", "decay(alpha)", "l2(global = 2)")
READS = ("before", "after")


def program(memory="matrix", bias="l2", retention="none", algorithm="gd(lr = eta)", period=4,
            gradient="gradient chunk_start(4)", read="before"):
    return nlc.compile(SPEC.format(memory=memory, bias=bias, retention=retention, algorithm=algorithm,
                                   period=period, gradient=gradient, read=read))


def inputs(op, T, seed):
    """Unit-norm q, k; gates in (0.05, 0.95) with eta scaled to 0.2 of that; a random initial state."""
    g = torch.Generator().manual_seed(seed)
    lv = op.level
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    q = torch.nn.functional.normalize(draw(2, T, lv.heads, lv.d_key), dim=-1)
    k = torch.nn.functional.normalize(draw(2, T, lv.heads, lv.d_key), dim=-1)
    v = draw(2, T, lv.heads, lv.d_value)
    gates = {n: (0.2 if n == "eta" else 1.0) * (0.05 + 0.9 * torch.rand(2, T, lv.heads, generator=g,
                                                                        dtype=torch.float64))
             for n in op.gates}
    state = tuple(s + 0.3 * draw(*s.shape) for s in op.initial_state(2))
    return q, k, v, gates, state


def run(op, q, k, v, gates, state, mode):
    o, final = op(q, k, v, **gates, initial_state=state, output_final_state=True, mode=mode)
    return o, ((final,) if torch.is_tensor(final) else tuple(final))


def compare(op, T, seed=0):
    """Chunked vs reference: outputs, final state, and gradients of a loss over both."""
    q, k, v, gates, state = inputs(op, T, seed)
    leaves = [x.requires_grad_() for x in (q, k, v, *gates.values(), *state)]
    g = torch.Generator().manual_seed(seed + 1)
    results = []
    for mode in ("reference", "chunk"):
        o, final = run(op, q, k, v, gates, state, mode)
        if not results:
            weights = [torch.randn(x.shape, generator=g, dtype=torch.float64) for x in (o, *final)]
        loss = sum((x * w).sum() for x, w in zip((o, *final), weights))
        results.append((o, final, torch.autograd.grad(loss, leaves, allow_unused=True)))
    (o_ref, s_ref, g_ref), (o, s, grads) = results
    assert torch.isfinite(o_ref).all()
    torch.testing.assert_close(o, o_ref, **TOL)
    for x, y in zip(s, s_ref, strict=True):
        torch.testing.assert_close(x, y, **TOL)
    names = ["q", "k", "v", *gates, *op.state_names]
    for name, x, y in zip(names, grads, g_ref, strict=True):
        if y is None:
            assert x is None or not x.abs().any(), name
        else:
            torch.testing.assert_close(x, y, **TOL, msg=lambda m: f"d/d{name}: {m}")


POINTS = list(itertools.product(MEMORIES, ALGORITHMS, RETENTIONS, READS))


@pytest.mark.parametrize("memory,algorithm,retention,read", POINTS,
                         ids=["-".join(p).replace(" ", "") for p in POINTS])
def test_period_equals_reference(memory, algorithm, retention, read):
    """Period 4 with gradient chunks of 4 (the CMS case), T = 23: a partial last period."""
    op = program(memory, retention=retention, algorithm=algorithm, read=read).op("memory")
    assert op.chunked is not None and op.chunked.CHUNK == 4
    compare(op, 23)


NESTED = [(4, 2), (2, 6), (6, 3)]


@pytest.mark.parametrize("period,chunk", NESTED, ids=[f"every{p}-chunk{c}" for p, c in NESTED])
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("read", READS)
def test_gradient_chunks_inside_and_around_periods(period, chunk, memory, read):
    """C | P: several gradient chunks per period; P | C: several periods per gradient chunk."""
    p = program(memory, retention="decay(alpha)", algorithm="momentum(lr = eta, beta = theta)",
                period=period, gradient=f"gradient chunk_start({chunk})", read=read)
    assert p.plans["memory"].family == "period" and p.plans["memory"].chunk == min(period, chunk)
    for T in (1, 5, 23):
        compare(p.op("memory"), T, seed=T)


@pytest.mark.parametrize("gradient", ["", "gradient retained", "gradient chunk_start(2)"])
def test_state_free_gradient_runs_whole_periods(gradient):
    """A dot bias on a matrix memory: the gradient is the same at every state, so units are periods."""
    p = program(bias="dot", algorithm="momentum(lr = eta, beta = theta)", period=3, gradient=gradient,
                retention="decay(alpha)", read="after")
    assert p.plans["memory"].family == "period" and p.plans["memory"].chunk == 3
    compare(p.op("memory"), 23)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_extreme_factors(algorithm):
    """Decays and momentum factors of exactly 1, tiny and negative stay exact and finite."""
    op = program(retention="decay(alpha)", algorithm=algorithm, read="after").op("memory")
    q, k, v, gates, state = inputs(op, 23, 7)
    for name, choices in (("alpha", (1.0, 1e-30, -0.7)), ("theta", (1e-30, 1.0, -0.5))):
        if name in gates:
            pick = torch.arange(gates[name].numel()).reshape(gates[name].shape) % (len(choices) + 1)
            for i, c in enumerate(choices):
                gates[name] = torch.where(pick == i, torch.full_like(gates[name], c), gates[name])
    o_ref, s_ref = run(op, q, k, v, gates, state, "reference")
    o, s = run(op, q, k, v, gates, state, "chunk")
    torch.testing.assert_close(o, o_ref, **TOL)
    for x, y in zip(s, s_ref, strict=True):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("memory", MEMORIES)
def test_streams_in_two_pieces_across_a_period_boundary(memory, read):
    """Two pieces cut at a period boundary (the second from the first's final state) give the whole
    sequence's outputs and final state; the whole runs in the reference loop."""
    op = program(memory, algorithm="momentum(lr = eta, beta = theta)", retention="decay(alpha)",
                 period=4, gradient="gradient chunk_start(2)", read=read).op("memory")
    q, k, v, gates, state = inputs(op, 21, 3)
    o_all, s_all = run(op, q, k, v, gates, state, "reference")
    cut = 8
    piece = lambda lo, hi, start: run(op, q[:, lo:hi], k[:, lo:hi], v[:, lo:hi],
                                      {n: x[:, lo:hi] for n, x in gates.items()}, start, "chunk")
    o1, s1 = piece(0, cut, state)
    o2, s2 = piece(cut, None, s1)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_all, **TOL)
    for x, y in zip(s2, s_all, strict=True):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("spec", ["cms", "hope"])
def test_plans_of_the_shipped_cms_levels(spec):
    """cms_mid and cms_slow run one unit per period; cms_fast (gradients at every token's own state,
    chunk_start(1)) runs the sequential family: no chunk-parallel form is exact for it."""
    plans = nlc.compile(SPECS / f"{spec}.nl").plans
    assert (plans["cms_mid"].family, plans["cms_mid"].chunk) == ("period", 16)
    assert (plans["cms_slow"].family, plans["cms_slow"].chunk) == ("period", 64)
    assert plans["cms_fast"].family == "sequential"


def test_cms_levels_equal_reference_over_two_periods():
    p = nlc.compile(SPECS / "cms.nl", d_model=8, chunk=4, chunk_slow=8)
    for level in ("cms_mid", "cms_slow"):
        compare(p.op(level), 19)


@pytest.mark.parametrize("change,reason", [
    (dict(gradient="gradient chunk_start(3)"), "gradient chunks of 3 and periods of 4 do not nest"),
    (dict(gradient="gradient chunk_start(1)"), ONE_TOKEN),
    (dict(gradient=""), "each gradient at the current state needs the previous token's update"),
    (dict(memory="vector"), "a vector memory with gd has no period chunked form"),
    (dict(retention="kl(decay = alpha)"), "retention kl is not an affine map of the old state"),
])
def test_levels_left_on_the_reference_say_why(change, reason):
    p = program(**change).plans["memory"]
    assert p.family == "reference" and reason in p.reason


def test_outer_levels_need_no_chunked_form():
    text = SPEC.format(memory="matrix", bias="l2", retention="none", algorithm="gd(lr = eta)",
                       period=1, gradient="", read="after").replace("update every 1", "update outer")
    p = nlc.compile(text).plans["memory"]
    assert p.family == "reference" and p.reason.startswith("update outer: the memory never changes")


@pytest.mark.parametrize("depth", [1, 2])
def test_titans_with_chunk_level_reads_equals_reference(depth):
    """titans.nl's read granularity: `reads_every = chunk` lets reads see the memory only at the end
    of each chunk (the period form), and still equals the loop."""
    p = nlc.compile(SPECS / "titans.nl", d_model=8, heads=2, d_head=4, chunk=4, reads_every=4,
                    depth=depth)
    assert p.plans["memory"].family == "period"
    compare(p.op("memory"), 19)
