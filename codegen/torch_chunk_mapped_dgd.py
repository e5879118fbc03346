"""The mapped family's closed form for delta gradient descent with plain gradient steps (MATH.md §3.6,
§3.3 without β = η/α): each weight W [I, O] of a layer with input a_t (at the chunk-start weights)
moves by
    W_t = (decay_t I - lr_t a_t a_tᵀ) W_{t-1} + a_t w_tᵀ,   w_t = -lr_t δ_t,
a gated delta rule with known keys a_t and values w_t. Writing W_t = decay_t W_{t-1} + a_t r_tᵀ with
the pseudo-values r_t = w_t - lr_t W_{t-1}ᵀ a_t and unrolling W_{t-1} over the chunk turns every r_t
into one unit lower-triangular solve, and every token's read h_t W_t into matmuls: no per-token weight
copy is ever formed. Decay products are plain cumulative products over each segment (no division by
decay_t, no logs), so a decay of 0 keeps exact values and gradients. A bias b moves by
b_t = decay_t b_{t-1} + w_t, a scalar scan."""
from __future__ import annotations

import sympy

from nlc.derive import symbols as S
from nlc.derive.rules import LevelRules

from .emitter import Emitter, where
from .torch_reference import self_target


def applies(rules: LevelRules) -> bool:
    """dgd with plain gradient steps on one token's gradient (no momentum, no accumulator, no omega
    window): s_t = -lr_t u_t is rank one per layer."""
    lv = rules.level
    return (lv.retention.kind == "dgd" and lv.algorithm.kind == "gd" and not rules.accumulator
            and lv.bias.kind != "omega")


def coefficients(rules: LevelRules) -> dict:
    """role -> sympy expression: the decay on the old weights and the learning rate (which also
    scales dgd's a aᵀ term). The retention must be decay·w0 + s (MATH.md, `retention dgd`)."""
    new = sympy.sympify(rules.retention_new())
    decay = sympy.diff(new, S.w0)
    if sympy.expand(new - decay * S.w0 - S.s) != 0 or decay.has(S.w0, S.s):
        raise ValueError(f"level {rules.level.name!r}: dgd retention {new} is not decay·w0 + s")
    return {"decay": decay, "lr": rules.lr}


def render_helpers(em: Emitter) -> None:
    render_products(em)
    em.gap()
    _render_solve_and_reads(em)


def render_products(em: Emitter) -> None:
    """`_products(a)` and `_before(run, seg)`: a chunk's decay products, and the same a token earlier."""
    em.block('''
def _products(a):
    """Products of the decay a [B, H, L] within a chunk: run[t] = prod_{r<=t} a_r [B, H, L] and
    seg[t, i] = prod_{i<r<=t} a_r for i <= t, 0 above the diagonal [B, H, L, L]. Each segment is its
    own cumulative product (no ratios, no logs): a decay of 0 keeps exact values and gradients."""
    L = a.shape[-1]
    later = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)  # [t, i]: t > i
    seg = torch.where(later, a[..., :, None], torch.ones_like(a)[..., None, :]).cumprod(-2).tril()
    return a.cumprod(-1), seg


def _before(run, seg):
    """The products up to the token before each token: run [B, H, L] -> run[t - 1] (1 at t = 0);
    seg [B, H, L, L] -> seg[t - 1, i] for i < t, 0 on and above the diagonal."""
    return (torch.cat([torch.ones_like(run[..., :1]), run[..., :-1]], dim=-1),
            torch.nn.functional.pad(seg[..., :-1, :], (0, 0, 1, 0)))
''')


def _render_solve_and_reads(em: Emitter) -> None:
    em.block('''
def _pieces(params, inputs, deltas, lr, run_prev, seg_prev):
    """Per layer of LAYERS, (a, r, w): its input a [B, H, L, I] and step value w_t = -lr_t δ_t [B, H, L, O]
    at W_0, and the pseudo-values r_t = w_t - lr_t W_{t-1}ᵀ a_t. With W_{t-1} = run_prev[t] W0 +
    sum_{i<t} seg_prev[t, i] a_i r_iᵀ, r solves (I + lr ⊙ (seg_prev ∘ a aᵀ)) r = w - lr run_prev (a W0),
    unit lower triangular [L, L], solved in at least fp32 (torch has no half-precision solve). lr,
    run_prev [B, H, L]; seg_prev [B, H, L, L]."""
    eye = torch.eye(lr.shape[-1], dtype=lr.dtype, device=lr.device)
    pieces = []
    for (w_index, _), a, d in zip(LAYERS, inputs, deltas):
        w = -lr[..., None] * d
        system = eye + lr[..., None] * seg_prev * (a @ a.transpose(-1, -2))
        rhs = w - (lr * run_prev)[..., None] * (a @ params[w_index])
        wide = torch.promote_types(rhs.dtype, torch.float32)
        r = torch.linalg.solve_triangular(system.to(wide), rhs.to(wide), upper=False, unitriangular=True)
        pieces.append((a, r.to(rhs.dtype), w))
    return pieces


def _reads(pieces, run, seg):
    """A `layer` for memory_forward reading every token at its own weights: layer i's product
    h_t W_t + b_t, W_t = run[t] W0 + sum_i seg[t, i] a_i r_iᵀ, b_t = run[t] b0 + sum_i seg[t, i] w_i,
    pieces[i] = (a, r, w) of that layer; h [B, H, L, I] -> [B, H, L, O]."""
    def layer(i, h, W0, b0):
        a, r, w = pieces[i]
        out = run[..., None] * (h @ W0) + (seg * (h @ a.transpose(-1, -2))) @ r
        return out if b0 is None else out + run[..., None] * b0[:, :, None, :] + seg @ w
    return layer


def _advance(params, pieces, run, seg):
    """The weights after the chunk: W_L = run[L-1] W0 + sum_i seg[L-1, i] a_i r_iᵀ per layer, and
    b_L = run[L-1] b0 + sum_i seg[L-1, i] w_i for its bias."""
    params = list(params)
    last, end = run[..., -1, None, None], seg[..., -1, :, None]  # [B, H, 1, 1], [B, H, L, 1]
    for (w_index, b_index), (a, r, w) in zip(LAYERS, pieces):
        params[w_index] = last * params[w_index] + (end * a).transpose(-1, -2) @ r
        if b_index is not None:
            params[b_index] = last[..., 0] * params[b_index] + (end * w).sum(-2)
    return tuple(params)
''')


def render_chunk(em: Emitter, rules: LevelRules, bias_args: str) -> None:
    """The body of the per-chunk loop: gradients at W_0, the solve per layer, the reads, the new W_0.
    bias_args: the bias gates' arguments to `_layer_grads`, sliced to the chunk."""
    lv = rules.level
    em.line(f"inputs, deltas = _layer_grads(weights, kh[:, :, start:end], "
            f"{self_target(lv, 'vh[:, :, start:end]', 'weights')}{bias_args})  "
            f"{where(lv.bias.span) or '#'} a_t, δ_t at W_0")
    em.line(f"run, seg = _products(decay[:, :, start:end])  {where(lv.retention.span) or '#'} decay_t within the chunk")
    em.line("run_prev, seg_prev = _before(run, seg)")
    em.line(f"pieces = _pieces(weights, inputs, deltas, lr[:, :, start:end], run_prev, seg_prev)  "
            f"{where(lv.retention.span) or '#'}")
    at = "run, seg" if lv.read == "after" else "run_prev, seg_prev"
    em.line(f"outputs.append(memory_forward(weights, qh[:, :, start:end], layer=_reads(pieces, {at})))  "
            f"# read {lv.read} the write")
    em.line("params = weights = _advance(weights, pieces, run, seg)  # W_0 of the next chunk")
