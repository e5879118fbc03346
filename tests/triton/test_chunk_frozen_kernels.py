"""Chunked Triton kernels of the frozen-gradient family (a linear memory: a matrix, or an MLP of depth
1 with nothing around its product) against the reference loop: outputs, final states and the
gradients of every input (q, k, v, gates, initial state), over the shipped Titans and OmegaNet levels
with a matrix memory (`depth = 1`) and every design-space point the kernels take (omega windows
included), for T = 1, 63, 100 and head dims 16, 32, 64, with gradient chunks that divide neither 63 nor
100, and omega windows narrower than, as wide as and wider than the chunk (reaching back three chunks),
also over a sequence shorter than the window.

The gradient chunk is part of the rule (`gradient chunk_start(C)`), so each case compiles its own C
(the reference changes with it). Each case runs the op in mode='triton' with these kernels alone
(`_only`: a matrix memory's fused recurrent kernels, which mode='triton' runs below one chunk, are
test_fused_recurrent's). Precision as in test_fused_recurrent: fp32 kernels against the float64
reference on the same inputs, relative error <= 1e-4; bf16 inputs (fp32 states) 2e-2.

On a CUDA device every case runs. On the CPU (Triton's interpreter, slow) Titans runs three (head dim,
T, C), OmegaNet four (head dim, T, C, window) and the design space a fixed sample, one (head dim, T, C)
each."""
from __future__ import annotations

import functools
import re

import pytest
import torch

import nlc
from nlc.codegen.triton_chunk_frozen import unsupported
from nlc.derive.rules import derive
from nlc.lower import check
from nlc.plan import plan

from ..ops.design_space import BIASES, chunked_points, spec_text
from .test_fused_recurrent import DEVICE, GPU, HEADS, RTOL_BF16, SPECS, _compare, _only

pytest.importorskip("triton", reason="triton is not installed (pip install 'nlc[triton]')")

LENGTHS, DIMS, CHUNKS = (1, 63, 100), (16, 32, 64), (5, 16, 24)


def _kernels_take(text):
    """Whether the chunked frozen kernels take a design point (its plan is frozen and they run it)."""
    rules = derive(check(text)[0])["memory"]
    p = plan(rules, 5)
    return p.family == "frozen" and unsupported(rules, p) is None


def steps_between_chunks(text):
    """Whether a design point's level takes a step between chunks that is not linear in the state (an
    lq map at chunk boundaries, KL's lag token): a linear memory then runs the MLP file's kernels."""
    lv = check(text)[0].level("memory")
    return lv.maps_at_chunks or lv.lag_token


def _design():
    """(id, spec text) of every frozen-family design point with a linear memory that these kernels take
    (those with steps between chunks are in test_chunk_frozen_mlp_kernels)."""
    return [(name, text) for name, text in chunked_points(("matrix", "mlp1"), ("chunk",))
            if _kernels_take(text) and not steps_between_chunks(text)]


def _sample(design):
    """A fixed sample in which every memory, (bias, algorithm) and (retention, algorithm) appears."""
    seen, out = set(), []
    for name, text in design:
        memory, bias, retention, algorithm, _ = name.split("-")
        new = {("memory", memory), ("bias", bias, algorithm), ("retention", retention, algorithm)} - seen
        if new:
            seen |= new
            out.append((name, text))
    return out


DESIGN = _design()
CPU_DESIGN = _sample(DESIGN)
CPU_SIZES = ((16, 100, 16), (32, 63, 5), (64, 1, 24), (16, 63, 2))  # (head dim, T, chunk)
SHIPPED_CASES = [(d, t, c) for d in DIMS for t in LENGTHS for c in CHUNKS] if GPU else list(CPU_SIZES[:3])
# (head dim, T, chunk, window): a window narrower than, as wide as and wider than the chunk (its rows
# reach three chunks back), a sequence shorter than the window, and a window of 64 (128 window rows
# by 128 key features: 32 value channels per block, two blocks at head dim 64)
OMEGA_SIZES = ((16, 100, 16, 4), (32, 63, 5, 5), (16, 63, 2, 7), (64, 3, 5, 7), (64, 20, 5, 64))
OMEGA_CASES = [(d, t, c, w) for d in DIMS for t in LENGTHS for _, _, c, w in OMEGA_SIZES[:3]] + \
    [(d, 3, 5, 7) for d in DIMS] + [(d, 100, 16, 64) for d in DIMS] if GPU else list(OMEGA_SIZES)
DESIGN_CASES = [(n, text, d, 100, 24) for n, text in DESIGN for d in DIMS] + \
    [(n, text, 16, *CPU_SIZES[1 + i % 3][1:]) for i, (n, text) in enumerate(DESIGN)] \
    if GPU else [(n, text, *CPU_SIZES[i % 4]) for i, (n, text) in enumerate(CPU_DESIGN)]


@functools.lru_cache(maxsize=None)
def _compile(spec, **params):
    return nlc.compile(spec, **params)


def _titans(dim, chunk):
    """The shipped Titans spec with a matrix memory (depth 1: M(x) = x W)."""
    return _compile(SPECS / "titans.nl", heads=HEADS, d_head=dim, depth=1, chunk=chunk)


def _omeganet(dim, chunk, window, depth):
    """The shipped OmegaNet spec (`depth = 1`: a matrix memory) at value head dim `dim` (its keys: 73
    polynomial features)."""
    return _compile(SPECS / "omeganet.nl", heads=HEADS, d_head=dim, depth=depth, chunk=chunk, window=window)


def _design_program(text, dim, chunk):
    text = re.sub(r"\[heads, 3\]", f"[heads, {dim}]", text).replace("param heads = 1", f"param heads = {HEADS}")
    return _compile(text.replace("chunk_start(2)", f"chunk_start({chunk})"))


@pytest.mark.parametrize("dim,T,chunk", SHIPPED_CASES, ids=[f"D{d}-T{t}-C{c}" for d, t, c in SHIPPED_CASES])
def test_titans_matrix_memory_matches_the_reference(dim, T, chunk):
    _compare(_only(_titans(dim, chunk).op("memory"), "chunked"), T)


@pytest.mark.parametrize("dim,T,chunk,window", OMEGA_CASES,
                         ids=[f"D{d}-T{t}-C{c}-W{w}" for d, t, c, w in OMEGA_CASES])
def test_omeganet_matrix_memory_matches_the_reference(dim, T, chunk, window):
    """Omega windows: each chunk's gradients are those of its window's rows, the WINDOW - 1 tokens
    before it among them, all at its start state; gamma's gradient comes back through Ω."""
    _compare(_only(_omeganet(dim, chunk, window, depth=1).op("memory"), "chunked"), T)


@pytest.mark.parametrize("name,text,dim,T,chunk", DESIGN_CASES,
                         ids=[f"{n}-D{d}-T{t}-C{c}" for n, _, d, t, c in DESIGN_CASES])
def test_design_space_matches_the_reference(name, text, dim, T, chunk):
    _compare(_only(_design_program(text, dim, chunk).op("memory"), "chunked"), T)


@pytest.mark.parametrize("bias,retention,algorithm", [("huber_norm", "decay", "momentum"), ("l1", "l2", "gd")])
def test_reads_before_the_write_match_the_reference(bias, retention, algorithm):
    """`read before` (no design point combines it with chunk-start gradients): rows shifted by one."""
    text = spec_text("matrix", bias, retention, algorithm, "chunk")
    text = text.replace("chunk_start(2)", "chunk_start(2)\n  read before")
    _compare(_only(_design_program(text, 16, 5).op("memory"), "chunked"), 63)


@pytest.mark.parametrize("bias,algorithm,read", [
    ("omega(window = 6, gamma = alpha) of huber(delta = alpha, form = mixture)", "momentum", "before"),
    ("omega(window = 3, gamma = 0.5) of huber(delta = 0.5, form = norm)", "gd", "after")],
    ids=["gate-in-gamma-bias-decay-momentum-before", "constant-gamma-norm-bias"])
def test_omega_windows_with_gates_norms_and_reads_before(bias, algorithm, read):
    """A gate read by gamma, by the bias (at the window's rows) and by the decay (at the chunk's), and
    momentum with rows shifted by one token; a constant gamma under a bias that reads ||e||."""
    text = spec_text("matrix", "omega", "decay", algorithm, "chunk").replace(BIASES["omega"], bias)
    text = text.replace("chunk_start(2)", f"chunk_start(2)\n  read {read}")
    _compare(_only(_design_program(text, 16, 5).op("memory"), "chunked"), 63)


def test_bf16_inputs_with_an_fp32_state():
    _compare(_only(_titans(32, 16).op("memory"), "chunked"), 63, dtype=torch.bfloat16, rtol=RTOL_BF16)


def test_every_linear_point_has_kernels_and_other_plans_say_why():
    """Every frozen design point with a linear memory gets these kernels (an MLP memory gets those of
    test_chunk_frozen_mlp_kernels); a level of another plan family gets none and says why."""
    assert len(DESIGN) >= 90
    assert {n.split("-")[1] for n, _ in CPU_DESIGN} == {n.split("-")[1] for n, _ in DESIGN}
    assert {n.split("-")[0] for n, _ in DESIGN if "-omega-" in n} == {"matrix", "mlp1"}  # omega windows
    for name, text in DESIGN:
        source = _compile(text).sources["level_memory_triton_chunk.py"]
        assert "def chunk_state_fwd_kernel(" in source, name
    program = _compile(SPECS / "gla.nl")
    assert "not 'frozen'" in unsupported(program.rules["memory"], program.plans["memory"])


def test_triton_mode_runs_the_chunked_kernels_from_one_chunk_on():
    """Titans' memory (an MLP of depth 1) has no fused recurrent kernels, so mode='triton' runs the
    chunked ones even below one chunk; a matrix memory has both, and runs the fused recurrent ones
    below one chunk (C = 5)."""
    op = _titans(16, 16).op("memory")
    for T in (1, 16, 100):
        assert op.pick("triton", T, torch.device(DEVICE)).__module__.endswith("level_memory_triton_chunk")
    matrix = _design_program(spec_text("matrix", "huber", "decay", "momentum", "chunk"), 16, 5).op("memory")
    picked = {T: matrix.pick("triton", T, torch.device(DEVICE)).__module__.rsplit(".", 1)[1] for T in (1, 4, 5, 63)}
    assert picked == {1: "level_memory_triton", 4: "level_memory_triton", 5: "level_memory_triton_chunk",
                      63: "level_memory_triton_chunk"}


def test_auto_mode_leaves_kernels_not_yet_run_on_a_gpu_to_mode_triton():
    """These kernels say `AUTO = False` (checked under the interpreter only), so the dispatch's auto
    path declines them, while the GPU-checked gated delta kernels are taken."""
    titans = _titans(16, 16).op("memory").triton
    assert titans.chunked().AUTO is False
    assert titans.function("level_memory", 100, auto=True) is None
    assert titans.function("level_memory", 100) is not None
    delta = nlc.compile(SPECS / "gated_deltanet.nl").op("memory").triton
    assert delta.function("level_memory", 100, auto=True) is not None
