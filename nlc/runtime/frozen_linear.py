"""The frozen-gradient chunked scan of a linear memory M(W; x) = x W (MATH.md §3.4) with a
hand-derived backward, for generated `level_<name>_chunk.py` modules of the frozen family.

Per chunk (positions t = 0..L-1; W, M the weights and momentum entering it; every gradient taken
at W, so the scan coefficients b, f, G, m, H come from the gates alone, see the generated module):
    Y = K W,   D = output_grad(Y, V, *bias gates)         (dℓ/dy at W, [L, V])
    S = Q K^T, P = S ∘ G_r                                 ([L, L])
    O = diag(b_r) Q W + diag(f_r) Q M - P D               (reads, [L, V])
    W' = b_L W + f_L M - K^T diag(g_L) D,  M' = m_L M - K^T diag(h_L) D
where _r marks the read's coefficients (those of W_t, or of W_{t-1} for read before) and _L row
L-1 of the write's (g_L = G[L-1, :], h_L = H[L-1, :]). Plain gradient descent has no M, f, m, H.

The backward walks the chunks in reverse, the state's gradients (dW', dM') carried back:
    dP = -dO D^T,  dS = dP ∘ G_r,  dG_r = dP ∘ S
    dD = -P^T dO - diag(g_L) K dW' - diag(h_L) K dM'
    dY, dV, d(bias gates) = the vjp of output_grad at (Y, V) with dD (autograd on that one
        elementwise function, so every bias the frozen family accepts is covered)
    dQ = diag(b_r) dO W^T + diag(f_r) dO M^T + dS K
    dK = dS^T Q + dY W^T - diag(g_L) D dW'^T - diag(h_L) D dM'^T
    dW = b_L dW' + Q^T diag(b_r) dO + K^T dY,   dM = f_L dW' + m_L dM' + Q^T diag(f_r) dO
    db_r = rowsum(Q ∘ dO W^T), df_r = rowsum(Q ∘ dO M^T), dg_L = -rowsum(K dW' ∘ D), ...
It saves the inputs and each chunk's starting state (NC states, no per-token tensors: autograd
through the same loop keeps ~20 of them per chunk) and recomputes Y, D, S chunk by chunk, whose
tensors stay small enough for the cache.
"""
from __future__ import annotations

import torch

from .amp import autocast_backward, autocast_forward


def _t(x):
    return x.transpose(-1, -2)


def _last(x, n, L):
    """Row L - 1 of chunk n of a coefficient [B, H, NC, C(, C)], shaped to scale [B, H, rows, cols]:
    a per-chunk scalar [B, H, 1, 1], or a row [B, H, L, 1] (its first L entries)."""
    row = x[:, :, n, L - 1]
    return row[..., None, None] if row.dim() == 2 else row[..., :L, None]


def frozen_linear(chunk, output_grad, q, k, v, W, M, b, f, G, m, H, b_r, f_r, G_r, *bias_gates):
    """FrozenLinear.apply (arguments there); the chunk-start states are kept for the backward only
    where autograd records (grad mode on), so inference holds one state at a time."""
    return FrozenLinear.apply(torch.is_grad_enabled(), chunk, output_grad, q, k, v, W, M, b, f, G, m, H,
                              b_r, f_r, G_r, *bias_gates)


class FrozenLinear(torch.autograd.Function):
    """apply(record, chunk, output_grad, q, k, v, W, M, b, f, G, m, H, b_r, f_r, G_r, *bias_gates)
    -> (o [B, H, T, V], W_T, M_T). q, k [B, H, T, K]; v [B, H, T, V]; W, M [B, H, K, V]; b, f, m,
    b_r, f_r [B, H, NC, C]; G, H, G_r [B, H, NC, C, C] (C = chunk; a short last chunk of L tokens
    uses its first L rows and row L - 1 for its state); bias gates [B, H, T, 1 or V], passed to
    output_grad. Plain gradient descent: M, f, m, H, f_r None, and M_T None."""

    @staticmethod
    @autocast_forward
    def forward(ctx, record, chunk, output_grad, q, k, v, W, M, b, f, G, m, H, b_r, f_r, G_r, *gates):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # one copy, none per chunk matmul
        T = k.shape[2]
        outputs, starts = [], []
        for n, s in enumerate(range(0, T, chunk)):
            L = min(chunk, T - s)
            q_n, k_n = q[:, :, s:s + L], k[:, :, s:s + L]
            if record:
                starts.append((W, M))
            D = output_grad(k_n @ W, v[:, :, s:s + L], *(g[:, :, s:s + L] for g in gates))
            P = (q_n @ _t(k_n)) * G_r[:, :, n, :L, :L]
            o = b_r[:, :, n, :L, None] * (q_n @ W) - P @ D
            step = _t(k_n) @ (_last(G, n, L) * D)
            if M is None:
                W = _last(b, n, L) * W - step
            else:
                o = torch.addcmul(o, f_r[:, :, n, :L, None], q_n @ M)
                W, M = (torch.addcmul(_last(b, n, L) * W, _last(f, n, L), M) - step,
                        _last(m, n, L) * M - _t(k_n) @ (_last(H, n, L) * D))
            outputs.append(o)
        if record:
            ctx.chunk, ctx.output_grad = chunk, output_grad
            Ms = None if M is None else torch.stack([x for _, x in starts])
            ctx.save_for_backward(q, k, v, b, f, G, m, H, b_r, f_r, G_r, torch.stack([w for w, _ in starts]),
                                  Ms, *gates)
        return torch.cat(outputs, dim=2), W, M

    @staticmethod
    @autocast_backward
    def backward(ctx, do, dW, dM):
        if torch.is_grad_enabled():  # create_graph=True: a silently wrong second derivative otherwise
            raise RuntimeError("the frozen family's linear-memory backward (FrozenLinear) is not "
                               "differentiable twice; for second derivatives run the level with "
                               "mode='reference'")
        q, k, v, b, f, G, m, H, b_r, f_r, G_r, Ws, Ms, *gates = ctx.saved_tensors
        chunk, momentum = ctx.chunk, Ms is not None
        T = k.shape[2]
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dW = torch.zeros_like(Ws[0]) if dW is None else dW
        if momentum:
            dM = torch.zeros_like(Ms[0]) if dM is None else dM
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.zeros_like(v)
        dgates = [torch.zeros_like(g) for g in gates]
        db, dG, db_r, dG_r = (torch.zeros_like(x) for x in (b, G, b_r, G_r))
        if momentum:
            df, dm, dH, df_r = (torch.zeros_like(x) for x in (f, m, H, f_r))
        for n in reversed(range(len(Ws))):
            s = n * chunk
            L = min(chunk, T - s)
            W = Ws[n]
            q_n, k_n, do_n = q[:, :, s:s + L], k[:, :, s:s + L], do[:, :, s:s + L]
            with torch.enable_grad():
                leaves = [(k_n @ W).requires_grad_(), v[:, :, s:s + L].detach().requires_grad_(),
                          *(g[:, :, s:s + L].detach().requires_grad_() for g in gates)]
                D_graph = ctx.output_grad(*leaves)
            D = D_graph.detach()
            # the reads
            S = q_n @ _t(k_n)
            G_n = G_r[:, :, n, :L, :L]
            dP = -(do_n @ _t(D))
            dG_r[:, :, n, :L, :L] = dP * S
            dS = dP * G_n
            dD = -(_t(S * G_n) @ do_n)
            RW = do_n @ _t(W)  # [B, H, L, K]
            db_r[:, :, n, :L] = (RW * q_n).sum(-1)
            b_n = b_r[:, :, n, :L, None]
            dq_n = torch.addcmul(dS @ k_n, b_n, RW)
            dk_n = _t(dS) @ q_n - (_last(G, n, L) * D) @ _t(dW)
            dW_prev = _last(b, n, L) * dW + _t(q_n) @ (b_n * do_n)
            # the carried state
            KW = k_n @ dW  # [B, H, L, V]
            dD = dD - _last(G, n, L) * KW
            dG[:, :, n, L - 1, :L] = -(KW * D).sum(-1)
            db[:, :, n, L - 1] = (W * dW).sum((-1, -2))
            if momentum:
                Mn, f_n = Ms[n], f_r[:, :, n, :L, None]
                RM = do_n @ _t(Mn)
                df_r[:, :, n, :L] = (RM * q_n).sum(-1)
                dq_n = torch.addcmul(dq_n, f_n, RM)
                KM = k_n @ dM
                dD = dD - _last(H, n, L) * KM
                dH[:, :, n, L - 1, :L] = -(KM * D).sum(-1)
                df[:, :, n, L - 1] = (Mn * dW).sum((-1, -2))
                dm[:, :, n, L - 1] = (Mn * dM).sum((-1, -2))
                dk_n = dk_n - (_last(H, n, L) * D) @ _t(dM)
                dM = torch.addcmul(_last(f, n, L) * dW, _last(m, n, L), dM) + _t(q_n) @ (f_n * do_n)
            # the bias: dY, dV, d(bias gates) from output_grad's vjp
            if D_graph.requires_grad:
                dY, dv_n, *dg = torch.autograd.grad(D_graph, leaves, dD, allow_unused=True)
            else:
                dY, dv_n, dg = None, None, [None] * len(gates)
            if dY is not None:
                dW_prev = dW_prev + _t(k_n) @ dY
                dk_n = dk_n + dY @ _t(W)
            dq[:, :, s:s + L], dk[:, :, s:s + L] = dq_n, dk_n
            if dv_n is not None:
                dv[:, :, s:s + L] = dv_n
            for acc, d in zip(dgates, dg):
                if d is not None:
                    acc[:, :, s:s + L] = d
            dW = dW_prev
        coefficients = (db, df, dG, dm, dH, db_r, df_r, dG_r) if momentum else \
            (db, None, dG, None, None, db_r, None, dG_r)
        return (None, None, None, dq, dk, dv, dW, dM if momentum else None, *coefficients, *dgates)
