"""Render a delta-family level (MATH.md §3.2-3.3) as a chunk-parallel PyTorch module.

The family: a matrix memory S [K, V] (row convention, o_t = S_t^T q_t) trained by gd on the l2 bias,
with the gradient taken after a scalar decay (or with no decay), which is the gated delta rule

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,   b_t = c_t lr_t (scalar)

Inside a chunk it runs in WY/UT form (a unit lower-triangular solve and matmuls); chunks run in
sequence carrying S.

Derivation (a chunk; i, j = 1..C; S_0 the state entering it; g = cumsum(log a), gam = e^g):
S_i = gam_i S_0 + sum_{j<=i} (gam_i / gam_j) k_j v'_j^T holds with the pseudo-values
v'_i = b_i (v_i - (a_i S_{i-1})^T k_i). Substituting S_{i-1} gives the lower-triangular system
v'_i + sum_{j<i} b_i (k_i.k_j) exp(g_i - g_j) v'_j = b_i v_i - b_i gam_i S_0^T k_i, i.e.
A V' = diag(b) V - diag(b gam) K S_0 with A = I + tril(diag(b)(K K^T * Gamma), -1). So
V' = U - W S_0 with U = A^-1 diag(b) V and W = A^-1 diag(b gam) K, which do not depend on S_0.
Reads: o_i = S_i^T q_i = gam_i S_0^T q_i + sum_{j<=i} exp(g_i - g_j)(q_i.k_j) v'_j (read after);
o_i = S_{i-1}^T q_i = gam_{i-1} S_0^T q_i + sum_{j<i} exp(g_{i-1} - g_j)(q_i.k_j) v'_j (read
before), the same form with g_{i-1} = g_i - log a_i on the query side and the diagonal masked.
"""
from __future__ import annotations

from nlc import ir
from nlc.derive.printer import to_torch
from nlc.derive.rules import LevelRules
from nlc.plan import KernelPlan

from .emitter import Emitter, where
from .torch_chunk_decay import (decay_axis, epilogue, gate_names, gate_views, log_decay,
                                op_signature, paren, preamble, prologue, show, step_factors)


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_chunk.py` for a delta-family plan."""
    lv = rules.level
    if plan.family != "delta":
        raise ValueError(f"plan family {plan.family!r} is not 'delta'")
    if decay_axis(rules, plan) != "scalar":
        raise NotImplementedError("the delta family needs a scalar decay")
    b_key, b_value = step_factors(rules, plan, value_target=False)
    if b_value != 1 or any(rules.level.gate_axes[g] != "scalar" for g in ir.gate_names(b_key)):
        raise NotImplementedError("the delta family needs a scalar step size b_t")
    beta = b_key
    after = lv.read == "after"
    em = Emitter()
    math_lines = [
        "  recurrence  S_t = a_t (I - b_t k_t k_t^T) S_(t-1) + b_t k_t v_t^T",
        f"  decay       a_t = {show(plan.decay)}",
        f"  step size   b_t = {show(beta)}",
        f"  read        o_t = {'S_t' if after else 'S_(t-1)'}^T q_t ({lv.read} write)",
        "WY/UT form per chunk of C = CHUNK tokens (i, j = 1..C), S_0 the state entering it, g = cumsum(log a)",
        "from the chunk start, gam = e^g, Gamma_ij = exp(g_i - g_j), g~_i = "
        + ("g_i:" if after else "g_(i-1) = g_i - log a_i:"),
        "  A  = I + tril(diag(b) (K K^T * Gamma), -1)      unit lower triangular, solved, never inverted",
        "  U  = A^-1 diag(b) V ;  W = A^-1 diag(b gam) K    (all chunks at once)",
        "  V' = U - W S_0                                   pseudo-values (chunks in sequence)",
        "  O  = diag(e^g~) Q S_0 + (Q K^T * exp(g~_i - g_j) * M) V',  M: j "
        + ("<= i" if after else "< i"),
        "  S_C = gam_C S_0 + (diag(gam_C / gam) K)^T V'",
        "A short last chunk is zero-padded (a = 1, b = 0, k = v = 0), which changes nothing.",
        "Decays must be > 0 (log space); a_t = 1 (no decay) is exact.",
    ]
    preamble(em, rules, plan, model, file, "delta family, MATH.md §3.2-3.3", math_lines)
    with op_signature(em, rules):
        prologue(em, rules)
        gate_views(em, rules, [plan.decay, beta])
        log_decay(em, rules, plan, vector=False)
        if beta == 1:
            em.line("beta = q.new_ones(B, T, H, 1)  # b_t = 1")
        elif not beta.free_symbols:
            em.line(f"beta = q.new_full((B, T, H, 1), {float(beta)!r})  # b_t = {show(beta)}")
        else:
            em.line(f"beta = {paren(to_torch(beta, gate_names(rules)))}.expand(B, T, H, 1)  "
                    f"{where(lv.algorithm.span) or '#'} [B, T, H, 1]: b_t = {show(beta)}")
        em.line("C = CHUNK")
        em.line("q_c, k_c, v_c, b_c, la_c = (_chunks(x, C) for x in (q, k, v, beta, log_a))  "
                "# [B, H, N, C, D]")
        em.line("N = q_c.shape[2]")
        em.line("g = la_c[..., 0].cumsum(-1)  # [B, H, N, C]: log decay from the chunk start, inclusive")
        em.line("g_q = g  # the query side reads S_i" if after else
                "g_q = g - la_c[..., 0]  # the query side reads S_(i-1): exclusive cumsum")
        em.line("lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= i")
        em.line("gamma = (g[..., :, None] - g[..., None, :]).masked_fill(~lower, float('-inf')).exp()"
                "  # [B, H, N, C, C]")
        em.line("eye = torch.eye(C, dtype=q.dtype, device=q.device)")
        em.line("A = eye + ((b_c * k_c) @ k_c.transpose(-1, -2) * gamma).tril(-1)  # I + L")
        em.line("U = torch.linalg.solve_triangular(A, b_c * v_c, upper=False, unitriangular=True)")
        em.line("W = torch.linalg.solve_triangular(A, (b_c * g[..., None].exp()) * k_c, upper=False, "
                "unitriangular=True)")
        if after:
            em.line("attn = (q_c @ k_c.transpose(-1, -2)) * gamma  # [B, H, N, C, C], j <= i")
        else:
            em.line("strict = lower.tril(-1)  # j < i")
            em.line("gamma_q = (g_q[..., :, None] - g[..., None, :]).masked_fill(~strict, float('-inf')).exp()"
                    "  # exp(g_(i-1) - g_j)")
            em.line("attn = (q_c @ k_c.transpose(-1, -2)) * gamma_q  # [B, H, N, C, C], j < i")
        em.line("q_decay = q_c * g_q[..., None].exp()  # queries, decayed from the chunk start")
        em.line("k_decay = k_c * (g[..., -1:] - g)[..., None].exp()  # keys, decayed to the chunk end")
        em.line("a_chunk = g[..., -1].exp()  # [B, H, N]: the whole chunk's decay")
        em.line("outputs = []")
        with em.indent("for n in range(N):"):
            em.line("v_new = U[:, :, n] - W[:, :, n] @ S  # [B, H, C, V]: pseudo-values V'")
            em.line("outputs.append(q_decay[:, :, n] @ S + attn[:, :, n] @ v_new)")
            em.line("S = a_chunk[:, :, n, None, None] * S + k_decay[:, :, n].transpose(-1, -2) @ v_new")
        epilogue(em)
    return em.text()

