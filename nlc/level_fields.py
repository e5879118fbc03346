"""Level fields -> `ir.Level`: memory, bias, retention, algorithm (against `nlc.options`), update
period, gradient and read points, init, streams, and which gates the rule uses on which axis.
A mixin of the checker (`nlc.lower`): it uses the checker's names, numbers and diagnostics."""
from __future__ import annotations

import math

import sympy

from . import ast, ir, options
from .diagnostics import Abort, nearest
from .teach_fields import TEACH_BIAS, TeachFields
from .validity import check_level


class LevelFields(TeachFields):
    def _level(self, d: ast.LevelDecl) -> None:
        fields: dict[str, ast.Field] = {}
        for f in d.fields:
            if f.key not in options.LEVEL_FIELDS:
                self.diag.error(f"unknown level field '{f.key}'", f.span,
                                "one of: " + ", ".join(options.LEVEL_FIELDS),
                                nearest(f.key, options.LEVEL_FIELDS))
            elif f.key in fields:
                self.diag.error(f"level field '{f.key}' given twice", f.span, "one value per field")
            else:
                fields[f.key] = f
        required = ("memory", "algorithm") if self._teach_signal(fields) is not None else \
            ("memory", "bias", "algorithm")
        for field in required:
            if field not in fields:
                self.diag.error(f"level '{d.name}' has no '{field}'", d.span,
                                f"a `{field} ...` line inside the level")
        if any(r not in fields for r in required):
            raise Abort
        level = self.level_from_fields(d, fields)
        self.levels = [lv.replace(initialises=(*lv.initialises, d.name)) if lv.name == level.init_from
                       else lv for lv in self.levels]
        self.levels.append(level)
        single_head = len(self.streams[level.key].shape) == 1
        shape = (level.d_value,) if single_head else (level.heads, level.d_value)
        self.streams[d.name] = ir.Stream(d.name, shape, None, d.span, "level")

    def level_from_fields(self, d: ast.LevelDecl, fields: dict[str, ast.Field]) -> ir.Level:
        memory = self._memory(fields["memory"].value)
        teach = self._teach_signal(fields)  # `value teach`: None, or whether δ is an outer constant
        bias = self._choice("bias", fields["bias"].value) if teach is None else TEACH_BIAS
        retention = (self._choice("retention", fields["retention"].value)
                     if "retention" in fields else ir.Choice("none", {}, None))
        algorithm = self._choice("algorithm", fields["algorithm"].value)
        period = 1
        if "update" in fields:
            v = fields["update"].value
            if isinstance(v, ast.Every):
                period = self._int(v.period, "an update period")
            elif isinstance(v, ast.Name) and v.id == "outer":
                period = None
            else:
                self._fail("bad update period", v.span, "every <C> or outer")
        grad_at, grad_chunk = "current", None
        if teach is not None and period is not None:  # at the state the block read
            grad_at, grad_chunk = "chunk", period
        if "gradient" in fields:
            v = fields["gradient"].value
            if isinstance(v, ast.Name) and v.id in ("current", "retained"):
                grad_at = v.id
            elif isinstance(v, ast.Call) and v.func == "chunk_start" and len(v.args) == 1:
                grad_at, grad_chunk = "chunk", self._int(v.args[0], "a gradient chunk size")
            else:
                name = v.id if isinstance(v, ast.Name) else getattr(v, "func", "")
                self._fail("bad gradient point", v.span,
                           "current, retained or chunk_start(C)", nearest(name, options.GRADIENT_POINTS))
        read = self._word(fields, "read", options.READ_POINTS, "after")
        source = None
        if "init" in fields and isinstance(fields["init"].value, ast.Call):
            source = self._init_source(d, fields["init"].value)
            init = "from"
        else:
            init = self._word(fields, "init", options.INITS, "learned" if memory.kind == "mlp" else "zero")
        target, stop = "value", False
        if teach is not None:
            target, stop = "teach", teach
        elif "value" in fields and isinstance(fields["value"].value, ast.Call):
            target, stop = self._self_target(fields["value"].value)
        names = {}
        for role, default in (("key", "k"), ("value", "v"), ("query", "q")):
            if teach is not None and (role == "value" or (role == "key" and role not in fields)):
                continue  # the query's, below
            v = fields[role].value if role in fields else ast.Name(default, d.span)
            if role == "value" and isinstance(v, ast.Call):
                v = v.args[0]
                if v.id == d.name and target == "self":  # its own read-out, computed in its op
                    if read != "before":
                        self._fail(f"level '{d.name}' reads its own output as its target but reads "
                                   "after writing", v.span, "read before",
                                   "the read-out M_{t-1}(q_t) exists before the write only with `read before`")
                    names[role] = d.name
                    continue
            if not isinstance(v, ast.Name):
                self._fail(f"the {role} of a level must name a stream", v.span,
                           "a `let` name, x, or a level name, or `value self(<stream>)`",
                           "declare it with `let` first")
            if v.id not in self.streams:
                self._unknown(v.id, v.span if role in fields else d.span,
                              [n for n in self.streams], f"a stream for the level's {role}")
            names[role] = v.id
            rank = len(self.streams[v.id].shape)
            if rank not in (1, 2):
                self._fail(f"the {role} of level '{d.name}' is '{v.id}', of shape "
                           f"{list(self.streams[v.id].shape)}", v.span if role in fields else d.span,
                           "a stream of shape [d] or [heads, d]")
        if teach is not None:  # δ_t is the gradient at the output M(q_t): key and value shapes are q's
            names = {"key": names["query"], **names, "value": names["query"]}
        shapes = {r: self.streams[names[r]].shape for r in ("key", "query")}
        shapes["value"] = self.streams[names["value"]].shape if names["value"] != d.name \
            else shapes["query"]
        k_shape, v_shape, q_shape = (self._head_shape(shapes[r]) for r in ("key", "value", "query"))
        if target == "self" and v_shape != k_shape:
            self._fail(f"the self-generated target of level '{d.name}' reads '{names['value']}' "
                       f"{list(shapes['value'])} through the memory, whose input is the key "
                       f"'{names['key']}' {list(shapes['key'])}", fields["value"].value.span,
                       "a stream of the key's shape")
        if k_shape != q_shape:
            self._fail(f"key {list(k_shape)} and query {list(q_shape)} of level '{d.name}' differ",
                       d.span, "keys and queries of the same shape")
        if k_shape[0] != v_shape[0]:
            self._fail(f"key has {k_shape[0]} heads but value has {v_shape[0]}", d.span,
                       "the same number of heads")
        heads, d_key, d_value = k_shape[0], k_shape[1], v_shape[1]
        level = ir.Level(d.name, memory, bias, retention, algorithm, period, grad_at, grad_chunk,
                         read, init, names["key"], names["value"], names["query"], heads, d_key,
                         d_value, (), {}, d.span, target, stop)
        if source is not None:
            level = self._restarting(level, source, fields["init"].value)
        level = level.replace(gates=self._level_gates(level))
        level = level.replace(gate_axes=self._gate_axes(level))
        if teach is not None:
            self._check_teach(d, fields, level)
        check_level(level, self.streams, self.diag)
        return level

    def _self_target(self, e: ast.Call) -> tuple[str, bool]:
        """`value self(s)`, `self(s, flag)`, `self(s, stopgrad = flag)`: the target is the level's own
        read-out M(s_t) (MATH.md §4.4), or s itself where the positional flag is 0. Returns the
        target kind (self | value) and whether the outer gradient through M(s_t) is stopped."""
        if e.func != "self":
            self._fail(f"unknown value form '{e.func}(...)'", e.span, "a stream name or self(<stream>)",
                       nearest(e.func, ["self"]))
        if not 1 <= len(e.args) <= 2 or not isinstance(e.args[0], ast.Name):
            self._fail("self() takes the stream the memory reads to make its target, and a flag", e.span,
                       "self(<stream>), self(<stream>, <flag>) or self(<stream>, stopgrad = <flag>)")
        for key, value in e.kwargs:
            if key != "stopgrad":
                self._fail(f"self() has no argument '{key}'", value.span, "stopgrad",
                           nearest(key, ["stopgrad"]))
        on = len(e.args) < 2 or self._number(e.args[1]) != 0
        flag = e.kwarg("stopgrad")
        stop = flag is not None and self._number(flag) != 0
        return ("self", stop) if on else ("value", False)

    def _init_source(self, d: ast.LevelDecl, e: ast.Call) -> ir.Level:
        """`init from(level)`: the level whose state this level restarts from (nested CMS)."""
        if e.func != "from" or len(e.args) != 1 or e.kwargs or not isinstance(e.args[0], ast.Name):
            self._fail("bad value for 'init'", e.span, "zero, learned or from(<level>)",
                       nearest(e.func, ["from"]))
        name, span = e.args[0].id, e.args[0].span
        if name == d.name:
            self._fail(f"level '{d.name}' restarts from its own state", span, "another, slower level")
        source = next((lv for lv in self.levels if lv.name == name), None)
        if source is None:
            if name in self.streams:
                self._fail(f"'{name}' is a stream, not a level", span, "a level's name")
            self._unknown(name, span, [lv.name for lv in self.levels], "a level")
        return source

    def _restarting(self, level: ir.Level, source: ir.Level, e: ast.Call) -> ir.Level:
        """`level` restarting from `source`'s state at each of `source`'s period boundaries: the two
        share one state layout, and `source` is slower, with a period that `level`'s divides."""
        span = e.args[0].span
        if level.period is None or source.period is None or source.period <= level.period \
                or source.period % level.period:
            mine = "outer" if level.period is None else f"every {level.period}"
            theirs = "outer" if source.period is None else f"every {source.period}"
            self._fail(f"level '{level.name}' (update {mine}) restarts at the period boundaries of "
                       f"'{source.name}' (update {theirs})", span,
                       "a source that updates every P tokens, P a larger multiple of this level's period")
        mine, theirs = ((lv.memory.describe(), lv.heads, lv.d_key, lv.d_value) for lv in (level, source))
        if mine != theirs:
            self._fail(f"level '{level.name}' ({_layout(mine)}) cannot start from the state of "
                       f"'{source.name}' ({_layout(theirs)})", span, "the same memory and sizes")
        if level.accumulates or source.accumulates:
            which = level if level.accumulates else source
            self._fail(f"level '{which.name}' keeps an FTRL accumulator, not weights, as its state",
                       span, "levels whose state is their weights (no lq retention, no ftrl)")
        return level.replace(init_from=source.name, restart=source.period)

    @staticmethod
    def _head_shape(shape: tuple[int, ...]) -> tuple[int, int]:
        return (1, shape[0]) if len(shape) == 1 else (shape[0], shape[-1])

    def _word(self, fields, key, allowed, default) -> str:
        if key not in fields:
            return default
        v = fields[key].value
        if isinstance(v, ast.Name) and v.id in allowed:
            return v.id
        name = v.id if isinstance(v, ast.Name) else ""
        self._fail(f"bad value for '{key}'", v.span, " or ".join(allowed), nearest(name, allowed))

    def _memory(self, e: ast.Expr) -> ir.Memory:
        kind, args = self._option("memory", e)
        if kind != "mlp":
            return ir.Memory(kind, span=e.span)
        depth = int(args["depth"])
        residual = args["residual"] if args["residual"] is not None else depth > 1
        return ir.Memory("mlp", depth, float(args["expand"]), args["act"], residual,
                         args["gated"], args["norm"], args["bias"], e.span)

    def _choice(self, family: str, e: ast.Expr) -> ir.Choice:
        if isinstance(e, ast.Of):
            kind, args = self._option(family, e.outer)
            if kind != "omega":
                self._fail(f"'{kind}' does not combine with `of`", e.outer.span,
                           "omega(window, gamma) of <bias>")
            inner = self._choice(family, e.inner)
            if inner.kind == "omega":
                self._fail("omega of omega", e.inner.span, "a plain bias after `of`")
            return ir.Choice(kind, args, e.span, inner)
        kind, args = self._option(family, e)
        if kind == "omega":
            self._fail("omega needs an inner bias", e.span, "omega(window, gamma) of <bias>")
        if family == "retention" and kind == "kl" and (args["decay"] is None) == (args["global"] is None):
            self._fail("kl retention needs exactly one of decay= or global=", e.span,
                       "kl(decay = alpha) or kl(global = alpha)")
        return ir.Choice(kind, args, e.span)

    def _option(self, family: str, e: ast.Expr) -> tuple[str, dict]:
        table = options.FAMILIES[family]
        if isinstance(e, ast.Name):
            kind, pos, kw = e.id, (), ()
        elif isinstance(e, ast.Call):
            kind, pos, kw = e.func, e.args, e.kwargs
        else:
            self._fail(f"expected a {family} here", e.span, "one of: " + ", ".join(table))
        if kind not in table:
            self._fail(f"unknown {family} '{kind}'", e.span, "one of: " + ", ".join(table),
                       nearest(kind, table))
        sig = table[kind]
        if len(pos) > len(sig):
            self._fail(f"{kind}() takes at most {len(sig)} arguments", pos[len(sig)].span,
                       f"{kind}({', '.join(a.name for a in sig)})")
        given: dict[str, ast.Expr] = {a.name: v for a, v in zip(sig, pos)}
        for k, v in kw:
            names = [a.name for a in sig]
            if k not in names:
                self._fail(f"{kind}() has no argument '{k}'", v.span,
                           ", ".join(names) or "no arguments", nearest(k, names))
            if k in given:
                self._fail(f"argument '{k}' given twice", v.span, "each argument once")
            given[k] = v
        out = {}
        for a in sig:
            if a.name not in given:
                if a.required:
                    self._fail(f"{kind}() needs '{a.name}'", e.span,
                               f"{kind}({', '.join(x.name + ('' if x.required else '=...') for x in sig)})")
                scalar = a.type == "scalar" and a.default is not None
                out[a.name] = sympy.sympify(a.default) if scalar else a.default
                continue
            out[a.name] = self._arg_value(a, given[a.name], kind)
        return kind, out

    def _arg_value(self, a: options.Arg, e: ast.Expr, kind: str):
        if a.type == "scalar":
            return self._sym(e)
        if a.type == "int":
            return self._int(e, f"{kind}({a.name})")
        if a.type == "number":
            return self._number(e)
        if a.type == "bool":
            if isinstance(e, ast.Name) and e.id in ("true", "false"):
                return e.id == "true"
            self._fail(f"{kind}({a.name}) is a flag", e.span, "true or false")
        if isinstance(e, ast.Name) and e.id in a.choices:
            return e.id
        name = e.id if isinstance(e, ast.Name) else ""
        self._fail(f"bad value for {kind}({a.name})", e.span, " or ".join(a.choices),
                   nearest(name, a.choices))

    def _sym(self, e: ast.Expr) -> sympy.Expr:
        """A scalar argument: sympy over numbers, parameters and gates. A constant part must have a
        finite real value (sympy's own floats would carry 1e308 ** 2 on, and slow the planner)."""
        value = self._sym_node(e)
        if value.is_number and not _finite(value):
            self._fail("this expression has no finite real value", e.span, "a finite value")
        return value

    def _sym_node(self, e: ast.Expr) -> sympy.Expr:
        match e:
            case ast.Number(value=v):
                return sympy.Integer(int(v)) if v.is_integer() else sympy.Float(v)
            case ast.Name(id=n):
                if n in self.gates:
                    return ir.gate_symbol(n)
                if n in self.params:
                    v = self.params[n]
                    return sympy.Integer(int(v)) if v.is_integer() else sympy.Float(v)
                self._unknown(n, e.span, [*self.gates, *self.params], "a gate or parameter")
            case ast.Neg(operand=o):
                return -self._sym(o)
            case ast.BinOp(op=op, left=l, right=r):
                a, b = self._sym(l), self._sym(r)
                if op == "**" and a.is_number and b.is_number and not _finite(sympy.Float(a) ** b):
                    self._fail(f"cannot evaluate '**' on {a} and {b}", e.span, "a finite value")
                return ir.ARITHMETIC[op](a, b)
            case ast.Call(func=f, args=(arg,), kwargs=()) if f in ("exp", "log", "sigmoid"):
                inner = self._sym(arg)
                return {"exp": sympy.exp, "log": sympy.log,
                        "sigmoid": lambda z: 1 / (1 + sympy.exp(-z))}[f](inner)
        self._fail("expected a number, parameter or gate expression", e.span,
                   "e.g. 0.5, beta, 1 - alpha")

    def _level_gates(self, level: ir.Level) -> tuple[str, ...]:
        used: list[str] = []
        for choice in (level.bias, level.bias.inner, level.retention, level.algorithm):
            for v in (choice.args.values() if choice is not None else ()):
                used += [g for g in ir.gate_names(v) if g not in used]
        return tuple(used)

    def _gate_axes(self, level: ir.Level) -> dict[str, str]:
        axes = {}
        value_roles = set()
        for choice in (level.bias, level.bias.inner):
            if choice is not None:
                value_roles |= {g for v in choice.args.values() for g in ir.gate_names(v)}
        if level.retention.kind == "implicit":
            value_roles |= set(ir.gate_names(level.algorithm.args["lr"]))
        for name in level.gates:
            g = self.gates[name]
            if g.shape[0] != level.heads:
                self._fail(f"gate '{name}' has {g.shape[0]} heads but level '{level.name}' has "
                           f"{level.heads}", g.span, f"gate {name}[{level.heads}, ...]")
            if len(g.shape) == 1:
                axes[name] = "scalar"
                continue
            dim = g.shape[1]
            if name in value_roles or dim != level.d_key:
                if dim != level.d_value:
                    self._fail(f"gate '{name}' has {dim} channels", g.span,
                               f"{level.d_key} (key channels) or {level.d_value} (value channels) "
                               f"for level '{level.name}'")
                axes[name] = "value"
            else:
                axes[name] = "key"
        return axes


def _layout(layout) -> str:
    memory, heads, d_key, d_value = layout
    return f"{memory}, {heads} heads, {d_key} -> {d_value}"


def _finite(value: sympy.Expr) -> bool:
    """Whether a constant sympy expression has a finite real value."""
    try:
        return bool(value.is_extended_real) and math.isfinite(float(value))
    except (OverflowError, TypeError):
        return False
