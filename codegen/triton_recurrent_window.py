"""The fused recurrent kernels' omega window (`triton_recurrent`): u_t = Σ_i gamma_i k_i d_i^T over
the last WINDOW tokens i, every d_i at the state token t reads. The forward loads each window token
again; the backward adds each window token's shares of its key, value and gate gradients to its rows
(atomic adds: later steps reach back to earlier tokens)."""
from __future__ import annotations

from nlc import ir

from .emitter import comment, ident
from .triton_printer import diff, join, times


class OmegaWindow:
    """Mixed into the fused recurrent renderer: uses its emitter `em`, expressions `x` and printers."""

    def load_window_token(self) -> None:
        """Loads of the window's token i = t - i_w (row i_i): its key, value and the gates its d_i and
        gamma_i read, as b_ki, b_vi, b_gi_<gate>."""
        em = self.em
        em.line("i_i = (i_b * T + t - i_w).to(tl.int64) * H + i_h  # row of token i = t - i_w")
        em.line("b_ki = tl.load(k + i_i * K + o_k, mask=m_k, other=0.0).to(tl.float32)")
        em.line("b_vi = tl.load(v + i_i * V + o_v, mask=m_v, other=0.0).to(tl.float32)")
        for g in self.x.window_gates:
            em.line(f"{ident(g, 'b_gi')} = {self.gate_load(g, 'i_i')}  # gate {comment(g)} of token i")

    def window_gradient(self, a: str, c) -> None:
        """b_u = u_t, the window's bias gradient at the gradient point `a`; `c` prints a comment or ""."""
        em, x = self.em, self.x
        em.line("b_u = tl.zeros([BK, BV], dtype=tl.float32)" + c("# u_t, summed over the window"))
        with em.indent("for i_w in range(0, WINDOW):"):
            with em.indent("if t >= i_w:  # the window's token i = t - i_w"):
                self.load_window_token()
                self.bias_gradient(a, "i", c)
                em.line(f"b_gamma = {self.vec(x.gamma, 'i')}" + c("# gamma_i"))
                em.line(f"b_u += b_gamma * {self.kcol('b_ki')} * b_di[None, :]" + c("# u_t += gamma_i k_i d_i^T"))

    def window_backward(self, a: str) -> None:
        """Token t's window backwards, from b_du = ∂/∂u_t: each window token's key, value and gate shares
        are added to its rows, and ∂/∂P_t summed into b_da."""
        em, x = self.em, self.x
        if not x.state_free:
            em.line("b_da = tl.zeros([BK, BV], dtype=tl.float32)  # ∂/∂P_t, over the window")
        with em.indent("for i_w in range(0, WINDOW):"):
            with em.indent("if t >= i_w:  # the window's token i = t - i_w"):
                self.load_window_token()
                self.bias_gradient(a, "i", lambda text: "")
                em.line(f"b_gamma = {self.vec(x.gamma, 'i')}")
                em.line(f"b_dui = tl.sum(b_du * {self.kcol('b_ki')}, 0)  # [BV]: ∂/∂(gamma_i d_i)")
                em.line("b_ddi = b_gamma * b_dui")
                em.line(f"b_dki = b_gamma * {self.ksum('b_du * b_di[None, :]')}  # through u_t += gamma_i k_i d_i^T")
                self.bias_gradient_back("i")
                if not x.state_free:
                    em.line(f"b_dki += {self.ksum(f'{a} * b_dei[None, :]')}  # through y_i = P_t^T k_i")
                    em.line(f"b_da += {self.kcol('b_ki')} * b_dei[None, :]")
                em.line("o_ni = i_i * NV + i_v")
                em.line(self.put(f"dk + {self.key_row('i_i', 'o_ni')} * K + o_k", "b_dki", "m_k"))
                em.line(self.put("dv + i_i * V + o_v", "b_dvi", "m_v"))
                if ir.gate_names(x.gamma):
                    em.line("b_dgamma = tl.sum(b_di * b_dui)  # ∂/∂gamma_i")
                for g in x.window_gates:  # [BV] shares through d_i, scalar ones through gamma_i
                    sym, value = ir.gate_symbol(g), self.gate_axis(g) == "value"
                    terms = []
                    if g in ir.gate_names(x.grad):
                        term = times(self.vec(diff(x.grad, sym), "i"), "b_ddi")
                        terms.append(term if value else f"tl.sum({term})")
                    if g in ir.gate_names(x.gamma):
                        terms.append(times(self.vec(diff(x.gamma, sym), "i"), "b_dgamma"))
                    at = f"{ident(g, 'dg')} + i_i * V + o_v" if value else f"{ident(g, 'dg')} + o_ni"
                    em.line(self.put(at, join(terms), "m_v" if value else None) + f"  # gate {comment(g)} of token i")
