"""Render a delta-family level (MATH.md §3.2-3.3, §3.6) as a chunk-parallel PyTorch module.

The family: a matrix memory S [K, V] (row convention, o_t = S_t^T q_t) trained by gd on the l2 bias
under a scalar decay a_t, with the error taken at the decayed state (`gradient retained`: the gated
delta rule) or at the old one (`gradient current`: Miras' order), and a step size b_t = c_t lr_t
that may carry scalar, key-channel (bk) and value-channel (bv) factors. With c = a (retained) or 1:

    S_t = a_t S_(t-1) - (bk_t * k_t) (bv_t * (c_t S_(t-1)^T k_t - v_t))^T

`retention implicit` is the same rule with c = a = 1 and the proximal rate b_t = eps(lr_t, ||k_t||^2)
(Longhorn: a rate per value channel). Inside a chunk it runs in WY/UT form (a unit lower-triangular
inverse and matmuls); chunks run in sequence carrying S.

Derivation (a chunk; i, j = 1..C; S_0 the state entering it; u_i = bk_i * k_i; seg(i, j) the product
of a_r over j < r <= i; gam_i = seg(i, 0)). The rule is S_i = a_i S_(i-1) + u_i d_i^T with the
pseudo-values d_i = bv_i * (v_i - c_i S_(i-1)^T k_i), so S_i = gam_i S_0 + sum_(j<=i) seg(i, j) u_j d_j^T.
Substituting S_(i-1) gives, per value channel, the lower-triangular system
(I + diag(bv) G) d = bv * (V - e * (K S_0)) with G_ij = c_i seg(i-1, j) (k_i . u_j) for j < i and
e_i = c_i gam_(i-1): for retained c_i seg(i-1, j) = seg(i, j), for current it is seg(i-1, j). With no
value-channel factor the system is one per chunk: d = U - W S_0, U = A^-1 V, W = A^-1 (e * K),
A = I + G, none of which depends on S_0 (all chunks at once). With one it is one system per value
channel: the inverses (I + diag(bv) G)^-1 go all chunks at once (channels last), their products with the right-hand
sides chunk by chunk, over chunks of STEP ~ sqrt(K) tokens (a system costs about C^2 per channel and
token, the recurrence K). Reads: o_i = gam_i S_0^T q_i + sum_(j<=i) seg(i, j)
(q_i . u_j) d_j (read after) or gam_(i-1) S_0^T q_i + sum_(j<i) seg(i-1, j) (q_i . u_j) d_j (before).
Every decay factor is a plain product (no ratios, no logs): a decay of exactly 0, or a negative one,
is exact, and the current order needs no division by a_t (MATH.md §3.6 divides by it).
"""
from __future__ import annotations

import math

from nlc import ir
from nlc.derive.printer import to_torch
from nlc.derive.rules import LevelRules
from nlc.plan import KernelPlan

from .emitter import Emitter, where
from .torch_chunk_decay import (decay_axis, decay_chunks, epilogue, gate_names, gate_views,
                                op_signature, paren, preamble, prologue, show, step_factors)


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_chunk.py` for a delta-family plan."""
    lv = rules.level
    if plan.family != "delta":
        raise ValueError(f"plan family {plan.family!r} is not 'delta'")
    if decay_axis(rules, plan) != "scalar":
        raise NotImplementedError("the delta family needs a scalar decay")
    key_step, value_step = step_factors(rules, plan, value_target=False)
    per_channel, decayed = value_step != 1, plan.decay != 1
    step = "STEP" if per_channel else "CHUNK"
    em = Emitter()
    helpers = ["_cumulative", "_remaining", "_segments"] if decayed else []
    constants = [f"STEP = {_step(plan.chunk, lv.d_key)}  # tokens per solve (per value channel)"] \
        if per_channel else []
    preamble(em, rules, plan, model, file, "delta family, MATH.md §3.2-3.3",
             _math(lv, plan, key_step, value_step), helpers, constants)
    em.block(_INVERSE_CHANNELS if per_channel else _INVERSE)
    em.gap()
    with op_signature(em, rules):
        prologue(em, rules)
        exprs = [plan.decay, key_step, value_step]
        gate_views(em, rules, exprs)
        names = gate_names(rules, exprs)
        span = where(lv.algorithm.span) or "#"
        if key_step == 1:
            em.line(f"q_c, k_c, v_c = (_chunks(x, {step}) for x in (q, k, v))  # [B, H, N, C, D]")
            em.line("u_c = k_c  # write keys: bk_t = 1")
        else:
            em.line(f"u = k * {paren(to_torch(key_step, names))}  {span} [B, T, H, K]: write keys "
                    f"bk_t k_t, bk_t = {show(key_step)}")
            em.line(f"q_c, k_c, u_c, v_c = (_chunks(x, {step}) for x in (q, k, u, v))  # [B, H, N, C, D]")
        if per_channel:
            em.line(f"b_c = _chunks({paren(to_torch(value_step, names))}.expand(B, T, H, v.shape[-1]), "
                    f"{step})  {span} [B, H, N, C, V]: bv_t = {show(value_step)}")
        if decayed:
            decay_chunks(em, rules, plan, vector=False, step=step)
        e = _render_terms(em, lv, decayed)
        if per_channel:
            em.line("inverse = _channel_inverses(G[..., None] * b_c[..., :, None, :])  # [B, H, N, C, C, V]:")
            em.line("# (I + diag(bv) G)^-1 per value channel (channels last), all chunks at once")
        else:
            em.line("inverse = _unit_lower_inverse(G)  # [B, H, N, C, C]: (I + G)^-1, all chunks at once")
            e_k = f"{e} * k_c" if e else "k_c"
            em.line(f"U, W = inverse @ v_c, inverse @ {paren(e_k)}  # [B, H, N, C, V], [B, H, N, C, K]")
        _render_loop(em, per_channel, decayed, e)
        em.line("o = q_in @ torch.stack(starts, 2) + P @ torch.stack(pseudo, 2)  # [B, H, N, C, V]")
        epilogue(em)
    return em.text()


def _math(lv: ir.Level, plan: KernelPlan, key_step, value_step) -> list[str]:
    """The generated docstring's account of the rule and its chunk form."""
    per_channel, retained, after = value_step != 1, lv.grad_at == "retained", lv.read == "after"
    lines = [
        "  recurrence  S_t = a_t S_(t-1) - (bk_t k_t) (bv_t * (c_t S_(t-1)^T k_t - v_t))^T,  c_t = "
        + ("a_t (error at the decayed state)" if retained else "1 (error at the old state)"),
        f"  decay       a_t = {show(plan.decay)}",
        f"  step size   bk_t = {show(key_step)} (scalar or per key channel),  bv_t = {show(value_step)}"
        + (" (per value channel)" if per_channel else ""),
        f"  read        o_t = {'S_t' if after else 'S_(t-1)'}^T q_t ({lv.read} write)",
        f"WY/UT form per chunk of C = {'STEP' if per_channel else 'CHUNK'} tokens (i, j = 1..C), S_0 the "
        "state entering it, U = bk * K,",
        "seg(i, j) = prod_(j<r<=i) a_r, gam_i = seg(i, 0):",
        f"  G  = (K U^T)_ij * {'seg(i, j)' if retained else 'seg(i-1, j)'} for j < i, else 0;  "
        f"e_i = {'gam_i' if retained else 'gam_(i-1)'}",
        "  D  = (I + diag(bv) G)^-1 (bv * (V - e * K S_0))   pseudo-values"
        + (", one system per value channel" if per_channel else ": D = U - W S_0 with U = (I + G)^-1 V,"),
    ]
    if not per_channel:
        lines.append("       W = (I + G)^-1 (e * K), solved for all chunks at once")
    lines += [
        f"  O  = (Q * {'gam_i' if after else 'gam_(i-1)'}) S_0 + P D,  P_ij = (Q U^T)_ij * "
        + ("seg(i, j) for j <= i" if after else "seg(i-1, j) for j < i"),
        "  S_C = gam_C S_0 + (U * seg(C, j))^T D",
        "A short last chunk is padded (a = 1, k = v = 0, b = 0), which changes nothing.",
    ]
    if per_channel:
        lines.append("A system per value channel costs about C^2 per channel and token where the "
                     "recurrence costs K: STEP ~ sqrt(K).")
    return lines


def _render_terms(em: Emitter, lv: ir.Level, decayed: bool) -> str | None:
    """G (the system), P (the reads), q_in, u_out and a_chunk of every chunk; returns the name of
    e (the decay the errors see S_0 with), or None with no decay."""
    e_shift = 0 if lv.grad_at == "retained" else 1  # the error reads S_i after the decay, or S_(i-1)
    q_shift = 0 if lv.read == "after" else 1
    if not decayed:
        em.line("G = (k_c @ u_c.transpose(-1, -2)).tril(-1)  # [B, H, N, C, C], strictly lower; no decay")
        em.line(f"P = (q_c @ u_c.transpose(-1, -2)).tril({-q_shift or ''})  # [B, H, N, C, C]")
        em.line("q_in, u_out = q_c, u_c")
        return None
    seg, gam = {0: "seg", 1: "seg_before"}, {0: "gam", 1: "gam_before"}
    for s in sorted({e_shift, q_shift}):
        upto = "i" if s == 0 else "i-1"
        em.line(f"{seg[s]} = _segments(a_c, {s})[..., 0]  # [B, H, N, C, C]: prod_(j<r<={upto}) a_r "
                f"(for j <= {upto})")
        em.line(f"{gam[s]} = _cumulative(a_c, {s})  # [B, H, N, C, 1]: prod_(r<={upto}) a_r")
    em.line(f"G = ((k_c @ u_c.transpose(-1, -2)) * {seg[e_shift]}).tril(-1)  # strictly lower")
    em.line(f"P = ((q_c @ u_c.transpose(-1, -2)) * {seg[q_shift]}).tril({-q_shift or ''})  # [B, H, N, C, C]")
    em.line(f"q_in = q_c * {gam[q_shift]}  # queries, decayed from the chunk start")
    em.line("u_out = u_c * _remaining(a_c)  # write keys, decayed to the chunk end")
    em.line("a_chunk = a_c.prod(-2)  # [B, H, N, 1]: each chunk's whole decay")
    return gam[e_shift]


def _render_loop(em: Emitter, per_channel: bool, decayed: bool, e: str | None) -> None:
    """Chunks in sequence: pseudo-values D from the state entering the chunk, then the next state."""
    em.line("starts, pseudo = [], []  # per chunk: the state entering it, its pseudo-values D")
    if per_channel:
        operands = {"k_n": "k_c", "v_n": "v_c", "b_n": "b_c", "inverse_n": "inverse"}
        if e:
            operands["e_n"] = e
    else:
        operands = {"U_n": "U", "W_n": "W"}
    operands["u_n"] = "u_out"
    if decayed:
        operands["a_n"] = "a_chunk[..., None]"
    em.line("# per-chunk operands unbound up front: indexing them inside the loop would cost a full-size")
    em.line("# gradient buffer per chunk in the backward pass")
    em.line(f"for {', '.join(operands)} in zip(")
    em.line("        " + ", ".join(f"{x}.unbind(2)" for x in operands.values()) + "):")
    with em.indent():
        if per_channel:
            error = "e_n * (k_n @ S)" if e else "k_n @ S"
            em.line(f"rhs = b_n * (v_n - {error})  # [B, H, C, V]")
            em.line("D = (inverse_n * rhs[:, :, None]).sum(-2)  # [B, H, C, V]: one C x C system per channel")
        else:
            em.line("D = U_n - W_n @ S  # [B, H, C, V]")
        em.line("starts.append(S)")
        em.line("pseudo.append(D)")
        em.line(f"S = {'a_n * S' if decayed else 'S'} + u_n.transpose(-1, -2) @ D")


def _step(chunk: int, d_key: int) -> int:
    """Tokens per solve for per-channel step sizes: a power of two near sqrt(K), at most the chunk."""
    return min(int(chunk), 1 << (math.isqrt(d_key).bit_length() - 1))


_INVERSE_CHANNELS = '''
def _channel_inverses(L):
    """(I + L)^-1 for strictly lower triangular L [..., C, C, V], one system per channel (channels
    last, so that every op runs along V), row by row: row i of the inverse is e_i minus the sum of
    L[i, m] times row m over m < i. C is STEP, a few tokens: C - 1 rounds of elementwise ops, against
    log2(C) rounds of [C, C] matmuls that a channels-first layout would batch over every channel."""
    C = L.shape[-2]
    eye = torch.eye(C, dtype=L.dtype, device=L.device)[..., None]  # [C, C, 1]
    rows = [eye[0].expand(L[..., 0, :, :].shape)]  # [..., C, V] each
    for i in range(1, C):
        done = torch.stack(rows, -3)  # [..., i, C, V]: the rows above row i
        rows.append(eye[i] - (L[..., i, :i, None, :] * done).sum(-3))
    return torch.stack(rows, -3)
'''

_INVERSE = '''
def _unit_lower_inverse(L):
    """(I + L)^-1 for strictly lower triangular L [..., C, C], by doubling: the inverse of a diagonal
    block of size 2s is [[T1, 0], [-T2 L21 T1, T2]] from the inverses T1, T2 of its halves, so
    log2(C) rounds of batched matmuls (C padded to a power of two; no LAPACK solve, whose threads
    spin on a busy CPU). The lower-left blocks L21 of every round tile the strict lower triangle:
    they are gathered in one indexing op."""
    C = L.shape[-1]
    P = 1 << (C - 1).bit_length()
    L = torch.nn.functional.pad(L, (0, P - C, 0, P - C)).flatten(-2)  # [..., P * P]
    halves = [1 << e for e in range((P - 1).bit_length())]  # s = 1, 2, 4, ..., P / 2
    index = []
    for s in halves:
        start = torch.arange(0, P, 2 * s, device=L.device)[:, None, None]  # each block's first row
        i = torch.arange(s, device=L.device)
        index.append(((start + s + i[:, None]) * P + start + i).flatten())  # rows start+s+i, cols start+j
    blocks = L[..., torch.cat(index)].split([P * s // 2 for s in halves], dim=-1)
    T = torch.ones_like(L[..., :P, None, None])  # [..., P, 1, 1]: the inverses of the blocks of size 1
    for s, L21 in zip(halves, blocks):
        L21 = L21.unflatten(-1, (P // (2 * s), s, s))  # [..., nb, s, s]
        T1, T2 = T.unflatten(-3, (-1, 2)).unbind(-3)  # [..., nb, s, s]: inverses of the two halves
        top = torch.cat([T1, torch.zeros_like(T1)], dim=-1)
        T = torch.cat([top, torch.cat([-(T2 @ L21) @ T1, T2], dim=-1)], dim=-2)  # [..., nb, 2s, 2s]
    return T[..., 0, :C, :C]
'''
