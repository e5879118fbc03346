"""Kernel plans: which execution family a level's *derived rule* falls into (MATH.md §3, §5.7), and
so which chunk-parallel form can run it exactly. A level that fits no family runs in the reference
recurrent form; its plan says why.

Families recognised here:
- decay:  S_t = a_t S_{t-1} + c_t k_t v_t^T — a state-independent bias gradient (dot) under an affine
          retention with scalar or per-key-channel decay (linear attention, RetNet, GLA, Mamba2).
- delta:  S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T — the l2 bias on a matrix memory with
          gd and a scalar decay, the error at the decayed or the old state, b_t over key or value
          channels; and the implicit l2 step (DeltaNet, Gated DeltaNet, Longhorn), WY/UT chunked.
- frozen: gradients frozen at the chunk start (`gradient chunk_start(C)`), any bias (omega windows
          too: banded sums of them), gd or momentum under a scalar affine retention: linear scans within
          the chunk (Titans, TTT, Miras by GD, OmegaNet); also an lq accumulator whose map runs at
          chunk boundaries (`lq(apply = chunk)`, Moneta): reads scaled by the map's slope there;
          and KL's lag token (`kl(apply = chunk)`, Memora): the softmax step at each chunk's first
          token, then a scan of W with the step's coefficients.
- mapped: gradients frozen at the chunk start on a matrix or MLP memory, where what turns them into
          weights is not one affine scan of W (MATH.md §3.6 family 4, §3.7, §3.8): accumulators
          W = psi(A) (lq, ftrl), KL's softmax, elastic's threshold, dgd, muon (with or without omega
          windows). The gradients (and window sums) come for the whole chunk at once; the per-token
          maps, which touch every weight anyway, run token by token (Memora, ATLAS, Hope).
- period: `update every P` (MATH.md §4.1-4.2, the CMS): reads see the state at the last period
          boundary; gradients frozen at chunk starts that nest with P (or state-free), gd or momentum
          under a scalar affine retention: units of min(C, P) tokens, one batched read and one
          weighted vjp each (CMS levels of cms and Hope). `update outer` needs none: it never changes.
- sequential: every gradient at the previous token's state (`gradient current` or chunk_start(1)),
          updated every token, gd or momentum under an affine retention or elastic net's soft
          threshold of one: no chunk-parallel form is exact, so the tokens run in order, one memory
          forward each, in-place rank-1 steps (into the momentum, with momentum) and a hand-written
          backward (cms_fast of cms and Hope; Titans' per-token rule).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy

from . import ir
from .derive import symbols as S
from .derive.rules import LevelRules


ONE_TOKEN = ("gradient chunk_start(1): each gradient needs the previous token's update, so a chunked "
             "form is the per-token loop with more overhead (measured slower than the reference)")


@dataclass(frozen=True)
class KernelPlan:
    """decay: the factor a_t on the old state; scale: the factor c_t on the step (both sympy over
    gates; for the delta family, the step size b_t = scale · lr)."""
    level: str
    family: str          # decay | delta | frozen | mapped | period | sequential | reference
    chunk: int
    reason: str
    decay: sympy.Expr = sympy.Integer(1)
    scale: sympy.Expr = sympy.Integer(1)
    exact: bool = True   # equals the reference to round-off


# Chunked families that compute self-generated targets (`value self(...)`), the restarts of nested
# levels (`init from(...)`) and the period states their sources export, exactly.
SELF_TARGET_FAMILIES = ("period", "mapped")
RESTART_FAMILIES = ("period", "sequential")
EXPORT_FAMILIES = ("period",)


def plan(rules: LevelRules, chunk: int) -> KernelPlan:
    """Classify one level; `chunk` is the spec's chunk size (used where the rule does not fix one).
    A self-generated target or nesting keeps a level on the reference loop outside the families
    that compute them."""
    p, lv = _rule_plan(rules, chunk), rules.level
    if lv.target == "teach":  # its reads are one batched memory read; its steps, the reference op's
        return KernelPlan(lv.name, "reference", p.chunk, "teach signal: nlc.runtime.teach reads it at "
                          "each segment and steps it at its period boundaries with the reference rule")
    if p.family == "reference":
        return p
    if lv.target == "self" and p.family == "mapped" and lv.value == lv.name:
        why = ("its self-generated target M(y_t) reads its own read-out, which the mapped chunked form "
               "has only after the chunk's steps (the period family and the reference loop do)")
    elif lv.target == "self" and p.family not in SELF_TARGET_FAMILIES:
        why = (f"its self-generated target M({lv.value}) reads the state, which the {p.family} "
               "chunked form does not compute (the period family and the reference loop do)")
    elif lv.init_from is not None and p.family not in RESTART_FAMILIES:
        why = (f"nested: it restarts from level {lv.init_from}'s state every {lv.restart} tokens, "
               f"which the {p.family} chunked form does not do (the period and sequential families do)")
    elif lv.initialises and p.family not in EXPORT_FAMILIES:
        why = (f"nested: {', '.join(lv.initialises)} restart(s) from its state at its period "
               f"boundaries, which the {p.family} chunked form does not export (the period family does)")
    else:
        return p
    return KernelPlan(lv.name, "reference", p.chunk, why)


def _rule_plan(rules: LevelRules, chunk: int) -> KernelPlan:
    """The family of the level's derived rule."""
    lv = rules.level
    affine = _affine(rules)

    def reference(reason: str) -> KernelPlan:
        return KernelPlan(lv.name, "reference", chunk, reason)

    if lv.period is None:
        return reference("update outer: the memory never changes in context, so the reference form is "
                         "already one batched read")
    if lv.period > 1:
        return _period(rules, affine)
    if lv.retention.kind == "implicit" and lv.grad_at == "current":
        return _implicit(rules, chunk)
    if lv.maps_at_chunks:
        return _mapped_at_chunks(rules)
    if lv.lag_token:
        return _lag_token(rules)
    centre = _affine(rules, "threshold")  # elastic net: W = soft(a·w0 + c·s, threshold)
    if centre is not None and (lv.grad_at == "current" or lv.grad_chunk == 1):
        return _sequential(rules, centre, chunk)
    if affine is None or lv.algorithm.kind == "muon":
        return _mapped(rules, affine)
    if lv.bias.kind == "omega":
        return _omega(rules, affine)
    decay, scale = affine
    scalar_decay = not _per_channel(lv, [decay])
    state_free = not (rules.bias.grad.free_symbols & {S.e, S.r, S.y})
    if lv.memory.kind == "matrix" and lv.algorithm.kind == "gd" and state_free:
        if any(lv.gate_axes[g] == "value" for g in ir.gate_names(decay)):
            return reference("a decay over value channels has no diagonal chunked form")
        if not _separable(scale * rules.lr, lv.gate_axes):
            return reference("the step size is not a product of key-channel and value-channel factors")
        return KernelPlan(lv.name, "decay", chunk, "state-independent gradient under a linear decay",
                          decay, scale)
    if (lv.memory.kind == "matrix" and lv.algorithm.kind == "gd" and rules.bias.grad == S.e
            and lv.grad_at in ("current", "retained")):
        if not scalar_decay:
            return reference("a per-channel decay under the l2 bias has no WY/UT chunked form")
        if not _separable(scale * rules.lr, lv.gate_axes):
            return reference("the step size is not a product of key-channel and value-channel factors")
        return KernelPlan(lv.name, "delta", chunk, "l2 regression step: a delta-rule transition",
                          decay, scale)
    if decay.is_number and decay <= 0:
        return reference(f"a constant decay of {decay} has no log-space chunked form")
    if _frozen_fits(rules, decay, scale):
        if lv.grad_chunk == 1:
            return _sequential(rules, affine, chunk)
        return KernelPlan(lv.name, "frozen", lv.grad_chunk,
                          "gradients frozen at the chunk start: linear scans within a chunk",
                          decay, scale)
    if lv.grad_at == "current":
        return _sequential(rules, affine, chunk)
    return reference("no chunked family fits this rule yet (reference recurrent form)")


def _mapped_at_chunks(rules: LevelRules) -> KernelPlan:
    """`lq(apply = chunk)`: within a chunk the accumulator's scan is linear and the weights are it
    times the map's slope at the chunk start (one factor per tensor), so gradients frozen there make
    it the frozen family with each chunk's reads and steps scaled by that factor."""
    lv = rules.level
    decay, algorithm = rules.retention.decay, lv.algorithm.kind

    def reference(reason: str) -> KernelPlan:
        return KernelPlan(lv.name, "reference", lv.grad_chunk, f"lq map at chunk boundaries: {reason}")

    if lv.grad_chunk == 1:
        return reference(ONE_TOKEN)
    if decay.is_number and decay <= 0:
        return reference(f"a constant decay of {decay} has no log-space chunked form")
    window = [lv.bias.args["gamma"]] if lv.bias.kind == "omega" else []
    if not _frozen_fits(rules, decay, sympy.Integer(1), *window, algorithms=("gd", "momentum", "ftrl")):
        return reference(f"memory {lv.memory.kind} with {algorithm} and these gates is not in the "
                         "frozen family (gd, momentum or ftrl, matrix or MLP, per-head scalar gates)")
    return KernelPlan(lv.name, "frozen", lv.grad_chunk, "gradients frozen at the chunk start and the "
                      "lq map applied at chunk boundaries: linear scans of the accumulator within a "
                      "chunk, weights scaled by the map's slope at its start", decay, sympy.Integer(1))


def _lag_token(rules: LevelRules) -> KernelPlan:
    """`kl(apply = chunk)`: the softmax step at each chunk's first token, then W_t = a_t W_{t-1} +
    c_t s_t with gradients at the state after it: the frozen family's scans from that state, with the
    first token's step taken apart."""
    lv = rules.level
    decay, scale = rules.lag_scan()

    def reference(reason: str) -> KernelPlan:
        return KernelPlan(lv.name, "reference", lv.grad_chunk, f"KL lag token: {reason}")

    if lv.grad_chunk == 1:
        return reference(ONE_TOKEN)
    if lv.bias.kind == "omega":
        return reference("an omega window reaches back over the lag token, whose gradient is at "
                         "another state: not in the frozen chunked form")
    if decay.is_number and decay <= 0:
        return reference(f"a constant decay of {decay} has no log-space chunked form")
    if not _frozen_fits(rules, decay, scale):
        return reference(f"memory {lv.memory.kind} with {lv.algorithm.kind} and these gates is not "
                         "in the frozen family (gd or momentum, matrix or MLP, per-head scalar gates)")
    return KernelPlan(lv.name, "frozen", lv.grad_chunk, "KL lag token: the softmax step at each chunk's "
                      "first token, then linear scans of W with gradients frozen at the state after it",
                      decay, scale)


def _omega(rules: LevelRules, affine) -> KernelPlan:
    """An omega window under an affine retention: frozen when its gradients are frozen at chunk starts
    (the window sums are a banded matrix of the chunk's gradients, so the scans stay linear), with gd
    or momentum and per-head scalar gates; otherwise what the mapped family says."""
    lv, (decay, scale) = rules.level, affine
    if (_frozen_fits(rules, decay, scale, lv.bias.args["gamma"]) and lv.grad_chunk > 1
            and lv.target != "self" and not (decay.is_number and decay <= 0)):
        return KernelPlan(lv.name, "frozen", lv.grad_chunk, "omega windows of gradients frozen at the "
                          "chunk start: banded sums, then linear scans within a chunk", decay, scale)
    return _mapped(rules, affine)


def _scan_coefficients(rules: LevelRules, decay, scale) -> list:
    """The factors of the frozen and period families' linear scans: decay, step factor, lr, beta."""
    return [decay, scale, rules.lr, rules.level.algorithm.args.get("beta", sympy.Integer(0))]


def _frozen_fits(rules: LevelRules, decay, scale, *more, algorithms=("gd", "momentum")) -> bool:
    """Whether the frozen family's scans take the rule: gradients at chunk starts, one of
    `algorithms` (ftrl on an accumulator is gd's scan), a matrix or MLP memory, and per-head scalar
    gates in the scan coefficients (and in `more`)."""
    lv = rules.level
    return (lv.grad_at == "chunk" and lv.algorithm.kind in algorithms
            and lv.memory.kind in ("matrix", "mlp")
            and not _per_channel(lv, [*_scan_coefficients(rules, decay, scale), *more]))


def _per_channel(lv, exprs) -> list[str]:
    """The gates in `exprs` that are per channel rather than one number per head, sorted."""
    return sorted({g for e in exprs for g in ir.gate_names(e) if lv.gate_axes[g] != "scalar"})


def _sequential(rules: LevelRules, affine, chunk: int) -> KernelPlan:
    """The sequential family (an exact per-token form) for a level updated every token whose
    gradients each need the previous token's update, or the reference with the reason why not."""
    lv, why = rules.level, sequential_unsupported(rules, affine)
    if why is not None:
        return KernelPlan(lv.name, "reference", chunk, "each gradient needs the previous token's update "
                          f"(no chunk-parallel form is exact), and the sequential form does not take it: {why}")
    decay, scale = affine
    return KernelPlan(lv.name, "sequential", chunk, "each gradient at the previous token's state: the "
                      "tokens in order, one memory forward each, in-place rank-1 steps, a hand-written "
                      "backward", decay, scale)


def sequential_unsupported(rules: LevelRules, affine) -> str | None:
    """Why the sequential form (codegen/torch_chunk_sequential.py) cannot run a level, or None: it
    takes an update every token with each gradient at the previous token's state, a matrix memory or
    a plain MLP chain, any bias but omega, gd or momentum under an elementwise affine retention or a
    soft threshold of one (elastic net) with per-head scalar gates, a read before or after the write."""
    lv, m = rules.level, rules.level.memory
    if lv.period != 1 or not (lv.grad_at == "current" or (lv.grad_at == "chunk" and lv.grad_chunk == 1)):
        return "it needs an update every token with each gradient at the previous token's state"
    if m.kind not in ("matrix", "mlp") or m.gated or m.norm != "none":
        return f"a {m.describe()} memory is not a plain chain of layers"
    if lv.algorithm.kind not in ("gd", "momentum"):
        return f"{lv.algorithm.kind}'s steps are not in it (gd's and momentum's are)"
    if lv.algorithm.kind == "momentum" and lv.init_from is not None:
        return "a nested level's restarts (momentum buffers from zero) with momentum are not in it"
    if lv.bias.kind == "omega":
        return "omega windows are not in it"
    if affine is None:
        return f"retention {lv.retention.kind} is not an affine map of the old state"
    threshold = [rules.threshold()] if rules.retention.form == "threshold" else []
    vector = _per_channel(lv, (*affine, rules.lr, lv.algorithm.args.get("beta", sympy.Integer(0)), *threshold))
    if vector:
        return f"per-channel gates ({', '.join(vector)}) in the step coefficients"
    return None


def _period(rules: LevelRules, affine) -> KernelPlan:
    """`update every P` (P > 1): the period family runs units of min(C, P) tokens when gradients are
    frozen at chunk starts with C | P or P | C (P when the gradient is state-free), or the reference
    with the reason why not."""
    lv, period = rules.level, rules.level.period

    def reference(reason: str) -> KernelPlan:
        return KernelPlan(lv.name, "reference", period, f"update every {period}: {reason}")

    if affine is None:
        return reference(f"retention {lv.retention.kind} is not an affine map of the old state")
    decay, scale = affine
    if lv.memory.kind not in ("matrix", "mlp") or lv.algorithm.kind not in ("gd", "momentum"):
        return reference(f"a {lv.memory.kind} memory with {lv.algorithm.kind} has no period chunked form")
    if lv.bias.kind == "omega":
        return reference("omega windows have no period chunked form")
    if decay.is_number and decay <= 0:
        return reference(f"a constant decay of {decay} has no log-space chunked form")
    vector = _per_channel(lv, _scan_coefficients(rules, decay, scale))
    if vector:
        return reference(f"per-channel gates ({', '.join(vector)}) in the step coefficients")
    state_free = lv.memory.kind == "matrix" and lv.target != "self" \
        and not (rules.bias.grad.free_symbols & {S.e, S.r, S.y})
    if state_free:
        unit = period
    elif lv.grad_at != "chunk":
        return reference(f"each gradient at the {lv.grad_at} state needs the previous token's update")
    elif period % lv.grad_chunk and lv.grad_chunk % period:
        return reference(f"gradient chunks of {lv.grad_chunk} and periods of {period} do not nest")
    else:
        unit = min(period, lv.grad_chunk)
    if unit == 1:
        return reference(ONE_TOKEN)
    return KernelPlan(lv.name, "period", unit, "reads of a period see one committed state; steps "
                      f"of {unit} tokens at one frozen state in closed form", decay, scale)


def _mapped(rules: LevelRules, affine) -> KernelPlan:
    """The mapped family for a level that is not one affine scan of W (a non-affine retention, an
    omega window or muon), or the reference with the reason why not."""
    lv, ret = rules.level, rules.retention
    if affine is None:
        what = f"retention {lv.retention.kind} is not an affine map of the old state"
    else:
        what = "omega windows" if lv.bias.kind == "omega" else "muon's orthogonalised steps"

    def reference(reason: str) -> KernelPlan:
        return KernelPlan(lv.name, "reference", lv.grad_chunk or 0, f"{what}; {reason}")

    if lv.grad_at != "chunk":
        return reference("chunked only with gradients at the chunk start (MATH.md §3.7, §3.8)")
    if lv.grad_chunk == 1:
        return reference(ONE_TOKEN)
    if lv.memory.kind not in ("matrix", "mlp"):
        return reference(f"a {lv.memory.kind} memory has no layers to factor its gradients")
    if ret.form == "implicit":
        return reference("the implicit step is not in the mapped family")
    used = [rules.lr, lv.algorithm.args.get("beta", sympy.Integer(0)), rules.retention_new(),
            ret.decay if ret.decay is not None else lv.retention.args.get("rate", sympy.Integer(1))]
    if ret.form == "threshold":
        used.append(rules.threshold())
    if lv.bias.kind == "omega":
        used.append(lv.bias.args["gamma"])
    vector = _per_channel(lv, used)
    if vector:
        return reference(f"per-channel gates ({', '.join(vector)}) are not chunked in the mapped family")
    batched = "omega windows of gradients" if lv.bias.kind == "omega" else "gradients"
    return KernelPlan(lv.name, "mapped", lv.grad_chunk, f"{batched} at the chunk start for the whole "
                      "chunk at once, then the optimizer step and retention map token by token")


def _implicit(rules: LevelRules, chunk: int) -> KernelPlan:
    """`retention implicit` at the current state: the exact proximal l2 step W = W0 - eps (W0 k - v) kᵀ
    with the derived rate eps = retention.new(lr, n = ||k||²) (MATH.md §2.7) is the delta rule with
    step size eps_t, per value channel where lr is (Longhorn). scale = eps / lr, so b_t = scale·lr."""
    lv, eps = rules.level, rules.retention_new()
    if not (lv.memory.kind == "matrix" and lv.algorithm.kind == "gd" and rules.bias.grad == S.e):
        return KernelPlan(lv.name, "reference", chunk,
                          "the implicit step is a delta rule only for the l2 bias, a matrix memory and gd")
    if not _separable(eps, lv.gate_axes):
        return KernelPlan(lv.name, "reference", chunk,
                          "the implicit rate is not a product of key-channel and value-channel factors")
    return KernelPlan(lv.name, "delta", chunk, "implicit l2 step: a delta rule with the proximal rate "
                      f"eps_t = {str(eps).replace('gate_', '')}, n = ||k_t||^2", sympy.Integer(1),
                      sympy.simplify(eps / rules.lr))


def _separable(step: sympy.Expr, axes) -> bool:
    """Whether a step size is a product of factors each over key or over value channels only."""
    for factor in sympy.Mul.make_args(sympy.factor(step)):
        kinds = {axes[g] for g in ir.gate_names(factor)} - {"scalar"}
        if len(kinds) > 1:
            return False
    return True


def _affine(rules: LevelRules, form: str = "elementwise") -> tuple[sympy.Expr, sympy.Expr] | None:
    """(a, c) if the retention's derived map (of `form`: with "threshold", the centre that elastic net's
    soft threshold then takes) is w = a·w0 + c·s with a, c free of w0 and s, and no accumulator holds
    the state."""
    if rules.retention.form != form or rules.level.accumulates:
        return None
    return _affine_coefficients(rules.retention_new())


@lru_cache(maxsize=None)
def _affine_coefficients(new: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr] | None:
    new = sympy.expand(new)
    a, c = sympy.diff(new, S.w0), sympy.diff(new, S.s)
    if a.has(S.w0, S.s) or c.has(S.w0, S.s) or sympy.simplify(new - a * S.w0 - c * S.s) != 0:
        return None
    return sympy.simplify(a), sympy.simplify(c)


def per_token_note(rules: LevelRules, p: KernelPlan) -> str | None:
    """A note for a level left on the reference loop or the sequential form because its spec asks for
    gradients at every token's own state: only chunk-start gradients chunk exactly, and switching
    would change the math."""
    lv = rules.level
    state_dependent = bool(rules.bias.grad.free_symbols & {S.e, S.r, S.y}) or lv.memory.kind != "matrix"
    if p.family not in ("reference", "sequential") or lv.grad_at == "chunk" or lv.period != 1 \
            or not state_dependent:
        return None
    runs = "the reference loop" if p.family == "reference" else "the sequential form, token by token"
    return (f"level {lv.name} takes each gradient at the state after the previous token "
            f"(`gradient {lv.grad_at}`), which no chunk-parallel form computes exactly; it runs "
            f"{runs}. `gradient chunk_start(C)` would chunk it, with gradients frozen at "
            "each chunk start: a different rule (MATH.md §3.4)")
