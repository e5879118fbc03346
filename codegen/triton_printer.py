"""Print derived sympy expressions as Triton source: `nlc.derive.printer.Printer` (which prints
PyTorch) with Triton's functions. Symbols print through a name map the caller gives (roles -> block
names in the kernel); nothing from a spec reaches the output unsanitised.

Triton has no `**`, `sign` or `tanh` on blocks: integer powers print as products, half-integer ones
through `tl.sqrt`, other real powers as exp(p·log x) (x > 0, as torch's `**` needs for them too);
sign as nested `tl.where`. A Dirac delta (the derivative of sign or of a branch switch) prints as 0:
autograd takes the same derivative (`diff`). `times` and `join` build sums of printed terms."""
from __future__ import annotations

import sympy

from nlc.derive.printer import Printer, check_names

_MAX_PRODUCT = 8  # integer powers up to this print as products


def to_triton(expr: sympy.Expr, names: dict[sympy.Symbol, str]) -> str:
    """Render `expr`; every free symbol must be in `names`."""
    expr = expr.replace(sympy.DiracDelta, lambda *args: sympy.Integer(0))
    check_names(expr, names)
    return _TritonPrinter(names).print(expr)


class _TritonPrinter(Printer):
    FUNCS = {sympy.exp: "tl.exp", sympy.log: "tl.log", sympy.Abs: "tl.abs"}
    WHERE, MAXIMUM, MINIMUM = "tl.where", "tl.maximum", "tl.minimum"

    def _other(self, e) -> str:
        if isinstance(e, (sympy.And, sympy.Or)):
            op = " & " if isinstance(e, sympy.And) else " | "
            return "(" + op.join(self.print(a) for a in e.args) + ")"
        if isinstance(e, sympy.sign):
            x = self.print(e.args[0])
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
        if isinstance(e, sympy.tanh):
            return f"(2.0 * tl.sigmoid(2.0 * {self._atom(e.args[0])}) - 1.0)"
        raise NotImplementedError(f"cannot print {type(e).__name__} as Triton: {e}")

    def _power(self, base, exp) -> str:
        if exp.is_Float and float(exp).is_integer():
            exp = sympy.Integer(int(exp))
        doubled = 2 * exp
        if exp.is_Integer and abs(int(exp)) <= _MAX_PRODUCT:
            text = " * ".join([self._atom(base)] * abs(int(exp)))
            return f"({text})" if exp > 0 else f"(1.0 / ({text}))"
        if doubled.is_Integer and abs(int(doubled)) <= 2 * _MAX_PRODUCT + 1:  # half-integer
            whole = (abs(int(doubled)) - 1) // 2
            text = " * ".join([f"tl.sqrt({self.print(base)})"] + [self._atom(base)] * whole)
            return f"({text})" if exp > 0 else f"(1.0 / ({text}))"
        return f"tl.exp({self._atom(exp)} * tl.log({self.print(base)}))"

    def _arg(self, e) -> str:
        return self.print(e)

    def _simple(self, e) -> bool:
        return e.func in self.FUNCS or isinstance(e, (sympy.Piecewise, sympy.sign, sympy.Max, sympy.Min))


def diff(expr, symbol) -> sympy.Expr:
    """∂expr/∂symbol with the derivative of sign (a Dirac delta) taken as 0, as autograd does."""
    return sympy.diff(expr, symbol).replace(sympy.DiracDelta, lambda *args: sympy.Integer(0))


def times(coeff: str, x: str) -> str:
    """coeff * x, dropping a factor of ±1."""
    if coeff in ("1.0", "(1.0)"):
        return x
    if coeff in ("-1.0", "(-1.0)"):
        return f"-{x}"
    return f"{coeff} * {x}"


def join(terms: list[str]) -> str:
    """The sum of printed terms, a leading minus turned into a subtraction."""
    out = terms[0]
    for t in terms[1:]:
        out += f" - {t[1:]}" if t.startswith("-") else f" + {t}"
    return out
