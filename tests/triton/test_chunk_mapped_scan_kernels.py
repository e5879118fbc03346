"""Triton scans of the mapped family outside dgd's closed form (codegen/triton_chunk_mapped_scans.py:
momentum and Muon's momentum as one scan, the retention map R(W, s) as another, Newton-Schulz and
the reads in PyTorch; an FTRL accumulator's scan and its map psi) against the reference loop: outputs,
final states and the gradients of every input (q, k, v, gates, initial state). Over ATLAS (Muon, an
omega window), every mapped design point they take (matrix, depth-1 and depth-2 MLP memories; every
bias; retentions none, decay, l2, KL by rows and globally, elastic, lq by its exact map and by Miras';
gd, momentum, Muon and FTRL steps), layer biases (a KL softmax over a bias as a column and as a row; a
q-norm over a bias), a gated MLP, reads before the write, psi with gates, tensors over one 64 x 64 tile.

Precision as in test_fused_recurrent: fp32 against the float64 reference on the same inputs,
relative error <= 1e-4; bf16 inputs (fp32 states) 2e-2.

On a CUDA device every case runs. On the CPU (Triton's interpreter, slow) each design point runs one
(head dim, T, chunk), in turn."""
from __future__ import annotations

import pytest
import torch

import nlc
from nlc.codegen.triton_chunk_mapped_scans import unsupported as scans_unsupported

from ..ops.design_space import ALGORITHMS, spec_text
from .test_chunk_mapped_kernels import MAPPED, _design_program, _rules_and_plan, _shipped
from .test_fused_recurrent import DEVICE, GPU, RTOL_BF16, SPECS, _compare, _only

pytest.importorskip("triton", reason="triton is not installed (pip install 'nlc[triton]')")

LENGTHS, DIMS, CHUNKS = (1, 63, 100), (16, 32), (5, 16, 80)
SCANNED = [(n, text) for n, text, closed in MAPPED if not closed and scans_unsupported(*_rules_and_plan(text)) is None]
SIZES = [(d, t, c) for d in DIMS for t in LENGTHS for c in CHUNKS]
DESIGN_CASES = [(n, text, d, t, c) for n, text in SCANNED for d, t, c in SIZES] if GPU else \
    [(n, text, *SIZES[(5 * i + 2) % len(SIZES)]) for i, (n, text) in enumerate(SCANNED)]
ATLAS_CASES = [(t, c) for t in LENGTHS for c in (4, 16)] if GPU else [(100, 16), (63, 4)]
# (memory, retention, algorithm, read) beside the design sample
VARIANTS = [
    ("mlp(depth = 2, expand = 1, bias = true)", "kl(decay = alpha)", "muon", "after"),
    ("mlp(depth = 2, expand = 1, bias = true)", "kl(decay = alpha, axis = column, mass = 2)", "momentum", "before"),
    ("mlp(depth = 2, expand = 2, gated = true, bias = true)", "elastic(l1 = 20, l2 = 2)", "momentum", "before"),
    ("mlp(depth = 3, expand = 1, act = gelu, residual = false)", "decay(alpha)", "muon", "before"),
    ("mlp(depth = 2, expand = 1, bias = true)", "lq(q = 3, decay = alpha)", "momentum", "before"),
    ("mlp(depth = 2, expand = 2, gated = true, bias = true)", "lq(q = 4, map = miras)", "muon", "after"),
    ("mlp(depth = 2, expand = 1, bias = true)", "elastic(l1 = 10 * delta, l2 = 2)", "ftrl", "before"),
    ("matrix", "elastic(l1 = 10 * delta, l2 = 1 + alpha)", "ftrl", "after"),
]


@pytest.mark.parametrize("T,chunk", ATLAS_CASES, ids=[f"atlas-T{t}-C{c}" for t, c in ATLAS_CASES])
def test_atlas_matches_the_reference(T, chunk):
    _compare(_only(_shipped("atlas", chunk).op("memory"), "chunked"), T)


@pytest.mark.parametrize("name,text,dim,T,chunk", DESIGN_CASES,
                         ids=[f"{n}-D{d}-T{t}-C{c}" for n, _, d, t, c in DESIGN_CASES])
def test_design_space_matches_the_reference(name, text, dim, T, chunk):
    _compare(_only(_design_program(text, dim, chunk).op("memory"), "chunked"), T)


@pytest.mark.parametrize("memory,retention,algorithm,read", VARIANTS,
                         ids=[f"{m}-{r}-{a}-{w}" for m, r, a, w in VARIANTS])
def test_biases_gated_mlps_and_reads_before(memory, retention, algorithm, read):
    """Layer biases scan as one row [1, O], or as one column [O, 1] under a KL softmax over each row of
    the weights (so the bias's softmax runs over the tile's same axis); a gated MLP (two products on one
    input); a deep MLP without residual; reads before the write (W_(t-1): the chunk's start, then each
    token's predecessor; under an accumulator, psi(A) entering the chunk); an lq map's norm over a
    bias; elastic's soft threshold as psi with gates (the first chunk's gradient at A_0 itself, as the
    reference)."""
    text = spec_text("mlp2", "huber", "decay", "muon", "chunk").replace("mlp(depth = 2, expand = 1)", memory)
    text = text.replace("decay(alpha)", retention).replace(ALGORITHMS["muon"], ALGORITHMS[algorithm])
    text = text.replace("chunk_start(2)", f"chunk_start(2)\n  read {read}")
    _compare(_only(_design_program(text, 16, 6).op("memory"), "chunked"), 31)


def test_tensors_over_one_tile():
    """Head dim 48 with expand 2: W1 [48, 96] spans two 64-wide column tiles and W2 [96, 48] two row
    tiles, each program's parts of the gates' gradients summed; KL's softmax over each weight's first
    axis keeps that axis whole (W2's 96 entries in a 128-row tile)."""
    for retention in ("decay(alpha)", "kl(decay = alpha)"):
        text = spec_text("mlp2", "l2", "decay", "momentum", "chunk").replace("expand = 1", "expand = 2")
        _compare(_only(_design_program(text.replace("decay(alpha)", retention), 48, 8).op("memory"), "chunked"), 20)


def test_bf16_inputs_with_an_fp32_state():
    _compare(_only(_shipped("atlas", 8).op("memory"), "chunked"), 40, dtype=torch.bfloat16, rtol=RTOL_BF16)


def test_every_mapped_point_has_kernels_or_says_why_not():
    """Every mapped point gets Triton kernels (dgd's closed form, or these scans) but dgd's map beside
    an omega window, which is refused by name; ATLAS runs these scans in mode='triton' at every length."""
    assert len(SCANNED) >= 620
    assert {n.split("-")[3] for n, _ in SCANNED} == {"gd", "momentum", "muon", "ftrl"}
    assert {n.split("-")[2] for n, _ in SCANNED} >= {"none", "decay", "l2", "kl", "kl_global", "elastic", "lq",
                                                    "lq_miras"}
    refused = [name for name, text, closed in MAPPED if not closed and scans_unsupported(*_rules_and_plan(text))]
    assert len(refused) == 3 and all("-dgd-" in name and "-omega-" in name for name in refused), refused
    program = nlc.compile(SPECS / "atlas.nl")
    assert "level_memory_triton_chunk.py" in program.sources
    for T in (1, 48, 100):
        assert program.op("memory").pick("triton", T, torch.device(DEVICE)).__module__.endswith(
            "level_memory_triton_chunk")
