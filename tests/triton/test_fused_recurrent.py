"""Fused recurrent Triton kernels against the reference loop: outputs, final states and the gradients
of every input (q, k, v, gates, initial state), over the shipped specs and every design-space point
the renderer takes, for T = 1, 63, 100 and head dims 16, 32, 64.

Precision: the kernels run in float32 (Triton has no float64 on every path), the reference in
float64 on the same inputs. Each result must match to a relative error ||x - ref|| / ||ref|| of at
most RTOL = 1e-4: float32 round-off (1e-7) grown over 100 recurrent steps and sums over 64 channels
lands near 1e-6, so 1e-4 leaves room for sharp biases (l1's smoothed sign, lp's cube) without
letting a wrong term (an error of order 1) through. bf16 inputs: 2e-2 (the inputs' and outputs'
own rounding is 4e-3 per element). Where the problem itself is ill-conditioned (l1's sign: a residual
near zero rounds to either side; seen on an H100 with MLP memories), a result above the bound passes
only within 10x of the error the reference loop itself makes in float32 on the same inputs (float32
only: bf16's own error is too large to bound a wrong term).
Inputs keep the reference's outputs below 1e4 (a diverged memory is not a comparison: lp(3) reached
1e129, finite in float64 and inf in float32), and keep elastic net's soft threshold away from its kink
(an entry within KINK of it flips branch under float32 rounding, which moves every earlier token's
gradient by a whole branch: seen at 2e-3 on dk with Muon's steps; such a draw is replaced).

On a CUDA device every case runs. On the CPU (Triton's interpreter, slow) the shipped levels run
every length at head dim 16 and one length at 32 and 64; the design space is a fixed sample, each
point at one (head dim, length)."""
from __future__ import annotations

import copy
import functools
import re
import sys
from pathlib import Path

import pytest
import torch

import nlc
from nlc.codegen.triton_recurrent import unsupported
from nlc.derive.rules import derive
from nlc.lower import check
from nlc.runtime.dispatch import TritonForms

from ..ops.design_space import gate_range, points

pytest.importorskip("triton", reason="triton is not installed (pip install 'nlc[triton]')")

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
BATCH, HEADS = (2, 2) if GPU else (1, 1)
LENGTHS, DIMS = (1, 63, 100), (16, 32, 64)
RTOL, RTOL_BF16 = 1e-4, 2e-2
BOUNDED = 1e4  # the largest |o| of the reference on test inputs
CHAOTIC = 1e-3  # the most a relative 2^-24 move of the inputs may move the reference's o
KINK = 1e-5  # the closest, relative to the entry, a soft threshold's input may come to its kink
SPECS = Path(__file__).resolve().parents[2] / "specs"
DIM_PARAMS = ("d_key", "d_value", "d_state", "d_head")
MEMORIES = ("matrix", "vector")  # the memories the kernels hold whole: S [K, V], or m [V] (M(x) = x ⊙ m)
SCHEDULES = ("token", "retained", "before", "period", "chunk", "period_chunk")  # every schedule in
# context (a period: reads of a state committed every 2 tokens; chunk: gradients at the state entering
# every 2 tokens)


def _sizes(gpu_all, cpu_subset):
    return gpu_all if GPU else cpu_subset


def _shipped():
    """(spec stem, level) of every shipped level with a Triton form."""
    out = []
    for path in sorted(SPECS.glob("*.nl")):
        program = nlc.compile(path)
        out += [(path.stem, lv.name) for lv in program.levels
                if f"level_{lv.name}_triton.py" in program.sources]
    return out


def _design():
    """(id, spec text) of every sampled matrix- and vector-memory point the renderer takes."""
    out = []
    for name, text in points(MEMORIES, SCHEDULES):
        if unsupported(derive(check(text)[0])["memory"]) is None:
            out.append((name, text))
    return out


SHIPPED = _shipped()
DESIGN = _design()


def _sample(design):
    """A fixed sample: each point that brings a memory, a bias, a retention, an algorithm or a schedule
    not yet seen (or a memory's retention or schedule), then every twelfth point of the rest."""
    seen, out = set(), []
    for name, text in design:
        memory, bias, retention, algorithm, schedule = name.split("-")
        keys = {("bias", bias), ("retention", retention), ("algorithm", algorithm), ("schedule", schedule),
                ("memory", memory, retention), ("memory", memory, schedule)}
        if not keys <= seen:
            seen |= keys
            out.append((name, text))
    return out + [point for point in design if point not in out][::12]


CPU_DESIGN = _sample(DESIGN)

CPU_SIZES = ((16, 100), (32, 63), (64, 1))  # (head dim, T) on the CPU, besides D = 16 at every T
SHIPPED_CASES = [(s, lv, d, t) for s, lv in SHIPPED for d in DIMS for t in LENGTHS
                 if GPU or d == 16 or (d, t) in CPU_SIZES]
DESIGN_CASES = [(n, text, d, t) for i, (n, text) in enumerate(DESIGN if GPU else CPU_DESIGN)
                for d in DIMS for t in LENGTHS if GPU or (d, t) == CPU_SIZES[i % 3]]


@functools.lru_cache(maxsize=None)
def _compile(spec, **params):
    return nlc.compile(spec, **params)


def _shipped_op(stem, level, dim):
    path = SPECS / f"{stem}.nl"
    dims = {p: dim for p in DIM_PARAMS if p in nlc.compile(path).params}
    return _only(_compile(path, heads=HEADS, **dims).op(level), "recurrent")


def _design_op(text, dim):
    return _only(_compile(re.sub(r"\[heads, 3\]", f"[heads, {dim}]", text).replace(
        "param heads = 1", f"param heads = {HEADS}")).op("memory"), "recurrent")


def _only(op, role):
    """`op` with its Triton kernels of `role` alone ("recurrent" or "chunked"): with both, mode='triton'
    runs the chunked ones from their CHUNK tokens on and the fused recurrent ones below."""
    op = copy.copy(op)
    op.triton = TritonForms(**{role: getattr(op.triton, role)})
    return op


def _inputs(op, T, seed, step, scale=0.3):
    """float64 CPU inputs: unit keys and queries, gates in their test ranges (step-size gates eta
    scaled by `step`), a random initial state of entries N(0, scale²)."""
    g = torch.Generator().manual_seed(seed)
    lv = op.level
    unit = lambda d: torch.nn.functional.normalize(
        torch.randn(BATCH, T, lv.heads, d, generator=g, dtype=torch.float64), dim=-1)
    q, k = unit(lv.d_key), unit(lv.d_key)
    v = torch.randn(BATCH, T, lv.heads, lv.d_value, generator=g, dtype=torch.float64)
    gates = {}
    for name in op.gates:
        axis = lv.gate_axes[name]
        tail = () if axis == "scalar" else ((lv.d_key,) if axis == "key" else (lv.d_value,))
        a, b = gate_range(name)
        x = a + (b - a) * torch.rand(BATCH, T, lv.heads, *tail, generator=g, dtype=torch.float64)
        gates[name] = x * step if name == "eta" else x
    state = tuple(scale * torch.randn(s.shape, generator=g, dtype=torch.float64)
                  for s in op.initial_state(BATCH))
    return q, k, v, gates, state


def _stable_inputs(op, T, seed):
    """Inputs on which the reference stays bounded and is not chaotic: float32 rounding of the
    inputs moves its float64 output by less than CHAOTIC. lp(3) feeds its error back cubically, so
    shrink the step size until it is, as tests/ops/test_chunked.py does; an lq accumulator's FTRL map
    reads weights 3 N^(2/3) |A|^(1/3), about 13 per entry from a 16 x 16 state at scale 0.3, so
    then shrink the state too. A draw that meets a soft threshold's kink is replaced by the next."""
    for draw in range(4):
        inputs = _bounded_inputs(op, T, seed + 1000 * draw)
        if not _near_kink(op, inputs):
            return inputs
    raise AssertionError("every draw tried meets the soft threshold's kink")


def _bounded_inputs(op, T, seed):
    """The first inputs of seed `seed`, over the step sizes and state scales tried, on which the
    reference stays below BOUNDED and a 2^-24 move of the inputs moves its output by under CHAOTIC."""
    for scale in (0.3, 0.01):
        for step in (1.0, 0.1, 0.01):
            inputs = _inputs(op, T, seed, step, scale)
            o = _output(op, inputs)
            if torch.isfinite(o).all() and o.abs().max() < BOUNDED and \
                    _relative_error(_output(op, _jitter(inputs)), o) < CHAOTIC:
                return inputs
    raise AssertionError("the reference diverges or is chaotic at every step size and state scale tried")


def _near_kink(op, inputs):
    """Whether the reference's soft threshold (elastic net: `retain`, or an accumulator's `psi`) meets
    an input within KINK of its kink on `inputs`: the threshold's input is linear in the map's tensor
    arguments, so scaling them by 1 ± KINK moves it by KINK relative, and an entry whose zero/nonzero
    output changes between the two lies that close."""
    if op.level.retention.kind != "elastic":
        return False
    module = sys.modules[op.function.__module__]
    name, tensors = ("psi", 1) if hasattr(module, "psi") else ("retain", 2)
    original, near = getattr(module, name), []

    def watched(*args):
        low, high = (original(*(x * (1 + sign * KINK) for x in args[:tensors]), *args[tensors:]) == 0
                     for sign in (-1, 1))
        near.append(bool((low != high).any()))
        return original(*args)
    setattr(module, name, watched)
    try:
        _output(op, inputs)
    finally:
        setattr(module, name, original)
    assert near, f"the reference never called {name}"
    return any(near)


def _output(op, inputs):
    q, k, v, gates, state = inputs
    return op(q, k, v, **gates, initial_state=_state(state), mode="reference")[0]


def _state(state):
    return state[0] if len(state) == 1 else state


def _run(op, mode, inputs, dtype, device):
    """[o, *final states, *gradients of (q, k, v, gates, initial state)] under a fixed random
    cotangent on o and on the final states."""
    q, k, v, gates, state = inputs
    leaves = [x.detach().to(device=device, dtype=dtype).requires_grad_()
              for x in (q, k, v, *gates.values(), *state)]
    qq, kk, vv = leaves[:3]
    gg = dict(zip(gates, leaves[3:3 + len(gates)]))
    o, final = op(qq, kk, vv, **gg, initial_state=_state(leaves[3 + len(gates):]),
                  output_final_state=True, mode=mode)
    final = (final,) if torch.is_tensor(final) else tuple(final)
    g = torch.Generator().manual_seed(7)
    loss = sum((x * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)).sum()
               for x in (o, *final))
    loss.backward()
    return [o, *final, *(x.grad for x in leaves)]


def _names(op):
    return ["o", *(f"final {s}" for s in op.state_names), "dq", "dk", "dv",
            *(f"d gate {g}" for g in op.gates), *(f"d initial {s}" for s in op.state_names)]


def _compare(op, T, seed=0, dtype=torch.float32, rtol=RTOL, inputs=None):
    """The op in mode='triton' against the float64 reference on `inputs` (default `_stable_inputs`)."""
    inputs = inputs or _stable_inputs(op, T, seed)
    rounded = tuple(x.to(dtype).double() if torch.is_tensor(x) else
                    ({n: g.to(dtype).double() for n, g in x.items()} if isinstance(x, dict) else
                     tuple(s.to(dtype).double() for s in x)) for x in inputs)
    want = _run(op, "reference", rounded, torch.float64, "cpu")
    got = _run(op, "triton", rounded, dtype, DEVICE)
    own = jittered = None  # float32 floors, run only if a result misses rtol
    for i, (name, a, b) in enumerate(zip(_names(op), got, want)):
        assert (a is None) == (b is None), name
        if b is None:
            continue
        a = a.detach().double().cpu()
        assert torch.isfinite(a).all(), f"{name}: not finite (a missed write reads NaN)"
        err = _relative_error(a, b)
        if err > rtol and dtype == torch.float32:
            own = own or _run(op, "reference", rounded, dtype, "cpu")
            floor = _relative_error(own[i].detach().double(), b)
            if err > 10 * floor:  # ill-conditioned: float32 rounding of the inputs alone moves the result
                jittered = jittered or _run(op, "reference", _jitter(rounded), torch.float64, "cpu")
                floor = max(floor, _relative_error(jittered[i].detach().double(), b))
            assert err <= 10 * floor, (f"{name}: relative error {err:.2e} > {rtol:g}, and more than 10x the "
                                       f"float32 floor ({floor:.2e}: the reference loop's own error in float32, "
                                       "or the float64 result's change when the inputs move by 2^-24)")
        else:
            assert err <= rtol, f"{name}: relative error {err:.2e} > {rtol:g}"


def _jitter(inputs, seed=1):
    """`inputs` with every entry moved by a relative 2^-24 (float32's rounding), at random."""
    g = torch.Generator().manual_seed(seed)
    move = lambda x: x * (1 + 2.0 ** -24 * torch.randn(x.shape, generator=g, dtype=x.dtype))
    return tuple(move(x) if torch.is_tensor(x) else
                 ({n: move(y) for n, y in x.items()} if isinstance(x, dict) else tuple(move(y) for y in x))
                 for x in inputs)


def _relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("stem,level,dim,T", SHIPPED_CASES,
                         ids=[f"{s}-{lv}-D{d}-T{t}" for s, lv, d, t in SHIPPED_CASES])
def test_shipped_levels_match_the_reference(stem, level, dim, T):
    _compare(_shipped_op(stem, level, dim), T)


@pytest.mark.parametrize("name,text,dim,T", DESIGN_CASES,
                         ids=[f"{n}-D{d}-T{t}" for n, _, d, t in DESIGN_CASES])
def test_design_space_matches_the_reference(name, text, dim, T):
    _compare(_design_op(text, dim), T)


@pytest.mark.parametrize("stem,level", [("gated_deltanet", "memory"), ("gla", "memory")])
def test_bf16_inputs_with_an_fp32_state(stem, level):
    _compare(_shipped_op(stem, level, 32), 63, dtype=torch.bfloat16, rtol=RTOL_BF16)


def test_every_supported_point_is_covered_here():
    """The renderer takes the shipped delta and decay-family levels and every matrix and vector point of
    the design space that learns in context: every bias (omega windows too), retention (lq's mirror maps
    and both maps at chunk boundaries too), algorithm (muon and ftrl too) and schedule (update periods
    and gradients at chunk starts too)."""
    assert {s for s, _ in SHIPPED} >= {"deltanet", "gated_deltanet", "gla", "linear_attention",
                                       "longhorn", "mamba2", "retnet"}
    assert [n for n, _ in DESIGN] == [n for n, _ in points(MEMORIES, SCHEDULES)]
    for part in range(0, 5):  # memory, bias, retention, algorithm, schedule
        assert {n.split("-")[part] for n, _ in CPU_DESIGN} == {n.split("-")[part] for n, _ in DESIGN}
    assert {n.split("-")[1] for n, _ in DESIGN} >= {"omega"}
    assert {n.split("-")[2] for n, _ in DESIGN} >= {"none", "decay", "l2", "elastic", "implicit", "kl", "kl_global",
                                                   "kl_chunk", "dgd", "lq", "lq_miras", "lq_chunk"}
    assert {n.split("-")[3] for n, _ in DESIGN} == {"gd", "momentum", "muon", "ftrl"}


@pytest.mark.parametrize("name", ["matrix-l2-decay-momentum-before", "matrix-huber-lq-gd-before",
                                  "matrix-l2-elastic-ftrl-before", "matrix-omega-kl-muon-before"])
def test_update_period_with_reads_before_write(name):
    """Every third token commits (T = 40 ends mid-period); the reads before each step see the state
    committed last (plain, an accumulator's weights, a psi that reads gates, with muon and a window)."""
    text = dict(points(("matrix",), ("before",)))[name].replace("read before", "update every 3\n  read before")
    _compare(_design_op(text, 16), 40)


@pytest.mark.parametrize("name,grad_chunk,read,T", [
    ("matrix-huber-decay-momentum-chunk", 5, "after", 100), ("matrix-l2-lq-ftrl-chunk", 24, "after", 100),
    ("matrix-l2-elastic-ftrl-chunk", 7, "before", 70), ("matrix-omega-kl-muon-chunk", 3, "after", 40),
    ("matrix-l1-dgd-gd-period_chunk", 6, "after", 70), ("matrix-lp3-lq_miras-momentum-chunk", 128, "after", 100),
    ("matrix-huber-lq_chunk-momentum-chunk", 24, "before", 100), ("matrix-robust-lq_chunk-gd-chunk", 5, "after", 70),
    ("matrix-l2-kl_chunk-momentum-chunk", 24, "before", 100), ("matrix-omega-kl_chunk-gd-chunk", 5, "after", 70)])
def test_gradient_chunks_across_checkpoints(name, grad_chunk, read, T):
    """Gradients at the state entering each gradient chunk, for chunks that divide neither T nor the
    kernels' 64-token checkpoints (so the backward restarts inside a chunk and reads F from the
    checkpoint), and one longer than the sequence (every gradient at the initial state): a plain
    state with momentum, an accumulator's weights, a psi that reads gates, muon with a window and
    softmax, DGD with a period of 2; lq's map at chunk starts (its slope checkpointed too) and KL's
    lag token (F is the state after it), each with reads before the write too (lq's read the weights
    its map leaves)."""
    text = dict(points(("matrix",), ("chunk", "period_chunk")))[name]
    text = text.replace("chunk_start(2)", f"chunk_start({grad_chunk})" + ("\n  read before" if read == "before" else ""))
    _compare(_design_op(text, 16), T)


@pytest.mark.parametrize("d_key,d_value", [(32, 16), (16, 32)], ids=["tall", "wide"])
def test_muon_on_a_state_either_side_of_square(d_key, d_value):
    """Newton-Schulz on a tall state (K > V) takes the smaller Gram matrix XᵀX and X (b A + c A²), as the
    reference's transpose does (the same polynomial in X); both branches give the reference's result."""
    text = dict(points(("matrix",), ("token",)))["matrix-huber-lq-muon-token"]
    text = text.replace("let q[heads, 3]", f"let q[heads, {d_key}]").replace(
        "let k[heads, 3]", f"let k[heads, {d_key}]").replace("let v[heads, 3]", f"let v[heads, {d_value}]")
    _compare(_compile(text).op("memory"), 30)


def test_muon_refuses_a_state_over_its_limit():
    """Muon's kernels hold the whole [K, V] state in one program; at 128 its tl.dot operands outgrow an
    H100 block's shared memory (tests/triton/test_sm90_compile.py), so the launcher says so."""
    op = _design_op(dict(points(("matrix",), ("token",)))["matrix-l2-decay-muon-token"], 128)
    q, k, v, gates, _ = _inputs(op, 2, 0, 1.0)
    on_device = lambda x: x.to(device=DEVICE, dtype=torch.float32)  # else the device check speaks first on a GPU
    with pytest.raises(ValueError, match="K and V up to 64, not 128 and 128"):
        op(on_device(q), on_device(k), on_device(v), **{n: on_device(g) for n, g in gates.items()}, mode="triton")


def test_auto_mode_leaves_recurrent_kernels_not_yet_run_on_a_gpu_to_mode_triton():
    """Kernels with a muon step (or KL, DGD, elastic net, an accumulator, an omega window, a period,
    gradients at chunk starts) say `AUTO = False`: checked under the interpreter only, so the
    dispatch's auto path declines them; the gated delta rule's, run on an H100, are taken."""
    muon = _design_op(dict(points(("matrix",), ("token",)))["matrix-l2-decay-muon-token"], 16).triton
    assert muon.recurrent().AUTO is False
    assert muon.function("level_memory", 1, auto=True) is None
    assert muon.function("level_memory", 1) is not None
    delta = _shipped_op("gated_deltanet", "memory", 16).triton
    assert not hasattr(delta.recurrent(), "AUTO")
    assert delta.function("level_memory", 1, auto=True).__module__.endswith("level_memory_triton")


@pytest.mark.parametrize("retention,algorithm,schedule", [
    ("kl(decay = alpha, axis = column, mass = 2)", "momentum", "before"),
    ("kl(global = 2, axis = column)", "gd", "token"),
    ("kl(decay = alpha, mass = 3)", "gd", "before")], ids=["column-mass-momentum-before", "column-global",
                                                           "row-mass-before"])
def test_kl_softmax_over_either_axis_with_any_mass(retention, algorithm, schedule):
    """KL's softmax over each row's value channels (then every value channel in one block) as well as
    over each column's key channels, with a mass other than 1."""
    text = next(t for n, t in points(("matrix",), (schedule,)) if n == f"matrix-l2-kl-{algorithm}-{schedule}")
    text = text.replace("kl(decay = alpha)", retention)
    _compare(_design_op(text, 32), 63)


def test_unsupported_levels_say_why():
    program = nlc.compile(SPECS / "cms_teach.nl")  # an MLP memory that the reference loop runs: no Triton form
    assert not any(f.startswith("level_cms_fast_triton") for f in program.sources)
    op = program.op("cms_fast")
    lv = op.level
    q = torch.zeros(1, 1, lv.heads, lv.d_key, device=DEVICE)
    v = torch.zeros(1, 1, lv.heads, lv.d_value, device=DEVICE)
    with pytest.raises(ValueError, match="mlp memory: the fused recurrent kernels hold a matrix .*; "
                                         "chunked: the level has no chunk-parallel form"):
        op(q, q, v, **{g: 0.5 for g in op.gates}, mode="triton")
