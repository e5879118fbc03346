"""The outer optimizer's memory rule, derived by the same machinery as a level's (MATH.md §4.6):
the bias's output gradient dℓ/dy from `derive_bias`, the retention's map from `derive_retention`,
printed to PyTorch by `to_torch` and compiled to elementwise functions.

Keys are the gradient's rows, values the unit vectors (`nlc.optimizer_decl`): outputs Y [R, R] with
row j = M(g_j), V = I. When sympy finds dℓ/dy = c·v (the dot bias) the cotangent is c·I whatever the
memory's output, so Y is never formed; otherwise (l2: delta momentum, lp, huber, robust) it is."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import sympy
import torch

from .. import ir
from .bias import BiasRule, derive_bias
from .printer import to_torch
from .retention import RetentionRule, derive_retention
from .symbols import e, lr, r, s, v, w0, y

FORMS = ("elementwise", "threshold")  # retention forms an optimizer memory applies entry by entry


@dataclass(frozen=True)
class OptimizerRule:
    """optimizer: the checked declaration. bias / retention: the derived rules.
    coefficient: c when dℓ/dy = c·v (then the cotangent is c·V), else None.
    output_grad(e, v, y, r): dℓ/dY entry by entry. retain(w0, s, lr): the retention's new state;
    threshold(lr): the soft threshold of `elastic` (None otherwise). second_moment: the dot rule of
    m3's V (a memory of squared gradients)."""
    optimizer: ir.Optimizer
    bias: BiasRule
    retention: RetentionRule
    coefficient: float | None
    output_grad: Callable
    retain: Callable
    threshold: Callable | None
    second_moment: "OptimizerRule | None" = None

    @property
    def lr(self) -> float:
        """The memory's own step (gd's lr; m3 uses beta1, beta2, beta3 instead)."""
        return float(self.optimizer.algorithm.args.get("lr", 1.0))

    def describe(self) -> str:
        opt = self.optimizer
        return "\n".join([
            "optimizer (outer level, MATH.md §4.6): memory of gradient rows g_j -> unit vectors e_j",
            f"  memory     {opt.memory.describe()}",
            f"  bias       {opt.bias.describe()}: loss {self.bias.loss}",
            f"             dℓ/dy = {self.bias.grad}",
            f"  retention  {opt.retention.describe()} [{self.retention.form}]: {self.retention.objective}",
            f"             w = {self.retention.new}",
            f"  algorithm  {opt.algorithm.describe()}: m = retain(m, -lr·dℓ/dm)",
            f"  readout    {opt.readout.describe()}: W = W - lr_outer·readout(M(I))"])


def derive_optimizer(optimizer: ir.Optimizer) -> OptimizerRule:
    rule = _rule(optimizer, optimizer.bias)
    if optimizer.algorithm.kind == "m3":
        rule = replace(rule, second_moment=_rule(optimizer, ir.Choice("dot", {}, None)))
    return rule


def _rule(optimizer: ir.Optimizer, bias_choice: ir.Choice) -> OptimizerRule:
    bias, retention = derive_bias(bias_choice), derive_retention(optimizer.retention)
    coefficient = sympy.simplify(bias.grad / v)
    linear = coefficient.is_number and not bias.uses_norm
    grad = _compile("e, v, y, r", bias.grad, {e: "e", v: "v", y: "y", r: "r"})
    names = {w0: "w0", s: "s", lr: "lr"}
    retain = _compile("w0, s, lr", retention.new, names)
    threshold = (_compile("lr", retention.threshold, {lr: "lr"})
                 if retention.form == "threshold" else None)
    assert retention.form in FORMS, retention.form  # the checker admits only these retentions
    return OptimizerRule(optimizer, bias, retention, float(coefficient) if linear else None, grad,
                         retain, threshold)


def _compile(arguments: str, expr: sympy.Expr, names: dict) -> Callable:
    """A torch function of the role symbols: the source comes from sympy over roles and numbers only
    (the checker allows no gates in an optimizer), so nothing from the spec's text reaches it."""
    body = to_torch(sympy.sympify(expr), names)
    return eval(f"lambda {arguments}: {body}", {"torch": torch})  # noqa: S307
