"""Chunked Triton kernels of the mapped family (codegen/triton_chunk_mapped.py: delta gradient descent
with plain gradient steps, each layer a gated delta rule run by the delta family's generated kernels,
beside PyTorch vjps) against the reference loop: outputs, final states and the gradients of every
input (q, k, v, gates, initial state). Over the shipped dgd levels (Hope's memory; self-modifying
Titans' memory and the projection memories that the mapped form runs), every mapped design point
they take (matrix, depth-1 and depth-2 MLP memories under every bias), layer biases, gated MLPs,
a constant decay, reads before and after the write, gradient chunks below, at and above the kernels'
64-token chunk; for T = 1, 63, 100 and head dims 16, 32.

Each case runs the op in mode='triton' with these kernels alone (a matrix memory's fused recurrent
kernels, which mode='triton' runs below CHUNK tokens, are test_fused_recurrent's). Precision as in
test_fused_recurrent: fp32 against the float64 reference on the same inputs, relative error <= 1e-4;
bf16 inputs (fp32 states) 2e-2.

On a CUDA device every case runs. On the CPU (Triton's interpreter, slow) each shipped level runs one
(T, chunk) and every design point one (head dim, T, chunk), in turn."""
from __future__ import annotations

import pytest
import torch

from nlc.codegen import torch_chunk_mapped_dgd as dgd
from nlc.codegen.triton_chunk_mapped import unsupported
from nlc.derive.rules import derive
from nlc.lower import check
from nlc.plan import plan

from ..ops.design_space import chunked_points, spec_text
from .test_fused_recurrent import DEVICE, GPU, HEADS, RTOL_BF16, SPECS, _compare, _compile, _only

pytest.importorskip("triton", reason="triton is not installed (pip install 'nlc[triton]')")

LENGTHS, DIMS = (1, 63, 100), (16, 32)
CHUNKS = (2, 5, 16, 80)  # gradient chunks: below the kernels' 16-token chunk, at it, above their 64
MEMORIES = ("matrix", "mlp1", "mlp2")


def _rules_and_plan(text):
    rules = derive(check(text)[0])["memory"]
    return rules, plan(rules, 5)


def _mapped():
    """(id, spec text, whether dgd's closed form applies) of every mapped-family design point."""
    out = []
    for name, text in chunked_points(MEMORIES, ("chunk",)):
        rules, p = _rules_and_plan(text)
        if p.family == "mapped":
            out.append((name, text, dgd.applies(rules)))
    return out


MAPPED = _mapped()
DESIGN = [(n, text) for n, text, closed in MAPPED if closed]
SIZES = [(d, t, c) for d in DIMS for t in LENGTHS for c in CHUNKS]
DESIGN_CASES = [(n, text, d, t, c) for n, text in DESIGN for d, t, c in SIZES] if GPU else \
    [(n, text, *SIZES[(7 * i + 3) % len(SIZES)]) for i, (n, text) in enumerate(DESIGN)]
SHIPPED = [("hope", "memory")] + [("self_mod_titans", lv) for lv in ("mem_k", "mem_eta", "mem_alpha", "memory")]
SHIPPED_CASES = [(s, lv, t, c) for s, lv in SHIPPED for t in LENGTHS for c in (4, 16)] if GPU else \
    [(s, lv, (100, 63)[i % 2], (4, 16)[i % 2]) for i, (s, lv) in enumerate(SHIPPED)]
# dgd beside the design sample: (memory, retention, read), as tests/ops/test_chunk_mapped.py's
VARIANTS = [
    ("mlp(depth = 2, expand = 1, bias = true)", "dgd(decay = alpha)", "after"),
    ("mlp(depth = 2, expand = 2, gated = true, bias = true)", "dgd(decay = alpha)", "before"),
    ("mlp(depth = 3, expand = 1, act = gelu, residual = false)", "dgd(decay = 0.9)", "after"),
    ("mlp(depth = 2, expand = 2, act = gelu, residual = true, bias = true)", "dgd(decay = alpha)", "before"),
]


def _design_program(text, dim, chunk):
    text = text.replace("[heads, 3]", f"[heads, {dim}]").replace("param heads = 1", f"param heads = {HEADS}")
    return _compile(text.replace("chunk_start(2)", f"chunk_start({chunk})"))


def _shipped(stem, chunk):
    return _compile(SPECS / f"{stem}.nl", d_model=16, heads=HEADS, chunk=chunk)


@pytest.mark.parametrize("stem,level,T,chunk", SHIPPED_CASES,
                         ids=[f"{s}-{lv}-T{t}-C{c}" for s, lv, t, c in SHIPPED_CASES])
def test_shipped_dgd_levels_match_the_reference(stem, level, T, chunk):
    _compare(_only(_shipped(stem, chunk).op(level), "chunked"), T)


@pytest.mark.parametrize("name,text,dim,T,chunk", DESIGN_CASES,
                         ids=[f"{n}-D{d}-T{t}-C{c}" for n, _, d, t, c in DESIGN_CASES])
def test_design_space_matches_the_reference(name, text, dim, T, chunk):
    _compare(_only(_design_program(text, dim, chunk).op("memory"), "chunked"), T)


@pytest.mark.parametrize("memory,retention,read", VARIANTS, ids=[f"{m}-{r}-{w}" for m, r, w in VARIANTS])
def test_biases_gates_residuals_and_a_constant_decay(memory, retention, read):
    """Layer biases (their scan in PyTorch), a gated MLP (two layers on one input), a residual, a
    constant decay (the gate kernel prints it beside the learning rate's gate), reads before and after."""
    text = spec_text("mlp2", "huber", "dgd", "gd", "chunk").replace("mlp(depth = 2, expand = 1)", memory)
    text = text.replace("dgd(decay = alpha)", retention).replace("chunk_start(2)", f"chunk_start(2)\n  read {read}")
    _compare(_only(_design_program(text, 16, 6).op("memory"), "chunked"), 63)


def test_keys_over_256_wide():
    """An MLP whose second layer reads 512 hidden channels (expand 8 at head dim 64): its kernels take
    32 value channels per block (BV_MAX // 2, so that an H100 block's shared memory holds them), two
    blocks over its 64 value channels."""
    text = spec_text("mlp2", "l2", "dgd", "gd", "chunk").replace("expand = 1", "expand = 8")
    _compare(_only(_design_program(text, 64, 16).op("memory"), "chunked"), 20)


def test_bf16_inputs_with_an_fp32_state():
    _compare(_only(_shipped("hope", 8).op("memory"), "chunked"), 63, dtype=torch.bfloat16, rtol=RTOL_BF16)


def test_every_dgd_point_has_kernels():
    """Every mapped point with dgd and gd steps gets these kernels (every memory and bias among them);
    mode='triton' runs them at every length for an MLP memory. (The other mapped points are
    test_chunk_mapped_scan_kernels'.)"""
    assert len(DESIGN) >= 24 and len(MAPPED) > len(DESIGN)
    assert {tuple(n.split("-")[:2]) for n, _ in DESIGN} == {
        (m, b) for m in MEMORIES for b in ("dot", "l2", "lp3", "l1", "huber", "huber_norm", "yaad", "robust")}
    for name, text in DESIGN:
        assert unsupported(*_rules_and_plan(text)) is None, name
    op = _shipped("hope", 16).op("memory")
    for T in (1, 48, 100):
        assert op.pick("triton", T, torch.device(DEVICE)).__module__.endswith("level_memory_triton_chunk")
