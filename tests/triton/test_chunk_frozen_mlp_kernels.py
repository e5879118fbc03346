"""Chunked Triton kernels of the frozen-gradient family with an MLP memory (codegen/
triton_chunk_frozen_mlp.py: Triton scans, bias map and dual-form reads beside PyTorch matmuls) against
the reference loop: outputs, final states and the gradients of every input (q, k, v, gates, initial
state). Over the shipped Titans level (depth 2, expand 4, residual, momentum, decay), the other
shipped levels it takes (biases and a layer norm in ttt_mlp, Huber in yaad, no residual in
deep_transformer; Moneta's lq map and Memora's KL lag token at chunk boundaries), OmegaNet (omega
windows narrower than, as wide as and wider than the chunk, and a sequence shorter than the window), a
gated MLP with a norm-type bias, reads before the write, every frozen design-space point with a depth-2
MLP (omega windows included) and every one with a linear memory and a step between chunks (an lq map,
a lag token: this file's loop runs it); for T = 1, 63, 100, head dims 16 and 32, gradient chunks that
divide neither 63 nor 100.

Each case runs the op in mode='triton' with these kernels alone (an MLP has no fused recurrent kernels;
a matrix memory's, which mode='triton' runs below one chunk, are test_fused_recurrent's). Precision as in test_fused_recurrent: fp32 against the float64 reference on the same
inputs, relative error <= 1e-4; bf16 inputs (fp32 states) 2e-2.

On a CUDA device every case runs. On the CPU (Triton's interpreter, slow) Titans runs three (head
dim, T, chunk), OmegaNet four (head dim, T, chunk, window), the other shipped levels one each, and
the design space a fixed sample in which every bias and every (retention, algorithm) appears, one
(head dim, T, chunk) each."""
from __future__ import annotations

import torch
import pytest

from ..ops.design_space import BIASES, chunked_points, spec_text
from .test_chunk_frozen_kernels import (OMEGA_SIZES, _compile, _design_program, _kernels_take, _omeganet,
                                        steps_between_chunks)
from .test_fused_recurrent import DEVICE, GPU, HEADS, RTOL_BF16, SPECS, _compare, _inputs, _only, _stable_inputs

pytest.importorskip("triton", reason="triton is not installed (pip install 'nlc[triton]')")

LENGTHS, DIMS, CHUNKS = (1, 63, 100), (16, 32), (5, 16, 24)
CPU_SIZES = ((16, 100, 16), (32, 63, 5), (16, 1, 24))  # (head dim, T, chunk)
SHIPPED = {"ttt_mlp": "d_head", "yaad": "d_head", "deep_transformer": "d_head", "moneta": "d_head",
           "memora": "d_head"}  # spec -> its head-dim param


def _design():
    """(id, spec text) of every frozen-family design point that these kernels take: those with a depth-2
    MLP memory, and those with a linear memory and a step between chunks."""
    deep = [(name, text) for name, text in chunked_points(("mlp2",), ("chunk",)) if _kernels_take(text)]
    return deep + [(name, text) for name, text in chunked_points(("matrix", "mlp1"), ("chunk",))
                   if _kernels_take(text) and steps_between_chunks(text)]


def _sample(design):
    """A fixed sample: each point that brings a bias, a (retention, algorithm) or a (memory, retention)
    not yet seen."""
    seen, out = set(), []
    for name, text in design:
        memory, bias, retention, algorithm, _ = name.split("-")
        keys = {("bias", bias), ("rule", retention, algorithm), ("memory", memory, retention)}
        if not keys <= seen:
            seen |= keys
            out.append((name, text))
    return out


DESIGN = _design()
CPU_DESIGN = _sample(DESIGN)
TITANS_CASES = [(d, t, c) for d in DIMS for t in LENGTHS for c in CHUNKS] if GPU else list(CPU_SIZES)
SHIPPED_CASES = [(s, d, t, c) for s in SHIPPED for d in DIMS for t, c in ((63, 5), (100, 16))] if GPU else \
    [(s, *CPU_SIZES[i % 3]) for i, s in enumerate(SHIPPED)]
OMEGA_CASES = [(d, t, c, w) for d in DIMS for t in LENGTHS for _, _, c, w in OMEGA_SIZES[:3]] + \
    [(d, 3, 5, 7) for d in DIMS] if GPU else [(min(d, DIMS[-1]), t, c, w) for d, t, c, w in OMEGA_SIZES]
DESIGN_CASES = [(n, text, d, t, c) for n, text in DESIGN for d in DIMS for t, c in ((100, 24), (63, 5))] \
    if GPU else [(n, text, *CPU_SIZES[i % 3]) for i, (n, text) in enumerate(CPU_DESIGN)]


def _titans(dim, chunk):
    return _compile(SPECS / "titans.nl", heads=HEADS, d_head=dim, chunk=chunk)


@pytest.mark.parametrize("dim,T,chunk", TITANS_CASES, ids=[f"D{d}-T{t}-C{c}" for d, t, c in TITANS_CASES])
def test_titans_mlp_memory_matches_the_reference(dim, T, chunk):
    _compare(_titans(dim, chunk).op("memory"), T)


@pytest.mark.parametrize("stem,dim,T,chunk", SHIPPED_CASES,
                         ids=[f"{s}-D{d}-T{t}-C{c}" for s, d, t, c in SHIPPED_CASES])
def test_shipped_mlp_levels_match_the_reference(stem, dim, T, chunk):
    text = (SPECS / f"{stem}.nl").read_text()
    assert "chunk_start(chunk)" in text, stem  # the gradient chunk is the `chunk` parameter
    program = _compile(SPECS / f"{stem}.nl", heads=HEADS, chunk=chunk, **{SHIPPED[stem]: dim})
    op = program.op("memory")
    _compare(op, T, inputs=_slow_decay(op, T) if stem == "moneta" else None)


def _slow_decay(op, T):
    """Moneta's test inputs with its decay alpha in (0.98, 0.998), as its learned offset of 4 starts it
    (sigmoid(4) = 0.982): its map reads A / ||A||_4^2 at each chunk start, so the test range's faster
    decay (0.6-0.95 per token) shrinks A over a chunk until the reads reach 1e16."""
    q, k, v, gates, state = _inputs(op, T, 0, 1.0)
    return q, k, v, {**gates, "alpha": 0.95 + 0.05 * gates["alpha"]}, state


@pytest.mark.parametrize("dim,T,chunk,window", OMEGA_CASES,
                         ids=[f"D{d}-T{t}-C{c}-W{w}" for d, t, c, w in OMEGA_CASES])
def test_omeganet_mlp_memory_matches_the_reference(dim, T, chunk, window):
    """Omega windows: each chunk's layer gradients a_j, δ_j are those of its window's rows at its
    start weights, the WINDOW - 1 tokens before it among them."""
    _compare(_omeganet(dim, chunk, window, depth=2).op("memory"), T)


@pytest.mark.parametrize("name,text,dim,T,chunk", DESIGN_CASES,
                         ids=[f"{n}-D{d}-T{t}-C{c}" for n, _, d, t, c in DESIGN_CASES])
def test_design_space_matches_the_reference(name, text, dim, T, chunk):
    _compare(_only(_design_program(text, dim, chunk).op("memory"), "chunked"), T)


def test_gated_mlp_with_biases_reading_before_the_write():
    """A gated MLP with biases (three layers, two on the same input), ||e|| in the bias, rows of the
    coefficients shifted by one token (read before)."""
    text = spec_text("mlp2", "huber_norm", "decay", "momentum", "chunk")
    text = text.replace("mlp(depth = 2, expand = 1)", "mlp(depth = 2, expand = 2, gated = true, bias = true)")
    text = text.replace("chunk_start(2)", "chunk_start(2)\n  read before")
    _compare(_design_program(text, 16, 5).op("memory"), 63)


def test_omega_window_of_a_gated_mlp_with_a_bias_gate_reading_before_the_write():
    """A window wider than the chunk over a gated MLP with biases, its gamma a gate the bias reads too
    (through the window's tail tokens), momentum, rows shifted by one token."""
    text = spec_text("mlp2", "omega", "decay", "momentum", "chunk")
    text = text.replace("mlp(depth = 2, expand = 1)", "mlp(depth = 2, expand = 2, gated = true, bias = true)")
    text = text.replace(BIASES["omega"], "omega(window = 7, gamma = delta) of huber(delta = delta, form = mixture)")
    text = text.replace("chunk_start(2)", "chunk_start(2)\n  read before")
    _compare(_design_program(text, 16, 5).op("memory"), 63)


@pytest.mark.parametrize("retention,algorithm", [("kl_chunk", "momentum"), ("lq_chunk", "momentum"),
                                                 ("kl_chunk", "gd")])
def test_steps_between_chunks_on_a_gated_mlp_with_biases_reading_before_the_write(retention, algorithm):
    """KL's lag token (its read before its step: the state entering the chunk, put back in the chunk's
    first row) and the lq map at chunk boundaries, on a gated MLP with biases, ||e|| in the bias."""
    text = spec_text("mlp2", "huber_norm", retention, algorithm, "chunk")
    text = text.replace("mlp(depth = 2, expand = 1)", "mlp(depth = 2, expand = 2, gated = true, bias = true)")
    text = text.replace("chunk_start(2)", "chunk_start(2)\n  read before")
    _compare(_design_program(text, 16, 5).op("memory"), 63)


def test_lq_map_at_chunk_boundaries_scales_a_layer_bias_by_its_own_slope():
    """Under an lq map the reads of r A_t scale a layer's weight and its bias by their own slopes r_W,
    r_β: with the bias accumulator started small its slope is about 100 times r_W's, so a read that
    scaled the bias's steps by r_W (or by 1) would miss by far more than round-off."""
    text = spec_text("mlp1", "l2", "lq_chunk", "gd", "chunk").replace("mlp(depth = 1)", "mlp(depth = 1, bias = true)")
    op = _design_program(text, 16, 5).op("memory")
    assert op.state_names == ("A_W1", "A_b1")
    q, k, v, gates, (weight, bias) = _stable_inputs(op, 63, 0)
    _compare(op, 63, inputs=(q, k, v, gates, (weight, 0.1 * bias)))


def test_bf16_inputs_with_an_fp32_state():
    _compare(_titans(32, 16).op("memory"), 63, dtype=torch.bfloat16, rtol=RTOL_BF16)


def test_every_mlp_point_has_kernels_and_triton_mode_runs_them():
    """Every frozen design point with a depth-2 MLP gets the MLP kernels; such a level has no fused
    recurrent ones, so mode='triton' runs them at every length."""
    assert len(DESIGN) >= 40
    assert {n.split("-")[1] for n, _ in CPU_DESIGN} == {n.split("-")[1] for n, _ in DESIGN}
    assert any("-omega-" in n for n, _ in DESIGN)  # omega windows
    for memory in ("matrix", "mlp1", "mlp2"):  # steps between chunks, whatever the memory
        assert {n.split("-")[2] for n, _ in DESIGN if n.startswith(memory)} >= {"lq_chunk", "kl_chunk"}, memory
    for name, text in DESIGN:
        assert "def dual_read_fwd_kernel(" in _compile(text).sources["level_memory_triton_chunk.py"], name
    op = _titans(16, 16).op("memory")
    for T in (1, 16, 100):
        assert op.pick("triton", T, torch.device(DEVICE)).__module__.endswith("level_memory_triton_chunk")
