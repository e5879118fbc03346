"""The sequential family (codegen/torch_chunk_sequential.py): levels updated every token with each
gradient at the previous token's state, run token by token with a hand-written backward. Against the
reference loop in float64: memory shapes the design-space sample does not reach, a query stored where
the key is (the shared forward), gradcheck, streaming, and what the planner keeps on the reference."""
from pathlib import Path

import pytest
import torch

import nlc

from ..architectures.test_nested_cms import SEQUENTIAL
from .design_space import TEMPLATE, op_inputs

SPECS = Path(__file__).resolve().parents[2] / "specs"
TOL = dict(rtol=1e-9, atol=1e-10)


def _run(op, T, mode, seed=0):
    """Outputs, final state and the gradients of every input (q, k, v, gates, initial state)."""
    q, k, v, gates, state = op_inputs(op, T, seed)
    leaves = [x.requires_grad_() for x in (q, k, v, *gates.values(), *state)]
    o, final = op(q, k, v, **gates, initial_state=tuple(state), output_final_state=True, mode=mode)
    final = (final,) if torch.is_tensor(final) else final
    loss = o.pow(2).sum() + sum(f.pow(2).sum() for f in final) + o.sin().sum()
    return [o, *final, *torch.autograd.grad(loss, leaves, allow_unused=True)]


def _compare(op, T):
    for a, b in zip(_run(op, T, "chunk"), _run(op, T, "reference"), strict=True):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, **TOL)


def _point(memory="mlp(depth = 2, expand = 1)", bias="l2", retention="decay(alpha)",
           algorithm="gd(lr = eta)", schedule="read before"):
    return TEMPLATE.format(memory=memory, bias=bias, retention=retention, algorithm=algorithm,
                           schedule=schedule, init="learned")


@pytest.mark.parametrize("spec", ["cms", "hope", "cms_independent", "hope_attention"])
def test_cms_fast_is_sequential(spec):
    assert nlc.compile(SPECS / f"{spec}.nl").plans["cms_fast"].family == "sequential"


MEMORIES = {
    "deep_silu_bias": "mlp(depth = 3, expand = 2, act = silu, bias = true)",
    "tanh_plain": "mlp(depth = 2, expand = 1.5, act = tanh, residual = false)",
    "relu_bias": "mlp(depth = 2, expand = 2, act = relu, bias = true)",
    "one_layer_residual_bias": "mlp(depth = 1, residual = true, bias = true)",
    "matrix": "matrix",
}
RULES = {
    "l2_decay_before": dict(bias="huber(delta = delta, form = mixture)", retention="decay(alpha)"),
    "l2_retention_after": dict(bias="lp(p = 3)", retention="l2(global = 2)", schedule=""),
    "chunk_start_1": dict(bias="l2", retention="none", schedule="gradient chunk_start(1)\n  read before"),
    "momentum_before": dict(bias="huber(delta = delta, form = mixture)", retention="decay(alpha)",
                            algorithm="momentum(lr = eta, beta = theta)"),
    "momentum_l2_after": dict(bias="l2", retention="l2(global = 2)", algorithm="momentum(lr = eta, beta = theta)",
                              schedule=""),
    "elastic_before": dict(bias="huber(delta = delta, form = mixture)", retention="elastic(l1 = 2, l2 = 2)"),
    "elastic_momentum_after": dict(bias="l2", retention="elastic(l1 = 2, l2 = 2)",
                                   algorithm="momentum(lr = eta, beta = theta)", schedule=""),
}


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_memories_equal_reference(memory, rule):
    program = nlc.compile(_point(memory=MEMORIES[memory], **RULES[rule]))
    assert program.plans["memory"].family == "sequential"
    for T in (1, 12):
        _compare(program.op("memory"), T)


def _shared_run(op, T, mode):
    """Outputs, final state and gradients when q and k are two views of one tensor (the layer passes
    `query = key` so): the read before the write reuses the gradient's forward."""
    q, _, v, gates, state = op_inputs(op, T, seed=3)
    x = q.detach().requires_grad_()
    q, k = x.view_as(x), x.view_as(x)
    leaves = [v.requires_grad_(), *(g.requires_grad_() for g in gates.values()),
              *(s.requires_grad_() for s in state)]
    o, final = op(q, k, v, **gates, initial_state=tuple(state), output_final_state=True, mode=mode)
    final = (final,) if torch.is_tensor(final) else final
    loss = o.pow(2).sum() + sum(f.pow(2).sum() for f in final) + o.sin().sum()
    return [o, *final, *torch.autograd.grad(loss, [q, k, *leaves])]


@pytest.mark.parametrize("spec", ["cms", "point"])
def test_shared_query_and_key_equal_reference(spec):
    program = nlc.compile(SPECS / "cms.nl", d_model=6, chunk=4) if spec == "cms" else nlc.compile(_point())
    op = program.op("cms_fast" if spec == "cms" else "memory")
    got, want = _shared_run(op, 11, "chunk"), _shared_run(op, 11, "reference")
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("algorithm", ["gd(lr = eta)", "momentum(lr = eta, beta = theta)"])
def test_gradcheck(algorithm):
    op = nlc.compile(_point(memory="mlp(depth = 2, expand = 1, bias = true)",
                            bias="huber(delta = delta, form = mixture)",
                            retention="l2(global = 2)", algorithm=algorithm)).op("memory")
    q, k, v, gates, state = op_inputs(op, 6, seed=1)
    names = list(gates)

    def f(q, k, v, *rest):
        o, final = op(q, k, v, **dict(zip(names, rest)), initial_state=rest[len(names):],
                      output_final_state=True, mode="chunk")
        return (o, *final)
    inputs = [x.detach().requires_grad_() for x in (q, k, v, *gates.values(), *state)]
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("cut", [3, 7])
def test_two_pieces_equal_the_whole(cut):
    """The per-token form needs no alignment: any cut, including one inside a CHUNK segment."""
    op = nlc.compile(SPECS / "hope.nl", d_model=8, heads=1, d_head=8, chunk=4).op("cms_fast")
    q, k, v, gates, state = op_inputs(op, 13, seed=2)

    def part(lo, hi, start):
        return op(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], initial_state=start, output_final_state=True,
                  mode="chunk")
    o_all, s_all = part(0, None, state)
    o1, s1 = part(0, cut, state)
    o2, s2 = part(cut, None, s1)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_all, **TOL)
    for a, b in zip(s2, s_all, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("change,reason", [
    (dict(memory="mlp(depth = 2, gated = true)"), "is not a plain chain of layers"),
    (dict(memory="mlp(depth = 1, norm = layernorm)"), "is not a plain chain of layers"),
    (dict(memory="vector"), "a vector memory is not a plain chain of layers"),
])
def test_levels_left_on_the_reference_say_why(change, reason):
    p = nlc.compile(_point(**change)).plans["memory"]
    assert p.family == "reference" and reason in p.reason


def test_a_nested_level_with_momentum_stays_on_the_reference():
    """Restarts zero a nested level's momentum buffers: not in the sequential form."""
    text = SEQUENTIAL.replace("READ", "before").replace("gd(lr = lr_mid)", "momentum(lr = lr_mid, beta = 0.5)")
    p = nlc.compile(text).plans["mid"]
    assert p.family == "reference" and "restarts (momentum buffers from zero) with momentum" in p.reason
