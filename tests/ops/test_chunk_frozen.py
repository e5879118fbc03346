"""The chunk-parallel frozen-gradient form (codegen/torch_chunk_frozen.py, MATH.md §3.4-3.6) against
the reference per-token loop, in float64: outputs, final state, and the gradients of every input
(q, k, v, gates, initial state), for sequence lengths that are and are not multiples of the chunk."""
import itertools

import pytest
import torch

import nlc
from nlc import ir

TOL = dict(rtol=1e-9, atol=1e-9)
LENGTHS = (1, 7, 33, 50)
SMALL = dict(d_model=8, heads=2, d_head=4)

MATRIX = """
model frozen_point
param d_model = 8
param heads = 2
param chunk = 4
let q[heads, 4] = l2norm(linear(x))
let k[heads, 4] = l2norm(linear(x))
let v[heads, 4] = linear(x)
gate alpha[heads] = sigmoid(linear(x))
gate eta[heads] = 0.5 * sigmoid(linear(x))
gate theta[heads] = sigmoid(linear(x))
level memory {{
  memory matrix
  bias {bias}
  retention {retention}
  algorithm {algorithm}
  gradient chunk_start(chunk)
  read {read}
}}
output = linear(memory)
"""
BIASES = ("l2", "dot", "lp(p = 3)", "huber(delta = 0.5)")
ALGORITHMS = ("gd(lr = eta)", "momentum(lr = eta, beta = theta)")
READS = ("after", "before")
RETENTIONS = ("none", "decay(alpha)", "l2(global = 2)")


def chunked_pair(program):
    """(reference op, chunked op, chunk module) of a program's level 'memory'. With a dot bias and
    gd the planner picks the decay family (the gradient does not depend on the state): that form
    is compared instead, equally exact."""
    assert program.plans["memory"].family in ("frozen", "decay"), program.plans["memory"].reason
    module = program.module("level_memory_chunk")
    assert module.CHUNK == program.plans["memory"].chunk
    return program.module("level_memory").level_memory, module.level_memory, module


def inputs(program, T, seed, gates=None, lr=0.3):
    """q, k (unit norm), v, gates in (0.05, 0.95) (learning rates scaled by `lr`, so that chunks of
    frozen gradients do not diverge), and a random initial state: float64 leaves that require grad."""
    lv = program.rules["memory"].level
    g = torch.Generator().manual_seed(seed)
    B, H, K, V = 2, lv.heads, lv.d_key, lv.d_value

    def draw(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    q = torch.nn.functional.normalize(draw(B, T, H, K), dim=-1)
    k = torch.nn.functional.normalize(draw(B, T, H, K), dim=-1)
    v = draw(B, T, H, V)
    lr_gates = set(ir.gate_names(program.rules["memory"].lr))
    values = {}
    for name in lv.gates:
        tail = {"scalar": (), "key": (K,), "value": (V,)}[lv.gate_axes[name]]
        x = 0.05 + 0.9 * torch.rand(B, T, H, *tail, generator=g, dtype=torch.float64)
        values[name] = lr * x if name in lr_gates else x
    if gates:
        values.update({n: f(values[n]) for n, f in gates.items() if n in values})
    state = program.module("level_memory").initial_state(B, torch.float64)
    state = tuple(s + 0.3 * draw(*s.shape) for s in state)
    leaves = [q, k, v, *values.values(), *state]
    for x in leaves:
        x.requires_grad_(True)
    return q, k, v, values, state, leaves


def run(op, q, k, v, values, state, leaves, weights):
    o, final = op(q, k, v, **{f"g_{n}": x for n, x in values.items()},
                  initial_state=state[0] if len(state) == 1 else state, output_final_state=True)
    final = (final,) if torch.is_tensor(final) else tuple(final)
    loss = (o * weights[0]).sum() + sum((s * w).sum() for s, w in zip(final, weights[1:]))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return o, final, grads


def compare(program, lengths=LENGTHS, seed=0, gates=None, grads=True, lr=0.3):
    reference, chunked, _ = chunked_pair(program)
    for T in lengths:
        q, k, v, values, state, leaves = inputs(program, T, seed + T, gates, lr)
        g = torch.Generator().manual_seed(seed + 1000 + T)
        weights = [torch.randn(q.shape[:3] + v.shape[-1:], generator=g, dtype=torch.float64)]
        weights += [torch.randn(s.shape, generator=g, dtype=torch.float64) for s in state]
        o_ref, s_ref, g_ref = run(reference, q, k, v, values, state, leaves, weights)
        assert torch.isfinite(o_ref).all(), "the reference diverged: pick smaller rates"
        o, s, g = run(chunked, q, k, v, values, state, leaves, weights)
        torch.testing.assert_close(o, o_ref, **TOL, msg=lambda m: f"T={T} output: {m}")
        assert len(s) == len(s_ref)
        for i, (x, y) in enumerate(zip(s, s_ref)):
            torch.testing.assert_close(x, y, **TOL, msg=lambda m: f"T={T} state {i}: {m}")
        if not grads:
            continue
        names = ["q", "k", "v", *values, *(f"state{i}" for i in range(len(state)))]
        for name, x, y in zip(names, g, g_ref):
            if y is None:
                assert x is None or not x.abs().any(), name
                continue
            torch.testing.assert_close(x, y, **TOL, msg=lambda m: f"T={T} d/d{name}: {m}")


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [4, 16])
def test_titans(depth, chunk):
    compare(nlc.compile("specs/titans.nl", **SMALL, depth=depth, chunk=chunk), seed=depth)


@pytest.mark.parametrize("chunk", [4, 16])
def test_ttt_linear(chunk):
    compare(nlc.compile("specs/ttt_linear.nl", **SMALL, chunk=chunk), seed=3)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("chunk", [4, 16])
def test_yaad(depth, chunk):
    compare(nlc.compile("specs/yaad.nl", **SMALL, depth=depth, chunk=chunk), seed=5)


MATRIX_POINTS = list(itertools.product(BIASES, ALGORITHMS, READS, RETENTIONS))


@pytest.mark.parametrize("bias,algorithm,read,retention", MATRIX_POINTS,
                         ids=["-".join(p).replace(" ", "") for p in MATRIX_POINTS])
def test_matrix_memory(bias, algorithm, read, retention):
    text = MATRIX.format(bias=bias, algorithm=algorithm, read=read, retention=retention)
    for chunk in (4, 16):
        compare(nlc.compile(text, chunk=chunk), seed=chunk, lr=0.05)


MLPS = ("mlp(depth = 1, bias = true)",
        "mlp(depth = 1, residual = true, norm = layernorm, bias = true)",
        "mlp(depth = 2, expand = 2)",
        "mlp(depth = 2, expand = 2, residual = false, act = silu)",
        "mlp(depth = 2, expand = 2, bias = true)",
        "mlp(depth = 2, expand = 2, norm = layernorm)",
        "mlp(depth = 2, expand = 2, gated = true)",
        "mlp(depth = 2, expand = 2, gated = true, bias = true, norm = layernorm, act = relu)",
        "mlp(depth = 3, expand = 2, bias = true, act = tanh)")


def mlp_spec(memory, bias="l2", algorithm=ALGORITHMS[1], read="after", retention="decay(alpha)"):
    text = MATRIX.format(bias=bias, algorithm=algorithm, read=read, retention=retention)
    return text.replace("memory matrix", f"memory {memory}\n  init learned")


@pytest.mark.parametrize("read", READS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("memory", MLPS)
def test_mlp_memory(memory, algorithm, read):
    """Every MLP layout (bias, norm, gating, residual, depth) reads through the per-layer dual form."""
    program = nlc.compile(mlp_spec(memory, algorithm=algorithm, read=read))
    assert program.plans["memory"].family == "frozen"
    compare(program, lengths=(1, 7, 33), seed=len(memory), lr=0.1)


@pytest.mark.parametrize("bias", BIASES[2:] + ("huber(delta = 0.5, form = mixture)",))
def test_mlp_memory_biases(bias):
    """Biases whose gradient depends on the error: the δ of every layer comes from one vjp."""
    compare(nlc.compile(mlp_spec(MLPS[4], bias=bias, retention="l2(global = 2)")), lengths=(7, 33),
            seed=11, lr=0.02)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("memory", ["matrix", "mlp(depth = 2, expand = 1)"])
def test_extreme_decays(algorithm, memory):
    """Decays and momentum factors of exactly 1, tiny (1e-30) and negative stay exact and finite;
    an exact 0 matches in the forward pass (its gradient is lost to log space: not compared)."""
    text = MATRIX.format(bias="l2", algorithm=algorithm, read="after", retention="decay(alpha)")
    if memory != "matrix":
        text = text.replace("memory matrix", f"memory {memory}\n  init learned")
    program = nlc.compile(text)

    def extremes(x, choices):
        pick = torch.arange(x.numel(), dtype=torch.long).reshape(x.shape) % (len(choices) + 1)
        out = x
        for i, c in enumerate(choices):
            out = torch.where(pick == i, torch.full_like(x, c), out)
        return out
    compare(program, lengths=(7, 33), gates={"alpha": lambda x: extremes(x, (1.0, 1e-30, -0.7)),
                                             "theta": lambda x: extremes(x, (1e-30, 1.0, -0.5))})
    compare(program, lengths=(33,), grads=False,
            gates={"alpha": lambda x: extremes(x, (0.0, 1.0)), "theta": lambda x: extremes(x, (1.0, 0.0))})


def test_generated_source_is_readable():
    program = nlc.compile("specs/titans.nl", **SMALL)
    assert program.plans["memory"].family == "frozen"
    text = program.sources["level_memory_chunk.py"]
    assert "CHUNK = 16" in text and "# specs/titans.nl:" in text
    assert "vmap" not in text and "LAYERS = ((0, None), (1, None))" in text  # dual form, per layer
    assert "def level_memory(q, k, v, *, g_alpha, g_theta, g_eta, initial_state=None, " \
           "output_final_state=False):" in text


def test_linear_memories_use_the_hand_derived_backward():
    """A matrix memory (or a plain depth-1 MLP) runs FrozenLinear; deeper memories the per-layer
    dual form through autograd; a step factor c_t = 1 is not carried."""
    matrix = nlc.compile("specs/titans.nl", **SMALL, depth=1).sources["level_memory_chunk.py"]
    assert "frozen_linear(CHUNK, output_grad" in matrix and "_dual_layer" not in matrix
    assert "def _coefficients(a, lr, beta):" in matrix
    deep = nlc.compile("specs/titans.nl", **SMALL, depth=2).sources["level_memory_chunk.py"]
    assert "frozen_linear" not in deep and "_dual_layer" in deep
    scaled = MATRIX.format(bias="l2", algorithm=ALGORITHMS[1], read="after", retention="l2(global = 2)")
    assert "def _coefficients(a, c, lr, beta):" in nlc.compile(scaled).sources["level_memory_chunk.py"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_linear_memory_state_only_and_frozen_inputs(algorithm):
    """FrozenLinear's backward when only the final state is differentiated (no output gradient)
    and when the initial state and some inputs do not require gradients."""
    program = nlc.compile(MATRIX.format(bias="huber(delta = 0.5)", algorithm=algorithm, read="before",
                                        retention="decay(alpha)"), chunk=4)
    reference, chunked, _ = chunked_pair(program)
    q, k, v, values, state, _ = inputs(program, 11, seed=7, lr=0.05)
    state = tuple(s.detach() for s in state)
    v = v.detach()
    gates = {f"g_{n}": x for n, x in values.items()}
    leaves = [q, k, *values.values()]
    grads = []
    for op in (reference, chunked):
        _, final = op(q, k, v, **gates, initial_state=state, output_final_state=True)
        final = (final,) if torch.is_tensor(final) else tuple(final)
        loss = sum((s * torch.linspace(-1, 1, s.numel(), dtype=s.dtype).reshape(s.shape)).sum() for s in final)
        grads.append(torch.autograd.grad(loss, leaves, allow_unused=True))  # q: only in outputs
    for expected, got in zip(*grads):
        if expected is None:
            assert got is None or not got.abs().any()
        else:
            torch.testing.assert_close(got, expected, **TOL)


def test_segment_products_gradcheck():
    """The hand-derived backward of the in-chunk segment products (`_Segments` under
    `_decay_products`), with factors near 1, tiny and negative, against finite differences."""
    module = nlc.compile("specs/titans.nl", **SMALL, depth=1).module("level_memory_chunk")
    g = torch.Generator().manual_seed(0)
    a = 0.2 + 0.8 * torch.rand(2, 3, 6, generator=g, dtype=torch.float64)
    a[0, 0, 2], a[1, 2, 4], a[0, 1, 1] = 1e-3, -0.7, 1.0
    a.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: module._decay_products(x), (a,))


OMEGA_GATES = ("gate theta[heads] = sigmoid(linear(x))\n"
               "gate gamma[heads] = sigmoid(linear(x))\n"
               "gate delta[heads] = softplus(linear(x))")
# (memory, bias, algorithm, read, retention): windows narrower and wider than the chunk (4), a
# constant and a gated gamma, a bias gate inside the window, layer biases
OMEGA_POINTS = [
    ("matrix", "omega(window = 3, gamma = gamma) of l2", ALGORITHMS[0], "after", "decay(alpha)"),
    ("matrix", "omega(window = 6, gamma = 0.5) of huber(delta = 0.5)", ALGORITHMS[1], "before",
     "l2(global = 2)"),
    ("mlp(depth = 1, bias = true)", "omega(window = 1, gamma = gamma) of l2", ALGORITHMS[0], "before", "none"),
    ("mlp(depth = 2, expand = 2, bias = true)", "omega(window = 2, gamma = gamma) of lp(p = 3)",
     ALGORITHMS[1], "after", "decay(alpha)"),
    ("mlp(depth = 2, expand = 2)", "omega(window = 9, gamma = gamma) of huber(delta = delta, form = mixture)",
     ALGORITHMS[0], "after", "decay(alpha)"),
]


def omega_spec(memory, bias, algorithm, read, retention):
    text = mlp_spec(memory, bias=bias, algorithm=algorithm, read=read, retention=retention)
    return text.replace("gate theta[heads] = sigmoid(linear(x))", OMEGA_GATES)


@pytest.mark.parametrize("point", OMEGA_POINTS, ids=[f"{p[0]}-{p[1]}".replace(" ", "") for p in OMEGA_POINTS])
def test_omega_windows(point):
    """Omega windows are banded sums of the chunk-start gradients: the frozen family, with windows
    that reach back into the previous chunks (re-evaluated at this chunk's start) and sequences shorter
    than a window."""
    program = nlc.compile(omega_spec(*point))
    assert program.plans["memory"].family == "frozen", program.plans["memory"].reason
    assert "_window(gamma_w, L)" in program.sources["level_memory_chunk.py"]
    compare(program, lengths=(1, 3, 7, 33), seed=len(point[1]), lr=0.05)


@pytest.mark.parametrize("chunk", [4, 16])
def test_omeganet(chunk):
    compare(nlc.compile("specs/omeganet.nl", d_model=8, heads=2, chunk=chunk), lengths=(1, 7, 33, 50),
            seed=chunk, lr=0.1)


@pytest.mark.parametrize("rule,family", [
    ("algorithm muon(lr = eta, beta = theta, steps = 3)", "mapped"),
    ("algorithm ftrl(lr = eta)", "mapped"),
    ("algorithm gd(lr = eta)\n  gradient current", "reference"),
])
def test_omega_windows_outside_the_frozen_family(rule, family):
    """Muon and FTRL keep the mapped family's per-token maps; gradients at every token's state stay
    on the reference loop."""
    text = omega_spec("mlp(depth = 2, expand = 2)", "omega(window = 3, gamma = gamma) of l2",
                      "gd(lr = eta)", "after", "decay(alpha)")
    text = text.replace("algorithm gd(lr = eta)", rule)
    if "gradient current" in rule:
        text = text.replace("  gradient chunk_start(chunk)\n", "")
    assert nlc.compile(text).plans["memory"].family == family
