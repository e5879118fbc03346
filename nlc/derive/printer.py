"""Print derived sympy expressions as PyTorch source. Symbols print through a name map the caller
gives (roles -> local variable names); nothing from a spec reaches the output unsanitised."""
from __future__ import annotations

import sympy

_FUNCS = {sympy.exp: "torch.exp", sympy.log: "torch.log", sympy.sign: "torch.sign",
          sympy.Abs: "torch.abs", sympy.tanh: "torch.tanh"}


def to_torch(expr: sympy.Expr, names: dict[sympy.Symbol, str]) -> str:
    """Render `expr`; every free symbol must be in `names`."""
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
            base, exp = e.args
            if exp == sympy.Rational(1, 2):
                return f"torch.sqrt({self.print(base)})"
            if exp == -1:
                return f"(1 / {self._atom(base)})"
            power = str(int(exp)) if exp.is_Integer else self._atom(exp)
            return f"{self._atom(base)} ** {power}"
        if isinstance(e, sympy.Piecewise):
            return self._piecewise(e.args)
        if isinstance(e, (sympy.core.relational.Relational,)):
            op = {"<=": "<=", "<": "<", ">=": ">=", ">": ">", "==": "=="}[e.rel_op]
            return f"({self.print(e.lhs)} {op} {self.print(e.rhs)})"
        if isinstance(e, (sympy.Max, sympy.Min)):
            fn = "torch.maximum" if isinstance(e, sympy.Max) else "torch.minimum"
            out = self.print(e.args[0])
            for a in e.args[1:]:
                out = f"{fn}({out}, {self._tensor(a)})"
            return out
        if e.func in _FUNCS:
            return f"{_FUNCS[e.func]}({self._tensor(e.args[0])})"
        raise NotImplementedError(f"cannot print {type(e).__name__}: {e}")

    def _piecewise(self, pieces) -> str:
        (value, cond), rest = pieces[0], pieces[1:]
        if cond == sympy.true:
            return self.print(value)
        other = self._piecewise(rest) if rest else "0.0"
        return f"torch.where({self.print(cond)}, {self._tensor(value)}, {other})"

    def _tensor(self, e) -> str:
        """Functions of torch need tensors: wrap bare numbers."""
        text = self.print(e)
        return f"torch.as_tensor({text})" if e.is_Number else text

    def _atom(self, e) -> str:
        text = self.print(e)
        simple = (e.is_Symbol or (e.is_Number and not text.startswith("-")) or e in self.names
                  or e.func in _FUNCS)
        return text if simple or text.startswith("(") and text.endswith(")") and _balanced(text[1:-1]) \
            else f"({text})"


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
