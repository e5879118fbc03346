"""Render the layer module: projections, gates, level calls and the output expression of a spec,
as one readable nn.Module mapping [B, T, d_model] -> [B, T, d_model]."""
from __future__ import annotations

import nlc
from nlc import ast, ir
from nlc.lower import expression_names

from .emitter import Emitter, comment, ident, where

_ELEMENTWISE = {"silu": "torch.nn.functional.silu({})", "gelu": "torch.nn.functional.gelu({})",
                "relu": "torch.relu({})", "sigmoid": "torch.sigmoid({})", "tanh": "torch.tanh({})",
                "softplus": "torch.nn.functional.softplus({})", "exp": "torch.exp({})",
                "log": "torch.log({})", "elu1": "(torch.nn.functional.elu({}) + 1)",
                "logsigmoid": "torch.nn.functional.logsigmoid({})", "abs": "torch.abs({})",
                "l2norm": "torch.nn.functional.normalize({}, dim=-1)"}


class _Expressions:
    """Compile stream expressions to torch source; submodules are declared on the fly."""

    def __init__(self, checked: ir.CheckedSpec):
        self.checked = checked
        self.modules: list[tuple[str, str, str]] = []  # (attribute, constructor, spec location)

    def module(self, role: str, ctor: str, span) -> str:
        name = f"{role}_{len(self.modules)}"
        self.modules.append((name, ctor, str(span)))
        return f"self.{name}"

    def shape(self, e) -> tuple[int, ...]:
        return self.checked.shapes[e.span]

    def compile(self, e: ast.Expr, role: str) -> str:
        match e:
            case ast.Number(value=v):
                return repr(float(v))
            case ast.Name(id="head"):
                return f"torch.arange({self.checked.params['heads']:.0f}, dtype=x.dtype, device=x.device)"
            case ast.Name(id="x"):
                return "x"
            case ast.Name(id=n):
                if n in self.checked.gates:  # a gate shadows the parameter it refines
                    return ident(n, "g")
                if n in self.checked.params:
                    return repr(float(self.checked.params[n]))
                return ident(n, "s")
            case ast.Neg(operand=o):
                return f"(-{self.compile(o, role)})"
            case ast.BinOp(op=op, left=l, right=r):
                rank = len(self.shape(e))
                left, right = self._lift(l, role, rank), self._lift(r, role, rank)
                return f"({left} {op} {right})"
            case ast.Call():
                return self._call(e, role)
        raise AssertionError(f"unchecked expression {e!r}")

    def _lift(self, e, role, rank) -> str:
        """Align a lower-rank operand on leading (head) dims: [B, T, H] -> [B, T, H, 1]."""
        text, own = self.compile(e, role), len(self.shape(e))
        return text + "[..., None]" * (rank - own) if 0 < own < rank else text

    def _call(self, e: ast.Call, role: str) -> str:
        f, shape = e.func, self.shape(e)
        if f == "learned":
            init = _const(e.args[0], self.checked.params)
            attr = self.module(role + "_learned",
                               f"nn.Parameter(torch.full({shape!r}, {init!r}))", e.span)
            return attr
        inner = self.compile(e.args[0], role)
        in_shape = self.shape(e.args[0])
        if f == "linear":
            size_in, size_out = _numel(in_shape), _numel(shape)
            bias = e.kwarg("bias")
            use_bias = isinstance(bias, ast.Name) and bias.id == "true"
            attr = self.module(role + "_linear", f"nn.Linear({size_in}, {size_out}, bias={use_bias})",
                               e.span)
            flat = f"{inner}.flatten(2)" if len(in_shape) > 1 else inner
            view = f".unflatten(-1, {shape!r})" if len(shape) > 1 else ""
            return f"{attr}({flat}){view}"
        if f == "conv":
            k = e.kwarg("kernel") or (e.args[1] if len(e.args) > 1 else None)
            kernel = int(_const(k, self.checked.params)) if k is not None else 4
            attr = self.module(role + "_conv", f"blocks.CausalConv({_numel(shape)}, {kernel})", e.span)
            if len(shape) > 1:
                return f"{attr}({inner}.flatten(2)).unflatten(-1, {shape!r})"
            return f"{attr}({inner})"
        if f == "rmsnorm":
            return f"{self.module(role + '_rmsnorm', f'blocks.RMSNorm({shape[-1]})', e.span)}({inner})"
        if f == "layernorm":
            return f"{self.module(role + '_layernorm', f'nn.LayerNorm({shape[-1]})', e.span)}({inner})"
        if f == "poly":
            deg = e.kwarg("degree") or (e.args[1] if len(e.args) > 1 else None)
            degree = int(_const(deg, self.checked.params)) if deg is not None else 2
            return f"{self.module(role + '_poly', f'blocks.PolyFeatures({degree})', e.span)}({inner})"
        return _ELEMENTWISE[f].format(inner)


def _const(e, params) -> float:
    """A constant the checker already evaluated once (numbers, parameters, arithmetic)."""
    match e:
        case ast.Number(value=v):
            return float(v)
        case ast.Name(id=n):
            return float(params[n])
        case ast.Neg(operand=o):
            return -_const(o, params)
        case ast.BinOp(op=op, left=l, right=r):
            a, b = _const(l, params), _const(r, params)
            return {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else 0.0, "**": a ** b}[op]
    raise AssertionError("constant expected")


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def render_layer(checked: ir.CheckedSpec, level_modules: dict[str, str],
                 chunk_modules: dict[str, str]) -> str:
    """The layer module source. `level_modules` / `chunk_modules`: level name -> generated module
    name of its reference / chunk-parallel form (levels without one are absent)."""
    exprs, body = _Expressions(checked), Emitter()
    body.depth = 2
    body.line("B, T, _ = x.shape")
    order = _evaluation_order(checked)
    for kind, name in order:
        if kind == "gate":
            g = checked.gates[name]
            code = exprs.compile(g.expr, ident(name, "gate"))
            if g.granularity == "constant":
                code = f"torch.as_tensor({code}, dtype=x.dtype, device=x.device).expand(B, T, *{g.shape!r})"
            elif checked.shapes[g.expr.span] != g.shape:
                code = f"({code}).expand(B, T, *{g.shape!r})"
            body.line(f"{ident(name, 'g')} = {code}  {where(g.span)}")
            if g.granularity == "chunk":
                body.line(f"{ident(name, 'g')} = blocks.hold_per_chunk({ident(name, 'g')}, {g.chunk})")
        elif kind == "let":
            s = checked.streams[name]
            body.line(f"{ident(name, 's')} = {exprs.compile(s.expr, ident(name, 'let'))}  {where(s.span)}")
        else:
            _render_level_call(body, checked, checked.level(name), level_modules[name],
                               chunk_modules.get(name))
    body.line(f"return {exprs.compile(checked.output, 'out')}")
    em = Emitter()
    em.line(f'"""Model {comment(checked.name)!r}: the layer [B, T, d_model] -> [B, T, d_model].')
    em.line()
    em.line(f"Generated by nlc {nlc.__version__} from {comment(checked.file)}; do not edit.")
    em.line('"""')
    em.line("import torch")
    em.line("from torch import nn")
    em.line()
    em.line("from nlc.runtime import blocks, dispatch")
    em.line()
    for lv in checked.levels:
        em.line(f"from . import {level_modules[lv.name]}")
        if lv.name in chunk_modules:
            em.line(f"from . import {chunk_modules[lv.name]}")
    em.gap()
    with em.indent("class Layer(nn.Module):"):
        em.line(f"d_model = {checked.d_model}")
        em.line()
        with em.indent('def __init__(self, mode="auto"):'):
            em.line("super().__init__()")
            em.line("self.mode = mode  # auto | reference | chunk (see dispatch.pick)")
            for attr, ctor, span in exprs.modules:
                em.line(f"self.{attr} = {ctor}  # {comment(span)}")
            for lv in checked.levels:
                if lv.init == "learned":
                    mod = level_modules[lv.name]
                    em.line(f"self.{ident(lv.name, 'init')} = nn.ParameterList(  {where(lv.span)}")
                    em.line(f"    [nn.Parameter(p[0].float()) for p in {mod}.initial_state(1)[:{mod}.N_PARAMS]])")
        em.line()
        with em.indent("def forward(self, x):"):
            em.line('"""x: [B, T, d_model] -> [B, T, d_model]."""')
            em.lines.extend(body.lines)
    return em.text()


def _render_level_call(body: Emitter, checked: ir.CheckedSpec, lv: ir.Level, module: str,
                       chunk_module: str | None) -> None:
    def stream(name):
        s = ident(name, "s") if name != "x" else "x"
        return f"{s}.unsqueeze(2)" if len(checked.streams[name].shape) == 1 else s

    gates = "".join(f", {ident(g, 'g')}={ident(g, 'g')}" for g in lv.gates)
    init = ""
    if lv.init == "learned":
        mod = module
        init = (f", initial_state=tuple(p.to(x.dtype).expand(B, *p.shape) for p in self.{ident(lv.name, 'init')})"
                f" + {mod}.initial_state(B, x.dtype, x.device)[{mod}.N_PARAMS:]")
    out = ident(lv.name, "s")
    op = f"dispatch.pick({module}.{ident(lv.name, 'level')}, {chunk_module}, self.mode, T)"
    body.line(f"{out}, _ = {op}(  {where(lv.span)}")
    body.line(f"    {stream(lv.query)}, {stream(lv.key)}, {stream(lv.value)}{gates}{init})")
    if len(checked.streams[lv.name].shape) == 1:
        body.line(f"{out} = {out}.squeeze(2)")


def _evaluation_order(checked: ir.CheckedSpec) -> list[tuple[str, str]]:
    """Gates, lets and levels in an order where each reads only what came before (the checker
    has already rejected cycles)."""
    deps = {n: set(expression_names(g.expr)) for n, g in checked.gates.items()}
    kinds = {n: "gate" for n in checked.gates}
    for n, st in checked.streams.items():
        if st.source == "let":
            deps[n], kinds[n] = set(expression_names(st.expr)), "let"
        elif st.source == "level":
            lv = checked.level(n)
            deps[n], kinds[n] = {lv.key, lv.value, lv.query} | set(lv.gates), "level"
    order, done = [], set()
    while len(order) < len(deps):
        for n in deps:
            if n not in done and deps[n] & deps.keys() <= done | {n}:
                order.append((kinds[n], n))
                done.add(n)
    return order
