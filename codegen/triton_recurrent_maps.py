"""The fused recurrent kernels' retention maps that are not elementwise in S (`triton_recurrent`):
KL's S = mass·softmax(z) over one axis of the state tile, and an FTRL accumulator's weights W = psi(A),
elementwise in A or (lq's mirror maps) in A and its norm N = ||A||_p over the whole state. Forward and
vector-Jacobian product of each, printed from the derived sympy expressions."""
from __future__ import annotations

import sympy

from nlc.derive import symbols as S

from .triton_printer import diff, times, to_triton


class RetentionMaps:
    """Mixed into the fused recurrent renderer: uses its emitter `em`, expressions `x` and printers."""

    def broadcast(self) -> str:
        """A [BV] (axis 0) or [BK] (axis 1) reduction of the tile, shaped back against it."""
        return "[None, :]" if self.x.axis == 0 else "[:, None]"

    def softmax(self, target: str, z, note: str) -> None:
        """`target` = mass·softmax(z) over the retention's axis of the tile (z of b_h, b_s); padded
        entries 0. `note`: the comment on z, or none."""
        em, ax, b = self.em, self.x.axis, self.broadcast()
        em.line("b_lw = tl.log(tl.maximum(b_h, 1e-30))" + ("  # log S0, clamped as the reference does" if note else ""))
        em.line(f"b_z = tl.where(m_h, {self.tile(z)}, -1e30)" + (f"  # z{note}" if note else ""))
        em.line(f"b_z = tl.exp(b_z - tl.max(b_z, {ax}){b})")
        mass = "" if self.x.mass == 1 else f"{self.x.mass!r} * "
        em.line(f"{target} = tl.where(m_h, {mass}b_z / tl.sum(b_z, {ax}){b}, 0.0)")

    def softmax_back(self, target: str, w: str, dw: str) -> None:
        """`target` = ∂/∂z of w = mass·softmax(z) from dw: w (dw - sum(w dw) / mass) along the axis."""
        mass = "" if self.x.mass == 1 else f" / {self.x.mass!r}"
        self.em.line(f"{target} = tl.where(m_h, {w} * ({dw} - tl.sum({w} * {dw}, {self.x.axis}){self.broadcast()}"
                     f"{mass}), 0.0)")

    def through_log(self, z, dz: str) -> str:
        """∂/∂S0 through z's log S0 = log(max(S0, 1e-30)) (none where clamped, as clamp_min gives)."""
        return f"tl.where(b_h >= 1e-30, {times(self.tile(diff(z, S.lw0)), dz)} / tl.maximum(b_h, 1e-30), 0.0)"

    def psi_tile(self, expr, a: str) -> str:
        """`expr` of the accumulator tile `a` (and its norm b_N) in the tile's context."""
        return to_triton(sympy.sympify(expr), self.tile_names() | {S.A: a, S.N: "b_N"})

    def norm(self, a: str) -> None:
        """b_nr = ||a||_p over the whole state (every entry is in the tile), b_N = max(b_nr, 1e-12)."""
        p, total = self.x.norm_p, sympy.Symbol("total", positive=True)
        self.em.line(f"b_np = tl.sum(tl.where(m_h, {self.psi_tile(sympy.Abs(S.A) ** p, a)}, 0.0))  "
                     "# Σ |A|^p over the state")
        self.em.line(f"b_nr = {to_triton(total ** (1 / p), {total: 'b_np'})}")
        self.em.line("b_N = tl.maximum(b_nr, 1e-12)  # N = ||A||_p, clamped as the reference does")

    def weights(self, target: str, a: str) -> None:
        """`target` = W = psi(a) of the accumulator tile `a`."""
        x = self.x
        if x.slope is not None:
            self.em.line(f"{target} = b_sc * {a}  # W = slope·A: the slope of the chunk's start")
            return
        if x.psi == S.A:
            self.em.line(f"{target} = {a}  # W = A")
            return
        if x.mirror:
            self.norm(a)
        self.em.line(f"{target} = tl.where(m_h, {self.psi_tile(x.psi, a)}, 0.0)  # W = psi(A)")

    def weights_back(self, a: str, dw: str, norm: bool = True, psi=None) -> str:
        """The name of ∂<dw, psi(a)>/∂a (a mirror map's through its norm too); emits what it needs
        (not a's norm b_nr, b_N when `norm` is False: the step that made `a` left them). `psi`: that
        map, or another expression of A and N (lq(apply = chunk)'s slope)."""
        x, em = self.x, self.em
        psi = x.psi if psi is None else psi
        if psi == S.A:
            return dw
        through_a = times(self.psi_tile(diff(psi, S.A), a), dw)
        if not x.mirror:
            em.line(f"b_dpsi = tl.where(m_h, {through_a}, 0.0)  # through W = psi(A)")
            return "b_dpsi"
        if norm:
            self.norm(a)
        p = x.norm_p
        dn_da = S.N ** (1 - p) * sympy.Abs(S.A) ** (p - 1) * sympy.sign(S.A)  # ∂N/∂A
        em.line(f"b_dN = tl.sum(tl.where(m_h, {times(self.psi_tile(diff(psi, S.N), a), dw)}, 0.0))")
        em.line("b_dN = tl.where(b_nr >= 1e-12, b_dN, 0.0)  # none through the clamp")
        em.line(f"b_dpsi = tl.where(m_h, {through_a} + b_dN * {self.psi_tile(dn_da, a)}, 0.0)  "
                "# through W = psi(A, N)")
        return "b_dpsi"
