"""Check a parsed spec and lower it to `ir.CheckedSpec`: resolve parameters and names, infer shapes,
parse level options against `nlc.options`, enforce the validity rules of MATH.md §5.7.
Every problem becomes a diagnostic pointing at the spec."""
from __future__ import annotations

import math
from dataclasses import replace as dc_replace

from . import ast, ir
from .block_shapes import BLOCK_FUNCS, BlockShapes
from .diagnostics import Abort, Collector, nearest
from .level_fields import LevelFields
from .optimizer_decl import OptimizerFields

ELEMENTWISE = {"silu", "gelu", "relu", "sigmoid", "tanh", "softplus", "exp", "log", "elu1",
               "logsigmoid", "abs"}
NORMS = {"l2norm", "rmsnorm", "layernorm"}
STREAM_FUNCS = ELEMENTWISE | NORMS | BLOCK_FUNCS | {"linear", "conv", "poly", "learned"}
BUILTINS = {"x", "head"}
MAX_SIZE = 2 ** 31 - 1  # the largest feature count poly() may produce
MAX_NAME = 64  # characters in a declared name: names become file names (level_<name>_chunk.py)


class _Lowering(LevelFields, OptimizerFields, BlockShapes):
    def __init__(self, spec: ast.Spec, overrides: dict, with_spaces: bool):
        self.spec, self.overrides, self.with_spaces = spec, overrides, with_spaces
        self.diag = Collector(spec.source)
        self.params: dict[str, float] = {}
        self.streams: dict[str, ir.Stream] = {}
        self.gates: dict[str, ir.Gate] = {}
        self.spans: dict[str, ast.Span] = {}
        self.shapes: dict[ast.Span, tuple[int, ...]] = {}  # every expression's per-token shape
        self.failed: set[str] = set()  # declarations already reported: no follow-on errors
        self.recalls: list = []  # (call, query shape, declared shape) of each recall(level, q)

    # ---- driver ----------------------------------------------------------------------------
    def run(self) -> ir.CheckedSpec:
        decls = self.spec.decls
        models = [d for d in decls if isinstance(d, ast.ModelDecl)]
        if not models:
            top = ast.Span(self.spec.file, 1, 1, 1, 1)
            self.diag.error("the spec declares no model", top, "a line `model <name>` at the top")
        for extra in models[1:]:
            self.diag.error(f"second model declaration '{extra.name}'", extra.span,
                            "one `model` per spec")
        name = models[0].name if models else "model"
        self._declare_names(decls)
        self._params([d for d in decls if isinstance(d, ast.ParamDecl)])
        for required in ("d_model", "heads", "chunk"):  # chunk: optional, the plans' chunk size
            if required not in self.params and models and required != "chunk":
                self.diag.error(f"the spec has no parameter '{required}'", models[0].span,
                                f"`param {required} = ...`", "every spec declares d_model and heads")
            value = self.params.get(required, 1.0)
            if not value.is_integer() or value < 1:
                span = next(d.span for d in decls if isinstance(d, ast.ParamDecl) and d.name == required)
                self.diag.error(f"'{required}' must be an integer >= 1, got {value:g}", span,
                                "an integer >= 1")
        self.diag.raise_if_errors()
        self.streams["x"] = ir.Stream("x", (int(self.params["d_model"]),), None, None, "input")
        level_decls = [d for d in decls if isinstance(d, ast.LevelDecl)]
        self._gates([d for d in decls if isinstance(d, ast.GateDecl)])
        self._streams_and_levels([d for d in decls if isinstance(d, ast.LetDecl)], level_decls)
        self._check_recalls()
        outputs = [d for d in decls if isinstance(d, ast.OutputDecl)]
        if not outputs and models:
            self.diag.error("the spec has no output", models[0].span,
                            "`output = <expression of x and levels>`")
        for extra in outputs[1:]:
            self.diag.error("second output declaration", extra.span, "one `output = ...`")
        if outputs:
            try:
                shape = self._sized(outputs[0].value, (int(self.params["d_model"]),))
                if shape != (int(self.params["d_model"]),):
                    self.diag.error(f"the output has shape {list(shape)}", outputs[0].value.span,
                                    f"shape [{int(self.params['d_model'])}] (d_model)",
                                    "end the output with linear(...) to project back to d_model")
            except Abort:
                pass
        optimizer = None
        optimizers = [d for d in decls if isinstance(d, ast.OptimizerDecl)]
        for extra in optimizers[1:]:
            self.diag.error("second optimizer declaration", extra.span, "one `optimizer { ... }`")
        if optimizers:
            try:
                optimizer = self._optimizer(optimizers[0])
            except Abort:
                pass
        self.diag.raise_if_errors()
        spaces = ()
        if self.with_spaces:
            spaces = tuple(s for d in decls if isinstance(d, ast.SpaceDecl)
                           if (s := self._space(d)) is not None)
        self.diag.raise_if_errors()
        checked = ir.CheckedSpec(name, self.spec.file, self.spec.source, dict(self.params),
                                 dict(self.streams), dict(self.gates), tuple(self.levels),
                                 outputs[0].value, spaces, dict(self.spans), dict(self.shapes),
                                 optimizer)
        from . import segments, teach
        segments.check(checked, self.diag)
        teach.check(checked, self.diag)
        inside = segments.plan(checked).inside
        for lv in checked.levels:
            if lv.init_from is not None and {lv.name, lv.init_from} & inside:
                self.diag.error(f"level '{lv.name}' restarts from the state of '{lv.init_from}', but "
                                "a recall's segment loop computes one of them segment by segment",
                                lv.span, "nested levels that no recall reads")
        self.diag.raise_if_errors()
        self.checked_diagnostics = tuple(self.diag.items)
        return checked

    def _declare_names(self, decls) -> None:
        """Every declared name is unique and not a builtin."""
        seen: dict[str, ast.Span] = {}
        kinds: dict[str, type] = {}
        for d in decls:
            if isinstance(d, (ast.ModelDecl, ast.ParamDecl, ast.LetDecl, ast.GateDecl, ast.LevelDecl,
                              ast.SpaceDecl)) and len(d.name) > MAX_NAME:
                self.diag.error(f"a name of {len(d.name)} characters", d.span,
                                f"at most {MAX_NAME} characters")
            if isinstance(d, (ast.ParamDecl, ast.LetDecl, ast.GateDecl, ast.LevelDecl)):
                if d.name in BUILTINS or d.name in STREAM_FUNCS:
                    self.diag.error(f"'{d.name}' is a built-in name and cannot be redeclared",
                                    d.span, "a fresh name")
                elif d.name in seen and {type(d), kinds[d.name]} == {ast.ParamDecl, ast.GateDecl}:
                    continue  # a gate may refine the parameter of its name: `gate delta = delta * ...`
                elif d.name in seen:
                    self.diag.error(f"'{d.name}' is declared twice", d.span,
                                    "a fresh name", f"first declared at {seen[d.name]}")
                else:
                    seen[d.name], kinds[d.name] = d.span, type(d)
        self.spans = seen

    # ---- parameters ----------------------------------------------------------------------
    def _params(self, decls) -> None:
        known = {d.name for d in decls}
        for key in self.overrides:
            if key not in known:
                hint = nearest(key, known)
                self.diag.error(f"no parameter named '{key}' to override", None,
                                "one of: " + ", ".join(sorted(known)), hint)
        for d in decls:
            try:
                value = self.overrides[d.name] if d.name in self.overrides else self._number(d.value)
            except Abort:
                self.failed.add(d.name)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                self.diag.error(f"parameter '{d.name}' must be a finite number, got {value!r}",
                                d.span, "a number")
                continue
            self.params[d.name] = float(value)

    def _number(self, e: ast.Expr) -> float:
        """Evaluate a constant expression over numbers and parameters."""
        match e:
            case ast.Number(value=v):
                return v
            case ast.Name(id=n):
                if n in self.params:
                    return self.params[n]
                self._unknown(n, e.span, self.params, "a parameter")
            case ast.Neg(operand=o):
                return -self._number(o)
            case ast.BinOp(op=op, left=l, right=r):
                a, b = self._number(l), self._number(r)
                try:
                    value = {"+": a + b, "-": a - b, "*": a * b}.get(op)
                    if value is None:
                        value = a / b if op == "/" else a ** b
                except (ZeroDivisionError, OverflowError):
                    self._fail(f"cannot evaluate '{op}' on {a:g} and {b:g}", e.span, "a finite value")
                if isinstance(value, complex) or not math.isfinite(value):
                    self._fail("this expression has no finite real value", e.span, "a finite value")
                return value
        self._fail("expected a constant here", e.span, "a number or a parameter expression")

    def _int(self, e: ast.Expr, what: str, minimum: int = 1) -> int:
        v = self._number(e)
        if not float(v).is_integer() or v < minimum:
            self._fail(f"{what} must be an integer >= {minimum}, got {v:g}", e.span,
                       f"an integer >= {minimum}")
        return int(v)

    # ---- gates and streams ---------------------------------------------------------------
    def _dims(self, shape, span) -> tuple[int, ...]:
        return tuple(self._int(s, "a dimension") for s in shape)

    def _gates(self, decls) -> None:
        for d in decls:
            try:
                if d.name in ir.OP_KEYWORDS:
                    self._fail(f"a gate named '{d.name}', which a level's op takes as a keyword", d.span,
                               f"a gate name other than {', '.join(ir.OP_KEYWORDS)}")
                shape = self._dims(d.shape, d.span) if d.shape else (int(self.params["heads"]),)
                if shape[0] != int(self.params["heads"]) or len(shape) > 2:
                    self._fail(f"gate '{d.name}' has shape {list(shape)}", d.span,
                               "[heads] (scalar per head) or [heads, channels] (vector per head)")
                gran, chunk = "token", None
                if d.granularity is not None:
                    gran = d.granularity.unit
                    if gran not in ("token", "chunk"):
                        self._fail(f"unknown gate granularity '{gran}'", d.granularity.span,
                                   "per token or per chunk(C)", nearest(gran, ("token", "chunk")))
                    if gran == "chunk":
                        size = d.granularity.size
                        chunk = self._int(size, "a chunk size") if size is not None else (
                            int(self.params["chunk"]) if "chunk" in self.params else None)
                        if chunk is None:
                            self._fail("per chunk needs a size", d.granularity.span,
                                       "per chunk(C), or a `chunk` parameter")
                value = d.value
                if d.name in self.params:  # inside its own definition the name is the parameter
                    value = _substitute(value, d.name, self.params[d.name])
                self.gates[d.name] = ir.Gate(d.name, shape, gran, chunk, value, d.span)
            except Abort:
                self.failed.add(d.name)
        self._gate_cycles()

    def _type_gate(self, g: ir.Gate) -> None:
        """Check a gate's expression once the streams and levels it reads are known."""
        got = self._sized(g.expr, g.shape, in_gate=True)
        if got not in (g.shape, (1,), ()):
            if not (len(got) == 1 and len(g.shape) == 2 and got[0] == g.shape[0]):
                self._fail(f"gate '{g.name}' computes shape {list(got)}", g.expr.span,
                           f"shape {list(g.shape)}")
        if not self._depends_on_input(g.expr):
            self.gates[g.name] = dc_replace(g, granularity="constant")

    def _gate_cycles(self) -> None:
        """Gates that define each other have no value; report the path and stop."""
        pending = {n: _names(g.expr) & set(self.gates) for n, g in self.gates.items()}
        while ready := [n for n, deps in pending.items() if not deps & set(pending)]:
            for n in ready:
                del pending[n]
        if pending:
            cycle = _find_cycle({n: d & set(pending) for n, d in pending.items()})
            path = " -> ".join(f"{n} ({self.gates[n].span})" for n in cycle + [cycle[0]])
            self.diag.error("cycle between gates: " + " -> ".join(cycle + [cycle[0]]),
                            self.gates[cycle[0]].span, "gates that read x and other gates, without a loop",
                            f"path: {path}")
            self.diag.raise_if_errors()

    def _depends_on_input(self, e: ast.Expr) -> bool:
        match e:
            case ast.Name(id=n):
                return n == "x" or n in self.streams or (n in self.gates and self._depends_on_input(
                    self.gates[n].expr))
            case ast.Call(func="learned"):
                return False
            case ast.Call(args=args):
                return any(self._depends_on_input(a) for a in args)
            case ast.BinOp(left=l, right=r):
                return self._depends_on_input(l) or self._depends_on_input(r)
            case ast.Neg(operand=o):
                return self._depends_on_input(o)
        return False

    def _streams_and_levels(self, lets, levels) -> None:
        """Gates, lets and levels depend on each other (a CMS chain keys one level on another's
        output; a gate may read a stream): resolve them in dependency order, report cycles with
        their path."""
        self.levels: list[ir.Level] = []
        pending = {d.name: d for d in [*self.gates.values(), *lets, *levels]}
        deps = {n: self._refs(d) & set(pending) for n, d in pending.items()}
        done: set[str] = set()
        while pending:
            ready = [n for n in pending if deps[n] <= done]
            if not ready:
                cycle = _find_cycle({n: deps[n] & set(pending) for n in pending})
                first = pending[cycle[0]]
                path = " -> ".join(f"{n} ({pending[n].span})" for n in cycle + [cycle[0]])
                self.diag.error("cycle in the level graph: " + " -> ".join(cycle + [cycle[0]]),
                                first.span, "gates, streams and levels that read only earlier ones",
                                f"path: {path}")
                self.failed |= set(pending)
                return
            for n in ready:
                d = pending.pop(n)
                done.add(n)
                try:
                    if isinstance(d, ir.Gate):
                        self._type_gate(d)
                    elif isinstance(d, ast.LetDecl):
                        self._let(d)
                    else:
                        self._level(d)
                except Abort:
                    self.failed.add(n)

    def _refs(self, d) -> set[str]:
        if isinstance(d, ir.Gate):
            return _names(d.expr)
        if isinstance(d, ast.LetDecl):
            return _names(d.value)
        out = set()
        for f in d.fields:
            names = _names(f.value) if f.key in ("key", "value", "query") else _argument_names(f.value)
            if f.key in ("value", "init") and isinstance(f.value, ast.Call):
                names -= {d.name}  # `self(<own name>)` reads its own read-out inside its op
            out |= names
        defaults = {"key": "k", "value": "v", "query": "q"}
        given = {f.key for f in d.fields}
        return out | {v for k, v in defaults.items() if k not in given}

    def _let(self, d: ast.LetDecl) -> None:
        declared = self._dims(d.shape, d.span) if d.shape else None
        shape = self._sized(d.value, declared)
        if declared is not None and shape != declared:
            self._fail(f"'{d.name}' computes shape {list(shape)} but is declared {list(declared)}",
                       d.value.span, f"shape {list(declared)}")
        self.streams[d.name] = ir.Stream(d.name, shape, d.value, d.span)

    def _sized(self, e: ast.Expr, want, in_gate: bool = False) -> tuple[int, ...]:
        """`_shape` of a whole declaration's value: a size nothing determines is an error."""
        try:
            return self._shape(e, want, in_gate)
        except _NeedsShape as exc:
            self._fail(f"cannot tell the size of {exc.expr.func}(...) here", exc.expr.span,
                       "linear(<input>, <size>), or a declared shape `let name[dims] = ...`")

    def _shape(self, e: ast.Expr, want: tuple[int, ...] | None, in_gate: bool = False
               ) -> tuple[int, ...]:
        """Per-token shape of a stream expression. `want` is the shape the context asks for; it sizes
        `linear(...)` and `learned(...)`, which have no shape of their own."""
        shape = self._infer(e, want, in_gate)
        self.shapes[e.span] = shape
        return shape

    def _infer(self, e: ast.Expr, want, in_gate) -> tuple[int, ...]:
        match e:
            case ast.Number(value=v):
                if not math.isfinite(v):
                    self._fail(f"the number {e.text[:20]} is too large", e.span, "a finite number")
                return ()
            case ast.Name(id="head"):
                return (int(self.params["heads"]),)
            case ast.Name(id=n):
                if n in self.streams:
                    return self.streams[n].shape
                if n in self.gates:
                    return self.gates[n].shape
                if n in self.params:
                    return ()
                self._unknown(n, e.span, [*self.streams, *self.gates, *self.params, "x", "head"],
                              "a stream, gate or parameter")
            case ast.Neg(operand=o):
                return self._shape(o, want, in_gate)
            case ast.BinOp(left=l, right=r):
                try:
                    left = self._shape(l, None, in_gate)
                except _NeedsShape:
                    right = self._shape(r, want, in_gate)
                    left = self._shape(l, right or want, in_gate)
                    return _broadcast(left, right, e.span, self)
                right = self._shape(r, left or want, in_gate)
                return _broadcast(left, right, e.span, self)
            case ast.Call():
                return self._call_shape(e, want, in_gate)
        self._fail("this expression cannot appear in a stream", e.span,
                   "arithmetic, calls and names")

    def _call_shape(self, e: ast.Call, want, in_gate) -> tuple[int, ...]:
        f = e.func
        if f not in STREAM_FUNCS:
            self._unknown(f, e.span, STREAM_FUNCS, "a stream function")
        if f in BLOCK_FUNCS:
            return self._block_shape(e, want, in_gate)
        allowed_kw = {"linear": {"bias"}, "conv": {"kernel"}, "poly": {"degree"}}.get(f, set())
        for k, v in e.kwargs:
            if k not in allowed_kw:
                self._fail(f"{f}() takes no argument '{k}'", v.span,
                           ", ".join(sorted(allowed_kw)) or "no keyword arguments")
        if f == "learned":
            if len(e.args) != 1:
                self._fail("learned() takes one initial value", e.span, "learned(<number>)")
            self._number(e.args[0])
            if want is None:
                raise _NeedsShape(e)
            return want
        if not e.args:
            self._fail(f"{f}() needs an input", e.span, f"{f}(<stream>)")
        if f == "linear":
            if len(e.args) > 2:
                self._fail("linear() takes an input and an optional size", e.span, "linear(x[, size])")
            self._shape(e.args[0], None, in_gate)
            if len(e.args) == 2:
                return (self._int(e.args[1], "a linear size"),)
            if want is None:
                raise _NeedsShape(e)
            return want
        if len(e.args) > 1 and f not in ("conv", "poly"):
            self._fail(f"{f}() takes one input", e.args[1].span, f"{f}(<stream>)")
        inner = self._shape(e.args[0], want if f != "poly" else None, in_gate)
        if f == "conv":
            if in_gate:
                self._fail("conv() in a gate", e.span, "gates of the current token only")
            kernel = e.kwarg("kernel") or (e.args[1] if len(e.args) > 1 else None)
            if kernel is not None:
                self._int(kernel, "a conv kernel size")
            return inner
        if f == "poly":
            degree = e.kwarg("degree") or (e.args[1] if len(e.args) > 1 else None)
            p = self._int(degree, "a polynomial degree") if degree is not None else 2
            if not inner:
                self._fail("poly() needs a vector input", e.span, "a stream with a channel axis")
            size = _poly_size(inner[-1], p)
            if size is None:
                self._fail(f"poly() of degree {p} on {inner[-1]} channels has more than "
                           f"{MAX_SIZE} features", e.span, "a smaller degree")
            return (*inner[:-1], size)
        if f in NORMS and not inner:
            self._fail(f"{f}() needs a vector input", e.span, "a stream with a channel axis")
        return inner

    # ---- design spaces -------------------------------------------------------------------
    def _space(self, d: ast.SpaceDecl) -> ir.Space | None:
        from .space import expand_space
        try:
            return expand_space(self, d)
        except Abort:
            return None

    # ---- helpers -------------------------------------------------------------------------
    def _unknown(self, name, span, known, what):
        if name in self.failed:
            raise Abort  # its own declaration is already reported
        self._fail(f"unknown name '{name}'", span, what, nearest(name, known))

    def _fail(self, message, span, expected=None, hint=None):
        self.diag.error(message, span, expected, hint)
        raise Abort


def _poly_size(d: int, degree: int) -> int | None:
    """1 + d + d^2 + ... + d^degree, or None past MAX_SIZE (stops early: degree may be huge)."""
    if d == 1:
        return degree + 1 if degree < MAX_SIZE else None
    total, term = 0, 1
    for _ in range(degree + 1):
        total, term = total + term, term * d
        if total > MAX_SIZE:
            return None
    return total


class _NeedsShape(Abort):
    """`linear(...)` or `learned(...)` without a size and no context to take one from."""

    def __init__(self, e):
        self.expr = e


def _broadcast(a, b, span, lowering) -> tuple[int, ...]:
    if not a:
        return b
    if not b:
        return a
    if len(a) < len(b):
        a = (1,) * (len(b) - len(a)) + a if len(a) != 1 or a[0] != b[0] else a + (1,)
    if len(b) < len(a):
        b = (1,) * (len(a) - len(b)) + b if len(b) != 1 or b[0] != a[0] else b + (1,)
    out = []
    for x, y in zip(a, b):
        if x != y and 1 not in (x, y):
            lowering._fail(f"shapes {list(a)} and {list(b)} do not match", span, "equal shapes")
        out.append(max(x, y))
    return tuple(out)


def expression_names(e) -> list[str]:
    """The names an expression reads, in order of first use. `recall(level, q)` reads the level's
    state at the segment start, not its output: the level is not among the names (see `recalls`)."""
    match e:
        case ast.Name(id=n):
            return [n]
        case ast.Call(func="recall", args=(_, *rest), kwargs=kwargs):
            parts = [*rest, *(v for _, v in kwargs)]
        case ast.Call(args=args, kwargs=kwargs):
            parts = [*args, *(v for _, v in kwargs)]
        case ast.BinOp(left=l, right=r):
            parts = [l, r]
        case ast.Neg(operand=o) | ast.Every(period=o):
            parts = [o]
        case ast.Of(outer=o, inner=i):
            parts = [o, i]
        case _:
            return []
    return list(dict.fromkeys(n for p in parts for n in expression_names(p)))


def recalls(e) -> list[ast.Call]:
    """The `recall(level, q, segment = S)` calls inside an expression."""
    match e:
        case ast.Call(func=f, args=args, kwargs=kwargs):
            inner = [c for a in [*args, *(v for _, v in kwargs)] for c in recalls(a)]
            return [e, *inner] if f == "recall" else inner
        case ast.BinOp(left=l, right=r):
            return recalls(l) + recalls(r)
        case ast.Neg(operand=o):
            return recalls(o)
    return []


def _names(e) -> set[str]:
    return set(expression_names(e))


def _argument_names(e) -> set[str]:
    """Names read by an option's arguments (`decay(alpha)` -> alpha), not the option words."""
    match e:
        case ast.Call(args=args, kwargs=kw):
            return set().union(*(_names(a) for a in args), *(_names(v) for _, v in kw))
        case ast.Of(outer=o, inner=i):
            return _argument_names(o) | _argument_names(i)
        case ast.Every(period=p):
            return _names(p)
    return set()


def _substitute(e: ast.Expr, name: str, value: float) -> ast.Expr:
    """`e` with every reference to `name` replaced by the number `value` (same span)."""
    match e:
        case ast.Name(id=n) if n == name:
            return ast.Number(value, f"{value:g}", e.span)
        case ast.Call(args=args, kwargs=kw):
            return dc_replace(e, args=tuple(_substitute(a, name, value) for a in args),
                              kwargs=tuple((k, _substitute(v, name, value)) for k, v in kw))
        case ast.BinOp(left=l, right=r):
            return dc_replace(e, left=_substitute(l, name, value), right=_substitute(r, name, value))
        case ast.Neg(operand=o):
            return dc_replace(e, operand=_substitute(o, name, value))
    return e


def _find_cycle(deps: dict[str, set[str]]) -> list[str]:
    """One cycle in a dependency map (every node here is on or leads to a cycle)."""
    node, path = next(iter(deps)), []
    while node not in path:
        path.append(node)
        node = sorted(deps[node])[0]
    return path[path.index(node):]


def check(source: str, file: str = "<spec>", overrides: dict | None = None):
    """Parse and check: returns (CheckedSpec, diagnostics) or raises SpecError."""
    from .parse import parse
    lowering = _Lowering(parse(source, file), dict(overrides or {}), True)
    checked = lowering.run()
    return checked, lowering.checked_diagnostics
