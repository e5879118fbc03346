"""Pieces shared by chunk-parallel renderers whose gradients are frozen at the chunk start (MATH.md
§3.4, §3.6): the op's signature and input preamble; generated helpers for closed-form coefficients of
scalar linear scans within every chunk, in log space, and every token's gradient at the chunk-start
weights factored per layer (input a_j, output delta δ_j)."""
from __future__ import annotations

import sympy

from nlc import ir
from nlc.derive.printer import to_torch
from nlc.derive.rules import LevelRules

from .emitter import Emitter, comment, ident, where


def show(expr) -> str:
    """A sympy expression for a comment, gates by their spec names."""
    return comment(str(sympy.sympify(expr))).replace("gate_", "")


def op_signature(lv: ir.Level) -> str:
    """`def level_<name>(q, k, v, *, <gates>, initial_state=None, output_final_state=False):`"""
    kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
    return f"def {ident(lv.name, 'level')}(q, k, v, *, {kw}initial_state=None, output_final_state=False):"


def render_op_inputs(em: Emitter, rules: LevelRules, coeffs: dict, extra_gates=()) -> None:
    """The op's docstring, its state split into params and buffers, q, k, v as [B, H, T, D], the gates
    that `coeffs` (role -> sympy expression) or `extra_gates` read as [B, H, T], the bias gates shaped
    for outputs, and `ones` where a coefficient is a constant."""
    lv = rules.level
    em.line(f'"""Level {comment(lv.name)!r}, chunk-parallel (CHUNK tokens at a time). q, k: [B, T, H, K]; '
            "v: [B, T, H, V];")
    em.line(f"gates {', '.join(lv.gates) or '(none)'}: [B, T, H] (bias gates may be [B, T, H, K|V]).")
    em.line('Returns (o [B, T, H, V], final state or None), exactly as the reference op."""')
    em.line("B, T = k.shape[:2]")
    em.line("state = initial_state if initial_state is not None else default_state(B, k.dtype, k.device)")
    em.line("state = (state,) if torch.is_tensor(state) else tuple(state)")
    em.line("params, buffers = state[:N_PARAMS], state[N_PARAMS:]")
    em.line("qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]")
    used = set(extra_gates) | set().union(*(ir.gate_names(e) for e in coeffs.values()))
    for g in lv.gates:
        if g in used:
            em.line(f"{ident(g, 'gh')} = {ident(g, 'g')}.transpose(1, 2)  # gate {comment(g)} [B, H, T]")
    for g in ir.gate_names(rules.bias.grad):
        view = "[..., None]  # [B, H, T, 1]" if lv.gate_axes[g] == "scalar" else "  # [B, H, T, K|V]"
        em.line(f"{ident(g, 'go')} = {ident(g, 'g')}.transpose(1, 2){view}, shaped for outputs")
    if any(not sympy.sympify(e).free_symbols for e in coeffs.values()):
        em.line("ones = torch.ones(kh.shape[:3], dtype=k.dtype, device=k.device)  # [B, H, T]")


def render_scan_coefficients(em: Emitter, lv: ir.Level, coeffs: dict, heads: dict) -> None:
    """The per-token factors of a linear scan (roles decay, scale, lr, beta -> sympy expressions,
    gate symbols printed through `heads`) as [B, H, T] tensors; a constant one times `ones`."""
    em.line("# per-token coefficients of the whole sequence, [B, H, T]")
    spans = {"decay": lv.retention.span, "scale": lv.retention.span, "lr": lv.algorithm.span,
             "beta": lv.algorithm.span}
    what = {"decay": "a_t, on the old state", "scale": "c_t, on the step",
            "lr": "lr_t", "beta": "beta_t, on the momentum"}
    for role, expr in coeffs.items():
        expr = sympy.sympify(expr)
        text = to_torch(expr, heads)
        if not expr.free_symbols:
            text = "ones" if expr == 1 else f"{text} * ones"
        em.line(f"{role} = {text}  {where(spans[role]) or '#'} {what[role]}")


def render_scan_helpers(em: Emitter) -> None:
    """`_decay_products(a)` (with `_Segments`, its [L, L] part and hand-derived backward) and
    `_by_chunk(x)`: products of per-token factors within each chunk."""
    em.block('''
class _Segments(torch.autograd.Function):
    """seg[..., t, i] = exp(sum_{i<r<=t} log_a[..., r]) for i <= t, 0 above the diagonal; from
    log_a [..., L]. Its backward is the exact derivative in three passes over [..., L, L] (autograd
    through the masked cumsum would take about ten and keep every intermediate):
    d log_a[r] = sum_{t>=r} sum_{i<r} (dseg ∘ seg)[t, i]; a sign folded into seg afterwards is
    constant, so dseg ∘ seg may use the signed seg as well."""

    @staticmethod
    def forward(ctx, log_a):
        L = log_a.shape[-1]
        lower = torch.ones(L, L, dtype=torch.bool, device=log_a.device).tril()
        steps = torch.where(lower.tril(-1), log_a[..., :, None], 0.0)  # [t, i] = log a_t where t > i
        seg = steps.cumsum_(-2).exp_().masked_fill_(~lower, 0.0)
        ctx.save_for_backward(seg)
        return seg

    @staticmethod
    def backward(ctx, dseg):
        (seg,) = ctx.saved_tensors
        x = dseg * seg
        # [t, r] = sum_{i<r} x[t, i], as a sum of its own terms (all carry the factor a_r, which may
        # be tiny: an inclusive sum minus x[t, r] would bury them under round-off)
        before = torch.nn.functional.pad(x[..., :-1], (1, 0)).cumsum_(-1)
        upper = torch.ones(seg.shape[-2:], dtype=torch.bool, device=seg.device).triu(1)
        return before.masked_fill_(upper, 0.0).sum(-2)  # sum over t >= r


def _decay_products(a):
    """Products of a per-token factor a [..., L] within each chunk (MATH.md §3.4, in log space):
    run [..., L]: run[t] = prod_{r<=t} a_r;  seg [..., L, L]: seg[t, i] = prod_{i<r<=t} a_r for i <= t,
    0 above the diagonal. Each entry of seg sums the logs of its own segment only (no ratio of running
    products, so nothing cancels); log 0 is clamped to log(tiny) and signs are carried apart, so a
    factor may be 1, tiny or negative and everything stays finite."""
    log_a = torch.log(a.abs().clamp_min(torch.finfo(a.dtype).tiny))
    sign = (1 - 2 * (a < 0).to(a.dtype)).cumprod(-1)  # prod_{r<=t} sign(a_r), exactly ±1
    run = torch.exp(log_a.cumsum(-1)) * sign
    seg = _Segments.apply(log_a) * (sign[..., :, None] * sign[..., None, :])  # no data-dependent branch
    return run, seg


def _by_chunk(x):
    """[B, H, T] -> [B, H, NC, CHUNK], NC = ceil(T / CHUNK). A short last chunk is padded with ones:
    the coefficients are causal, so rows and columns past its end never reach its L tokens."""
    return torch.nn.functional.pad(x, (0, (-x.shape[-1]) % CHUNK), value=1.0).unflatten(-1, (-1, CHUNK))
''')



def render_product(em: Emitter) -> None:
    """`_product(x, W, bias)`: one layer's product at fixed weights."""
    em.block('''
def _product(x, W, bias):
    """One layer's product at fixed weights: x [B, H, L, I] @ W [B, H, I, O] (+ bias [B, H, O])."""
    return x @ W if bias is None else x @ W + bias[:, :, None, :]
''')


def render_layer_grads(em: Emitter) -> None:
    """`_layer_grads(params, x, v, *bias_gates)`: every token's gradient at fixed weights, factored
    per layer (the module defines LAYERS and `_product`, and imports memory_forward and output_grad)."""
    em.block('''
def _layer_grads(params, x, v, *bias_gates):
    """The pieces of every token's gradient at the chunk-start weights, per layer i of LAYERS:
    inputs[i] a [B, H, L, I] (the layer's input) and deltas[i] δ [B, H, L, O] = ∂<dy_j, M(x_j)>/∂(the
    layer's output at token j), dy = output_grad(M(params; x), v); the weight's gradient is a_j ⊗ δ_j,
    the bias's δ_j. One forward and one vjp, at every layer's (tapped) output."""
    def tapped(tap):
        inputs, order = [None] * len(LAYERS), []

        def layer(i, h, W, b):
            inputs[i] = h
            order.append(i)  # a gated MLP computes its gate's product before its value's
            return tap(_product(h, W, b))
        return memory_forward(params, x, layer=layer), (inputs, order)
    y, pullback, (inputs, order) = tapped_vjp(tapped, has_aux=True)
    deltas = [None] * len(LAYERS)
    for i, d in zip(order, pullback(output_grad(y, v, *bias_gates))):
        deltas[i] = d
    return inputs, deltas
''')
