"""Muon's Newton-Schulz orthogonalisation inside the fused recurrent Triton kernels (MATH.md §1.4).

The state tile holds the whole [K, V] momentum matrix (one program per batch x head), so each step
X -> a X + (b A + c A²) X, A = X Xᵀ, is three `tl.dot`s on the tile (when K > V, as the reference
transposes a tall matrix: A = XᵀX and X -> a X + X (b A + c A²)). The forward keeps every iterate
X_0 .. X_(n-1) in registers (the step count is the spec's constant), and the backward takes each
step's vector-Jacobian product in reverse, then the normalisation X_0 = M / max(||M||_F, 1e-7)'s.
"""
from __future__ import annotations

from .emitter import Emitter

COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic's a, b, c, as the reference's newton_schulz


def helpers(em: Emitter) -> None:
    """`@triton.jit` functions for one step and its vector-Jacobian product (fp32 `tl.dot`s)."""
    a, b, c = COEFFICIENTS
    em.block(f'''
@triton.jit
def newton_schulz_step(x, TALL: tl.constexpr):
    """One quintic step on the tile x [BK, BV]: a x + (b A + c A²) x with A = x xᵀ (TALL: x (b A + c A²)
    with A = xᵀ x)."""
    if TALL:
        b_a = tl.dot(tl.trans(x), x, input_precision="ieee")
        b_p = {b!r} * b_a + {c!r} * tl.dot(b_a, b_a, input_precision="ieee")
        return {a!r} * x + tl.dot(x, b_p, input_precision="ieee")
    else:
        b_a = tl.dot(x, tl.trans(x), input_precision="ieee")
        b_p = {b!r} * b_a + {c!r} * tl.dot(b_a, b_a, input_precision="ieee")
        return {a!r} * x + tl.dot(b_p, x, input_precision="ieee")


@triton.jit
def newton_schulz_step_back(x, g, TALL: tl.constexpr):
    """∂<g, newton_schulz_step(x)>/∂x: A and P = b A + c A² are symmetric, so with dP = g xᵀ (TALL: xᵀ g)
    and dA = b dP + c (dP A + A dP) it is a g + P g + (dA + dAᵀ) x (TALL: a g + g P + x (dA + dAᵀ))."""
    if TALL:
        b_a = tl.dot(tl.trans(x), x, input_precision="ieee")
        b_p = {b!r} * b_a + {c!r} * tl.dot(b_a, b_a, input_precision="ieee")
        b_dp = tl.dot(tl.trans(x), g, input_precision="ieee")
        b_da = {b!r} * b_dp + {c!r} * (tl.dot(b_dp, b_a, input_precision="ieee") + tl.dot(b_a, b_dp, input_precision="ieee"))
        return {a!r} * g + tl.dot(g, b_p, input_precision="ieee") + tl.dot(x, b_da + tl.trans(b_da), input_precision="ieee")
    else:
        b_a = tl.dot(x, tl.trans(x), input_precision="ieee")
        b_p = {b!r} * b_a + {c!r} * tl.dot(b_a, b_a, input_precision="ieee")
        b_dp = tl.dot(g, tl.trans(x), input_precision="ieee")
        b_da = {b!r} * b_dp + {c!r} * (tl.dot(b_dp, b_a, input_precision="ieee") + tl.dot(b_a, b_dp, input_precision="ieee"))
        return {a!r} * g + tl.dot(b_p, g, input_precision="ieee") + tl.dot(b_da + tl.trans(b_da), x, input_precision="ieee")
''')


def forward(em: Emitter, m: str, steps: int, comments: bool) -> str:
    """Emit X = NS_steps(m) for the momentum tile `m` (padded entries 0); its iterates stay as b_x0 ..
    b_x<steps>. Returns the name of the result."""
    em.line(f"b_nrm = tl.sqrt(tl.sum({m} * {m}))" + ("  # ||M_t||_F" if comments else ""))
    em.line(f"b_x0 = {m} / tl.maximum(b_nrm, 1e-7)" + ("  # X_0, clamped as the reference does" if comments else ""))
    for i in range(steps):
        em.line(f"b_x{i + 1} = newton_schulz_step(b_x{i}, TALL)")
    return f"b_x{steps}"


def backward(em: Emitter, dx: str, steps: int) -> None:
    """Emit `dx` = ∂/∂M_t from `dx` = ∂/∂X_steps, with the forward's iterates and b_nrm in scope."""
    for i in reversed(range(steps)):
        em.line(f"{dx} = newton_schulz_step_back(b_x{i}, {dx}, TALL)  # through X_{i + 1} = step(X_{i})")
    em.line(f"{dx} = tl.where(b_nrm >= 1e-7, ({dx} - b_x0 * tl.sum(b_x0 * {dx})) / b_nrm, {dx} / 1e-7)  "
            "# through X_0 = M_t / max(||M_t||, 1e-7)")
