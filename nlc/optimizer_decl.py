"""`optimizer { ... }` -> `ir.Optimizer`: the outer optimizer as a level of the same algebra
(MATH.md §4.6). A mixin of the checker (`nlc.lower`), beside `LevelFields`, whose option parsing it
reuses for memory, bias, retention and `gd`; `m3`, `readout` and `lr` are the optimizer's own.

The memory is one per parameter tensor W [R, C] (1-D: [1, n]; more axes flattened after the first).
Its keys are the gradient's rows g_j, its values the unit vectors e_j (P = I), so the dot bias is
ell(m) = -<m G^T, I> = -<m, G>: plain momentum; l2 gives delta momentum. The step is the memory read
at the unit queries (the matrix itself for a matrix memory), mapped by `readout`."""
from __future__ import annotations

from dataclasses import replace

import sympy

from . import ast, ir
from .diagnostics import Abort, nearest

FIELDS = ("memory", "bias", "retention", "algorithm", "readout", "lr")
# Retentions whose map is elementwise in (old state, step): the ones an optimizer memory can use.
RETENTIONS = ("none", "decay", "l2", "elastic")
# The optimizer's own calls: argument -> default (None: required). All are constants.
M3 = {"beta1": 1.0, "beta2": 1.0, "beta3": 1.0, "alpha": 1.0, "every": None, "eps": 1e-8}
READOUTS = {"identity": {}, "newton_schulz": {"steps": 5.0}}
MOMENTUM_HINT = ("momentum is this declaration itself: memory matrix, bias dot, retention "
                 "decay(beta), algorithm gd(lr = 1); Muon adds `readout newton_schulz(5)`")


class OptimizerFields:
    def _optimizer(self, d: ast.OptimizerDecl) -> ir.Optimizer:
        fields: dict[str, ast.Field] = {}
        for f in d.fields:
            if f.key not in FIELDS:
                self.diag.error(f"unknown optimizer field '{f.key}'", f.span,
                                "one of: " + ", ".join(FIELDS), nearest(f.key, FIELDS))
            elif f.key in fields:
                self.diag.error(f"optimizer field '{f.key}' given twice", f.span, "one value per field")
            else:
                fields[f.key] = f
        for required in ("memory", "bias", "algorithm"):
            if required not in fields:
                self.diag.error(f"the optimizer has no '{required}'", d.span,
                                f"a `{required} ...` line inside `optimizer {{ }}`")
        if any(r not in fields for r in ("memory", "bias", "algorithm")):
            raise Abort
        memory = self._optimizer_memory(fields["memory"].value)
        bias = self._choice("bias", fields["bias"].value)
        if bias.kind == "omega":
            self._fail("omega sums a window of tokens; the optimizer sees one gradient per step",
                       bias.span, "dot, l2, lp, l1, huber or robust")
        retention = (self._choice("retention", fields["retention"].value)
                     if "retention" in fields else ir.Choice("none", {}, None))
        if retention.kind not in RETENTIONS:
            self._fail(f"retention '{retention.kind}' has no elementwise map for an optimizer memory",
                       retention.span, " or ".join(RETENTIONS))
        algorithm = self._optimizer_algorithm(fields["algorithm"].value)
        if algorithm.kind == "m3" and memory.kind != "matrix":
            self._fail("m3 orthogonalizes matrix momenta", memory.span, "memory matrix")
        readout = (self._optimizer_call(fields["readout"].value, READOUTS, "readout")
                   if "readout" in fields else ir.Choice("identity", {}, None))
        lr = None
        if "lr" in fields:
            lr = self._number(fields["lr"].value)
            if lr <= 0:
                self._fail(f"the optimizer's lr must be > 0, got {lr:g}", fields["lr"].value.span,
                           "a positive learning rate")
        for choice in (bias, retention, algorithm):
            self._constant_args(choice)
        return ir.Optimizer(memory, bias, retention, algorithm, readout, lr, d.span)

    def _optimizer_memory(self, e: ast.Expr) -> ir.Memory:
        memory = self._memory(e)
        if memory.kind == "vector":
            self._fail("the optimizer's keys (gradient rows) and values (unit vectors) differ in size",
                       e.span, "memory matrix or mlp(...)")
        if memory.kind != "mlp":
            return memory
        flags = {k: v for k, v in e.kwargs} if isinstance(e, ast.Call) else {}
        for flag in ("residual", "gated"):
            if isinstance(flags.get(flag), ast.Name) and flags[flag].id == "true":
                self._fail(f"an optimizer MLP memory maps gradient rows to unit vectors of another size; "
                           f"it has no {flag} form", flags[flag].span, f"{flag} = false")
        if memory.norm != "none":
            self._fail("an optimizer MLP memory has no norm", e.span, "norm = none")
        return replace(memory, residual=False)

    def _optimizer_algorithm(self, e: ast.Expr) -> ir.Choice:
        kind = e.id if isinstance(e, ast.Name) else getattr(e, "func", "")
        if kind == "gd":
            return self._choice("algorithm", e)
        if kind == "m3":
            return self._optimizer_call(e, {"m3": M3}, "algorithm")
        self._fail(f"unknown optimizer algorithm '{kind}'", e.span,
                   "gd(lr) or m3(beta1, beta2, beta3, alpha, every, eps)",
                   MOMENTUM_HINT if kind in ("momentum", "muon") else nearest(kind, ("gd", "m3")))

    def _optimizer_call(self, e: ast.Expr, table: dict, what: str) -> ir.Choice:
        """`name` or `name(args)` from `table`: constant arguments, positional or by keyword."""
        kind = e.id if isinstance(e, ast.Name) else getattr(e, "func", "")
        if kind not in table:
            self._fail(f"unknown optimizer {what} '{kind}'", e.span, " or ".join(table),
                       nearest(kind, table))
        sig = table[kind]
        positional = e.args if isinstance(e, ast.Call) else ()
        if len(positional) > len(sig):
            self._fail(f"{kind}() takes at most {len(sig)} arguments", positional[len(sig)].span,
                       f"{kind}({', '.join(sig)})")
        given = dict(zip(sig, positional))
        for key, value in (e.kwargs if isinstance(e, ast.Call) else ()):
            if key not in sig or key in given:
                self._fail(f"{kind}() has no argument '{key}'" if key not in sig else
                           f"argument '{key}' given twice", value.span, ", ".join(sig),
                           nearest(key, sig))
            given[key] = value
        args = {}
        for name, default in sig.items():
            if name not in given and default is None:
                self._fail(f"{kind}() needs '{name}'", e.span, f"{kind}({name} = ...)")
            if name in ("every", "steps"):
                args[name] = self._int(given[name], f"{kind}({name})") if name in given else int(default)
            else:
                args[name] = self._number(given[name]) if name in given else default
        if args.get("eps", 1.0) <= 0:
            self._fail("eps must be > 0", given["eps"].span, "a small positive number")
        return ir.Choice(kind, args, e.span)

    def _constant_args(self, choice: ir.Choice) -> None:
        """Gates are per token and head; the optimizer steps once per batch: numbers only."""
        for value in choice.args.values():
            gates = ir.gate_names(value)
            if gates:
                self._fail(f"the optimizer's {choice.kind}() reads gate '{gates[0]}'", choice.span,
                           "numbers or parameters (the optimizer steps once per batch, not per token)")
            if isinstance(value, sympy.Expr) and not value.is_number:
                self._fail(f"the optimizer's {choice.kind}() is not a constant", choice.span,
                           "numbers or parameters")
