"""Kernel plans: which execution family a level's *derived rule* falls into (MATH.md §3, §5.7), and
so which chunk-parallel form can run it exactly. A level that fits no family runs in the reference
recurrent form; its plan says why.

Families recognised here:
- decay:  S_t = a_t S_{t-1} + c_t k_t v_t^T — a state-independent bias gradient (dot) under an affine
          retention with scalar or per-key-channel decay (linear attention, RetNet, GLA, Mamba2).
- delta:  S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T — the l2 bias on a matrix memory with
          gd and a scalar decay (DeltaNet, Gated DeltaNet, Longhorn's scalar form), WY/UT chunked.
- frozen: gradients frozen at the chunk start (`gradient chunk_start(C)`), any bias, gd or momentum
          under a scalar affine retention: linear scans within the chunk (Titans, TTT, Miras by GD).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy

from . import ir
from .derive import symbols as S
from .derive.rules import LevelRules


@dataclass(frozen=True)
class KernelPlan:
    """decay: the factor a_t on the old state; scale: the factor c_t on the step (both sympy over
    gates; for the delta family, the step size b_t = scale · lr)."""
    level: str
    family: str          # decay | delta | frozen | reference
    chunk: int
    reason: str
    decay: sympy.Expr = sympy.Integer(1)
    scale: sympy.Expr = sympy.Integer(1)
    exact: bool = True   # equals the reference to round-off


def plan(rules: LevelRules, chunk: int) -> KernelPlan:
    """Classify one level; `chunk` is the spec's chunk size (used where the rule does not fix one)."""
    lv = rules.level
    affine = _affine(rules)

    def reference(reason: str) -> KernelPlan:
        return KernelPlan(lv.name, "reference", chunk, reason)

    if lv.period != 1:
        return reference("multi-period and outer levels are not chunked yet (MATH.md §3, family 5)")
    if affine is None:
        return reference(f"retention {lv.retention.kind} is not an affine map of the old state")
    decay, scale = affine
    scalar_decay = all(lv.gate_axes[g] == "scalar" for g in ir.gate_names(decay))
    state_free = not (rules.bias.grad.free_symbols & {S.e, S.r, S.y})
    if lv.bias.kind == "omega":
        return reference("omega windows are not chunked yet (MATH.md §3.8)")
    if decay.is_number and decay <= 0:
        return reference(f"a constant decay of {decay} has no log-space chunked form")
    if lv.memory.kind == "matrix" and lv.algorithm.kind == "gd" and state_free:
        if any(lv.gate_axes[g] == "value" for g in ir.gate_names(decay)):
            return reference("a decay over value channels has no diagonal chunked form")
        if not _separable(scale * rules.lr, lv.gate_axes):
            return reference("the step size is not a product of key-channel and value-channel factors")
        return KernelPlan(lv.name, "decay", chunk, "state-independent gradient under a linear decay",
                          decay, scale)
    if (lv.memory.kind == "matrix" and lv.algorithm.kind == "gd" and rules.bias.grad == S.e
            and lv.grad_at in ("current", "retained") and scalar_decay
            and all(lv.gate_axes[g] == "scalar" for g in ir.gate_names(rules.lr * scale))):
        if lv.grad_at == "current" and decay != 1:
            return reference("the l2 error at the undecayed state (Miras order) is not chunked yet")
        return KernelPlan(lv.name, "delta", chunk, "l2 regression step: a delta-rule transition",
                          decay, scale)
    coefficients = [decay, scale, rules.lr, lv.algorithm.args.get("beta", sympy.Integer(0))]
    scalar = all(lv.gate_axes[g] == "scalar" for c in coefficients for g in ir.gate_names(c))
    if lv.grad_at == "chunk" and lv.algorithm.kind in ("gd", "momentum") and scalar \
            and lv.memory.kind in ("matrix", "mlp"):
        return KernelPlan(lv.name, "frozen", lv.grad_chunk,
                          "gradients frozen at the chunk start: linear scans within a chunk",
                          decay, scale)
    return reference("no chunked family fits this rule yet (reference recurrent form)")


def _separable(step: sympy.Expr, axes) -> bool:
    """Whether a step size is a product of factors each over key or over value channels only."""
    for factor in sympy.Mul.make_args(sympy.factor(step)):
        kinds = {axes[g] for g in ir.gate_names(factor)} - {"scalar"}
        if len(kinds) > 1:
            return False
    return True


def _affine(rules: LevelRules) -> tuple[sympy.Expr, sympy.Expr] | None:
    """(a, c) if the retention's derived map is w = a·w0 + c·s with a, c free of w0 and s."""
    if rules.retention.form != "elementwise" or rules.level.accumulates:
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
    """A note for a level left on the reference loop because its spec asks for gradients at every
    token's own state: only chunk-start gradients chunk exactly, and switching would change the math."""
    lv = rules.level
    state_dependent = bool(rules.bias.grad.free_symbols & {S.e, S.r, S.y}) or lv.memory.kind != "matrix"
    if p.family != "reference" or lv.grad_at == "chunk" or lv.period != 1 or not state_dependent:
        return None
    return (f"level {lv.name} takes each gradient at the state after the previous token "
            f"(`gradient {lv.grad_at}`), which no chunk-parallel form computes exactly; it runs the "
            "reference loop. `gradient chunk_start(C)` would chunk it, with gradients frozen at "
            "each chunk start: a different rule (MATH.md §3.4)")
