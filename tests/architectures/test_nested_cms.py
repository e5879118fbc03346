"""Nested levels (`init from(L)`, nested CMS, MATH.md §4.2): a level restarts from level L's state at
every boundary of L's period. The reference ops and the period family's chunked forms against an
independent float64 lockstep loop (outputs, final states, gradients), gradcheck, restart timing, the
level graph's "initialises" edge, located errors, and the shipped cms_nested spec."""
import math
from pathlib import Path

import pytest
import torch

import nlc
from nlc import graph

from .test_self_targets import F, _flat, _gelu_grad, _grads, _mlp, _same, assert_located

SPECS = Path(__file__).resolve().parents[2] / "specs"

NESTED = """\
model n
param d_model = 3
param heads = 1
param lr_mid = 0.1
param grad = 4
let t_slow[d_model] = linear(x)
level slow {
  memory mlp(depth = 2, expand = 2)
  bias l2
  algorithm gd(lr = 0.2)
  update every 8
  gradient chunk_start(8)
  read before
  key x  value t_slow  query x
}
let t_mid[d_model] = linear(slow)
level mid {
  memory mlp(depth = 2, expand = 2)
  bias l2
  algorithm momentum(lr = lr_mid, beta = 0.5)
  update every 4
  gradient chunk_start(grad)
  read before
  init from(slow)
  key slow  value t_mid  query slow
}
output = x + linear(mid)
"""


class _Hand:
    """One residual-MLP level by hand: l2 bias, gradients at chunk starts, read before, committed
    every `period` tokens, gd or momentum (beta)."""

    def __init__(self, W, period, chunk, lr, beta=None):
        self.period, self.chunk, self.lr, self.beta = period, chunk, lr, beta
        self.restart(W)

    def restart(self, W):
        self.W, self.committed = tuple(W), tuple(W)
        self.M = tuple(torch.zeros_like(w) for w in W)

    def step(self, t, x, v):
        if t % self.chunk == 0:
            self.at = self.W
        y = _mlp(*self.committed, x)
        (A1, A2), z = self.at, x @ self.at[0]
        e = _mlp(A1, A2, x) - v
        g = (x.transpose(-1, -2) @ ((e @ A2.transpose(-1, -2)) * _gelu_grad(z)),
             F.gelu(z).transpose(-1, -2) @ e)
        if self.beta is None:
            self.W = tuple(w - self.lr * gi for w, gi in zip(self.W, g))
        else:
            self.M = tuple(self.beta * m - self.lr * gi for m, gi in zip(self.M, g))
            self.W = tuple(w + m for w, m in zip(self.W, self.M))
        if (t + 1) % self.period == 0:
            self.committed = self.W
        return y


def _hand(xs, vs, vm, W1, W2, grad):
    """The two levels in lockstep: at every token 8j (j >= 1), mid restarts from slow's state."""
    slow, mid = _Hand((W1, W2), 8, 8, 0.2), _Hand((W1, W2), 4, grad, 0.1, 0.5)
    outs = []
    for t in range(xs.shape[1]):
        if t > 0 and t % 8 == 0:
            mid.restart(slow.W)
        ys = slow.step(t, xs[:, t][:, :, None], vs[:, t][:, :, None])
        outs.append(mid.step(t, ys, vm[:, t][:, :, None])[:, :, 0])
    return torch.stack(outs, 1), mid.W + mid.M


def _ops(program, form):
    suffix = "_chunk" if form == "chunk" else ""
    return [getattr(program.module(f"level_{n}{suffix}"), f"level_{n}") for n in ("slow", "mid")]


def _composed(program, form):
    """slow's op, then mid's on slow's output, starting and restarting from slow's state."""
    slow, mid = _ops(program, form)

    def run(xs, vs, vm, W1, W2):
        o, _, periods = slow(xs, xs, vs, initial_state=(W1, W2), output_period_states=True)
        zeros = (torch.zeros_like(W1), torch.zeros_like(W2))
        return mid(o, o, vm, initial_state=(W1, W2) + zeros, restart_states=periods,
                   output_final_state=True)
    return run


def _inputs(T, seed, B=2):
    g = torch.Generator().manual_seed(seed)
    xs, vs, vm = (torch.randn(B, T, 1, 3, generator=g, dtype=torch.float64) for _ in range(3))
    W1 = torch.randn(B, 1, 3, 6, generator=g, dtype=torch.float64) / 2
    W2 = torch.randn(B, 1, 6, 3, generator=g, dtype=torch.float64) / 2
    return [xs, vs, vm, W1, W2]


@pytest.mark.parametrize("grad", [2, 4, 8])
@pytest.mark.parametrize("form", ["reference", "chunk"])
def test_matches_hand_loop(grad, form):
    program = nlc.compile(NESTED, grad=grad)
    assert [program.plans[n].family for n in ("slow", "mid")] == ["period", "period"]
    for T in (1, 8, 21):
        leaves = _inputs(T, T)
        got = _grads(_composed(program, form), leaves)
        want = _grads(lambda *x: _hand(*x, grad), leaves)
        _same(got, want)


def test_gradcheck_reference():
    leaves = [x[:1].requires_grad_() for x in _inputs(10, 0)]
    run = _composed(nlc.compile(NESTED), "reference")
    assert torch.autograd.gradcheck(lambda *x: _flat(run(*x)), leaves)


@pytest.mark.parametrize("form", ["reference", "chunk"])
def test_restarts_exactly_at_the_source_period(form):
    """With no learning (lr 0) the state changes only at restarts: the read at token t is M(state) of
    restart_states[t // 8 - 1] from token 8 on, of the initial state before."""
    _, mid = _ops(nlc.compile(NESTED, lr_mid=0), form)
    _assert_reads_restart_states(mid, buffers=True)


def _assert_reads_restart_states(mid, buffers):
    """mid, not learning: its read at token t is M(restart_states[t // 8 - 1]) from token 8 on, of
    the initial state before. buffers: the state also holds momentum buffers (zeros)."""
    xs, _, vm, W1, W2 = _inputs(27, 1)
    g = torch.Generator().manual_seed(2)
    restart = (torch.randn(2, 3, 1, 3, 6, generator=g, dtype=torch.float64),
               torch.randn(2, 3, 1, 6, 3, generator=g, dtype=torch.float64))
    zeros = (torch.zeros_like(W1), torch.zeros_like(W2)) if buffers else ()
    o, _ = mid(xs, xs, vm, initial_state=(W1, W2) + zeros, restart_states=restart)
    for t in range(27):
        state = (W1, W2) if t < 8 else tuple(r[:, t // 8 - 1] for r in restart)
        want = _mlp(*state, xs[:, t][:, :, None])[:, :, 0]
        torch.testing.assert_close(o[:, t], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["reference", "chunk"])
def test_period_states_are_the_source_state_at_each_boundary(form):
    slow, _ = _ops(nlc.compile(NESTED), form)
    xs, vs, _, W1, W2 = _inputs(25, 3)
    _, _, periods = slow(xs, xs, vs, initial_state=(W1, W2), output_period_states=True)
    assert [p.shape[1] for p in periods] == [3, 3]  # tokens 8, 16, 24 < 25
    for j in (1, 2, 3):
        _, final = slow(xs[:, :8 * j], xs[:, :8 * j], vs[:, :8 * j], initial_state=(W1, W2),
                        output_final_state=True)
        for p, f in zip(periods, final):
            torch.testing.assert_close(p[:, j - 1], f, rtol=1e-12, atol=1e-12)
    _, _, none = slow(xs[:, :8], xs[:, :8], vs[:, :8], output_period_states=True)
    assert [p.shape[1] for p in none] == [0, 0]


def test_shipped_spec_layer_chunk_equals_reference():
    program = nlc.compile(SPECS / "cms_nested.nl", d_model=8, chunk=2)
    assert program.checked.level("cms_mid").init_from == "cms_slow"
    assert program.checked.level("cms_slow").initialises == ("cms_mid",)
    torch.manual_seed(0)
    layer = program.layer().double()
    x = torch.randn(2, 19, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for mode in ("reference", "auto"):
        layer.mode = mode
        out = layer(x)
        results.append([out, *torch.autograd.grad(out.pow(2).sum(), [x, *layer.parameters()])])
    _same(results[1], results[0])


def test_level_graph_draws_initialises():
    program = nlc.compile(SPECS / "cms_nested.nl")
    g = program.graph
    assert g.edges["cms_slow", "cms_mid"]["initialises"] and g.edges["cms_mid", "cms_fast"]["initialises"]
    assert g.edges["cms_slow", "cms_mid"]["kind"] == "flow"  # the key/query flow stays
    assert {(u, v) for u, v, d in g.edges(data=True) if d["kind"] == "nests"} == {(graph.OUTER, "cms_slow")}
    text = graph.to_text(g)
    assert "cms_slow initialises cms_mid" in text and "init: from cms_slow (every 64)" in text
    assert graph.to_dot(g).count('label="initialises"') == 2


def _mid(line: str) -> str:
    return NESTED.replace("  init from(slow)", line)


BAD = [
    ("not_multiple", NESTED.replace("update every 8", "update every 6").replace("chunk_start(8)",
                                                                            "chunk_start(6)"),
     "restarts at the period boundaries of 'slow' (update every 6)", 24, 13),
    ("slower_target", NESTED.replace("update every 4", "update every 16"),
     "level 'mid' (update every 16) restarts", 24, 13),
    ("stream", _mid("  init from(t_slow)"), "'t_slow' is a stream, not a level", 24, 13),
    ("unknown", _mid("  init from(slwo)"), "unknown name 'slwo'", 24, 13),
    ("itself", _mid("  init from(mid)"), "restarts from its own state", 24, 13),
    ("form", _mid("  init frm(slow)"), "bad value for 'init'", 24, 8),
    ("layout", NESTED.replace("  memory mlp(depth = 2, expand = 2)\n  bias l2\n  algorithm momentum",
                              "  memory mlp(depth = 2, expand = 4)\n  bias l2\n  algorithm momentum"),
     "cannot start from the state of 'slow'", 24, 13),
    ("cycle", NESTED.replace("key x  value t_slow  query x", "key x  value t_slow  query mid"),
     "cycle in the level graph", None, None),
]


@pytest.mark.parametrize("name, text, message, line, column", BAD, ids=[b[0] for b in BAD])
def test_bad_specs_give_located_errors(name, text, message, line, column):
    assert_located(text, message, line, column)


# mid as the fastest CMS level: a gd step every token at its own state (the sequential family)
SEQUENTIAL = NESTED.replace("param grad = 4\n", "param grad = 4\nparam chunk = 4\n").replace(
    "algorithm momentum(lr = lr_mid, beta = 0.5)\n  update every 4\n  gradient chunk_start(grad)\n  read before",
    "algorithm gd(lr = lr_mid)\n  update every 1\n  gradient chunk_start(1)\n  read READ")


def _sequential_composed(program, form):
    """slow's op (period family, or reference), then mid's restarting from slow's period states."""
    slow, mid = _ops(program, form)

    def run(xs, vs, vm, W1, W2):
        o, _, periods = slow(xs, xs, vs, initial_state=(W1, W2), output_period_states=True)
        return mid(o, o, vm, initial_state=(W1, W2), restart_states=periods, output_final_state=True)
    return run


@pytest.mark.parametrize("read", ["before", "after"])
@pytest.mark.parametrize("chunk", [3, 4, 16])
def test_sequential_level_restarts_as_the_reference(read, chunk):
    """A nested level updated every token runs the sequential form with its restarts (copies for the
    backward's replay every gcd(chunk, 8) tokens): outputs, final state and every gradient, the restart
    states' through slow's period states, equal the reference."""
    program = nlc.compile(SEQUENTIAL.replace("READ", read), chunk=chunk)
    assert [program.plans[n].family for n in ("slow", "mid")] == ["period", "sequential"]
    assert f"CHUNK = {math.gcd(chunk, 8)} " in program.sources["level_mid_chunk.py"]
    for T in (1, 8, 9, 21, 33):
        leaves = _inputs(T, T)
        got = _grads(_sequential_composed(program, "chunk"), leaves)
        want = _grads(_sequential_composed(program, "reference"), leaves)
        _same(got, want)


def test_sequential_level_restarts_exactly_at_the_source_period():
    """With lr 0 the read at token t is M(restart_states[t // 8 - 1]) from token 8 on."""
    _, mid = _ops(nlc.compile(SEQUENTIAL.replace("READ", "before"), lr_mid=0, chunk=4), "chunk")
    _assert_reads_restart_states(mid, buffers=False)


@pytest.mark.parametrize("mode", ["reference", "chunk"])
def test_program_op_takes_the_nesting_arguments(mode):
    """Program.op passes restart_states and output_period_states through to the form it runs."""
    program = nlc.compile(SEQUENTIAL.replace("READ", "after"), chunk=4)
    slow_op, mid_op = program.op("slow"), program.op("mid")
    xs, vs, vm, W1, W2 = _inputs(21, 5)
    o, _, periods = slow_op(xs, xs, vs, initial_state=(W1, W2), output_period_states=True, mode=mode)
    got = mid_op(o, o, vm, initial_state=(W1, W2), restart_states=periods, output_final_state=True,
                 mode=mode)
    want = _sequential_composed(program, mode)(xs, vs, vm, W1, W2)
    _same([got[0], *got[1]], [want[0], *want[1]])
    with pytest.raises(TypeError, match="restarts from no other level's state"):
        slow_op(xs, xs, vs, restart_states=periods)
    with pytest.raises(TypeError, match="no level restarts from level 'mid'"):
        mid_op(o, o, vm, output_period_states=True)
