"""Self-generated targets (`value self(s)`, MATH.md §4.4): the reference op against independent
float64 loops (outputs, final states, gradients), gradcheck, the stopgrad flag, the period family's
chunked form, located errors and the shipped specs that use them."""
import math
from pathlib import Path

import pytest
import torch

import nlc
from nlc.diagnostics import SpecError

SPECS = Path(__file__).resolve().parents[2] / "specs"
F = torch.nn.functional

MATRIX = """\
model m
param d_model = 8
param heads = 2
param stop = 0
let q[heads, 3] = l2norm(linear(x))
let k[heads, 3] = l2norm(linear(x))
let v[heads, 3] = linear(x)
gate alpha[heads] = sigmoid(linear(x))
gate beta[heads] = sigmoid(linear(x))
level mem {
  memory matrix
  bias l2
  retention decay(alpha)
  algorithm gd(lr = beta)
  key k  value self(v, stopgrad = stop)  query q
}
output = linear(mem)
"""

MLP = """\
model m
param d_model = 8
param heads = 1
param stop = 0
let q[heads, 3] = l2norm(linear(x))
let k[heads, 3] = l2norm(linear(x))
level mem {
  memory mlp(depth = 2, expand = 2, act = gelu)
  bias l2
  algorithm gd(lr = 0.5)
  update every UPDATE
  gradient chunk_start(4)
  read before
  key k  value self(mem, stopgrad = stop)  query q
}
output = linear(mem)
"""


def _op(text, **params):
    program = nlc.compile(text, **params)
    return program, program.module("level_mem").level_mem


def _inputs(B, T, H, D, seed):
    g = torch.Generator().manual_seed(seed)
    unit = lambda: F.normalize(torch.randn(B, T, H, D, generator=g, dtype=torch.float64), dim=-1)
    return unit(), unit(), torch.randn(B, T, H, D, generator=g, dtype=torch.float64), g


def _matrix_loop(q, k, v, alpha, beta, S, stop):
    """S [B, H, K, V], o_t = S^T q_t; target M(v_t) = S^T v_t at the current state."""
    outs = []
    for t in range(q.shape[1]):
        kt, vt, qt = k[:, t], v[:, t], q[:, t]                         # [B, H, D]
        target = torch.einsum("bhkv,bhk->bhv", S, vt)
        target = target.detach() if stop else target
        e = torch.einsum("bhkv,bhk->bhv", S, kt) - target
        b = beta[:, t, :, None, None]
        S = alpha[:, t, :, None, None] * S - b * kt[..., :, None] * e[..., None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, qt))
    return torch.stack(outs, 1), S


def _gelu_grad(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _mlp(W1, W2, x):
    return x + F.gelu(x @ W1) @ W2


def _mlp_loop(q, W1, W2, lr, chunk, period, stop):
    """Residual 2-layer MLP memory, l2 bias, gd, gradients at chunk starts, read before, committed
    every `period` tokens; the target is M_{t'}(y_t) of its own read-out y_t, the gradient derived by
    hand: dW2 = h^T e, dW1 = x^T ((e W2^T) * gelu'(x W1))."""
    outs, committed = [], (W1, W2)
    for t in range(q.shape[1]):
        if t % chunk == 0:
            A1, A2 = W1, W2
        qt = q[:, t][:, :, None]                                          # [B, H, 1, D]
        y = _mlp(*committed, qt)
        outs.append(y[:, :, 0])
        target = _mlp(A1, A2, y)
        target = target.detach() if stop else target
        e = _mlp(A1, A2, qt) - target
        z = qt @ A1
        W2 = W2 - lr * F.gelu(z).transpose(-1, -2) @ e
        W1 = W1 - lr * qt.transpose(-1, -2) @ ((e @ A2.transpose(-1, -2)) * _gelu_grad(z))
        if (t + 1) % period == 0:
            committed = (W1, W2)
    return torch.stack(outs, 1), (W1, W2)


def _flat(result):
    """(o, final state) -> (o, *state tensors)."""
    o, final = result
    return (o, final) if torch.is_tensor(final) else (o, *final)


def _grads(fn, leaves):
    leaves = [x.detach().requires_grad_() for x in leaves]
    o, final = fn(*leaves)
    final = (final,) if torch.is_tensor(final) else tuple(final)
    loss = o.pow(2).sum() + sum(f.pow(2).sum() for f in final)
    return [o, *final, *torch.autograd.grad(loss, leaves, allow_unused=True)]


def _same(got, want):
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b,
                                       rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("stop", [0, 1])
def test_matrix_reference_matches_hand_loop(stop):
    _, op = _op(MATRIX, stop=stop)
    q, k, v, g = _inputs(2, 13, 2, 3, 0)
    alpha, beta = torch.rand(2, 13, 2, generator=g, dtype=torch.float64), \
        torch.rand(2, 13, 2, generator=g, dtype=torch.float64)
    S = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    got = _grads(lambda *x: op(*x[:3], g_alpha=x[3], g_beta=x[4], initial_state=x[5],
                               output_final_state=True), [q, k, v, alpha, beta, S])
    want = _grads(lambda *x: _matrix_loop(*x, stop=stop), [q, k, v, alpha, beta, S])
    _same(got, want)


@pytest.mark.parametrize("stop", [0, 1])
@pytest.mark.parametrize("update", [1, 4])
def test_mlp_own_read_out_matches_hand_loop(stop, update):
    program, op = _op(MLP.replace("UPDATE", str(update)), stop=stop)
    q, k, _, g = _inputs(2, 11, 1, 3, 1)
    W1 = torch.randn(2, 1, 3, 6, generator=g, dtype=torch.float64) / 2
    W2 = torch.randn(2, 1, 6, 3, generator=g, dtype=torch.float64) / 2
    # the key is the query here: the hand loop reads and writes at q_t
    got = _grads(lambda q, W1, W2: op(q, q, q, initial_state=(W1, W2), output_final_state=True),
                 [q, W1, W2])
    want = _grads(lambda q, W1, W2: _mlp_loop(q, W1, W2, 0.5, 4, update, stop), [q, W1, W2])
    _same(got, want)


def test_gradcheck_reference():
    _, op = _op(MATRIX)
    q, k, v, g = _inputs(1, 5, 2, 3, 2)
    alpha, beta = torch.rand(1, 5, 2, generator=g, dtype=torch.float64), \
        torch.rand(1, 5, 2, generator=g, dtype=torch.float64)
    S = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64)
    leaves = [x.requires_grad_() for x in (q, k, v, alpha, beta, S)]
    assert torch.autograd.gradcheck(
        lambda *x: op(*x[:3], g_alpha=x[3], g_beta=x[4], initial_state=x[5], output_final_state=True),
        leaves)
    _, op = _op(MLP.replace("UPDATE", "2"))
    W1 = (torch.randn(1, 1, 3, 6, generator=g, dtype=torch.float64) / 2).requires_grad_()
    W2 = (torch.randn(1, 1, 6, 3, generator=g, dtype=torch.float64) / 2).requires_grad_()
    q1, k1 = (x[:, :, :1].detach().requires_grad_() for x in (q, k))
    assert torch.autograd.gradcheck(
        lambda q, k, W1, W2: _flat(op(q, k, q, initial_state=(W1, W2), output_final_state=True)),
        [q1, k1, W1, W2])


def test_stopgrad_flag():
    """Forward unchanged; with stopgrad the value stream (read only through M(v)) gets no gradient,
    and the other gradients change."""
    q, k, v, g = _inputs(2, 9, 2, 3, 3)
    alpha, beta = torch.rand(2, 9, 2, generator=g, dtype=torch.float64), \
        torch.rand(2, 9, 2, generator=g, dtype=torch.float64)
    S = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
    runs = []
    for stop in (0, 1):
        _, op = _op(MATRIX, stop=stop)
        runs.append(_grads(lambda *x: op(*x[:3], g_alpha=x[3], g_beta=x[4], initial_state=x[5],
                                         output_final_state=True), [q, k, v, alpha, beta, S]))
    (o0, f0, gq0, gk0, gv0, *_), (o1, f1, gq1, gk1, gv1, *_) = runs
    torch.testing.assert_close(o1, o0, rtol=0, atol=0)
    torch.testing.assert_close(f1, f0, rtol=0, atol=0)
    assert gv1 is None or gv1.abs().max() == 0
    assert gv0.abs().max() > 1e-3 and (gk1 - gk0).abs().max() > 1e-6


@pytest.mark.parametrize("own", [False, True])
def test_period_family_chunked_equals_reference(own):
    text = MLP.replace("UPDATE", "4").replace("lr = 0.5", "lr = 0.05")
    if not own:
        text = text.replace("value self(mem,", "value self(v,").replace(
            "let k[", "let v[heads, 3] = linear(x)\nlet k[")
    program = nlc.compile(text)
    assert program.plans["mem"].family == "period"
    ref, chunk = program.module("level_mem").level_mem, program.module("level_mem_chunk").level_mem
    for T in (1, 13, 30):  # 30: a short last unit
        q, k, v, g = _inputs(2, T, 1, 3, T)
        W1 = torch.randn(2, 1, 3, 6, generator=g, dtype=torch.float64) / 2
        W2 = torch.randn(2, 1, 6, 3, generator=g, dtype=torch.float64) / 2
        run = lambda f: _grads(lambda *x: f(*x[:3], initial_state=x[3:], output_final_state=True),
                               [q, k, v, W1, W2])
        _same(run(chunk), run(ref))


def test_planner_keeps_other_families_on_the_reference():
    plans = nlc.compile(MATRIX).plans
    assert plans["mem"].family == "reference" and "self-generated target" in plans["mem"].reason
    plans = nlc.compile(MLP.replace("UPDATE", "1")).plans
    assert plans["mem"].family == "reference" and "frozen chunked form" in plans["mem"].reason


def test_shipped_specs():
    smt = nlc.compile(SPECS / "self_mod_titans.nl")
    assert {lv.name: (lv.target, lv.value) for lv in smt.levels} == {
        n: ("self", "mem_v") for n in ("mem_v", "mem_k", "mem_eta", "mem_alpha", "memory")}
    assert nlc.compile(SPECS / "self_mod_titans.nl", stop_target=1).checked.level("memory").stop_target
    hope = nlc.compile(SPECS / "hope.nl")
    assert hope.checked.level("memory").target == "self"
    static = nlc.compile(SPECS / "hope.nl", self_targets=0)
    assert static.checked.level("memory").target == "value" and static.plans["memory"].family == "mapped"


def test_stop_target_cuts_mem_v_from_the_outer_loss():
    """self_mod_titans: with stop_target = 1 the generated value v_t reaches only stopped targets, so
    mem_v's learned initial state gets no gradient; with 0 it does."""
    grads = []
    for stop in (0, 1):
        program = nlc.compile(SPECS / "self_mod_titans.nl", d_model=16, d_head=8, chunk=3,
                              stop_target=stop)
        torch.manual_seed(0)
        layer = program.layer().double()
        layer(torch.randn(1, 5, 16, dtype=torch.float64)).pow(2).sum().backward()
        grads.append(sum(0 if p.grad is None else float(p.grad.abs().sum()) for p in layer.init_mem_v))
    assert grads[0] > 0 and grads[1] == 0


BAD = [
    ("shape", MATRIX.replace("let v[heads, 3]", "let v[heads, 4]"),
     "reads 'v' [2, 4] through the memory", 15, 16),
    ("own_after", MLP.replace("UPDATE", "1").replace("  read before\n", ""),
     "reads its own output as its target but reads after writing", 13, 21),
    ("kwarg", MATRIX.replace("stopgrad = stop", "stopgad = stop"), "self() has no argument 'stopgad'",
     15, 34),
    ("args", MATRIX.replace("self(v, stopgrad = stop)", "self(v, 1, 2)"), "self() takes the stream",
     15, 16),
    ("form", MATRIX.replace("self(v,", "slef(v,"), "unknown value form 'slef(...)'", 15, 16),
]


def assert_located(text, message, line, column):
    """Compiling `text` fails, and its first error says `message` at line:column (None: somewhere)."""
    with pytest.raises(SpecError) as info:
        nlc.compile(text)
    first = next(d for d in info.value.diagnostics if d.severity == "error")
    assert message in first.message and first.span is not None
    assert line is None or (first.span.line, first.span.column) == (line, column)


@pytest.mark.parametrize("name, text, message, line, column", BAD, ids=[b[0] for b in BAD])
def test_bad_specs_give_located_errors(name, text, message, line, column):
    assert_located(text, message, line, column)
