"""Print derived sympy expressions as Triton source (the sibling of `nlc.derive.printer`, which prints
PyTorch). Symbols print through a name map the caller gives (roles -> block names in the kernel);
nothing from a spec reaches the output unsanitised.

Triton has no `**`, `sign` or `tanh` on blocks: integer powers print as products, half-integer ones
through `tl.sqrt`, other real powers as exp(p·log x) (x > 0, as torch's `**` needs for them too);
sign as nested `tl.where`. A Dirac delta (the derivative of sign or of a branch switch) prints as 0:
autograd takes the same derivative."""
from __future__ import annotations

import sympy

_FUNCS = {sympy.exp: "tl.exp", sympy.log: "tl.log", sympy.Abs: "tl.abs"}
_MAX_PRODUCT = 8  # integer powers up to this print as products


def to_triton(expr: sympy.Expr, names: dict[sympy.Symbol, str]) -> str:
    """Render `expr`; every free symbol must be in `names`."""
    expr = expr.replace(sympy.DiracDelta, lambda *args: sympy.Integer(0))
    missing = expr.free_symbols - set(names)
    if missing:
        raise KeyError(f"no name for symbols {sorted(map(str, missing))}")
    return _Printer(names).print(expr)


class _Printer:
    def __init__(self, names):
        self.names = names

    def print(self, e) -> str:
        if e in self.names:
            return self.names[e]
        if e.is_Number:
            return _number(e)
        if isinstance(e, sympy.Add):
            terms = [self.print(t) for t in sympy.Add.make_args(e)]
            out = terms[0]
            for t in terms[1:]:
                out += f" - {t[1:]}" if t.startswith("-") and not t.startswith("-(") else f" + {t}"
            return f"({out})"
        if isinstance(e, sympy.Mul):
            num, den = sympy.fraction(e)
            if den != 1:
                return f"({self.print(num)} / {self._atom(den)})"
            factors = list(sympy.Mul.make_args(e))
            if factors[0] == -1:
                return "-" + self._atom(sympy.Mul(*factors[1:]))
            return " * ".join(self._atom(f) for f in factors)
        if isinstance(e, sympy.Pow):
            return self._power(*e.args)
        if isinstance(e, sympy.Piecewise):
            return self._piecewise(e.args)
        if isinstance(e, sympy.core.relational.Relational):
            return f"({self.print(e.lhs)} {e.rel_op} {self.print(e.rhs)})"
        if isinstance(e, (sympy.And, sympy.Or)):
            op = " & " if isinstance(e, sympy.And) else " | "
            return "(" + op.join(self.print(a) for a in e.args) + ")"
        if isinstance(e, (sympy.Max, sympy.Min)):
            fn = "tl.maximum" if isinstance(e, sympy.Max) else "tl.minimum"
            out = self.print(e.args[0])
            for a in e.args[1:]:
                out = f"{fn}({out}, {self.print(a)})"
            return out
        if isinstance(e, sympy.sign):
            x = self.print(e.args[0])
            return f"tl.where({x} > 0, 1.0, tl.where({x} < 0, -1.0, 0.0))"
        if isinstance(e, sympy.tanh):
            return f"(2.0 * tl.sigmoid(2.0 * {self._atom(e.args[0])}) - 1.0)"
        if e.func in _FUNCS:
            return f"{_FUNCS[e.func]}({self.print(e.args[0])})"
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

    def _piecewise(self, pieces) -> str:
        (value, cond), rest = pieces[0], pieces[1:]
        if cond == sympy.true:
            return self.print(value)
        other = self._piecewise(rest) if rest else "0.0"
        return f"tl.where({self.print(cond)}, {self.print(value)}, {other})"

    def _atom(self, e) -> str:
        text = self.print(e)
        simple = e.is_Symbol or (e.is_Number and not text.startswith("-")) or e in self.names \
            or e.func in _FUNCS or isinstance(e, (sympy.Piecewise, sympy.sign, sympy.Max, sympy.Min))
        wrapped = text.startswith("(") and text.endswith(")") and _balanced(text[1:-1])
        return text if simple or wrapped else f"({text})"


def _balanced(text: str) -> bool:
    depth = 0
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if depth < 0:
            return False
    return depth == 0


def _number(e) -> str:
    if e.is_Integer:
        return f"{int(e)}.0" if abs(int(e)) < 10 ** 15 else repr(float(e))
    if e.is_Rational:
        return f"({int(e.p)}.0 / {int(e.q)}.0)"
    return repr(float(e))
