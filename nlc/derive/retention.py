"""Retention gates, defined once as a local premetric D and a global regulariser G (or, for the
published parameterisations, as their map); the per-entry update is derived by sympy from the
stationarity of the linearised proximal problem (MATH.md §1.2-1.3):

    w = argmin_w  -s·w + D(w, w0) + lr·G(w)        with s = the algorithm's step (-lr·g for GD)
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy

from .. import ir
from .symbols import A, N, lam, lr, lw0, n, s, sigma, v, w, w0, y, y0, z


@dataclass(frozen=True)
class RetentionRule:
    """form:
    - 'elementwise': w = new(w0, s)
    - 'threshold':   c = new(w0, s); w = sign(c)·max(|c| - threshold, 0)
    - 'softmax':     w = mass · softmax(new(lw0, s)) over `axis` slices (lw0 = log w0)
    - 'mirror':      accumulator A' = decay·A + s; w = new(A, N) with N = ||A||_norm_p; slope =
                     d new / dA with N held fixed (an odd map whose slope is free of A is slope(N)·A:
                     `apply = chunk` reads w = slope(N_0)·A within a chunk, N_0 at its start)
    - 'implicit':    w = w0 + s with the algorithm's lr replaced by lr_effective(lr, n), n = ||k||^2
    - 'dgd':         w = decay·w0 - lr·a (aᵀ w0) + s, a = the layer's input
    objective: what was solved (for the generated docstring)."""
    kind: str
    form: str
    new: sympy.Expr
    objective: str
    threshold: sympy.Expr | None = None
    decay: sympy.Expr | None = None
    norm_p: sympy.Expr | None = None
    slope: sympy.Expr | None = None


def derive_retention(choice: ir.Choice) -> RetentionRule:
    return _derive_retention(choice.kind, tuple(sorted(choice.args.items())))


@lru_cache(maxsize=None)
def _derive_retention(kind: str, items: tuple) -> RetentionRule:
    """Derivations are pure in (kind, args): each is done once per process."""
    args = dict(items)
    quad = (w - w0) ** 2 / 2
    match kind:
        case "none":
            return _prox(kind, quad, "-s·w + (w - w0)²/2")
        case "l2":
            alpha = args["global"]
            return _prox(kind, quad + lr * w ** 2 / (2 * alpha), "-s·w + (w - w0)²/2 + lr·w²/(2·alpha)")
        case "decay":
            return RetentionRule(kind, "elementwise", args["rate"] * w0 + s,
                                 "published parameterisation of l2 retention: w = rate·w0 + s")
        case "elastic":
            return _elastic(args["l1"], args["l2"])
        case "kl":
            return _kl(args)
        case "lq":
            return _lq(args)
        case "implicit":
            return _implicit()
        case "dgd":
            return RetentionRule(kind, "dgd", args["decay"] * w0 + s,
                                 "delta gradient descent: W (decay·I - lr·a aᵀ) + s (NL-arXiv)",
                                 decay=args["decay"])
    raise ValueError(f"no retention rule for {kind!r}")


def _prox(kind: str, objective: sympy.Expr, text: str) -> RetentionRule:
    stationary = sympy.diff(-s * w + objective, w)
    (solution,) = sympy.solve(stationary, w)
    return RetentionRule(kind, "elementwise", sympy.simplify(solution), text)


def _elastic(l1: sympy.Expr, l2: sympy.Expr) -> RetentionRule:
    """G = w²/(2·l2) + |w|/l1. On each side of 0 the problem is smooth: solve with sign sigma;
    the centre (sigma = 0) minus the sigma = +1 solution is the soft threshold."""
    objective = -s * w + (w - w0) ** 2 / 2 + lr * (w ** 2 / (2 * l2) + sigma * w / l1)
    (branch,) = sympy.solve(sympy.diff(objective, w), w)
    centre = sympy.simplify(branch.subs(sigma, 0))
    threshold = sympy.simplify(centre - branch.subs(sigma, 1))
    return RetentionRule("elastic", "threshold", centre,
                         "-s·w + (w - w0)²/2 + lr·(w²/(2·l2) + |w|/l1)", threshold=threshold)


def _kl(args) -> RetentionRule:
    """KL(w || w0) + lr/alpha · Σ w log w on the simplex, in log space z = log w. The Lagrange
    multiplier and constants are shared by a slice, so softmax removes them."""
    if args["decay"] is not None:
        return RetentionRule("kl", "softmax", args["decay"] * lw0 + s,
                             "published parameterisation (Memora): softmax(decay·log w0 + s)")
    alpha = args["global"]
    stationary = -s + (z - lw0 + 1) + lr / alpha * (z + 1) + lam
    (solution,) = sympy.solve(stationary, z)
    coeff_w0, coeff_s = sympy.diff(solution, lw0), sympy.diff(solution, s)
    rest = sympy.simplify(solution - coeff_w0 * lw0 - coeff_s * s)
    assert not rest.has(lw0) and not rest.has(s), "KL solution is not affine in log w0 and s"
    return RetentionRule("kl", "softmax", sympy.simplify(coeff_w0 * lw0 + coeff_s * s),
                         "-s·w + KL(w||w0) + lr/alpha·Σ w log w, Σ w = mass")


def _lq(args) -> RetentionRule:
    q = args["q"]
    if args["map"] == "miras":
        new = A / N ** (q - 2)
        return RetentionRule("lq", "mirror", new, "Miras' published map: W = A / ||A||_q^(q-2)",
                             decay=args["decay"], norm_p=q, slope=_frozen_slope(new))
    # FTRL with R = ||W||_q² / (2(q-1)): W = ∇R*(A), R*(A) = ||A||_p² / (2(p-1)), p = q/(q-1).
    p = q / (q - 1)
    a1, a2 = sympy.symbols("a1 a2", positive=True)
    conjugate = (a1 ** p + a2 ** p) ** (2 / p) / (2 * (p - 1))
    slope = sympy.diff(conjugate, a1).subs(a1 ** p + a2 ** p, N ** p)
    slope = sympy.powsimp(sympy.simplify(slope), force=True)
    mapped = (slope * sympy.sign(A)).subs(a1, sympy.Abs(A))
    assert not mapped.has(a2), "mirror map did not reduce to a norm"
    return RetentionRule("lq", "mirror", mapped, "FTRL mirror map of ||W||_q²/(2(q-1))",
                         decay=args["decay"], norm_p=p, slope=_frozen_slope(mapped))


def _frozen_slope(new: sympy.Expr) -> sympy.Expr:
    """d new / dA with the norm N held fixed, for a map odd in A (both lq maps): on A > 0 the
    derivative of the odd function, at |A| (it is even)."""
    assert sympy.simplify(new.subs(A, -A) + new) == 0, "mirror map is not odd in the accumulator"
    positive = sympy.Symbol("A_pos", positive=True)
    return sympy.simplify(sympy.diff(new.subs(A, positive), positive)).subs(positive, sympy.Abs(A))


def _implicit() -> RetentionRule:
    """Exact l2 loss with proximity: along k the optimum has output y solving
    (y - v)·n + (y - y0)/lr = 0; the step is then -lr·(y - v)·k = -eps·(y0 - v)·k."""
    (y_star,) = sympy.solve((y - v) * n + (y - y0) / lr, y)
    eps = sympy.simplify(lr * (y_star - v) / (y0 - v))
    assert not eps.has(v) and not eps.has(y0)
    return RetentionRule("implicit", "implicit", eps,
                         "exact ½(Wk - v)² + ||W - W0||²/(2·lr): lr_effective = " + str(eps))
