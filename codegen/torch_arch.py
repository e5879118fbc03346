"""Memory architectures as generated PyTorch: forward over a batch of tokens, parameter gradients
(outer products for a matrix, a vjp for an MLP), layer inputs, and default initial states.

A matrix or MLP memory is a chain of layers, each one product h @ W (+ a bias b), with parameter-free
maps between them (activation, gating, norm, residual). `memory_forward` sends every product through
an optional `layer(i, h, W, b)` hook (`layers` numbers them), so a chunked form can record each
layer's inputs or swap in its own product (MATH.md §3.5, the dual form)."""
from __future__ import annotations

from nlc import ir

from .emitter import Emitter

_ACT = {"gelu": "torch.nn.functional.gelu", "silu": "torch.nn.functional.silu",
        "relu": "torch.relu", "tanh": "torch.tanh"}


def has_buffers(level: ir.Level) -> bool:
    """Whether the level's state carries an optimizer buffer (zeros at the start) per memory tensor."""
    return level.algorithm.kind in ("momentum", "muon")


def param_layout(level: ir.Level) -> list[tuple[str, tuple[str, ...], bool]]:
    """(name, shape in terms of K, V, HIDDEN, is_weight_matrix) for each memory tensor."""
    m = level.memory
    if m.kind == "matrix":
        return [("S", ("K", "V"), True)]
    if m.kind == "vector":
        return [("m", ("V",), False)]
    if m.gated:
        out = [("W_in", ("K", "HIDDEN"), True), ("W_gate", ("K", "HIDDEN"), True),
               ("W_out", ("HIDDEN", "V"), True)]
        return out + ([("b_out", ("V",), False)] if m.bias else [])
    dims = ["K"] + ["HIDDEN"] * (m.depth - 1) + ["V"]
    out = []
    for i in range(m.depth):
        out.append((f"W{i + 1}", (dims[i], dims[i + 1]), True))
        if m.bias:
            out.append((f"b{i + 1}", (dims[i + 1],), False))
    return out


def layers(level: ir.Level) -> list[tuple[int, int | None]]:
    """Per layer of a matrix or MLP memory, in the order `memory_forward` calls `layer(i, ...)`: the
    index in `param_layout` of its weight and of its bias (None without one)."""
    index = {name: i for i, (name, _, _) in enumerate(param_layout(level))}
    m = level.memory
    if m.kind == "matrix":
        return [(index["S"], None)]
    if m.kind != "mlp":
        raise ValueError(f"a {m.kind} memory has no layers")
    if m.gated:
        return [(index["W_in"], None), (index["W_gate"], None), (index["W_out"], index.get("b_out"))]
    return [(index[f"W{i + 1}"], index.get(f"b{i + 1}")) for i in range(m.depth)]


def hidden_size(level: ir.Level) -> int:
    return max(1, int(round(level.memory.expand * level.d_key)))


def render_forward(em: Emitter, level: ir.Level, record: bool) -> None:
    """memory_forward(params, x[, inputs], layer=None): x [B, H, N, K] -> [B, H, N, V]. With `record`,
    each weight matrix's input is appended to `inputs` when given (delta gradient descent needs them).
    A matrix or MLP memory computes each product through `layer(i, h, W, b)`, h @ W (+ b) by default."""
    m, names = level.memory, [n for n, _, _ in param_layout(level)]
    hooked = m.kind in ("matrix", "mlp")
    signature = "params, x" + (", inputs=None" if record else "") + (", layer=None" if hooked else "")
    rec = (lambda *xs: em.line(f"_record(inputs, {', '.join(xs)})")) if record else (lambda *xs: None)
    with em.indent(f"def memory_forward({signature}):"):
        if hooked:
            em.line(f'"""{m.describe()}: x [B, H, N, K] -> [B, H, N, V].')
            em.line('Layer i\'s product h @ W (+ b) is layer(i, h, W, b) when given (b None: no bias)."""')
        else:
            em.line(f'"""{m.describe()}: x [B, H, N, K] -> [B, H, N, V]."""')
        em.line(f"({names[0]},) = params" if len(names) == 1 else f"{', '.join(names)} = params")
        if m.kind == "vector":
            em.line("return x * m[:, :, None, :]")
            return
        with em.indent("if layer is None:"):
            with em.indent("def layer(i, h, W, b):"):
                em.line("return h @ W if b is None else h @ W + b[:, :, None, :]")
        product = _products(level, names)
        if m.kind == "matrix":
            rec("x")
            em.line(f"return {product(0, 'x')}")
            return
        act = _ACT[m.act]
        if m.gated:
            rec("x", "x")
            em.line(f"h = {act}({product(1, 'x')}) * {product(0, 'x')}")
            rec("h")
            em.line(f"h = {product(2, 'h')}")
        else:
            em.line("h = x")
            for i in range(m.depth):
                rec("h")
                em.line(f"h = {product(i, 'h')}")
                if i < m.depth - 1:
                    em.line(f"h = {act}(h)")
        if m.norm == "layernorm":
            em.line("h = torch.nn.functional.layer_norm(h, h.shape[-1:])")
        em.line("return x + h" if m.residual else "return h")


def _products(level: ir.Level, names: list[str]):
    """`layer(i, h, W, b)` of layer i, as source."""
    table = layers(level)

    def product(i: int, h: str) -> str:
        w, b = table[i]
        return f"layer({i}, {h}, {names[w]}, {names[b] if b is not None else 'None'})"
    return product


def render_grads(em: Emitter, level: ir.Level) -> None:
    with em.indent("def memory_grads(params, x, dy):"):
        em.line('"""Σ_n ∂<dy_n, M(x_n)>/∂params for x [B, H, N, K], dy [B, H, N, V]."""')
        if level.memory.kind == "matrix":
            em.line("return (x.transpose(-1, -2) @ dy,)")
        elif level.memory.kind == "vector":
            em.line("return ((x * dy).sum(2),)")
        else:
            em.line("_, pullback = vjp(lambda *p: memory_forward(p, x), *params)")
            em.line("return pullback(dy)")


def render_initial_state(em: Emitter, level: ir.Level, kl_axis: str | None, mass: float,
                         buffers: int) -> None:
    """initial_state(batch, dtype, device): zeros, a seeded draw (learned init's default), or the
    uniform point of the simplex (KL retention)."""
    layout = param_layout(level)
    with em.indent("def initial_state(batch, dtype=torch.float64, device=None):"):
        em.line('"""The default initial state, [B, H, ...] per tensor (a layer passes its own learned one)."""')
        if kl_axis is None and level.init == "learned" and any(is_matrix for _, _, is_matrix in layout):
            em.line("generator = torch.Generator().manual_seed(0)")
        em.line("params = []")
        for name, shape, is_matrix in layout:
            dims = ", ".join(shape)
            if kl_axis is not None:
                fan = shape[0] if (kl_axis == "row" or not is_matrix) else shape[-1]
                em.line(f"p = torch.full((HEADS, {dims}), {mass!r} / {fan}, dtype=torch.float64)")
            elif level.init == "learned" and is_matrix:
                em.line(f"p = torch.randn(HEADS, {dims}, generator=generator, dtype=torch.float64)"
                        f" / math.sqrt({shape[0]})")
            else:
                em.line(f"p = torch.zeros(HEADS, {dims}, dtype=torch.float64)")
            em.line("params.append(p.to(dtype=dtype, device=device).expand(batch, *p.shape).clone())")
        if buffers:
            em.line("return tuple(params) + tuple(torch.zeros_like(p) for p in params)  # + optimizer buffers")
        else:
            em.line("return tuple(params)")
    em.gap()
    em.line("default_state = initial_state  # for the ops, whose initial_state argument shadows the name")
