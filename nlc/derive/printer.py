"""Print derived sympy expressions as PyTorch source (`to_torch`). `Printer` holds what every backend
shares and is the base of the Triton printer (`nlc.codegen.triton_printer`). Symbols print through a
name map the caller gives (roles -> local variable names); nothing from a spec reaches the output
unsanitised."""
from __future__ import annotations

import sympy


def to_torch(expr: sympy.Expr, names: dict[sympy.Symbol, str]) -> str:
    """Render `expr`; every free symbol must be in `names`."""
    check_names(expr, names)
    return Printer(names).print(expr)


def check_names(expr: sympy.Expr, names: dict[sympy.Symbol, str]) -> None:
    missing = expr.free_symbols - set(names)
    if missing:
        raise KeyError(f"no name for symbols {sorted(map(str, missing))}")


class Printer:
    """Names, numbers, sums, products, powers, Piecewise, relations, Max/Min and one-argument
    functions, printed for PyTorch. A backend overrides the function table and the hooks below."""
    FUNCS = {sympy.exp: "torch.exp", sympy.log: "torch.log", sympy.sign: "torch.sign",
             sympy.Abs: "torch.abs", sympy.tanh: "torch.tanh"}
    WHERE, MAXIMUM, MINIMUM = "torch.where", "torch.maximum", "torch.minimum"

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
        if isinstance(e, (sympy.Max, sympy.Min)):
            fn = self.MAXIMUM if isinstance(e, sympy.Max) else self.MINIMUM
            out = self.print(e.args[0])
            for a in e.args[1:]:
                out = f"{fn}({out}, {self._arg(a)})"
            return out
        if e.func in self.FUNCS:
            return f"{self.FUNCS[e.func]}({self._arg(e.args[0])})"
        return self._other(e)

    def _other(self, e) -> str:
        """What the shared cases do not cover."""
        raise NotImplementedError(f"cannot print {type(e).__name__}: {e}")

    def _power(self, base, exp) -> str:
        if exp == sympy.Rational(1, 2):
            return f"torch.sqrt({self.print(base)})"
        if exp == -1:
            return f"(1 / {self._atom(base)})"
        power = str(int(exp)) if exp.is_Integer else self._atom(exp)
        return f"{self._atom(base)} ** {power}"

    def _piecewise(self, pieces) -> str:
        (value, cond), rest = pieces[0], pieces[1:]
        if cond == sympy.true:
            return self.print(value)
        other = self._piecewise(rest) if rest else "0.0"
        return f"{self.WHERE}({self.print(cond)}, {self._arg(value)}, {other})"

    def _arg(self, e) -> str:
        """An argument of a function call: torch's functions need tensors, so bare numbers are wrapped."""
        text = self.print(e)
        return f"torch.as_tensor({text})" if e.is_Number else text

    def _simple(self, e) -> bool:
        """Whether `e` prints as one call (needs no parentheses as a factor)."""
        return e.func in self.FUNCS

    def _atom(self, e) -> str:
        text = self.print(e)
        simple = e.is_Symbol or (e.is_Number and not text.startswith("-")) or e in self.names \
            or self._simple(e)
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
