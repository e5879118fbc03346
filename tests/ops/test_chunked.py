"""Every chunk-parallel form against the reference loop, in float64: outputs, final states and the
gradients of every input, over the shipped specs and every sampled design-space point that the
planner gives a chunked form, for awkward lengths and chunk sizes that do not divide them."""
import functools
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import nlc

from nlc.program import CHUNKED_FAMILIES
from nlc.runtime.dispatch import pick

from .design_space import chunked_points, op_inputs

SPECS = Path(__file__).resolve().parents[2] / "specs"
LENGTHS = (1, 63, 100, 257)


@functools.lru_cache(maxsize=None)
def _compile(text):
    return nlc.compile(text)


def _chunked_levels(program):
    return [name for name, p in program.plans.items() if p.family != "reference"]


DESIGN = list(chunked_points(memories=("matrix", "vector", "mlp2"),
                             schedules=("token", "chunk", "retained", "before", "period",
                                        "period_chunk"))
              ) if CHUNKED_FAMILIES else []
SHIPPED = [(p.stem, name) for p in sorted(SPECS.glob("*.nl"))
           for name in _chunked_levels(nlc.compile(p, **({"chunk": 5} if "chunk" in
                                                          nlc.compile(p).params else {})))]


STEPS = (1.0, 0.1, 0.01)
TOL = dict(rtol=1e-9, atol=1e-10)


def _stable_inputs(op, T, seed, steps=STEPS):
    """Inputs on which the reference stays finite, and their step scale. lp(3) feeds its error back
    cubically and diverges over ~60 tokens at the default steps (MATH.md §5.7.2): shrink the step
    size until the reference is finite, then compare there. Through an MLP under the exact lq map
    it diverges at every step size tried (test_design_space.DIVERGENT): compare on the first half of
    the tokens before its first non-finite output instead."""
    for step in steps:
        q, k, v, gates, state = op_inputs(op, T, seed, step)
        o, _ = op(q, k, v, **gates, initial_state=state, mode="reference")
        finite = torch.isfinite(o).flatten(2).all(-1).all(0)
        if finite.all():
            return (q, k, v, gates, state), step
    keep = max(1, int(finite.int().argmin()) // 2)
    return (q[:, :keep], k[:, :keep], v[:, :keep], {n: g[:, :keep] for n, g in gates.items()},
            state), step


def _run(op, inputs, mode):
    """Outputs, final state and the gradients of every input of one mode."""
    q, k, v, gates, state = inputs
    names = list(gates)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, *gates.values(), *state)]
    n_state = len(state)
    o, final = op(*leaves[:3], **dict(zip(names, leaves[3:3 + len(names)])),
                  initial_state=tuple(leaves[len(leaves) - n_state:]),
                  output_final_state=True, mode=mode)
    final = (final,) if torch.is_tensor(final) else final
    loss = o.pow(2).sum() + sum(f.pow(2).sum() for f in final)
    return [o, *final, *torch.autograd.grad(loss, leaves, allow_unused=True)]


def _assert_same(got, want, scale=1.0):
    """Equal to round-off (TOL, times scale), NaN where the reference is NaN: an lq map's |A|^(1/3)
    has no derivative at a zero accumulator, so the gradient of a zero initial state is NaN in both."""
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=scale * TOL["rtol"], atol=scale * TOL["atol"],
                                       equal_nan=True)


def _nudged(op, inputs):
    """The reference's results with every entry of every input (q, k, v, gates, initial state) moved
    by a random -1, 0 or +1 unit in the last place (seeded). Random, not uniform: a uniform nudge
    keeps an exactly symmetric state (KL's uniform point of the simplex) symmetric, where some of
    the reference's gradients jump by 1e4 once round-off breaks the symmetry (mlp2, kl, muon); and
    every input, not the keys alone: some points move most with the values (mlp2, omega, lq_miras)."""
    q, k, v, gates, state = inputs
    g = torch.Generator().manual_seed(0)

    def nudge(x):
        return x * (1 + torch.finfo(x.dtype).eps * torch.randint(-1, 2, x.shape, generator=g).to(x.dtype))
    return _run(op, (nudge(q), nudge(k), nudge(v), {n: nudge(x) for n, x in gates.items()},
                     tuple(nudge(x) for x in state)), "reference")


def _spread(a, b) -> float:
    """max |a - b| relative to max |b| + 1 (NaN where both are NaN counts as equal)."""
    if b is None:
        return 0.0 if a is None else float(a.detach().abs().max())
    a, b = a.detach(), b.detach()
    diff = torch.where(a.isnan() & b.isnan(), 0, (a - b).abs()).nan_to_num(float("inf"))
    return float(diff.max() / (b.nan_to_num().abs().max() + 1))


SENSITIVITY = 10    # a chunked result may sit within 10x the reference's own 1-ulp sensitivity
CHAOTIC = 1e-3      # beyond this 1-ulp sensitivity a comparison at this length means nothing


def _verdict(got, want, nudged) -> str:
    """Where the reference itself moves by more than round-off when its inputs move by one ulp, no
    form can match it to round-off. Per tensor (every output, state and gradient), relative to its
    largest entry: 'differs' if the chunked result is further from the reference than SENSITIVITY
    times that movement (and the tolerance) where the movement is below CHAOTIC; else 'chaotic' if
    some movement is not below CHAOTIC (that tensor cannot be compared at this length); else 'within'."""
    spreads = [(_spread(a, b), _spread(n, b)) for a, b, n in zip(got, want, nudged, strict=True)]
    if any(own < CHAOTIC and err > SENSITIVITY * own + TOL["rtol"] for err, own in spreads):
        return "differs"
    return "chaotic" if any(own >= CHAOTIC for _, own in spreads) else "within"


def _ill_conditioned(want, nudged) -> bool:
    """Whether the reference fails to match itself, elementwise at the tolerance over SENSITIVITY, when
    its inputs move by one ulp: two summation orders of the same math cannot be asked to agree more
    closely than SENSITIVITY times that (a gradient of |A|^(1/3) near a zero accumulator mixes 1e25
    and 1e-3 in one tensor; an omega window under an lq map moves by 1e-10 over 100 tokens)."""
    try:
        _assert_same(nudged, want, scale=1 / SENSITIVITY)
    except AssertionError:
        return True
    return False


def _stable_reference(op, T, seed, steps=STEPS):
    """(inputs, step, the reference's results on them), as `_stable_inputs` picks them, with the
    reference's run with gradients doubling as the finiteness probe (one loop run less per case)."""
    for step in steps:
        inputs = op_inputs(op, T, seed, step)
        want = _run(op, inputs, "reference")
        if torch.isfinite(want[0]).all():
            return inputs, step, want
    inputs, step = _stable_inputs(op, T, seed, steps[-1:])
    return inputs, step, _run(op, inputs, "reference")


def _compare(op, T, seed=0):
    """Chunked == reference to round-off. Where the reference is itself ill-conditioned (l1's
    smoothed sign under momentum, lp(3) fed through an lq map, over hundreds of tokens), the chunked
    result must lie within a few times the reference's own 1-ulp sensitivity, or match at a smaller
    step size. Where the reference is chaotic at every step size (an lq map with muon on an MLP over
    257 tokens: a 1-ulp nudge moves some gradients by more than their size), the comparison is made
    on the first half of the tokens instead, and so on down."""
    steps = STEPS
    while True:
        inputs, step, want = _stable_reference(op, T, seed, steps)
        got = _run(op, inputs, "chunk")
        try:
            return _assert_same(got, want)
        except AssertionError:
            nudged = _nudged(op, inputs)
            if not _ill_conditioned(want, nudged):
                raise
            verdict = _verdict(got, want, nudged)
            if verdict == "within":
                return
            steps = [s for s in STEPS if s < step]
            if not steps:
                if verdict == "chaotic" and T > 1:
                    return _compare(op, T // 2, seed)
                raise


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("name,text", DESIGN, ids=[n for n, _ in DESIGN])
def test_design_point_chunked_equals_reference(name, text, T):
    _compare(_compile(text).op("memory"), T)


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("spec,level", SHIPPED, ids=[f"{s}-{l}" for s, l in SHIPPED])
def test_shipped_chunked_equals_reference(spec, level, T):
    program = nlc.compile(SPECS / f"{spec}.nl", **({"chunk": 5} if "chunk" in
                                                   nlc.compile(SPECS / f"{spec}.nl").params else {}))
    _compare(program.op(level), T)


@pytest.mark.parametrize("spec,level", SHIPPED, ids=[f"{s}-{l}" for s, l in SHIPPED])
def test_shipped_chunked_streams_in_pieces(spec, level):
    """A sequence cut into two pieces, the second starting from the first's final state, gives the
    whole sequence's outputs and final state. The cut falls on a boundary of the level's gradient
    chunks and update periods (the rule itself restarts them at each call). An omega window is not
    part of the state, so the reference restarts it at each call too: test_chunk_mapped covers it."""
    program = nlc.compile(SPECS / f"{spec}.nl", **({"chunk": 5} if "chunk" in
                                                   nlc.compile(SPECS / f"{spec}.nl").params else {}))
    op = program.op(level)
    if op.level.bias.kind == "omega":
        pytest.skip("an omega window restarts at each call, in the reference as in the chunked form")
    align = math.lcm(op.level.grad_chunk or 1, op.level.period or 1)
    cut = align * -(-37 // align)
    (q, k, v, gates, state), _ = _stable_inputs(op, cut + 30, seed=5)

    def part(lo, hi, start):
        return op(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], **{n: g[:, lo:hi] for n, g in gates.items()},
                  initial_state=start, output_final_state=True, mode="chunk")

    o_all, s_all = part(0, None, state)
    o1, s1 = part(0, cut, state)
    o2, s2 = part(cut, None, s1)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_all, **TOL)
    s2, s_all = ((s,) if torch.is_tensor(s) else s for s in (s2, s_all))
    for a, b in zip(s2, s_all, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_auto_mode_picks_by_length_and_chunk_mode_needs_a_chunked_form():
    def level_memory(*args, **kwargs):
        """stands in for a reference op"""

    chunked = SimpleNamespace(CHUNK=8, level_memory=lambda *a, **k: None)
    assert pick(level_memory, chunked, "auto", 7) is level_memory        # decoding: the loop
    assert pick(level_memory, chunked, "auto", 8) is chunked.level_memory
    assert pick(level_memory, chunked, "reference", 100) is level_memory
    assert pick(level_memory, None, "auto", 100) is level_memory         # no chunked form
    with pytest.raises(ValueError, match="level 'memory' has no chunk-parallel form"):
        pick(level_memory, None, "chunk", 100)
