"""RuleSet: per level, the derived bias gradient, retention map and algorithm recurrences."""
from __future__ import annotations

from dataclasses import dataclass

import sympy

from .. import ir
from .bias import BiasRule, derive_bias
from .retention import RetentionRule, derive_retention
from .symbols import lr, lw0, s, w0

# The algorithms' state recurrences (u: the bias gradient at the gradient point, M: a buffer).
ALGORITHM_TEXT = {
    "gd": "s = -lr·u",
    "momentum": "M = beta·M - lr·u ;  s = M                 (Titans: S_t = eta S - theta u)",
    "muon": "M = beta·M + u ;  s = -lr·NS_steps(M)        (ATLAS; NS on each 2-D weight)",
    "ftrl": "A = A - lr·u (accumulator) ;  W = psi(A)",
}


@dataclass(frozen=True)
class LevelRules:
    level: ir.Level
    bias: BiasRule
    retention: RetentionRule
    algorithm: str

    @property
    def accumulator(self) -> bool:
        """State is an FTRL accumulator A with weights W = psi(A)."""
        return self.level.accumulates

    @property
    def lr(self) -> sympy.Expr:
        return self.level.algorithm.args["lr"]

    def retention_new(self) -> sympy.Expr:
        """The retention's map with the local strength bound to the algorithm's learning rate."""
        return self.retention.new.subs(lr, self.lr)

    def lag_scan(self) -> tuple[sympy.Expr, sympy.Expr]:
        """(a, c) of KL's step in log space, z = a·log w0 + c·s: with `kl(apply = chunk)` the scan
        w = a·w0 + c·s runs on W itself within a chunk (MATH.md §3.7's lag token)."""
        new = self.retention_new()
        a, c = sympy.diff(new, lw0), sympy.diff(new, s)
        assert sympy.simplify(new - a * lw0 - c * s) == 0, "KL step is not affine in log w0 and s"
        return a, c

    def threshold(self) -> sympy.Expr:
        return self.retention.threshold.subs(lr, self.lr)

    def psi_gates(self) -> list[str]:
        """The gates an FTRL accumulator's map W = psi(A) reads, sorted: a soft threshold's (elastic
        under ftrl), else none."""
        if not self.accumulator or self.retention.form != "threshold":
            return []
        return sorted(set(ir.gate_names(self.retention_new())) | set(ir.gate_names(self.threshold())))

    def accumulator_decay(self) -> sympy.Expr:
        """An FTRL accumulator's factor on itself, A_t = decay·A_(t-1) + s_t: the mirror map's decay,
        a decay retention's rate, else 1 (MATH.md §1.4, §2.13)."""
        if self.retention.form == "mirror":
            return sympy.sympify(self.retention.decay)
        if self.level.retention.kind == "decay":
            return sympy.sympify(self.level.retention.args["rate"])
        return sympy.Integer(1)

    def describe(self) -> str:
        lv = self.level
        lines = [f"level {lv.name}:",
                 f"  bias       {lv.bias.describe()}: loss {self.bias.loss}",
                 f"             dℓ/dy = {self.bias.grad}",
                 f"  retention  {lv.retention.describe()} [{self.retention.form}]: {self.retention.objective}",
                 f"             w = {self.retention.new}"]
        if lv.maps_at_chunks:
            lines.append(f"             within a chunk: w = slope·A, slope = {self.retention.slope} at N = the norm of A_0")
        if lv.lag_token:
            lines.append(f"             at a chunk's first token only; within it: w = "
                         f"{self.retention.new.subs(lw0, w0)} (the lag token)")
        if self.retention.threshold is not None:
            lines.append(f"             threshold = {self.retention.threshold}")
        lines.append(f"  algorithm  {lv.algorithm.describe()}: {ALGORITHM_TEXT[self.algorithm]}")
        return "\n".join(lines).replace("gate_", "")


def derive(checked: ir.CheckedSpec) -> dict[str, LevelRules]:
    """Derive the rules of every level."""
    out = {}
    for lv in checked.levels:
        base = lv.bias.inner or lv.bias
        out[lv.name] = LevelRules(lv, derive_bias(base), derive_retention(lv.retention),
                                  lv.algorithm.kind)
    return out
