"""Chunked Triton kernels (decay and delta families) against the reference loop: outputs, final states
and the gradients of every input (q, k, v, gates, initial state), over every shipped level and every
design-space point whose plan family is decay or delta, for T = 1, 63, 100 and head dims 16, 32, 64,
with chunks of 16 or 64 tokens (neither divides 63 or 100). Per-key-channel decays (GLA's kernels):
the shipped GLA, the design space's decay points with their decay gate over key channels (and one
with a scalar times a per-channel gate), and a decay strong enough (log a = -5 a token) that a
chunk's cumulative log reaches -320, where exp(-g) overflows float32. Steps per value channel or
through ||k||^2 (Longhorn, the implicit step: one system per value channel): the shipped Longhorn,
the design space's implicit points, 80 value channels over two programs, reads before, bf16.

Precision as in test_fused_recurrent: fp32 kernels against the float64 reference on the same inputs,
relative error ||x - ref|| / ||ref|| <= 1e-4; bf16 inputs (fp32 states) 2e-2.

On a CUDA device every case runs. On the CPU (Triton's interpreter, slow) the shipped levels run
(D 16, T 100, chunk 16) and (D 32, T 63); the design-space points one (head dim, length, chunk) each."""
from __future__ import annotations

import functools
import re

import pytest
import torch

import nlc
from nlc.derive.rules import derive
from nlc.lower import check
from nlc.plan import plan

from ..ops.design_space import points
from .test_fused_recurrent import (DEVICE, DIM_PARAMS, GPU, HEADS, RTOL, RTOL_BF16, SPECS,
                                   _names, _stable_inputs, _state)

pytest.importorskip("triton", reason="triton is not installed (pip install 'nlc[triton]')")

FAMILIES = ("decay", "delta")
LENGTHS, DIMS, CHUNKS = (1, 63, 100), (16, 32), (16, 64)


def _shipped():
    """(spec stem, level, has chunked Triton kernels) of every shipped decay- or delta-family level."""
    out = []
    for path in sorted(SPECS.glob("*.nl")):
        program = nlc.compile(path)
        out += [(path.stem, name, f"level_{name}_triton_chunk.py" in program.sources)
                for name, p in program.plans.items() if p.family in FAMILIES]
    return out


def _design():
    """(id, spec text) of every matrix-memory design point of the two families (any schedule)."""
    return [(name, text) for name, text in points(("matrix",), ("token", "retained", "before", "chunk"))
            if plan(derive(check(text)[0])["memory"], 5).family in FAMILIES]


def _by_channel(design):
    """The points whose decay is the gate alpha, with alpha over key channels (the head dim the tests
    substitute for 3), where they stay in the two families (the decay family's; the planner leaves a
    delta rule with a per-channel decay to the reference loop); and the `before` one with a scalar
    alpha times a per-channel gamma."""
    out = []
    for name, text in design:
        if "retention decay(alpha)" in text:
            out.append((f"{name}-channels", text.replace("gate alpha[heads] =", "gate alpha[heads, 3] =")))
            if name.endswith("-before"):
                out.append((f"{name}-mixed-channels", text.replace("decay(alpha)", "decay(alpha * gamma)")
                            .replace("gate gamma[heads] =", "gate gamma[heads, 3] =")))
    return [(name, text) for name, text in out if plan(derive(check(text)[0])["memory"], 5).family in FAMILIES]


SHIPPED = _shipped()
DESIGN = _design()
CHANNELS = _by_channel(DESIGN)
KERNELS = [(s, lv) for s, lv, has in SHIPPED if has]
CPU_SIZES = ((16, 100, 16), (32, 63, 64), (16, 1, 64))  # (head dim, T, chunk)
# the per-channel points on the CPU: T = 1; a ragged last chunk with an empty sub-chunk (100 = 64 + 36)
CHANNEL_SIZES = ((16, 1, 64), (16, 100, 16), (64, 100, 64), (32, 63, 64), (16, 100, 64))
SHIPPED_CASES = [(s, lv, d, t, c) for s, lv in KERNELS for d in DIMS for t in LENGTHS for c in CHUNKS
                 if GPU or (d, t, c) in CPU_SIZES[:2]] + [("gated_deltanet", "memory", 64, 100, 16)]
DESIGN_CASES = [(n, text, d, t, c) for n, text in DESIGN + CHANNELS for d in DIMS for t in LENGTHS
                for c in CHUNKS] if GPU else \
    [(n, text, *CPU_SIZES[i % 3]) for i, (n, text) in enumerate(DESIGN)] + \
    [(n, text, *CHANNEL_SIZES[i]) for i, (n, text) in enumerate(CHANNELS)]


@functools.lru_cache(maxsize=None)
def _compile(spec, **params):
    return nlc.compile(spec, **params)


def _shipped_program(stem, dim):
    path = SPECS / f"{stem}.nl"
    dims = {p: dim for p in DIM_PARAMS if p in nlc.compile(path).params}
    return _compile(path, heads=HEADS, **dims)


def _design_program(text, dim):
    return _compile(re.sub(r"\[heads, 3\]", f"[heads, {dim}]", text).replace(
        "param heads = 1", f"param heads = {HEADS}"))


def _run(function, gates_of, inputs, dtype, device):
    """[o, final state, *gradients of (q, k, v, gates, initial state)] under a fixed cotangent."""
    q, k, v, gates, state = inputs
    leaves = [x.detach().to(device=device, dtype=dtype).requires_grad_()
              for x in (q, k, v, *gates.values(), *state)]
    gg = {f"g_{name}": x for name, x in zip(gates, leaves[3:3 + len(gates)])}
    o, final = function(*leaves[:3], **gg, initial_state=_state(leaves[3 + len(gates):]),
                        output_final_state=True)
    g = torch.Generator().manual_seed(7)
    loss = sum((x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)).sum() for x in (o, final))
    loss.backward()
    return [o, final, *(x.grad for x in leaves)]


def _compare(program, level, T, chunk, monkeypatch, dtype=torch.float32, rtol=RTOL, inputs=None):
    op = program.op(level)
    kernels = program.module(f"level_{level}_triton_chunk")
    monkeypatch.setattr(kernels, "CHUNK", chunk)
    inputs = inputs or _stable_inputs(op, T, seed=0)
    rounded = tuple(x.to(dtype).double() if torch.is_tensor(x) else
                    ({n: g.to(dtype).double() for n, g in x.items()} if isinstance(x, dict) else
                     tuple(s.to(dtype).double() for s in x)) for x in inputs)
    want = _run(op.function, op.gates, rounded, torch.float64, "cpu")
    got = _run(getattr(kernels, op.function.__name__), op.gates, rounded, dtype, DEVICE)
    for name, a, b in zip(_names(op), got, want):
        a = a.detach().double().cpu()
        assert torch.isfinite(a).all(), f"{name}: not finite (a missed write reads NaN)"
        err = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
        assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:g}"


@pytest.mark.parametrize("stem,level,dim,T,chunk", SHIPPED_CASES,
                         ids=[f"{s}-{lv}-D{d}-T{t}-C{c}" for s, lv, d, t, c in SHIPPED_CASES])
def test_shipped_levels_match_the_reference(stem, level, dim, T, chunk, monkeypatch):
    _compare(_shipped_program(stem, dim), level, T, chunk, monkeypatch)


@pytest.mark.parametrize("name,text,dim,T,chunk", DESIGN_CASES,
                         ids=[f"{n}-D{d}-T{t}-C{c}" for n, _, d, t, c in DESIGN_CASES])
def test_design_space_matches_the_reference(name, text, dim, T, chunk, monkeypatch):
    program = _design_program(text, dim)
    if "level_memory_triton_chunk.py" not in program.sources:
        from nlc.codegen.triton_chunk_common import unsupported
        reason = unsupported(program.rules["memory"], program.plans["memory"], program.plans["memory"].family)
        assert reason, "a level without chunked Triton kernels must say why"
        pytest.skip(reason)
    _compare(program, "memory", T, chunk, monkeypatch)


@pytest.mark.parametrize("stem", ["gated_deltanet", "gla", "longhorn"])
def test_bf16_inputs_with_an_fp32_state(stem, monkeypatch):
    _compare(_shipped_program(stem, 32), "memory", 100, 16 if stem != "gla" else 64, monkeypatch,
             dtype=torch.bfloat16, rtol=RTOL_BF16)


@pytest.mark.parametrize("read", ["after", "before"])
def test_a_step_per_value_channel_over_two_value_blocks(read, monkeypatch):
    """Longhorn's systems (one per value channel) with 80 value channels: two programs of BV = 64 per
    head, whose parts of dq and dk are summed; reads after the write and before it (P strictly lower)."""
    path = SPECS / "longhorn.nl"
    text = path.read_text().replace("  read after", f"  read {read}")
    program = _compile(text, heads=HEADS, d_head=80, d_state=16)
    assert program.module("level_memory_triton_chunk").READ_AFTER is (read == "after")
    _compare(program, "memory", 40, 16, monkeypatch)


@pytest.mark.parametrize("mixed", [False, True], ids=["every-channel", "half-the-channels"])
def test_a_strong_per_channel_decay_stays_finite(mixed, monkeypatch):
    """GLA with log a_t around -5 a token (uniform in [-6, -4]): a chunk of 64 tokens sums its
    cumulative log to about -320, so exp(-g) (1e139) overflows float32 and a whole-chunk
    (q exp(g)) (k exp(-g))^T would give inf and NaN. The kernels' sub-chunk blocks keep every exponent
    <= 0. `mixed`: the odd channels decay slowly instead (log a in [-0.05, 0]), so the state carries
    them across chunks while the even ones forget within a token."""
    program = _shipped_program("gla", 32)
    op = program.op("memory")
    q, k, v, gates, state = _stable_inputs(op, 100, seed=0)
    g = torch.Generator().manual_seed(3)
    log_a = -6 + 2 * torch.rand(gates["a"].shape, generator=g, dtype=torch.float64)
    if mixed:
        log_a[..., 1::2] = -0.05 * torch.rand(log_a[..., 1::2].shape, generator=g, dtype=torch.float64)
    assert log_a[..., :64, :, 0].sum(1).max() < -250  # the first chunk's cumulative log, channel 0
    _compare(program, "memory", 100, 64, monkeypatch, inputs=(q, k, v, {"a": log_a.exp()}, state))


def test_every_family_level_is_covered_or_says_why():
    """Gated DeltaNet, DeltaNet, RetNet, Mamba2, linear attention, GLA (a per-key-channel decay) and
    Longhorn (a step per value channel through ||k||^2) have chunked kernels, as has every design point
    of the two families but those the planner's families leave to the reference loop."""
    assert {s for s, _ in KERNELS} >= {"deltanet", "gated_deltanet", "gla", "linear_attention", "mamba2",
                                       "retnet", "longhorn"}
    assert all(has for _, _, has in SHIPPED)
    assert "CHUNK = 16  # tokens per chunk (BT, a power of two >= 16): one system per value channel" in \
        nlc.compile(SPECS / "longhorn.nl").sources["level_memory_triton_chunk.py"]
    implicit = [text for name, text in DESIGN if "-implicit-" in name]  # a step through ||k||^2
    assert implicit and all("level_memory_triton_chunk.py" in _design_program(text, 16).sources for text in implicit)
    assert len(DESIGN) >= 19
    assert len(CHANNELS) == 5 and len(CHANNEL_SIZES) == len(CHANNELS)


def test_triton_mode_picks_chunked_kernels_for_long_sequences():
    """op(mode='triton'): the chunked kernels from CHUNK tokens on, the fused recurrent ones below."""
    program = _shipped_program("gated_deltanet", 16)
    op = program.op("memory")
    chunk = program.module("level_memory_triton_chunk").CHUNK
    short, long = op.pick("triton", 1, torch.device(DEVICE)), op.pick("triton", chunk, torch.device(DEVICE))
    assert short.__module__.endswith("level_memory_triton")
    assert long.__module__.endswith("level_memory_triton_chunk")


def test_triton_mode_picks_glas_chunked_kernels_and_auto_leaves_them():
    """GLA's chunked kernels follow the scalar-decay levels' rule under mode='triton' (from CHUNK tokens
    on); they say AUTO = False (run under the interpreter only so far), so mode='auto' keeps the
    fused recurrent kernels at every length."""
    program = _shipped_program("gla", 16)
    op = program.op("memory")
    chunk = program.module("level_memory_triton_chunk").CHUNK
    device = torch.device(DEVICE)
    assert op.pick("triton", chunk - 1, device).__module__.endswith("level_memory_triton")
    assert op.pick("triton", chunk, device).__module__.endswith("level_memory_triton_chunk")
    assert op.triton.chunked().AUTO is False
    for T in (1, chunk, 4 * chunk):
        assert op.triton.function("level_memory", T, auto=True).__module__.endswith("level_memory_triton")


def test_a_layer_with_the_triton_backend_equals_the_reference_layer():
    """`.layer(backend='triton')`: a whole Gated DeltaNet layer (projections, convolutions, gates,
    read-out) with its memory in Triton kernels equals the layer on the reference loop."""
    program = _shipped_program("gated_deltanet", 16)
    torch.manual_seed(0)
    reference = program.layer("reference").to(DEVICE)
    triton_layer = program.layer(backend="triton").to(DEVICE)
    triton_layer.load_state_dict(reference.state_dict())
    x = torch.randn(2, 40, int(program.checked.params["d_model"]), device=DEVICE)
    want, got = reference(x), triton_layer(x)
    assert (got - want).norm() <= RTOL * want.norm()
    with pytest.raises(ValueError, match="disagree"):
        program.layer("chunk", backend="triton")
