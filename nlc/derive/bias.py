"""Attentional biases, defined once as losses; their output gradients dℓ/dy are derived by sympy.

A bias is either coordinate-separable, ℓ = Σ_j f(e_j, |e_j|), or a function of the error norm,
ℓ = F(||e||), or the dot product ℓ = -<y, v>. The parameter gradient follows by the chain rule
through the memory (outer product for a matrix memory, a vjp for an MLP)."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy

from .. import ir
from .symbols import a, e, r, v, y


@dataclass(frozen=True)
class BiasRule:
    """loss: the per-token loss (coordinate form summed over j, or norm form);
    grad: dℓ/dy for one output coordinate, in symbols e, r, v and gate/param values."""
    kind: str
    loss: sympy.Expr
    grad: sympy.Expr
    uses_norm: bool


def derive_bias(choice: ir.Choice) -> BiasRule:
    return _derive_bias(choice.kind, tuple(sorted(choice.args.items())))


@lru_cache(maxsize=None)
def _derive_bias(kind: str, items: tuple) -> BiasRule:
    """Derivations are pure in (kind, args): each is done once per process."""
    args = dict(items)
    match kind:
        case "dot":
            loss = -y * v
            return BiasRule(kind, loss, sympy.diff(loss, y), False)
        case "l2":
            return _coordinate(kind, e ** 2 / 2, 0.0)
        case "lp":
            return _coordinate(kind, a ** args["p"], args["eps"])
        case "l1":
            return _coordinate(kind, a, args["eps"])
        case "huber":
            d = args["delta"]
            if args["form"] == "coord":
                return _coordinate(kind, sympy.Piecewise((a ** 2 / 2, a <= d), (d * (a - d / 2), True)), 0.0)
            if args["form"] == "norm":
                return _norm(kind, sympy.Piecewise((r ** 2 / 2, r <= d), (d * (r - d / 2), True)))
            return _mixture(kind, d)
        case "robust":
            shift = args["shift"]
            return _norm(kind, r ** 2 / 2 + shift * r + shift ** 2 / 2)
    raise ValueError(f"no bias rule for {kind!r}")  # omega is applied around its inner rule


def _abs_chain(eps: float) -> sympy.Expr:
    """d|e|/de, or d sqrt(e^2 + eps)/de for the smoothed surrogate (MATH.md §5.7.2)."""
    return sympy.sign(e) if not eps else e / sympy.sqrt(e ** 2 + sympy.Float(eps))


def _abs_value(eps: float) -> sympy.Expr:
    return sympy.Abs(e) if not eps else sympy.sqrt(e ** 2 + sympy.Float(eps))


def _coordinate(kind: str, f: sympy.Expr, eps: float) -> BiasRule:
    """ℓ = Σ_j f(e_j, a_j) with a = |e|: dℓ/dy_j = ∂f/∂e + ∂f/∂a · d|e|/de."""
    grad = sympy.diff(f, e) + sympy.powsimp(sympy.diff(f, a), force=True) * _abs_chain(eps)
    grad = sympy.piecewise_fold(grad.subs(a, _abs_value(eps)))
    return BiasRule(kind, f.subs(a, _abs_value(eps)), grad, False)


def _norm(kind: str, F: sympy.Expr) -> BiasRule:
    """ℓ = F(r), r = ||e||: dℓ/dy = F'(r) e / r."""
    grad = sympy.piecewise_fold(sympy.diff(F, r) / r * e)
    return BiasRule(kind, F, sympy.simplify(grad), True)


def _mixture(kind: str, d: sympy.Expr) -> BiasRule:
    """Yaad's published rule: the l2 branch while ||e|| <= delta, else delta times the l1 branch.
    Each branch's gradient is derived from its own loss; the switch is on the norm."""
    l2, l1 = _coordinate("l2", e ** 2 / 2, 0.0), _coordinate("l1", a, 0.0)
    loss = sympy.Piecewise((r ** 2 / 2, r <= d), (d * sympy.Abs(e), True))
    grad = sympy.Piecewise((l2.grad, r <= d), (d * l1.grad, True))
    return BiasRule(kind, loss, grad, True)
