"""Derived rules against torch.autograd and direct optimisation: each bias gradient equals autograd of
the loss written independently in torch; each retention map solves its proximal problem."""
import math

import pytest
import sympy
import torch

from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.bias import derive_bias
from nlc.derive.printer import to_torch
from nlc.derive.retention import derive_retention

torch.manual_seed(0)
D = ir.gate_symbol("delta")


def _evaluate(expr, **values):
    names = {sym: name for name, sym in
             [("e", S.e), ("r", S.r), ("v", S.v), ("y", S.y), ("w0", S.w0), ("s", S.s), ("lr", S.lr),
              ("A", S.A), ("N", S.N), ("n", S.n), ("lw0", S.lw0), ("delta", D)]}
    code = to_torch(expr, {k: v for k, v in names.items() if k in expr.free_symbols})
    return eval(code, {"torch": torch}, values)


# Each loss written directly in torch (not from the sympy definition): e = y - v, one token [V].
LOSSES = {
    ("dot", ()): lambda y, v, d: -(y * v).sum(),
    ("l2", ()): lambda y, v, d: 0.5 * ((y - v) ** 2).sum(),
    ("lp", (3,)): lambda y, v, d: ((y - v).abs() ** 3).sum(),
    ("lp", (1.5,)): lambda y, v, d: ((y - v).abs() ** 1.5).sum(),
    ("l1", ()): lambda y, v, d: (y - v).abs().sum(),
    ("huber_coord", ()): lambda y, v, d: torch.nn.functional.huber_loss(y, v, delta=d, reduction="sum"),
    ("huber_norm", ()): lambda y, v, d: (lambda r: 0.5 * r ** 2 if r <= d else d * (r - d / 2))(
        (y - v).norm()),
    ("robust", ()): lambda y, v, d: 0.5 * (y - v).norm() ** 2 + 0.3 * (y - v).norm() + 0.045,
}


def _choice(name, args):
    if name == "lp":
        return ir.Choice("lp", {"p": sympy.sympify(args[0]), "eps": 0.0}, None)
    if name == "huber_coord":
        return ir.Choice("huber", {"delta": D, "form": "coord"}, None)
    if name == "huber_norm":
        return ir.Choice("huber", {"delta": D, "form": "norm"}, None)
    if name == "robust":
        return ir.Choice("robust", {"shift": sympy.Float(0.3)}, None)
    return ir.Choice(name, {"eps": 0.0} if name == "l1" else {}, None)


@pytest.mark.parametrize("key", list(LOSSES), ids=lambda k: k[0] + "".join(map(str, k[1])))
@pytest.mark.parametrize("delta", [0.2, 5.0])
def test_bias_gradient_equals_autograd(key, delta):
    rule = derive_bias(_choice(*key))
    for _ in range(5):
        y = torch.randn(6, dtype=torch.float64, requires_grad=True)
        v = torch.randn(6, dtype=torch.float64)
        (expected,) = torch.autograd.grad(LOSSES[key](y, v, delta), y)
        e = (y - v).detach()
        got = _evaluate(rule.grad, e=e, r=e.norm(), v=v, y=y.detach(),
                        delta=torch.tensor(delta, dtype=torch.float64))
        torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64).expand(6), expected)


def test_yaad_mixture_is_the_published_piecewise_rule():
    rule = derive_bias(ir.Choice("huber", {"delta": D, "form": "mixture"}, None))
    e = torch.tensor([0.3, -2.0, 0.5], dtype=torch.float64)
    small = _evaluate(rule.grad, e=e, r=e.norm(), delta=torch.tensor(10.0, dtype=torch.float64))
    large = _evaluate(rule.grad, e=e, r=e.norm(), delta=torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(small, e)
    torch.testing.assert_close(large, 0.5 * torch.sign(e))


def _objective(w, w0, s, lr, retention):
    """The proximal objective of each retention, written directly."""
    quad = -s * w + 0.5 * (w - w0) ** 2
    if retention == "none":
        return quad
    if retention == "l2":
        return quad + lr * w ** 2 / (2 * 0.7)
    if retention == "elastic":
        return quad + lr * (w ** 2 / (2 * 1.5) + w.abs() / 4.0)
    raise AssertionError


@pytest.mark.parametrize("retention", ["none", "l2", "elastic"])
def test_retention_map_minimises_its_objective(retention):
    args = {"none": {}, "l2": {"global": sympy.Float(0.7)},
            "elastic": {"l1": sympy.Float(4.0), "l2": sympy.Float(1.5)}}[retention]
    rule = derive_retention(ir.Choice(retention, args, None))
    w0, s = torch.randn(200, dtype=torch.float64), torch.randn(200, dtype=torch.float64)
    lr = torch.tensor(0.4, dtype=torch.float64)
    centre = _evaluate(rule.new, w0=w0, s=s, lr=lr)
    w = centre if rule.threshold is None else torch.sign(centre) * (
        centre.abs() - _evaluate(rule.threshold, lr=lr)).clamp_min(0)
    best = _objective(w, w0, s, lr, retention)
    for shift in (1e-4, -1e-4, 1e-2, -1e-2):
        assert (_objective(w + shift, w0, s, lr, retention) >= best - 1e-12).all()
    if retention == "elastic":
        assert (w == 0).any(), "the soft threshold should zero some entries"


def test_kl_global_matches_the_closed_form_of_the_table():
    """MATH.md §1.3: W = Softmax((1 - lam) log W0 - eta' g), lam = (1/a)/(1/a + 1/eta), eta' = 1/(1/a + 1/eta)."""
    a, eta = 0.8, 0.3
    rule = derive_retention(ir.Choice("kl", {"decay": None, "global": ir.gate_symbol("a"),
                                             "axis": "row", "mass": 1.0}, None))
    w0 = torch.softmax(torch.randn(5, dtype=torch.float64), 0)
    g = torch.randn(5, dtype=torch.float64)
    z = _evaluate(rule.new.subs(ir.gate_symbol("a"), a), lw0=torch.log(w0), s=-eta * g,
                  lr=torch.tensor(eta, dtype=torch.float64))
    lam, eta_p = (1 / a) / (1 / a + 1 / eta), 1 / (1 / a + 1 / eta)
    torch.testing.assert_close(torch.softmax(z, 0), torch.softmax((1 - lam) * torch.log(w0) - eta_p * g, 0))


@pytest.mark.parametrize("q", [4.0, 3.0, 1.5])
def test_lq_exact_map_is_the_gradient_of_the_conjugate(q):
    rule = derive_retention(ir.Choice("lq", {"q": sympy.Float(q), "decay": sympy.Integer(1),
                                             "map": "exact"}, None))
    p = q / (q - 1)
    A = torch.randn(12, dtype=torch.float64, requires_grad=True)
    conjugate = A.abs().pow(p).sum().pow(2 / p) / (2 * (p - 1))
    (expected,) = torch.autograd.grad(conjugate, A)
    N = A.detach().abs().pow(p).sum().pow(1 / p)
    torch.testing.assert_close(_evaluate(rule.new, A=A.detach(), N=N), expected)


def test_lq_miras_map_is_the_published_rescale():
    rule = derive_retention(ir.Choice("lq", {"q": sympy.Integer(4), "decay": sympy.Integer(1),
                                             "map": "miras"}, None))
    A = torch.randn(7, dtype=torch.float64)
    N = A.abs().pow(4).sum().pow(0.25)
    torch.testing.assert_close(_evaluate(rule.new, A=A, N=N), A / N ** 2)


@pytest.mark.parametrize("kind", ["exact", "miras"])
def test_lq_slope_is_the_derivative_of_the_map_with_its_norm_held_fixed(kind):
    """The slope that `apply = chunk` linearises with: d psi / dA at fixed N, by autograd, entry by
    entry; for the miras map it is N^(2-q), free of A, so psi(A) = slope·A."""
    rule = derive_retention(ir.Choice("lq", {"q": sympy.Integer(4), "decay": sympy.Integer(1),
                                             "map": kind}, None))
    A = torch.randn(9, dtype=torch.float64, requires_grad=True)
    N = torch.tensor(1.7, dtype=torch.float64)
    (expected,) = torch.autograd.grad(_evaluate(rule.new, A=A, N=N).sum(), A)
    torch.testing.assert_close(_evaluate(rule.slope, A=A.detach(), N=N).expand(9), expected)
    assert rule.slope.has(sympy.Symbol("A", real=True)) == (kind == "exact")


def test_implicit_step_solves_the_exact_proximal_problem():
    """W = argmin ½||Wk - v||² + ||W - W0||²/(2 lr), solved by a linear system, equals the derived step."""
    rule = derive_retention(ir.Choice("implicit", {}, None))
    K, V, lr = 5, 3, 0.7
    W0, k, v = torch.randn(V, K, dtype=torch.float64), torch.randn(K, dtype=torch.float64), torch.randn(V, dtype=torch.float64)
    system = torch.outer(k, k) + torch.eye(K, dtype=torch.float64) / lr
    W = torch.linalg.solve(system, (torch.outer(v, k) + W0 / lr).T).T
    eps = _evaluate(rule.new, lr=torch.tensor(lr, dtype=torch.float64), n=k @ k)
    torch.testing.assert_close(W0 - eps * torch.outer(W0 @ k - v, k), W)
    assert math.isclose(float(eps), lr / (1 + lr * float(k @ k)))
