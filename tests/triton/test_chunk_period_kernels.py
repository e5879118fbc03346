"""Chunked Triton kernels of the period family (codegen/triton_chunk_period.py: Triton coefficient and
bias kernels beside PyTorch vjps and batched reads of the committed states) against the reference
loop: outputs, final states and the gradients of every input (q, k, v, gates, initial state). Over
the shipped CMS levels that update every `chunk` and `chunk_slow` tokens (cms, cms_independent, hope,
hope_attention), every period-family design point (matrix, depth-1 and depth-2 MLP memories; gradients
at chunk starts, or free of the state), periods equal to, a multiple of and a divisor of the gradient
chunk, reads before and after the write; for T = 1, 63, 100 and head dims 16, 32; and nested levels
(cms_nested's, and a level with momentum restarting from another's period states), composed as
tests/architectures/test_nested_cms.py composes them.

Each case runs the op in mode='triton' with these kernels alone (a matrix memory's fused recurrent
kernels, which mode='triton' runs below one unit, are test_fused_recurrent's). Precision as in
test_fused_recurrent: fp32 against the float64 reference on the same inputs, relative error <= 1e-4;
bf16 inputs (fp32 states) 2e-2.

On a CUDA device every case runs. On the CPU (Triton's interpreter, slow) each shipped level runs one
(T, chunk) and every design point one (head dim, T, period, chunk), in turn."""
from __future__ import annotations

import pytest
import torch

from nlc.codegen.triton_chunk_period import unsupported
from nlc.derive.rules import derive
from nlc.lower import check
from nlc.plan import plan
from nlc.program import triton_refusal

from ..architectures.test_nested_cms import NESTED
from ..ops.design_space import chunked_points, spec_text
from .test_fused_recurrent import DEVICE, GPU, HEADS, RTOL_BF16, SPECS, _compare, _compile, _only

pytest.importorskip("triton", reason="triton is not installed (pip install 'nlc[triton]')")

LENGTHS, DIMS = (1, 63, 100), (16, 32)
PERIODS = ((5, 5), (12, 4), (3, 6), (16, 16))  # (update every P, gradient chunk C): equal, P = 3 C, C = 2 P
CMS = ("cms", "cms_independent", "hope", "hope_attention")  # shipped specs with CMS levels


def _period_plan(text):
    rules = derive(check(text)[0])["memory"]
    return rules, plan(rules, 5)


def _design():
    """(id, spec text) of every design point whose plan is the period family (all of them take these
    kernels: `test_every_period_point_has_kernels` says so)."""
    return [(name, text) for name, text in chunked_points(("matrix", "mlp1", "mlp2"), ("period", "period_chunk"))
            if _period_plan(text)[1].family == "period"]


DESIGN = _design()
SIZES = [(d, t, p) for d in DIMS for t in LENGTHS for p in PERIODS]
DESIGN_CASES = [(n, text, d, t, p) for n, text in DESIGN for d, t, p in SIZES] if GPU else \
    [(n, text, *SIZES[(5 * i + 2) % len(SIZES)]) for i, (n, text) in enumerate(DESIGN)]
SHIPPED = [(s, lv) for s in CMS for lv in ("cms_mid", "cms_slow")]
SHIPPED_CASES = [(s, lv, t, c) for s, lv in SHIPPED for t in LENGTHS for c in (4, 16)] if GPU else \
    [(s, lv, (100, 63)[i % 2], (4, 16)[i % 2]) for i, (s, lv) in enumerate(SHIPPED)]


def _design_program(text, dim, period, chunk):
    text = text.replace("[heads, 3]", f"[heads, {dim}]").replace("param heads = 1", f"param heads = {HEADS}")
    return _compile(text.replace("update every 2", f"update every {period}")
                    .replace("chunk_start(2)", f"chunk_start({chunk})"))


def _cms(stem, chunk):
    """A shipped CMS spec with its mid level updated every `chunk` tokens and its slow level every
    3 `chunk` (64 tokens in the spec: T = 100 would commit once), at d_model = 16."""
    return _compile(SPECS / f"{stem}.nl", d_model=16, heads=HEADS, chunk=chunk, chunk_slow=3 * chunk)


@pytest.mark.parametrize("stem,level,T,chunk", SHIPPED_CASES,
                         ids=[f"{s}-{lv}-T{t}-C{c}" for s, lv, t, c in SHIPPED_CASES])
def test_shipped_cms_levels_match_the_reference(stem, level, T, chunk):
    _compare(_only(_cms(stem, chunk).op(level), "chunked"), T)


@pytest.mark.parametrize("name,text,dim,T,sizes", DESIGN_CASES,
                         ids=[f"{n}-D{d}-T{t}-P{p}C{c}" for n, _, d, t, (p, c) in DESIGN_CASES])
def test_design_space_matches_the_reference(name, text, dim, T, sizes):
    _compare(_only(_design_program(text, dim, *sizes).op("memory"), "chunked"), T)


@pytest.mark.parametrize("period,chunk", [(12, 4), (3, 6)], ids=["P-3C", "C-2P"])
def test_gated_mlp_with_biases_momentum_and_reads_before_the_write(period, chunk):
    """A gated MLP with biases (three layers, two on the same input), ||e|| in the bias, momentum under
    a decay; reads before the write (a token that ends a period reads the state before its commit)."""
    text = spec_text("mlp2", "huber_norm", "decay", "momentum", "period_chunk")
    text = text.replace("mlp(depth = 2, expand = 1)", "mlp(depth = 2, expand = 2, gated = true, bias = true)")
    text = text.replace("chunk_start(2)", "chunk_start(2)\n  read before")
    _compare(_only(_design_program(text, 16, period, chunk).op("memory"), "chunked"), 63)


def test_bf16_inputs_with_an_fp32_state():
    _compare(_only(_cms("hope", 8).op("cms_mid"), "chunked"), 63, dtype=torch.bfloat16, rtol=RTOL_BF16)


def test_every_period_point_has_kernels_and_triton_mode_runs_them():
    """Every period-family design point gets these kernels (every memory and schedule among them), and
    mode='triton' runs them from one unit on (an MLP level: at every length)."""
    assert len(DESIGN) >= 150
    assert {tuple(n.split("-")[::4]) for n, _ in DESIGN} == {
        (m, s) for m in ("matrix", "mlp1", "mlp2") for s in ("period_chunk",)} | {("matrix", "period")}
    for name, text in DESIGN:
        assert unsupported(*_period_plan(text)) is None, name
    op = _cms("cms", 16).op("cms_slow")
    for T in (1, 48, 100):
        assert op.pick("triton", T, torch.device(DEVICE)).__module__.endswith("level_cms_slow_triton_chunk")


def _nested(program, slow, mid, mode):
    """slow's op, then mid's on slow's output, starting from slow's initial state and restarting from
    slow's period states (as tests/architectures/test_nested_cms.py composes them)."""
    slow, mid = program.op(slow), program.op(mid)

    def run(xs, vs, vm, *state):
        o, _, periods = slow(xs, xs, vs, initial_state=state[:2], output_period_states=True, mode=mode)
        return mid(o, o, vm, initial_state=state, restart_states=periods, output_final_state=True, mode=mode)
    return run


def _nested_case(program, slow, mid, T):
    """[o, *final states, *gradients] of the composed ops in mode='triton' (fp32) against the float64
    reference on the same inputs, each within RTOL of its largest entry."""
    g = torch.Generator().manual_seed(T)
    lv = program.op(mid).level
    xs, vs, vm = (torch.nn.functional.normalize(torch.randn(1, T, lv.heads, lv.d_key, generator=g,
                                                             dtype=torch.float64), dim=-1) for _ in range(3))
    state = tuple(0.3 * torch.randn(s.shape, generator=g, dtype=torch.float64)
                  for s in program.op(mid).initial_state(1))
    results = []
    for mode, dtype in (("reference", torch.float64), ("triton", torch.float32)):
        leaves = [x.to(device=DEVICE, dtype=dtype).requires_grad_() for x in (xs, vs, vm, *state)]
        o, final = _nested(program, slow, mid, mode)(*leaves)
        loss = o.pow(2).sum() + sum(f.pow(2).sum() for f in final)
        results.append([o, *final, *torch.autograd.grad(loss, leaves)])
    for want, got in zip(*results, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("grad", [2, 8], ids=["C-2", "C-8"])
def test_nested_levels_restart_and_export_as_the_reference(grad):
    """A level that restarts from another's period states (`init from`), with momentum (buffers zeroed
    at each restart), and the level it restarts from exporting them (`output_period_states`): slow
    commits every 8 tokens, mid every 4 with gradient chunks of 2 or 8; T = 37 restarts mid 4 times."""
    program = _compile(NESTED.replace("gd(lr = 0.2)", "gd(lr = 0.5)"), d_model=16, grad=grad, lr_mid=0.5)
    for level in ("slow", "mid"):
        assert f"level_{level}_triton_chunk.py" in program.sources
    _nested_case(program, "slow", "mid", 37)


def test_shipped_nested_cms_levels_match_the_reference():
    """cms_nested's slow and mid levels (gd, units of 4 and 16 tokens): every kernel of both, composed."""
    program = _compile(SPECS / "cms_nested.nl", d_model=16, heads=HEADS, chunk=4)
    for level in ("cms_mid", "cms_slow"):
        assert triton_refusal(program.rules[level], program.plans[level], "chunked") is None
    _nested_case(program, "cms_slow", "cms_mid", 37)
