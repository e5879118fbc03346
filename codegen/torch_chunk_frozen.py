"""Render one level of the *frozen-gradient* family as a chunk-parallel PyTorch module (MATH.md §3.4,
§3.5, §3.6): every gradient of a chunk is taken at the chunk-start weights W_0 (`gradient
chunk_start(C)`), so within the chunk the optimizer is a pair of linear scans with per-token scalar
transitions, which run in closed form from log-space segment sums. Chunks run one after another.

A matrix or MLP memory is a chain of layers h @ W (+ b) (codegen/torch_arch.py, `layers`), and the
gradient of one layer at W_0 is an outer product a_j ⊗ δ_j of its input and its output's gradient,
so reads use the dual form layer by layer (matmuls over the chunk's tokens) and never build the
per-token weights W_t.

An omega window (`bias omega(window = c, gamma) of <bias>`, MATH.md §3.8) stays linear: token t's
gradient is g_t = sum of gamma_i u_i over its last c tokens, all at W_0, so it is a banded matrix Ω
[L, P + L] of the chunk's tokens and the P <= c - 1 before it (re-evaluated at W_0, as the reference
does, never before the call's first token); the scan coefficients become G Ω over those P + L tokens.

The module it renders imports the reference module's memory (`memory_forward`), bias
(`output_grad`) and state helpers, and defines `CHUNK`, `LAYERS` and the op `level_<name>` with the
reference op's signature, state layout and return convention.
"""
from __future__ import annotations

import sympy

import nlc
from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.printer import to_torch
from nlc.derive.rules import ALGORITHM_TEXT, LevelRules
from nlc.plan import KernelPlan

from . import torch_arch
from .emitter import Emitter, comment, ident, where
from .torch_chunk_common import (op_signature, render_layer_grads, render_op_inputs, render_product,
                                 render_scan_coefficients, render_scan_helpers, show)


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """Source of `level_<name>_chunk.py` for a level whose plan is the frozen family."""
    lv = rules.level
    if plan.family != "frozen" or plan.chunk < 1:
        raise ValueError(f"level {lv.name!r}: not a frozen-family plan with a chunk size "
                         f"({plan.family}, chunk {plan.chunk})")
    state_free = not (rules.bias.grad.free_symbols & {S.e, S.r, S.y})
    mapped = lv.maps_at_chunks  # the state is an accumulator A, read as psi_scale(A_0)·A in a chunk
    lag = lv.lag_token  # KL's softmax step at each chunk's first token, a scan of W after it
    affine = rules.retention.form == "elementwise" and not rules.accumulator
    if lv.period != 1 or not (affine or mapped or lag) or not (lv.grad_at == "chunk" or state_free):
        raise ValueError(f"level {lv.name!r}: the frozen chunked form needs gradients at the chunk "
                         "start (or a state-free bias), period 1 and an affine retention (or an lq "
                         "map at chunk boundaries, or KL's lag token)")
    if lag and (lv.bias.kind == "omega" or plan.chunk < 2):
        raise ValueError(f"level {lv.name!r}: KL's lag token is in the frozen chunked form without "
                         "omega windows and with chunks of 2 tokens or more")
    algorithms = ("gd", "momentum", "ftrl") if mapped else ("gd", "momentum")
    if lv.memory.kind not in ("matrix", "mlp") or lv.algorithm.kind not in algorithms:
        raise NotImplementedError(f"level {lv.name!r}: {lv.memory.kind} memory with "
                                  f"{lv.algorithm.kind} is not in the frozen family")
    momentum, omega = lv.algorithm.kind == "momentum", lv.bias.kind == "omega"
    coeffs = {"decay": plan.decay, "scale": plan.scale, "lr": rules.lr}
    if momentum:
        coeffs["beta"] = lv.algorithm.args["beta"]
    for role, expr in {**coeffs, **({"gamma": lv.bias.args["gamma"]} if omega else {})}.items():
        vector = [g for g in ir.gate_names(expr) if lv.gate_axes[g] != "scalar"]
        if vector:
            raise NotImplementedError(
                f"level {lv.name!r}: the frozen chunked form needs scalar gates in the {role} "
                f"coefficient; {', '.join(vector)} is per channel")
    # with momentum the lag token's factor on the step is set to 0 (its step is taken apart)
    scaled = sympy.sympify(plan.scale) != 1 or (lag and momentum)
    if not scaled:
        del coeffs["scale"]  # c_t = 1: no factor to carry
    linear = _linear(lv.memory) and not (omega or mapped or lag)  # FrozenLinear has none of these
    em = Emitter()
    _header(em, rules, plan, coeffs, model, file)
    em.line("import torch")
    em.line()
    if linear:
        em.line("from nlc.runtime.frozen_linear import frozen_linear")
        em.line()
        em.line(f"from .{ident(lv.name, 'level')} import N_PARAMS, _pack, default_state, output_grad")
    else:
        em.line("from nlc.runtime.vjp import tapped_vjp")
        em.line()
        names = "N_PARAMS, _pack, default_state, memory_forward, output_grad" + (
            ", psi_scale" if mapped else ", _per_tensor, retain" if lag else "")
        em.line(f"from .{ident(lv.name, 'level')} import {names}")
    em.line()
    em.line(f"CHUNK = {int(plan.chunk)}")
    if omega:
        em.line(f"WINDOW = {int(lv.bias.args['window'])}")
    if not linear:
        em.line(f"LAYERS = {tuple(torch_arch.layers(lv))!r}  # per layer: index of its weight, of its bias (or None)")
    em.gap()
    render_scan_helpers(em)
    em.gap()
    _render_coefficients(em, momentum, scaled)
    if lv.read == "before":
        em.gap()
        _render_shift(em)
    if linear:
        em.gap()
        _render_linear_op(em, rules, coeffs, momentum)
        return em.text()
    em.gap()
    render_product(em)
    em.gap()
    render_layer_grads(em)
    em.gap()
    _render_dual_layer(em, momentum, mapped)
    em.gap()
    _render_carried(em)
    if lag:
        em.gap()
        _render_lag_step(em, momentum)
    if omega:
        em.gap()
        _render_window_helpers(em)
    em.gap()
    _render_op(em, rules, coeffs, momentum)
    return em.text()


def _linear(memory: ir.Memory) -> bool:
    """M(W; x) = x W: a matrix, or an MLP of depth 1 with nothing around the product; then the one
    layer's input is x and its output's gradient is dy itself."""
    return memory.kind == "matrix" or (
        memory.kind == "mlp" and memory.depth == 1 and not (memory.residual or memory.gated
                                                             or memory.bias) and memory.norm == "none")


def _header(em: Emitter, rules: LevelRules, plan: KernelPlan, coeffs, model: str, file: str) -> None:
    lv = rules.level
    momentum = lv.algorithm.kind == "momentum"
    em.line(f'"""Level {comment(lv.name)!r} of model {comment(model)!r}: chunk-parallel form, frozen-gradient '
            "family (MATH.md §3.4-3.6).")
    em.line()
    em.line(f"Generated by nlc {nlc.__version__} from {comment(file)}; do not edit. It computes what the")
    em.line(f"reference op in {ident(lv.name, 'level')}.py computes, up to round-off, a chunk of "
            f"{int(plan.chunk)} tokens at a time.")
    for key, value in lv.describe().items():
        em.line(f"  {key:<10} {comment(value)}")
    em.line(f"  step       {ALGORITHM_TEXT[lv.algorithm.kind]}")
    em.line(f"  a_t = {show(coeffs['decay'])}   (retention: factor on the old state)")
    em.line(f"  c_t = {show(plan.scale)}   (retention: factor on the step)")
    em.line(f"  lr_t = {show(coeffs['lr'])}")
    if momentum:
        em.line(f"  beta_t = {show(coeffs['beta'])}")
    em.line()
    em.line("Within a chunk (positions t = 0..L-1, W_0 and M_0 the state entering it) every gradient is")
    if _linear(lv.memory):
        em.line("taken at W_0, so all of them come at once: the memory is linear, M(W; x) = x W, and token j's")
        em.line("gradient is u_j = k_j ⊗ δ_j, δ = output_grad(K W_0, V) = dℓ/dy at W_0. The recurrence")
    else:
        em.line("taken at W_0, so all of them come at once. The memory is a chain of layers (LAYERS), each a")
        em.line("product h @ W (+ b); token j's gradient of a layer's weight is u_j = a_j ⊗ δ_j (of its bias,")
        em.line("δ_j), a_j the layer's input and δ_j = dℓ/d(layer output) at W_0, all from one pass")
        em.line("(`_layer_grads`: a forward at W_0 and one vjp). The recurrence")
    if momentum:
        em.line("  M_t = beta_t M_{t-1} - lr_t u_t,    W_t = a_t W_{t-1} + c_t M_t")
    else:
        em.line("  W_t = a_t W_{t-1} + c_t (-lr_t u_t)")
    if lv.maps_at_chunks:
        em.line("(W here is the lq accumulator A: the state, and the scans, are A's). Its map runs at chunk")
        em.line(f"boundaries only: W_0 = psi(A_0) = r A_0 with r = psi_scale(A_0) = {show(rules.retention.slope)},")
        em.line("N = ||A_0|| per tensor, and within the chunk the weights are r A_t, so every read below is")
        em.line("scaled by its tensor's r (W_0 and M_0 enter scaled, the steps' part is multiplied by r).")
        em.line("The scan")
    if lv.lag_token:
        em.line("KL's lag token (kl(apply = chunk), MATH.md §3.7): at each chunk's first token the exact step")
        em.line("W_1 = retain(W_0, s_1), the softmax, with its gradient at the state entering the chunk; the")
        em.line("recurrence above runs on W itself over the chunk's other tokens, their gradients at W_1")
        em.line("(a_t and c_t are the step's own coefficients on log W and s). In the scans the first")
        em.line("token is the identity (a = 1, lr = 0; with momentum beta = 1, c = 0), so W_0 below is W_1. The scan")
    em.line("is then linear with scalar transitions. With b_t = prod_{r<=t} a_r and P[t, i] =")
    em.line("prod_{i<r<=t} a_r (i <= t, else 0), both from log-space sums of each segment's log a:")
    if momentum:
        em.line("  m_t, Pm[t, j]: the same products of beta")
        em.line("  N[i, j] = c_i Pm[i, j] lr_j,   G = P N,   f = P (c * m)       (every factor bounded)")
        em.line("  W_t = b_t W_0 + f_t M_0 - sum_j G[t, j] u_j")
        em.line("  M_t = m_t M_0 - sum_j Pm[t, j] lr_j u_j")
    else:
        em.line("  G[t, j] = P[t, j] c_j lr_j")
        em.line("  W_t = b_t W_0 - sum_j G[t, j] u_j")
    if lv.bias.kind == "omega":
        em.line("The omega window puts g_t = sum_i Ω[t, i] u_i in the place of u_t, with Ω[t, i] = gamma_i =")
        em.line(f"{show(lv.bias.args['gamma'])} for the WINDOW tokens i up to t (up to WINDOW - 1 of them before the chunk,")
        em.line("re-evaluated at W_0, none before the call's first token), so each G (and H) above is G Ω, over")
        em.line("the chunk's tokens and those before it (`_window`).")
    read = "W_t (read after write)" if lv.read == "after" else "W_{t-1}, W_{-1} = W_0 (read before write)"
    if _linear(lv.memory) and lv.bias.kind != "omega":
        extra = " + f_t q_t M_0" if momentum else ""
        em.line(f"The read o_t = q_t W uses {read}, and never builds it:")
        em.line(f"  o_t = b_t q_t W_0{extra} - sum_j G[t, j] (q_t·k_j) δ_j")
        em.line("(rows of b, f, G shifted by one token for read before). Row L-1 of the same coefficients is")
        em.line("the state carried to the next chunk; a short last chunk is L < CHUNK. FrozenLinear")
        em.line("(nlc/runtime/frozen_linear.py) runs the chunks in order and differentiates them by hand (its")
        em.line("backward: matmuls per chunk in reverse, the bias's vjp from output_grad).")
        em.line("Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; scalar gates [B, T, H]; the state is the")
        em.line(f"reference's: {comment(', '.join(_state_names(lv)))}.")
        em.line('"""')
        return
    em.line(f"The read o_t = M(.; q_t) uses {read}, and never builds it: memory_forward")
    em.line("runs over the chunk's queries with each layer in dual form (`_dual_layer`, MATH.md §3.5), X the")
    em.line("layer's inputs at the read [L, I], A = (a_j) [L, I], Δ = (δ_j) [L, O]:")
    extra = " + diag(f) (X M_0 [+ μ_0])" if momentum else ""
    em.line(f"  X W_t [+ β_t] = diag(b) (X W_0 [+ β_0]){extra} - ((X A^T [+ 1]) * G) Δ")
    em.line("(rows of b, f, G shifted by one token for read before). Row L-1 of the same coefficients is")
    em.line("the state carried to the next chunk; a short last chunk is L < CHUNK.")
    em.line("Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; scalar gates [B, T, H]; the state is the")
    em.line(f"reference's: {comment(', '.join(_state_names(lv)))}.")
    em.line('"""')


def _state_names(lv: ir.Level) -> list[str]:
    names = [("A_" if lv.accumulates else "") + n for n, _, _ in torch_arch.param_layout(lv)]
    return names + ([f"M_{n}" for n in names] if lv.algorithm.kind == "momentum" else [])


def _render_coefficients(em: Emitter, momentum: bool, scaled: bool) -> None:
    """`_coefficients`; without `c` (and its products) where the retention's step factor c_t is 1."""
    c, cm = ("c, ", "P * c[..., None, :]") if scaled else ("", "P")
    if momentum:
        em.block(f'''
def _coefficients(a, {c}lr, beta):
    """Closed-form scan coefficients of each chunk, all [..., L] or [..., L, L]:
    W_t = b_t W_0 + f_t M_0 - sum_j G[t, j] u_j  and  M_t = m_t M_0 - sum_j H[t, j] u_j, with
    H[i, j] = Pm[i, j] lr_j, G = P diag(c) H, f = P (c * m) (stable P·N form, N = diag(c) H)."""
    b, P = _decay_products(a)
    m, Pm = _decay_products(beta)
    H = Pm * lr[..., None, :]
    G = ({cm}) @ H
    f = (P @ ({"c * m" if scaled else "m"})[..., None])[..., 0]
    return b, f, G, m, H
''')
    else:
        em.block(f'''
def _coefficients(a, {c}lr):
    """Closed-form scan coefficients of each chunk: W_t = b_t W_0 - sum_j G[t, j] u_j with
    b [..., L] and G[t, j] = P[t, j] c_j lr_j [..., L, L]."""
    b, P = _decay_products(a)
    return b, P * ({"c * lr" if scaled else "lr"})[..., None, :]
''')


def _render_shift(em: Emitter) -> None:
    em.block('''
def _previous(x, first, dim):
    """Coefficients of W_{t-1} from those of W_t: shift one token along `dim`, with `first` (the
    chunk-start state's coefficient) at t = 0."""
    head = torch.full_like(x.narrow(dim, 0, 1), first)
    return torch.cat([head, x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)
''')


def _render_dual_layer(em: Emitter, momentum: bool, mapped: bool) -> None:
    """`_dual_layer`; with `mapped` (an lq map at chunk boundaries) it also takes each state tensor's
    slope at the chunk start, which scales the steps' part of every read."""
    sig, doc = ("buffers, ", "buffers: M_0 per state tensor; ") if momentum else ("", "")
    weights = "b_t W_0 + f_t M_0 - sum_j G[t, j] a_j ⊗ δ_j" if momentum else "b_t W_0 - sum_j G[t, j] a_j ⊗ δ_j"
    read = ("b_t (x_t W_0 (+ β_0)) + f_t (x_t M_0 (+ μ_0)) - sum_j G[t, j] (x_t·a_j (+ 1)) δ_j" if momentum
            else "b_t (x_t W_0 (+ β_0)) - sum_j G[t, j] (x_t·a_j (+ 1)) δ_j")
    if mapped:
        weights = weights.replace("- sum_j", "- r sum_j")
        read = read.replace("(x_t·a_j (+ 1))", "(r_W x_t·a_j (+ r_β))")
        doc += "scales: r [B, H, 1, ...] per state tensor (W_0, M_0 already scaled); "
    lines = [
        f"def _dual_layer({sig}inputs, deltas, {'b, f, G' if momentum else 'b, G'}{', scales' if mapped else ''}):",
        '    """The `layer` hook of memory_forward that reads every token t of a chunk at its own weights',
        f"    W_t = {weights} (biases: δ_j alone), without building them:",
        f"      x_t W_t (+ β_t) = {read}.",
        f"    {doc}inputs, deltas from _layer_grads; b{', f' if momentum else ''} [B, H, L]; G [B, H, L, L].\"\"\"",
        "    minus_G = -G  # the sign on the [L, L] factor: no full-size negation, forward or backward",
        "",
        "    def layer(i, x, W, bias):",
    ]
    if momentum or mapped:
        lines.append("        w, c = LAYERS[i]")
    if mapped:
        lines += ["        scores = (x @ inputs[i].transpose(-1, -2)) * scales[w]  # [B, H, L, L]: r_W x_t·a_j",
                  "        if bias is not None:",
                  "            scores = scores + scales[c][..., None]"]
    else:
        lines += ["        scores = x @ inputs[i].transpose(-1, -2)  # [B, H, L, L]: x_t·a_j",
                  "        if bias is not None:",
                  "            scores = scores + 1.0"]
    if momentum:
        lines += ["        out = torch.addcmul((scores * minus_G) @ deltas[i], b[..., None], _product(x, W, bias))",
                  "        return torch.addcmul(out, f[..., None], _product(x, buffers[w], None if c is None else buffers[c]))"]
    else:
        lines.append("        return torch.addcmul((scores * minus_G) @ deltas[i], b[..., None], _product(x, W, bias))")
    lines.append("    return layer")
    em.block("\n" + "\n".join(lines) + "\n")


def _render_carried(em: Emitter) -> None:
    em.block('''
def _carried(starts, scales, row, inputs, deltas):
    """A state after the chunk's last token, per state tensor: sum_s scales[s] X_s - sum_j row[j] u_j,
    u_j = a_j ⊗ δ_j for a layer's weight and δ_j for its bias. starts: tuples X_s of state tensors
    [B, H, ...]; scales: [B, H] each; row [B, H, L]; inputs, deltas per layer [B, H, L, I|O]."""
    minus_row = -row[..., :, None]  # [B, H, L, 1]: the sign on the small factor
    carried = [None] * N_PARAMS
    for (w, c), a, d in zip(LAYERS, inputs, deltas):
        # -sum_j row[j] a_j ⊗ δ_j, the row on the narrower of a [B, H, L, I] and δ [B, H, L, O]
        if a.shape[-1] < d.shape[-1]:
            carried[w] = (minus_row * a).transpose(-1, -2) @ d
        else:
            carried[w] = a.transpose(-1, -2) @ (minus_row * d)
        if c is not None:
            carried[c] = (minus_row * d).sum(-2)
    for i in range(N_PARAMS):
        for s, x in zip(scales, starts):
            carried[i] = torch.addcmul(carried[i], s.reshape(s.shape + (1,) * (x[i].dim() - 2)), x[i])
    return tuple(carried)
''')


def _render_lag_step(em: Emitter, momentum: bool) -> None:
    """`_lag_step`: KL's exact step at a chunk's first token (`kl(apply = chunk)`)."""
    if momentum:
        head = "def _lag_step(params, buffers, inputs, deltas, lr, beta, *gates):"
        doc, returns = "M_1 = beta M_0 - lr u, s = M_1", "(W_1, M_1)"
        extra = ["    buffers = steps = tuple(_per_tensor(beta, m) * m + s for m, s in zip(buffers, steps))"]
        result = "params, buffers"
    else:
        head, doc, returns, extra, result = ("def _lag_step(params, inputs, deltas, lr, *gates):",
                                             "s = -lr u", "W_1", [], "params")
    lines = [
        head,
        f'    """The lag token\'s step (MATH.md §3.7): W_1 = retain(W_0, s), the softmax, with {doc}; u = a ⊗ δ',
        "    its gradient at W_0 (inputs, deltas of one token from _layer_grads); lr" + (", beta" if momentum else ""),
        f'    and the retention\'s gates [B, H] at that token. Returns {returns}."""',
        "    steps = _carried((), (), lr[..., None], inputs, deltas)  # -lr u per state tensor",
        *extra,
        "    params = tuple(retain(w, s, *(_per_tensor(g, w) for g in gates)) for w, s in zip(params, steps))",
        f"    return {result}",
    ]
    em.block("\n" + "\n".join(lines) + "\n")


def _render_op(em: Emitter, rules: LevelRules, coeffs, momentum: bool) -> None:
    lv = rules.level
    omega = lv.bias.kind == "omega"
    heads = {ir.gate_symbol(g): ident(g, "gh") for g in lv.gates}
    bias_gates = ir.gate_names(rules.bias.grad)
    gamma = sympy.sympify(lv.bias.args["gamma"]) if omega else None
    with em.indent(op_signature(lv)):
        render_op_inputs(em, rules, coeffs, ir.gate_names(gamma) if omega else ())
        em.line("qh, kh, vh = qh.contiguous(), kh.contiguous(), vh.contiguous()  # one copy, none per chunk matmul")
        render_scan_coefficients(em, lv, coeffs, heads)
        if lv.lag_token:
            _render_lag_coefficients(em, rules, coeffs, momentum)
        if omega:
            text = f"{to_torch(gamma, heads)}[..., None]" if gamma.free_symbols else \
                f"torch.full_like(kh[..., :1], {to_torch(gamma, heads)})"
            em.line(f"gamma = {text}  {where(lv.bias.span) or '#'} gamma_i, the window's weight of token i, [B, H, T, 1]")
        names = "b, f, G, m, H" if momentum else "b, G"
        em.line("# the scan coefficients depend on the gates alone: those of every chunk at once, unbound into")
        em.line("# tuples over the NC chunks of [B, H, CHUNK] or [B, H, CHUNK, CHUNK] (a short last chunk uses its")
        em.line("# first rows; slicing whole-sequence tensors per chunk would cost a full-size gradient each)")
        chunked = ", ".join(f"_by_chunk({role})" for role in coeffs)
        em.line(f"{where(lv.algorithm.span) or '#'} {comment(lv.algorithm.describe())}")
        em.line(f"{names} = (x.unbind(2) for x in _coefficients({chunked}))")
        rows = ["kh", "vh", *(ident(g, "go") for g in bias_gates)] + (["gamma"] if omega else [])
        split = ", ".join(f"{x}.split(CHUNK, 2)" for x in ["qh", *rows])
        em.line(f"chunks = zip({split})  # [B, H, L, D] each")
        if omega:
            em.line(f"tail = ({', '.join(f'{x}[:, :, :0]' for x in rows)})  "
                    "# the tokens before a chunk that its windows reach")
        em.line("outputs = []")
        chunk_rows = [f"{x[0]}_c" if x in ("kh", "vh") else f"{x}_c" for x in rows]
        with em.indent(f"for n, ({', '.join(['q_c', *chunk_rows])}) in enumerate(chunks):"):
            em.line(f"{where(lv.span)} level {comment(lv.name)}, chunk n: q_c, k_c [B, H, L, K], v_c [B, H, L, V]")
            em.line("L = k_c.shape[2]  # CHUNK, or fewer in a short last chunk")
            G_c = "G[n][..., :L, :L]"
            if omega:
                window_rows = [r[:-2] + "_w" for r in chunk_rows]
                em.line(f"({', '.join(window_rows)}), tail = _with_tail(tail, ({', '.join(chunk_rows)}))  "
                        "# the window's P + L tokens")
                em.line(f"window = _window(gamma_w, L)  {where(lv.bias.span) or '#'} Ω [B, H, L, P + L]: "
                        "g_t = sum_i Ω[t, i] u_i")
                G_c, chunk_rows = f"{G_c} @ window", window_rows
            if momentum:
                em.line(f"b_c, f_c, G_c = b[n][..., :L], f[n][..., :L], {G_c}  # this chunk's rows")
            else:
                em.line(f"b_c, G_c = b[n][..., :L], {G_c}  # this chunk's rows")
            args = ", ".join(chunk_rows[:-1] if omega else chunk_rows)  # gamma is in the window
            span = where((lv.bias.inner or lv.bias).span) or "#"
            at = "params"
            if lv.maps_at_chunks:
                em.line(f"scales = tuple(psi_scale(a) for a in params)  {where(lv.retention.span) or '#'} the lq "
                        "map's slope at the chunk start, [B, H, 1, ...]")
                em.line("weights = tuple(c * a for c, a in zip(scales, params))  # W_0 = psi(A_0)")
                at = "weights"
            if lv.lag_token:
                _render_lag_token(em, rules, chunk_rows, momentum)
            em.line(f"inputs, deltas = _layer_grads({at}, {args})  {span} per layer at W_0")
            _render_chunk(em, lv.read, momentum, omega, lv.maps_at_chunks, lv.lag_token)
        em.line("o = torch.cat(outputs, dim=2).transpose(1, 2)  # [B, T, H, V]")
        em.line("return o, (_pack(params + buffers) if output_final_state else None)")


def _render_lag_coefficients(em: Emitter, rules: LevelRules, coeffs, momentum: bool) -> None:
    """The lag tokens' own coefficients (and the retention's gates there), [B, H, NC] unbound per
    chunk; then those tokens become the identity in the scans."""
    assert "scale" in coeffs or not momentum, "momentum's lag token needs c_t in the scans (set to 0 there)"
    lv = rules.level
    gates = [ident(g, "gh") for g in sorted(ir.gate_names(rules.retention_new()))]
    lag = ["lr", *(["beta"] if momentum else []), *gates]
    em.line(f"{where(lv.retention.span) or '#'} KL's lag token: each chunk's first token takes the exact softmax "
            "step apart, with")
    em.line("# its own rates and gates (at_lag, one tuple of [B, H] per chunk); in the scans it is the identity")
    em.line(f"at_lag = tuple(zip(*(x[..., ::CHUNK].unbind(-1) for x in ({', '.join(lag)},))))")
    em.line("lag = torch.arange(T, device=k.device) % CHUNK == 0  # [T]")
    em.line("decay, lr = torch.where(lag, 1.0, decay), torch.where(lag, 0.0, lr)")
    if momentum:
        em.line("beta, scale = torch.where(lag, 1.0, beta), torch.where(lag, 0.0, scale)")


def _render_lag_token(em: Emitter, rules: LevelRules, chunk_rows: list[str], momentum: bool) -> None:
    """In the chunk loop: the read of the first token before its step (read before), and the step."""
    lv = rules.level
    first = ", ".join(f"{x}[:, :, :1]" for x in chunk_rows)
    if lv.read == "before":
        em.line("o_lag = memory_forward(params, q_c[:, :, :1])  # the lag token reads the state entering the chunk")
    em.line(f"inputs, deltas = _layer_grads(params, {first})  # the lag token's gradient, at that state")
    state = "params, buffers" if momentum else "params"
    em.line(f"{state} = _lag_step({state}, inputs, deltas, *at_lag[n])  {where(lv.retention.span)} the softmax step: W_1")


def _render_window_helpers(em: Emitter) -> None:
    render_with_tail(em)
    em.gap()
    em.block('''
def _window(gamma, L):
    """The omega windows Ω [B, H, L, N] of a chunk's last L tokens among N: Ω[t, i] = gamma_i when
    token i is one of the WINDOW tokens up to token t (which is N - L + t), else 0. gamma [B, H, N, 1]."""
    N = gamma.shape[2]
    t = torch.arange(N - L, N, device=gamma.device)[:, None]
    i = torch.arange(N, device=gamma.device)
    return gamma.transpose(-1, -2) * ((i <= t) & (i > t - WINDOW))
''')


def render_with_tail(em: Emitter) -> None:
    """`_with_tail`: a chunk's rows after those of the tokens before it that its omega windows reach
    (also in the frozen MLP Triton file)."""
    em.block('''
def _with_tail(tail, chunk):
    """Per tensor, the chunk's rows [B, H, L, D] after the up to WINDOW - 1 rows before it (tail
    [B, H, P, D]) -> (rows [B, H, P + L, D] each, the next chunk's tail)."""
    rows = tuple(torch.cat([t, x], dim=2) for t, x in zip(tail, chunk))
    N = rows[0].shape[2]
    return rows, tuple(x[:, :, max(N - (WINDOW - 1), 0):] for x in rows)
''')


def _render_linear_op(em: Emitter, rules: LevelRules, coeffs, momentum: bool) -> None:
    """The op of a linear memory: the scan coefficients here, the chunks in FrozenLinear (a forward
    chunk by chunk and a hand-derived backward, nlc/runtime/frozen_linear.py)."""
    lv = rules.level
    heads = {ir.gate_symbol(g): ident(g, "gh") for g in lv.gates}
    with em.indent(op_signature(lv)):
        render_op_inputs(em, rules, coeffs)
        render_scan_coefficients(em, lv, coeffs, heads)
        em.line("# the scan coefficients depend on the gates alone: those of every chunk at once,")
        em.line("# [B, H, NC, CHUNK] or [B, H, NC, CHUNK, CHUNK] (a short last chunk uses its first rows)")
        chunked = ", ".join(f"_by_chunk({role})" for role in coeffs)
        em.line(f"{where(lv.algorithm.span) or '#'} {comment(lv.algorithm.describe())}")
        em.line(f"{'b, f, G, m, H' if momentum else 'b, G'} = _coefficients({chunked})")
        rows = "b_r, f_r, G_r" if momentum else "b_r, G_r"
        if lv.read == "after":
            em.line(f"{rows} = {rows.replace('_r', '')}  # the read's coefficients: W_t (read after write)")
        else:
            shifted = ["_previous(b, 1.0, -1)"] + (["_previous(f, 0.0, -1)"] if momentum else [])
            em.line(f"{rows} = {', '.join(shifted + ['_previous(G, 0.0, -2)'])}  # the read's: W_{{t-1}} (read before)")
        gates = "".join(f", {ident(g, 'go')}" for g in ir.gate_names(rules.bias.grad))
        args = "b, f, G, m, H, b_r, f_r, G_r" if momentum else "b, None, G, None, None, b_r, None, G_r"
        em.line(f"{where(lv.span)} level {comment(lv.name)}: the chunks in order, o [B, H, T, V] and the final state")
        em.line(f"o, W, M = frozen_linear(CHUNK, output_grad, qh, kh, vh, params[0], "
                f"{'buffers[0]' if momentum else 'None'}, {args}{gates})")
        state = "(W, M)" if momentum else "(W,)"
        em.line(f"return o.transpose(1, 2), (_pack({state}) if output_final_state else None)")


def _render_chunk(em: Emitter, read: str, momentum: bool, omega: bool, mapped: bool, lag: bool) -> None:
    rows = "b_c, f_c, G_c" if momentum else "b_c, G_c"
    if read == "after":
        what = "W_t (read after write)"
    else:
        shifted = ["_previous(b_c, 1.0, -1)"] + (["_previous(f_c, 0.0, -1)"] if momentum else [])
        em.line(f"{rows.replace('_c', '_r')} = {', '.join(shifted + ['_previous(G_c, 0.0, -2)'])}  # W_{{t-1}}")
        rows, what = rows.replace("_c", "_r"), "W_{t-1} (read before write)"
    if mapped:
        buffers = "tuple(c * m for c, m in zip(scales, buffers)), " if momentum else ""
        em.line(f"layer = _dual_layer({buffers}inputs, deltas, {rows}, scales)  # reads of psi_scale(A_0)·A_t")
        em.line(f"outputs.append(memory_forward(weights, q_c, layer=layer))  # read at {what}, [B, H, L, V]")
    else:
        em.line(f"layer = _dual_layer({'buffers, ' if momentum else ''}inputs, deltas, {rows})")
        if lag and read == "before":
            em.line(f"o_c = memory_forward(params, q_c, layer=layer)  # read at {what}, [B, H, L, V]")
            em.line("outputs.append(torch.cat([o_lag, o_c[:, :, 1:]], dim=2))  # the first token's: before its step")
        else:
            em.line(f"outputs.append(memory_forward(params, q_c, layer=layer))  # read at {what}, [B, H, L, V]")
    em.line("# row L - 1 of the coefficients: the state carried on, W_{L-1}" + (" and M_{L-1}" if momentum else ""))
    if momentum:
        em.line("params, buffers = (")
        em.line("    _carried((params, buffers), (b_c[..., L - 1], f_c[..., L - 1]), G_c[..., L - 1, :], inputs, deltas),")
        H_row = "(H[n][..., L - 1:L, :L] @ window)[..., 0, :]" if omega else "H[n][..., L - 1, :L]"
        em.line(f"    _carried((buffers,), (m[n][..., L - 1],), {H_row}, inputs, deltas))")
    else:
        em.line("params = _carried((params,), (b_c[..., L - 1],), G_c[..., L - 1, :], inputs, deltas)")
