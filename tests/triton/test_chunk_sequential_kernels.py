"""Triton kernels of the sequential family (codegen/triton_chunk_sequential.py: one program per
(batch, head) runs the tokens in order, with a hand-written backward that replays segments of the
state) against the reference loop: outputs, final states and the gradients of every input (q, k, v,
gates, initial state). Over the shipped CMS levels updated every token (cms, cms_independent, hope,
hope_attention; cms_nested's restarting from cms_mid's period states), every sequential design point
with an MLP memory (depth 1 and 2, every bias, retentions none, decay, l2 and elastic net's soft
threshold, gd and momentum, reads before and after),
deeper and wider chains (layer biases, silu, tanh, relu, no residual), a query stored where the key is,
bf16 inputs; for T = 1, 63, 100 and head dims 16, 32.

Precision as in test_fused_recurrent: fp32 against the float64 reference on the same inputs, relative
error <= 1e-4; bf16 inputs (fp32 states) 2e-2.

On a CUDA device every case runs. On the CPU (Triton's interpreter, slow) each shipped level runs one
T and every design point one (head dim, T), in turn."""
from __future__ import annotations

import pytest
import torch

from nlc.codegen import triton_recurrent
from nlc.codegen.triton_chunk_sequential import unsupported
from nlc.derive.rules import derive
from nlc.lower import check
from nlc.plan import plan
from nlc.program import triton_refusal

from ..architectures.test_nested_cms import SEQUENTIAL
from ..ops.design_space import chunked_points, spec_text
from .test_chunk_period_kernels import _nested_case
from .test_fused_recurrent import DEVICE, GPU, HEADS, RTOL, RTOL_BF16, SPECS, _compare, _compile, _only

pytest.importorskip("triton", reason="triton is not installed (pip install 'nlc[triton]')")

LENGTHS, DIMS = (1, 63, 100), (16, 32)
CMS = ("cms", "cms_independent", "hope", "hope_attention")  # shipped specs whose cms_fast is sequential


def _sequential():
    """(id, spec text, rules, plan) of every sequential-family design point."""
    out = []
    for name, text in chunked_points(("matrix", "mlp1", "mlp2"), ("token", "before")):
        rules = derive(check(text)[0])["memory"]
        p = plan(rules, 5)
        if p.family == "sequential":
            out.append((name, text, rules, p))
    return out


SEQUENTIAL_POINTS = _sequential()
DESIGN = [(n, text) for n, text, _, _ in SEQUENTIAL_POINTS if not n.startswith("matrix")]
SIZES = [(d, t) for d in DIMS for t in LENGTHS]
DESIGN_CASES = [(n, text, d, t) for n, text in DESIGN for d, t in SIZES] if GPU else \
    [(n, text, *SIZES[(5 * i + 1) % len(SIZES)]) for i, (n, text) in enumerate(DESIGN)]
SHIPPED_CASES = [(s, t) for s in CMS for t in LENGTHS] if GPU else \
    [(s, (100, 63, 1, 63)[i]) for i, s in enumerate(CMS)]
# chains the design sample does not reach (tests/ops/test_chunk_sequential.py's), under the yaad bias
# (a gate in the bias) and an l2 retention
CHAINS = {
    "deep_silu_bias": "mlp(depth = 3, expand = 2, act = silu, bias = true)",
    "tanh_plain": "mlp(depth = 2, expand = 1.5, act = tanh, residual = false)",
    "relu_bias": "mlp(depth = 2, expand = 2, act = relu, bias = true)",
    "wide_gelu": "mlp(depth = 2, expand = 5, act = gelu)",
    "one_layer_residual_bias": "mlp(depth = 1, residual = true, bias = true)",
}


def _design_program(text, dim):
    text = text.replace("[heads, 3]", f"[heads, {dim}]").replace("param heads = 1", f"param heads = {HEADS}")
    return _compile(text)


@pytest.mark.parametrize("stem,T", SHIPPED_CASES, ids=[f"{s}-T{t}" for s, t in SHIPPED_CASES])
def test_shipped_cms_fast_levels_match_the_reference(stem, T):
    program = _compile(SPECS / f"{stem}.nl", d_model=16, heads=HEADS)
    assert program.plans["cms_fast"].family == "sequential"
    _compare(_only(program.op("cms_fast"), "chunked"), T)


@pytest.mark.parametrize("name,text,dim,T", DESIGN_CASES, ids=[f"{n}-D{d}-T{t}" for n, _, d, t in DESIGN_CASES])
def test_design_space_matches_the_reference(name, text, dim, T):
    _compare(_only(_design_program(text, dim).op("memory"), "chunked"), T)


@pytest.mark.parametrize("read", ["before", "after"])
@pytest.mark.parametrize("chain", CHAINS)
@pytest.mark.parametrize("algorithm", ["gd", "momentum"])
def test_chains_the_design_sample_does_not_reach(algorithm, chain, read):
    """Three layers, layer biases, silu, tanh, relu, no residual, a hidden width (80) over the tile
    (64), one layer with a bias and a residual, with gd and with momentum (each bias's momentum too);
    23 tokens make 5 segments of CHUNK = 5."""
    text = spec_text("mlp2", "yaad", "l2", algorithm, "before").replace("mlp(depth = 2, expand = 1)", CHAINS[chain])
    _compare(_only(_design_program(text.replace("read before", f"read {read}"), 16).op("memory"), "chunked"), 23)


@pytest.mark.parametrize("read", ["before", "after"])
@pytest.mark.parametrize("algorithm", ["gd", "momentum"])
def test_a_soft_threshold_on_a_deep_chain(algorithm, read):
    """Elastic net's soft threshold with a threshold large enough to zero many weights (l1 = 2), on three
    layers with biases (each bias thresholded too) and an 80-wide hidden layer, over 5 segments."""
    text = spec_text("mlp2", "yaad", "elastic", algorithm, "before").replace(
        "mlp(depth = 2, expand = 1)", CHAINS["deep_silu_bias"]).replace("elastic(l1 = 20, l2 = 2)", "elastic(l1 = 2, l2 = 2)")
    _compare(_only(_design_program(text.replace("read before", f"read {read}"), 16).op("memory"), "chunked"), 23)


def test_a_query_stored_where_the_key_is():
    """q and k one tensor (a layer passing `query = key`): the read before the write is the key's
    forward, and the gradient reaching that tensor is the sum of both."""
    op = _only(_compile(SPECS / "cms.nl", d_model=16, heads=HEADS).op("cms_fast"), "chunked")
    g = torch.Generator().manual_seed(4)
    x, v = (torch.nn.functional.normalize(torch.randn(2, 37, HEADS, 16, generator=g, dtype=torch.float64), dim=-1)
            for _ in range(2))
    state = tuple(0.3 * torch.randn(s.shape, generator=g, dtype=torch.float64) for s in op.initial_state(2))
    results = []
    for mode, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        leaves = [t.to(device=DEVICE, dtype=dtype).requires_grad_() for t in (x, v, *state)]
        o, final = op(leaves[0], leaves[0], leaves[1], initial_state=tuple(leaves[2:]), output_final_state=True,
                      mode=mode)
        loss = o.pow(2).sum() + o.sin().sum() + sum(f.pow(2).sum() for f in final)
        results.append([o, *final, *torch.autograd.grad(loss, leaves)])
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got.double().cpu(), want, rtol=RTOL, atol=RTOL * want.abs().max().item())


@pytest.mark.parametrize("read", ["before", "after"])
def test_nested_level_restarts_as_the_reference(read):
    """A level updated every token that restarts from another's period states every 8 tokens (copies
    for the backward's replay every gcd(4, 8) = 4 tokens), composed after its source in mode='triton':
    T = 37 restarts it 4 times."""
    program = _compile(SEQUENTIAL.replace("READ", read).replace("gd(lr = 0.2)", "gd(lr = 0.5)"), d_model=16,
                       chunk=4, lr_mid=0.3)
    assert [program.plans[n].family for n in ("slow", "mid")] == ["period", "sequential"]
    _nested_case(program, "slow", "mid", 37)


def test_shipped_nested_cms_fast_restarts_as_the_reference():
    """cms_nested's cms_fast restarting from cms_mid's period states every 4 tokens (chunk 4)."""
    program = _compile(SPECS / "cms_nested.nl", d_model=16, heads=HEADS, chunk=4)
    assert triton_refusal(program.rules["cms_fast"], program.plans["cms_fast"], "chunked") is None
    _nested_case(program, "cms_mid", "cms_fast", 37)


def test_bf16_inputs_with_an_fp32_state():
    _compare(_only(_compile(SPECS / "hope.nl", d_model=16, heads=HEADS).op("cms_fast"), "chunked"), 63,
             dtype=torch.bfloat16, rtol=RTOL_BF16)


def test_every_sequential_point_has_triton_kernels():
    """Every MLP point of the sequential family gets these kernels, every bias, retention (elastic net
    too) and algorithm (gd, momentum) among them; every matrix point is refused for its fused recurrent
    kernels, which it has."""
    assert len(DESIGN) >= 256
    for name, _, rules, p in SEQUENTIAL_POINTS:
        why = unsupported(rules, p)
        if name.startswith("matrix"):
            assert "fused recurrent kernels" in why and triton_recurrent.unsupported(rules) is None, name
        else:
            assert why is None, f"{name}: {why}"
    assert {tuple(n.split("-")[:4]) for n in dict(DESIGN)} == {
        (m, b, r, a) for m in ("mlp1", "mlp2") for b in ("dot", "l2", "lp3", "l1", "huber", "huber_norm", "yaad", "robust")
        for r in ("none", "decay", "l2", "elastic") for a in ("gd", "momentum")}


def test_per_channel_bias_gates_are_refused_by_name():
    text = spec_text("mlp2", "yaad", "none", "gd").replace("gate delta[heads]", "gate delta[heads, 3]")
    rules = derive(check(text)[0])["memory"]
    assert unsupported(rules, plan(rules, 5)) == "the bias gradient reads per-channel gate(s) delta: not in the kernels"
