"""Render the layer module: projections, gates, level calls and the output expression of a spec,
as one readable nn.Module mapping [B, T, d_model] -> [B, T, d_model]."""
from __future__ import annotations

import nlc
from nlc import ast, ir, segments, teach
from nlc.lower import expression_names

from . import torch_arch
from .emitter import Emitter, comment, ident, where

_ELEMENTWISE = {"silu": "torch.nn.functional.silu({})", "gelu": "torch.nn.functional.gelu({})",
                "relu": "torch.relu({})", "sigmoid": "torch.sigmoid({})", "tanh": "torch.tanh({})",
                "softplus": "torch.nn.functional.softplus({})", "exp": "torch.exp({})",
                "log": "torch.log({})", "elu1": "(torch.nn.functional.elu({}) + 1)",
                "logsigmoid": "torch.nn.functional.logsigmoid({})", "abs": "torch.abs({})",
                "l2norm": "torch.nn.functional.normalize({}, dim=-1)"}


class _Expressions:
    """Compile stream expressions to torch source; submodules are declared on the fly."""

    def __init__(self, checked: ir.CheckedSpec, level_modules: dict[str, str]):
        self.checked, self.level_modules = checked, level_modules
        self.modules: list[tuple[str, str, str]] = []  # (attribute, constructor, spec location)
        self.runtime: set[str] = set()  # nlc.runtime modules the layer uses besides blocks, dispatch
        self.sliced: set[str] = set()  # whole-sequence names read inside the segment loop
        self.offset = "0"  # position of the first token of what is being computed

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
            case ast.Name(id=n):
                if n not in self.checked.gates and n in self.checked.params:
                    return repr(float(self.checked.params[n]))  # a gate shadows the parameter it refines
                return self.name(n)
            case ast.Neg(operand=o):
                return f"(-{self.compile(o, role)})"
            case ast.BinOp(op=op, left=l, right=r):
                rank = len(self.shape(e))
                left, right = self._lift(l, role, rank), self._lift(r, role, rank)
                return f"({left} {op} {right})"
            case ast.Call():
                return self._call(e, role)
        raise AssertionError(f"unchecked expression {e!r}")

    def name(self, n: str) -> str:
        """A stream or gate (n is no parameter), sliced to the segment inside the segment loop."""
        text = "x" if n == "x" else ident(n, "g") if n in self.checked.gates else ident(n, "s")
        return f"{text}[:, t0:t1]" if n in self.sliced else text

    def _lift(self, e, role, rank) -> str:
        """Align a lower-rank operand on leading (head) dims: [B, T, H] -> [B, T, H, 1]."""
        text, own = self.compile(e, role), len(self.shape(e))
        return text + "[..., None]" * (rank - own) if 0 < own < rank else text

    def _call(self, e: ast.Call, role: str) -> str:
        f, shape = e.func, self.shape(e)
        if f == "learned":
            init = ir.constant(e.args[0], self.checked.params)
            attr = self.module(role + "_learned",
                               f"nn.Parameter(torch.full({shape!r}, {init!r}))", e.span)
            return attr
        if f in ("attention", "recall"):
            return getattr(self, f"_{f}")(e, role)
        inner = self.compile(e.args[0], role)
        in_shape = self.shape(e.args[0])
        if f == "rope":
            base = e.kwarg("base")
            self.runtime.add("attention")
            extra = f", base={ir.constant(base, self.checked.params)!r}" if base is not None else ""
            return f"attention.rope({inner}, {self.offset}{extra})"
        if f == "swiglu":
            h = e.kwarg("hidden")
            hidden = int(ir.constant(h, self.checked.params)) if h is not None else -(-8 * shape[0] // 3)
            self.runtime.add("mlp")
            return f"{self.module(role + '_swiglu', f'mlp.SwiGLU({shape[0]}, {hidden})', e.span)}({inner})"
        if f == "stopgrad":
            on = len(e.args) < 2 or ir.constant(e.args[1], self.checked.params) != 0
            return f"{inner}.detach()" if on else inner
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
            kernel = int(ir.constant(k, self.checked.params)) if k is not None else 4
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
            degree = int(ir.constant(deg, self.checked.params)) if deg is not None else 2
            return f"{self.module(role + '_poly', f'blocks.PolyFeatures({degree})', e.span)}({inner})"
        return _ELEMENTWISE[f].format(inner)

    def _attention(self, e: ast.Call, role: str) -> str:
        q, k, v = (self.compile(a, role) for a in e.args)
        (heads, d_key), d_value = self.shape(e.args[1]), self.shape(e.args[2])[-1]
        sizes = [int(ir.constant(e.kwarg(n), self.checked.params)) if e.kwarg(n) is not None else 0
                 for n in ("window", "block", "persistent")]
        ctor = (f"attention.Attention({heads}, {d_key}, {d_value}, window={sizes[0]}, "
                f"block={sizes[1]}, persistent={sizes[2]})")
        self.runtime.add("attention")
        extra = "".join(f", {n}={self.compile(e.kwarg(n), role)}" for n in ("extra_k", "extra_v")
                        if e.kwarg(n) is not None)
        return f"{self.module(role + '_attention', ctor, e.span)}({q}, {k}, {v}{extra}, offset={self.offset})"

    def _recall(self, e: ast.Call, role: str) -> str:
        """M(q) at the state the level had when the segment began (its parameters, no write)."""
        level, mod = e.args[0].id, self.level_modules[e.args[0].id]
        q = self.compile(e.args[1], role)
        if len(self.shape(e.args[1])) == 1:
            return (f"{mod}.memory_forward({ident(level, 'st')}[:{mod}.N_PARAMS], "
                    f"{q}[:, None]).squeeze(1)")
        return (f"{mod}.memory_forward({ident(level, 'st')}[:{mod}.N_PARAMS], "
                f"{q}.transpose(1, 2)).transpose(1, 2)")


def _numel(shape) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def render_layer(checked: ir.CheckedSpec, level_modules: dict[str, str],
                 chunk_modules: dict[str, str]) -> str:
    """The layer module source. `level_modules` / `chunk_modules`: level name -> generated module
    name of its reference / chunk-parallel form (levels without one are absent)."""
    exprs, body = _Expressions(checked, level_modules), Emitter()
    body.depth = 2
    body.line("blocks.check_input(self, x)")
    body.line("B, T, _ = x.shape")
    order = _evaluation_order(checked)
    teach_size = teach.segment(checked)
    if teach_size is not None:  # value teach: the whole layer carries its states from segment to segment
        _render_teach_segment(body, exprs, checked, order, level_modules, chunk_modules)
    else:
        _render_body(body, exprs, checked, order, level_modules, chunk_modules)
    em = Emitter()
    em.line(f'"""Model {comment(checked.name)!r}: the layer [B, T, d_model] -> [B, T, d_model].')
    em.line()
    em.line(f"Generated by nlc {nlc.__version__} from {comment(checked.file)}; do not edit.")
    em.line('"""')
    em.line("import torch")
    em.line("from torch import nn")
    em.line()
    em.line(f"from nlc.runtime import {', '.join(sorted({'blocks', 'dispatch', 'recompute'} | exprs.runtime))}")
    em.line()
    for lv in checked.levels:
        em.line(f"from . import {level_modules[lv.name]}")
        if lv.name in chunk_modules:
            em.line(f"from . import {chunk_modules[lv.name]}")
    em.gap()
    with em.indent("class Layer(nn.Module):"):
        em.line(f"d_model = {checked.d_model}")
        if teach_size is not None:
            _render_teach_table(em, checked, level_modules, teach_size)
        em.line()
        with em.indent('def __init__(self, mode="auto", recompute=None):'):
            em.line("super().__init__()")
            em.line("self.mode = mode  # auto | reference | chunk | triton (see dispatch.pick)")
            em.line("self.recompute = recompute  # tokens per recomputed segment in training, or None (nlc.runtime.recompute)")
            for attr, ctor, span in exprs.modules:
                em.line(f"self.{attr} = {ctor}  # {comment(span)}")
            for lv in checked.levels:
                em.line(f"self.{ident(lv.name, 'kernels')} = dispatch.triton_forms({level_modules[lv.name]})"
                        "  # Triton kernels, if generated")
                if lv.init == "learned":
                    mod = level_modules[lv.name]
                    em.line(f"self.{ident(lv.name, 'init')} = nn.ParameterList(  {where(lv.span)}")
                    em.line(f"    [nn.Parameter(p[0].float()) for p in {mod}.initial_state(1)[:{mod}.N_PARAMS]])")
        em.line()
        if teach_size is not None:
            _render_teach_methods(em, body)
        else:
            with em.indent("def forward(self, x):"):
                em.line('"""x: [B, T, d_model] -> [B, T, d_model]."""')
                em.lines.extend(body.lines)
    return em.text()


def _render_body(body: Emitter, exprs: _Expressions, checked: ir.CheckedSpec, order,
                 level_modules: dict[str, str], chunk_modules: dict[str, str]) -> None:
    """forward's body: every node over the whole sequence, or the recall segment loop."""
    seg = segments.plan(checked)
    for kind, name in order:
        if name not in seg.inside:
            _render_node(body, exprs, checked, kind, name, level_modules, chunk_modules, "T")
    if seg.size is None:
        body.line(f"return {exprs.compile(checked.output, 'out')}")
        return
    # recall(...): retrieve -> ... -> write, one segment at a time (nlc.segments)
    for name in seg.recalled:
        body.line(f"{ident(name, 'st')} = {_initial_state(checked.level(name), level_modules[name])}")
    exprs.sliced = {"x"} | {n for n in [*checked.gates, *checked.streams] if n not in seg.inside}
    exprs.offset = "t0"
    body.line("outputs = []")
    with body.indent(f"for t0 in range(0, T, {seg.size}):  # segments of {seg.size} tokens"):
        body.line(f"t1 = min(t0 + {seg.size}, T)")
        for kind, name in order:
            if name in seg.inside:
                _render_node(body, exprs, checked, kind, name, level_modules, chunk_modules,
                             "t1 - t0", ident(name, "st") if name in seg.recalled else None)
        body.line(f"outputs.append({exprs.compile(checked.output, 'out')})")
    body.line("return torch.cat(outputs, dim=1)")


def _render_teach_segment(body: Emitter, exprs: _Expressions, checked: ir.CheckedSpec, order,
                          level_modules: dict[str, str], chunk_modules: dict[str, str]) -> None:
    """segment's body (value teach): every node over the segment, each level from its carried state;
    a teach level is one read of its state, handed to nlc.runtime.teach (which steps it)."""
    exprs.runtime.add("teach")
    exprs.offset = "t0"
    with body.indent("if carry is None:  # the initial states"):
        body.line("carry = {")
        for lv in checked.levels:
            body.line(f"    {_key(lv.name)}: {_initial_state(lv, level_modules[lv.name])},")
        body.line("}")
    body.line("carry = {name: (s,) if torch.is_tensor(s) else tuple(s) for name, s in carry.items()}")
    for kind, name in order:
        lv = checked.level(name) if kind == "level" else None
        if lv is not None and lv.target == "teach":
            _render_teach_read(body, exprs, checked, lv, level_modules[name])
        else:
            _render_node(body, exprs, checked, kind, name, level_modules, chunk_modules, "T",
                         f"carry[{_key(name)}]" if lv is not None else None)
    body.line(f"return {exprs.compile(checked.output, 'out')}, carry")


def _render_teach_read(body: Emitter, exprs: _Expressions, checked: ir.CheckedSpec, lv: ir.Level,
                       module: str) -> None:
    """A teach level over the segment: y = M(q) at its carried state (read before its step)."""
    single = len(checked.streams[lv.query].shape) == 1
    q = exprs.name(lv.query) + (".unsqueeze(2)" if single else "")
    gates = ", ".join(f"{ident(g, 'g')!r}: {exprs.name(g)}" for g in lv.gates)
    out = ident(lv.name, "s")
    body.line(f"{out} = {module}.memory_forward(carry[{_key(lv.name)}][:{module}.N_PARAMS], "
              f"{q}.transpose(1, 2)).transpose(1, 2)  {where(lv.span)}")
    body.line(f"{out} = teach.watch(reads, {_key(lv.name)}, {out}, {q}, {{{gates}}})  "
              "# [B, T, H, V], recorded for its step")
    if single:
        body.line(f"{out} = {out}.squeeze(2)")


def _render_teach_methods(em: Emitter, body: Emitter) -> None:
    """forward (teach levels at their initial state) and segment (a stretch of tokens, states carried)."""
    em.block('''
def forward(self, x):
    """x: [B, T, d_model] -> [B, T, d_model]. Teach levels read their initial state throughout: their
    steps need the model's loss (nlc.runtime.teach, run by Program.model)."""
    return self.segment(x)[0]

def segment(self, x, carry=None, t0=0, reads=None):
    """Tokens t0 .. t0 + T - 1 of a sequence, x [B, T, d_model], from `carry` (each level's state at
    t0 by name; None: the initial states) -> (output [B, T, d_model], the states at t0 + T).
    reads: a dict that receives each teach level's (output, query, gates) (nlc.runtime.teach)."""
''')
    em.lines.extend(body.lines)


def _render_teach_table(em: Emitter, checked: ir.CheckedSpec, level_modules: dict[str, str],
                        size: int) -> None:
    """The class attributes nlc.runtime.teach reads: the segment length and the teach levels."""
    em.line(f"SEGMENT = {size}  # tokens per segment: the smallest teach period")
    em.line("# teach levels: (reference op, period, whether δ is a constant for the outer loop)")
    em.line("TEACH = {")
    for lv in teach.teach_levels(checked):
        op = f"{level_modules[lv.name]}.{ident(lv.name, 'level')}"
        em.line(f"    {_key(lv.name)}: ({op}, {lv.period}, {lv.stop_target}),  {where(lv.span)}")
    em.line("}")


def _key(name: str) -> str:
    """A level name as a dict key in generated code (checked to be an identifier)."""
    ident(name, "level")
    return repr(name)


def _render_node(body: Emitter, exprs: _Expressions, checked: ir.CheckedSpec, kind: str, name: str,
                 level_modules: dict[str, str], chunk_modules: dict[str, str], length: str,
                 state: str | None = None) -> None:
    """One gate, let or level call over `length` tokens."""
    if kind == "gate":
        g = checked.gates[name]
        code = exprs.compile(g.expr, ident(name, "gate"))
        if g.granularity == "constant":
            code = f"torch.as_tensor({code}, dtype=x.dtype, device=x.device).expand(B, {length}, *{g.shape!r})"
        elif checked.shapes[g.expr.span] != g.shape:
            code = f"({code}).expand(B, {length}, *{g.shape!r})"
        body.line(f"{ident(name, 'g')} = {code}  {where(g.span)}")
        if g.granularity == "chunk":
            body.line(f"{ident(name, 'g')} = blocks.hold_per_chunk({ident(name, 'g')}, {g.chunk})")
    elif kind == "let":
        s = checked.streams[name]
        body.line(f"{ident(name, 's')} = {exprs.compile(s.expr, ident(name, 'let'))}  {where(s.span)}")
    else:
        _render_level_call(body, exprs, checked, checked.level(name), level_modules[name],
                           chunk_modules.get(name), length, state)


def _initial_state(lv: ir.Level, mod: str) -> str:
    """The level's initial state: its learned parameters (init learned) and zero optimizer buffers,
    or its module's default."""
    if lv.init != "learned":
        return f"{mod}.initial_state(B, x.dtype, x.device)"
    learned = f"self.{ident(lv.name, 'init')}"
    return (f"tuple(p.to(x.dtype).expand(B, *p.shape) for p in {learned})"
            + (f" + tuple(x.new_zeros(B, *p.shape) for p in {learned})" if torch_arch.has_buffers(lv) else ""))


def _render_level_call(body: Emitter, exprs: _Expressions, checked: ir.CheckedSpec, lv: ir.Level,
                       module: str, chunk_module: str | None, length: str, state: str | None) -> None:
    """The level's op over `length` tokens; `state` names a variable carrying its state from one
    segment to the next (read as the initial state, rebound to the final one)."""
    def stream(name):
        s = exprs.name(name)
        return f"{s}.unsqueeze(2)" if len(checked.streams[name].shape) == 1 else s

    gates = "".join(f", {ident(g, 'g')}={exprs.name(g)}" for g in lv.gates)
    init = ""
    if state is not None:
        init = f", initial_state={state}, output_final_state=True"
    elif lv.init_from is not None:  # nested: start, and restart, from the source level's state
        source, source_module = checked.level(lv.init_from), exprs.level_modules[lv.init_from]
        buffers = f" + {module}.initial_state(B, x.dtype, x.device)[{module}.N_PARAMS:]" if torch_arch.has_buffers(lv) else ""
        init = (f", initial_state=({_initial_state(source, source_module)})[:{source_module}.N_PARAMS]{buffers},"
                f" restart_states={ident(lv.init_from, 'periods')}")
    elif lv.init == "learned":
        init = f", initial_state={_initial_state(lv, module)}"
    if lv.initialises:
        init += ", output_period_states=True"
    out = ident(lv.name, "s")
    op = (f"dispatch.pick({module}.{ident(lv.name, 'level')}, {chunk_module}, self.mode, {length}, "
          f"self.{ident(lv.name, 'kernels')}, x.device)")
    align, why_not = lv.segment_alignment()
    segments = f"self.recompute, {lv.name!r}, {align}{'' if why_not is None else f', {why_not!r}'}"
    periods = f", {ident(lv.name, 'periods')}" if lv.initialises else ""
    # a level whose target reads its own read-out computes that stream in its op: v is its query
    value = stream(lv.query if lv.value == lv.name else lv.value)
    body.line(f"{out}, {state or '_'}{periods} = recompute.segmented(  {where(lv.span)}")
    body.line(f"    {op},")
    body.line(f"    {segments})(  # nlc.runtime.recompute: training in segments, when asked")
    body.line(f"    {stream(lv.query)}, {stream(lv.key)}, {value}{gates}{init})")
    if state is not None:
        body.line(f"{state} = ({state},) if torch.is_tensor({state}) else {state}")
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
            deps[n], kinds[n] = {lv.key, lv.value, lv.query, lv.init_from} | set(lv.gates), "level"
    order, done = [], set()
    while len(order) < len(deps):
        for n in deps:
            if n not in done and deps[n] & deps.keys() <= done | {n}:
                order.append((kinds[n], n))
                done.add(n)
    return order
