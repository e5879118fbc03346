"""The reference form over the whole sampled design space: every combination the checker accepts
compiles, runs, and stays finite; an MLP memory of depth 1 (gradients by torch.func.vjp) agrees with
the matrix memory (gradients by outer products) wherever both are valid; gradients are right."""
import pytest
import torch

import nlc

from .design_space import ALGORITHMS, BIASES, RETENTIONS, gate_range, points, spec_text

B, T = 2, 5
TOKEN_POINTS = list(points())
SCHEDULE_POINTS = list(points(memories=("matrix", "mlp2"),
                              schedules=("chunk", "period", "before", "retained", "outer")))


def _inputs(op, seed=0, T=T):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, generator=g, dtype=torch.float64), dim=-1)
    q, k = unit(B, T, 1, 3), unit(B, T, 1, 3)
    v = torch.randn(B, T, 1, 3, generator=g, dtype=torch.float64)
    gates = {}
    for name in op.gates:
        a, b = gate_range(name)
        gates[name] = a + (b - a) * torch.rand(B, T, 1, generator=g, dtype=torch.float64)
    return q, k, v, gates


# lp(3) through an MLP under the exact Lq mirror map (which scales ||W||_q to 3 ||A||_p at q = 4)
# without the bounded Newton-Schulz step of muon
# feeds back cubically and diverges at any of the rates tried (0.005 to 0.2): MATH.md §5.7.2.
DIVERGENT = ("mlp2-lp3-lq-gd-", "mlp2-lp3-lq-momentum-", "mlp2-lp3-lq-ftrl-")


def _run(text, name=""):
    op = nlc.compile(text).op("memory")
    q, k, v, gates = _inputs(op)
    # A small start: maps such as the exact Lq mirror map amplify a unit-scale random state (x3
    # for q = 4) and an lp(3) bias then diverges within a few tokens, as the math says it will.
    start = tuple(0.1 * s for s in op.initial_state(B))
    o, state = op(q, k, v, **gates, initial_state=start, output_final_state=True)
    assert o.shape == (B, T, 1, 3)
    state = (state,) if torch.is_tensor(state) else state
    assert len(state) == len(op.state_names)
    assert all(s.shape[:2] == (B, 1) for s in state)
    if name.startswith(DIVERGENT):
        assert any(not torch.isfinite(s).all() or s.abs().max() > 1e6 for s in state)
        return op, o
    assert torch.isfinite(o).all()
    assert all(torch.isfinite(s).all() for s in state)
    return op, o


def test_the_sample_covers_every_option():
    seen = " ".join(name for name, _ in TOKEN_POINTS + SCHEDULE_POINTS)
    for option in [*BIASES, *RETENTIONS, *ALGORITHMS]:
        assert f"-{option}-" in seen, option
    assert len(TOKEN_POINTS) > 500 and len(SCHEDULE_POINTS) > 900


@pytest.mark.parametrize("name,text", TOKEN_POINTS, ids=[n for n, _ in TOKEN_POINTS])
def test_point_runs(name, text):
    _run(text, name)


@pytest.mark.parametrize("name,text", SCHEDULE_POINTS, ids=[n for n, _ in SCHEDULE_POINTS])
def test_schedule_point_runs(name, text):
    _run(text, name)


MATRIX_AND_MLP1 = [(n, t) for n, t in TOKEN_POINTS if n.startswith("matrix-")
                   and any(m == n.replace("matrix-", "mlp1-", 1) for m, _ in TOKEN_POINTS)]


@pytest.mark.parametrize("name,text", MATRIX_AND_MLP1, ids=[n for n, _ in MATRIX_AND_MLP1])
def test_mlp_of_depth_one_equals_the_matrix_memory(name, text):
    _, bias, retention, algorithm, schedule = name.split("-")
    matrix = nlc.compile(text).op("memory")
    mlp = nlc.compile(spec_text("mlp1", bias, retention, algorithm, schedule)).op("memory")
    q, k, v, gates = _inputs(matrix)
    state = mlp.initial_state(B)
    o_matrix, s_matrix = matrix(q, k, v, **gates, initial_state=state, output_final_state=True)
    o_mlp, s_mlp = mlp(q, k, v, **gates, initial_state=state, output_final_state=True)
    torch.testing.assert_close(o_mlp, o_matrix, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s_mlp, s_matrix, rtol=1e-10, atol=1e-12)


def _gradcheck_sample():
    """Every bias, retention and algorithm at least once, on matrix and MLP memories."""
    chosen, covered = [], set()
    for name, text in TOKEN_POINTS + SCHEDULE_POINTS:
        memory, bias, retention, algorithm, schedule = name.split("-")
        new = {("m", memory), ("b", bias), ("r", retention), ("a", algorithm), ("s", schedule)} - covered
        if new and memory != "mlp1":
            chosen.append((name, text))
            covered |= new
    return chosen


GRADCHECK = _gradcheck_sample()


@pytest.mark.parametrize("name,text", GRADCHECK, ids=[n for n, _ in GRADCHECK])
def test_gradcheck(name, text):
    op = nlc.compile(text).op("memory")
    q, k, v, gates = _inputs(op, seed=1, T=3)
    names = list(gates)
    inputs = [x.requires_grad_() for x in (q, k, v, *gates.values())]

    def f(q, k, v, *g):
        return op(q, k, v, **dict(zip(names, g)))[0]

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
