"""Render a matrix-memory level as fused recurrent Triton kernels (decoding and short sequences):
`level_<name>_triton.py`, a real file in the cache (Triton reads kernel source from disk).

The file stacks four layers, as fla's `fused_recurrent.py` does: `@triton.jit` kernels (one program
per batch, head and block of value channels; the state tile [BK, BV] stays in registers for the whole
sequence, fp32) -> launchers (blocks, allocation, grid) -> a `torch.autograd.Function` -> the public
`level_<name>` with the reference op's signature, state layout and return convention.

What one token does is printed from the level's derived rules (sympy -> `triton_printer`): the bias
gradient d = dℓ/dy, elementwise in the error e = Aᵀk - v (or in e and r = ||e||, or free of the
state), the learning rate and momentum factor, and the retention's elementwise map S = R(S0, s)
(elastic net's soft threshold as its branches, `soft_threshold`), or KL's S = mass·softmax(z) over
one axis of the tile with z = R(log S0, s) (the whole axis in one block; its backward is softmax's
vector-Jacobian product, then z's derivatives), or DGD's S = R(S0, s) - lr k (kᵀ S0) (every key
channel is in the tile, so kᵀ S0 is one reduction over it).
The backward kernel runs backwards in time; its partial derivatives (∂R/∂S0, ∂R/∂s, ∂d/∂e, ∂/∂gate
...) are `sympy.diff` of the same expressions. The forward saves the state every CHUNK tokens; the
backward recomputes one chunk's states from its checkpoint into a per-program buffer, then walks the
chunk backwards.
"""
from __future__ import annotations

import sympy

import nlc
from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.rules import ALGORITHM_TEXT, LevelRules

from .emitter import Emitter, comment, ident, where
from .triton_printer import to_triton


def unsupported(rules: LevelRules) -> str | None:
    """Why the fused recurrent kernels cannot run this level, or None when they can."""
    lv, ret = rules.level, rules.retention
    if lv.memory.kind != "matrix":
        return f"a {lv.memory.kind} memory: the fused recurrent kernels hold a matrix state [K, V]"
    if lv.period != 1:
        when = "outer" if lv.period is None else f"every {lv.period}"
        return f"update {when}: reads of a committed state are not in the fused recurrent kernels"
    if lv.grad_at not in ("current", "retained"):
        return "gradients frozen at chunk starts: a chunked form, not a per-token recurrence"
    if lv.target == "self" or lv.init_from is not None:
        return "a self-generated target or a restart (init from) is not in the fused recurrent kernels"
    if lv.algorithm.kind not in ("gd", "momentum"):
        return f"algorithm {lv.algorithm.kind} is not elementwise in the gradient (gd and momentum are)"
    if lv.bias.kind == "omega":
        return "omega windows sum gradients over the last tokens' keys: not one outer product"
    if rules.accumulator or ret.form not in ("elementwise", "implicit", "threshold", "softmax", "dgd"):
        return f"retention {lv.retention.kind} is a {ret.form} map, not elementwise in the state"
    keyed = [g for g in ir.gate_names(rules.bias.grad) if lv.gate_axes[g] == "key"]
    if keyed:
        return f"the bias gradient reads key-channel gate(s) {', '.join(keyed)} on value channels"
    try:
        _Renderer(rules, "", "").text()
    except NotImplementedError as err:  # a function the Triton printer has no form for
        return str(err)
    return None


class _Exprs:
    """The level's derived expressions in the roles the kernels print them in (sympy)."""

    def __init__(self, rules: LevelRules):
        lv = rules.level
        self.implicit = rules.retention.form == "implicit"
        self.grad = sympy.sympify(rules.bias.grad).subs(S.y, S.e + S.v)        # d(e, r, v)
        self.retain = S.w0 + S.s if self.implicit else rules.retention_new()   # R(w0, s)
        if rules.retention.form == "threshold":  # elastic net: the soft threshold of the smooth centre
            self.retain = soft_threshold(self.retain, rules.threshold())
        self.dgd = rules.retention.form == "dgd"  # S = retain(S0, s) - lr k (kᵀ S0): delta gradient descent
        # KL: S = mass·softmax(z) over each column's key channels (axis row) or each row's value
        # channels (axis column), z = retain(log S0, s) affine in both; retain holds z then
        self.softmax = rules.retention.form == "softmax"
        if self.softmax:
            self.axis = 0 if lv.retention.args["axis"] == "row" else 1  # of the state tile [BK, BV]
            self.mass = float(lv.retention.args["mass"])
        self.lr = sympy.sympify(rules.retention_new() if self.implicit else rules.lr)
        self.beta = sympy.sympify(lv.algorithm.args["beta"]) if lv.algorithm.kind == "momentum" else None
        self.state_free = not (self.grad.free_symbols & {S.e, S.r})
        self.norm = S.r in self.grad.free_symbols
        used = [x for x in (self.grad, self.retain, self.lr, self.beta) if x is not None]
        self.gates = sorted(set().union(*(ir.gate_names(x) for x in used)))


def soft_threshold(centre, threshold) -> sympy.Expr:
    """sign(c)·max(|c| - t, 0) as branches, which sympy differentiates branch by branch; a branch
    holds at |c| = t as well, where the reference's clamp_min passes its gradient through."""
    return sympy.Piecewise((centre - threshold, centre >= threshold), (centre + threshold, centre <= -threshold),
                           (0, True))


def diff(expr, symbol) -> sympy.Expr:
    """∂expr/∂symbol with the derivative of sign (a Dirac delta) taken as 0, as autograd does."""
    return sympy.diff(expr, symbol).replace(sympy.DiracDelta, lambda *args: sympy.Integer(0))


def render(rules: LevelRules, model: str, file: str) -> str:
    """The source of `level_<name>_triton.py` for a level `unsupported` accepts."""
    return _Renderer(rules, model, file).text()


AMP_IMPORT = "from nlc.runtime.amp import autocast_backward, autocast_forward"


def decorators(em: Emitter, method: str) -> None:
    """The decorators of a kernels' autograd.Function `method` ('forward' or 'backward'): static, and
    nlc.runtime.amp's, under which the backward runs in the forward's autocast state."""
    em.line("@staticmethod")
    em.line(f"@autocast_{method}")


def first_order_only(em: Emitter) -> None:
    """The first lines of a kernels' autograd.Function backward: refuse create_graph=True, whose
    second derivative through kernel outputs would silently be wrong."""
    em.line("if torch.is_grad_enabled():  # create_graph=True: no silently wrong second derivative")
    em.line("    raise RuntimeError(\"Triton kernels' backward is not differentiable twice; for second \"")
    em.line("                       \"derivatives run the level with mode='chunk' or 'reference'\")")


class _Renderer:
    def __init__(self, rules: LevelRules, model: str, file: str):
        self.lv, self.x = rules.level, _Exprs(rules)
        self.model, self.file = model, file
        self.momentum = self.lv.algorithm.kind == "momentum"
        self.retained = self.lv.grad_at == "retained"
        self.after = self.lv.read == "after"
        self.em = Emitter()

    # ---- names ------------------------------------------------------------------------------
    def gate_axis(self, g: str) -> str:
        return self.lv.gate_axes[g]

    def tile_names(self) -> dict:
        """Names in the state tile's context [BK, BV]: gates broadcast by their channel axis."""
        view = {"scalar": "", "key": "[:, None]", "value": "[None, :]"}
        names = {ir.gate_symbol(g): ident(g, "b_g") + view[self.gate_axis(g)] for g in self.x.gates}
        return names | {S.w0: "b_h", S.s: "b_s", S.n: "b_n", S.lw0: "b_lw"}

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
        return f"tl.where(b_h >= 1e-30, {_times(self.tile(diff(z, S.lw0)), dz)} / tl.maximum(b_h, 1e-30), 0.0)"

    def value_names(self) -> dict:
        """Names in the value channels' context [BV] (the bias gradient)."""
        names = {ir.gate_symbol(g): ident(g, "b_g") for g in self.x.gates}
        return names | {S.e: "b_e", S.r: "b_r", S.v: "b_v"}

    def tile(self, expr) -> str:
        return to_triton(sympy.sympify(expr), self.tile_names())

    def vec(self, expr) -> str:
        return to_triton(sympy.sympify(expr), self.value_names())

    def state_args(self) -> list[str]:
        """The state tensors' short names: h (S) and, with momentum, m (M)."""
        return ["h", "m"] if self.momentum else ["h"]

    # ---- the file ---------------------------------------------------------------------------
    def text(self) -> str:
        em, lv = self.em, self.lv
        self.header()
        em.line("import torch")
        em.line("import triton")
        em.line("import triton.language as tl")
        em.line()
        em.line(AMP_IMPORT)
        em.line()
        em.line(f"from .{ident(lv.name, 'level')} import _pack, default_state")
        em.gap()
        em.line("# Launch configuration, kept apart from the kernels (results do not depend on it).")
        em.line("BV_MAX = 16  # value channels per program" +
                (" (not here: ||e|| needs every value channel in one program)" if self.x.norm else ""))
        em.line("WARP_TILE = 512  # state-tile elements per warp (16 per thread)")
        em.line("MAX_WARPS = 16")
        em.line("CHUNK = 64  # tokens between saved states: the backward recomputes one chunk at a time")
        em.gap()
        self.forward_kernel()
        em.gap()
        self.backward_kernel()
        em.gap()
        self.launchers()
        em.gap()
        self.function()
        em.gap()
        self.public()
        return em.text()

    def header(self) -> None:
        em, lv, x = self.em, self.lv, self.x
        name = comment(lv.name)
        em.line(f'"""Level {name!r} of model {comment(self.model)!r}: fused recurrent Triton kernels.')
        em.line()
        em.line(f"Generated by nlc {nlc.__version__} from {comment(self.file)}; do not edit. It computes "
                f"what level_{name}.py")
        em.line("(the reference recurrent form) computes, with an fp32 state and fp32 arithmetic.")
        for key, value in lv.describe().items():
            em.line(f"  {key:<10} {comment(value)}")
        em.line(f"  step       {ALGORITHM_TEXT[lv.algorithm.kind]}")
        em.line("Per token t (row convention, S [K, V]):")
        at = "R(S_(t-1), 0)  (the retained state)" if self.retained else "S_(t-1)"
        em.line(f"  A_t = {at}")
        if x.state_free:
            em.line(f"  d_t = dℓ/dy = {_show(x.grad)}  (free of the state)")
        else:
            em.line("  e_t = A_t^T k_t - v_t" + (",  r_t = ||e_t||" if x.norm else ""))
            em.line(f"  d_t = dℓ/dy = {_show(x.grad)}")
        lr = _show(x.lr) + ("  (n = ||k_t||^2)" if x.implicit else "")
        if self.momentum:
            em.line("  M_t = beta_t M_(t-1) - lr_t k_t d_t^T,  s_t = M_t;  "
                    f"lr = {lr}, beta = {_show(x.beta)}")
        else:
            em.line(f"  s_t = -lr_t k_t d_t^T;  lr = {lr}")
        if x.softmax:
            over = "key channels (each column)" if x.axis == 0 else "value channels (each row)"
            em.line(f"  S_t = {x.mass!r}·softmax(z) over {over},  z = {_show(x.retain)},")
            em.line("        w0 = S_(t-1), lw0 = log(max(w0, 1e-30))")
        elif x.dgd:
            em.line(f"  S_t = R(S_(t-1), s_t) - lr_t k_t (k_t^T S_(t-1)),  R = {_show(x.retain)}  (DGD)")
        else:
            em.line(f"  S_t = R(S_(t-1), s_t) = {_show(x.retain)}  (elementwise)")
        em.line(f"  o_t = {'S_t' if self.after else 'S_(t-1)'}^T q_t")
        em.line("Grid: one program per (block of BV value channels, batch x head); the state tile [BK, BV]")
        em.line("stays in registers for all T tokens. The forward saves the state every CHUNK tokens; the")
        em.line("backward recomputes each chunk's states into a per-program buffer and walks it backwards.")
        em.line("Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; scalar gates [B, T, H]; vector gates")
        state = "(S, M), each" if self.momentum else "S"
        em.line(f"[B, T, H, K or V]. State: {state} [B, H, K, V], float32.")
        em.line('"""')

    # ---- kernels ----------------------------------------------------------------------------
    def gate_params(self, prefix: str = "g") -> str:
        return "".join(f"{ident(g, prefix)}, " for g in self.x.gates)

    def prologue(self) -> None:
        em = self.em
        em.line("i_v, i_bh = tl.program_id(0), tl.program_id(1)")
        em.line("i_b, i_h = i_bh // H, i_bh % H")
        em.line("o_k = tl.arange(0, BK)")
        em.line("o_v = i_v * BV + tl.arange(0, BV)")
        em.line("m_k, m_v = o_k < K, o_v < V")
        em.line("m_h = m_k[:, None] & m_v[None, :]")
        em.line("o_h = o_k[:, None] * V + o_v[None, :]  # the tile's offsets in one [K, V] state")
        em.line("o_s = i_bh.to(tl.int64) * (K * V)  # this (batch, head)'s state")

    def load_token(self, grads: bool) -> None:
        """Loads of token t's inputs (row i_t of [B, T, H, ...]) as fp32 blocks."""
        em = self.em
        em.line("i_t = (i_b * T + t).to(tl.int64) * H + i_h  # row of token t in [B, T, H, ...]")
        em.line("b_q = tl.load(q + i_t * K + o_k, mask=m_k, other=0.0).to(tl.float32)")
        em.line("b_k = tl.load(k + i_t * K + o_k, mask=m_k, other=0.0).to(tl.float32)")
        em.line("b_v = tl.load(v + i_t * V + o_v, mask=m_v, other=0.0).to(tl.float32)")
        for g in self.x.gates:
            em.line(f"{ident(g, 'b_g')} = {self.gate_load(g)}  # gate {comment(g)}: {self.gate_axis(g)}")
        if grads:
            em.line("b_do = tl.load(do + i_t * V + o_v, mask=m_v, other=0.0).to(tl.float32)")

    def gate_load(self, g: str) -> str:
        p = ident(g, "g")
        at = {"scalar": f"{p} + i_t", "key": f"{p} + i_t * K + o_k, mask=m_k, other=0.0",
              "value": f"{p} + i_t * V + o_v, mask=m_v, other=0.0"}[self.gate_axis(g)]
        return f"tl.load({at}).to(tl.float32)"

    def step(self, new: str, new_m: str, comments: bool) -> None:
        """One token's forward: from b_h (and b_m) to `new` (and `new_m`)."""
        em, lv, x = self.em, self.lv, self.x
        c = (lambda text: f"  {text}") if comments else (lambda text: "")
        if comments:
            em.line(f"{where(lv.span)} level {comment(lv.name)}".strip())
        a = "b_h"
        if self.retained and not x.state_free:  # the checker allows it after a decay only (elementwise)
            em.line(f"b_a = {self.tile(x.retain.subs(S.s, 0))}" +
                    c(f"{where(lv.retention.span) or '#'} A_t: the retained state".strip()))
            a = "b_a"
        if not x.state_free:
            em.line(f"b_y = tl.sum({a} * b_k[:, None], 0)" + c("# [BV]: y_t = A_t^T k_t"))
            e = "tl.where(m_v, b_y - b_v, 0.0)" if x.norm else "b_y - b_v"
            em.line(f"b_e = {e}" + c("# e_t"))
        if x.norm:
            em.line("b_norm = tl.sqrt(tl.sum(b_e * b_e))")
            em.line("b_r = tl.maximum(b_norm, 1e-12)" + c("# r_t = ||e_t||, clamped as the reference does"))
        em.line(f"b_d = {self.vec(x.grad)}" + c(f"{where(lv.bias.span) or '#'} [BV]: d_t = dℓ/dy".strip()))
        if x.implicit:
            em.line("b_n = tl.sum(b_k * b_k)" + c("# n = ||k_t||^2"))
        em.line(f"b_lr = {self.tile(x.lr)}" + c(f"{where(lv.algorithm.span) or '#'} lr_t".strip()))
        em.line("b_u = b_k[:, None] * b_d[None, :]" + c("# [BK, BV]: u_t = k_t d_t^T, the bias gradient"))
        if self.momentum:
            em.line(f"{new_m} = {_times(self.tile(x.beta), 'b_m')} - b_lr * b_u" +
                    c("# M_t = beta_t M_(t-1) - lr_t u_t"))
            em.line(f"b_s = {new_m}")
        else:
            em.line("b_s = -b_lr * b_u" + c("# s_t = -lr_t u_t"))
        if x.softmax:
            if comments:
                em.line(f"{where(lv.retention.span) or '#'} S_t = R(S_(t-1), s_t) = mass·softmax(z)".strip())
            self.softmax(new, x.retain, " = retain(log S_(t-1), s_t)" if comments else "")
        elif x.dgd:
            em.line("b_kh = tl.sum(b_k[:, None] * b_h, 0)" + c("# [BV]: k_t^T S_(t-1)"))
            em.line(f"{new} = {self.tile(x.retain)} - b_lr * b_k[:, None] * b_kh[None, :]" +
                    c(f"{where(lv.retention.span) or '#'} S_t = S_(t-1) (decay I - lr k k^T) + s_t".strip()))
        else:
            em.line(f"{new} = {self.tile(x.retain)}" +
                    c(f"{where(lv.retention.span) or '#'} S_t = R(S_(t-1), s_t)".strip()))

    def forward_kernel(self) -> None:
        em = self.em
        state_in = ", ".join(f"{s}0" for s in self.state_args())
        state_out = ", ".join(f"{s}t" for s in self.state_args())
        checkpoints = ", ".join(f"{s}c" for s in self.state_args())
        em.line('@triton.jit(do_not_specialize=["T"])')
        with em.indent("def fused_recurrent_fwd_kernel("):
            em.line(f"q, k, v, {self.gate_params()}{state_in},  # inputs; states [B, H, K, V] fp32")
            em.line(f"o, {state_out}, {checkpoints},  # o [B, T, H, V]; final states; checkpoints "
                    "[B, H, NC, K, V]")
            em.line("T,")
            em.line("H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, "
                    "BV: tl.constexpr,")
            em.line("CHUNK: tl.constexpr, SAVE_CHECKPOINTS: tl.constexpr,")
        with em.indent("):"):
            em.line('"""Program (i_v, i_bh): value channels [i_v BV, (i_v + 1) BV) of batch x head i_bh, '
                    "all T tokens."
                    '"""')
            self.prologue()
            em.line("NC = tl.cdiv(T, CHUNK)")
            for s in self.state_args():
                em.line(f"b_{s} = tl.load({s}0 + o_s + o_h, mask=m_h, other=0.0)")
            with em.indent("for t in range(0, T):"):
                with em.indent("if SAVE_CHECKPOINTS:"):
                    with em.indent("if t % CHUNK == 0:  # the state entering this chunk"):
                        em.line("o_c = (i_bh * NC + t // CHUNK).to(tl.int64) * (K * V)")
                        for s in self.state_args():
                            em.line(f"tl.store({s}c + o_c + o_h, b_{s}, mask=m_h)")
                self.load_token(grads=False)
                if not self.after:
                    em.line("b_o = tl.sum(b_h * b_q[:, None], 0)  # o_t = S_(t-1)^T q_t: read before write")
                self.step("b_h", "b_m", comments=True)
                if self.after:
                    em.line("b_o = tl.sum(b_h * b_q[:, None], 0)  # o_t = S_t^T q_t")
                em.line("tl.store(o + i_t * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)")
            for s in self.state_args():
                em.line(f"tl.store({s}t + o_s + o_h, b_{s}, mask=m_h)")

    def backward_kernel(self) -> None:
        em = self.em
        states = self.state_args()
        em.line('@triton.jit(do_not_specialize=["T"])')
        with em.indent("def fused_recurrent_bwd_kernel("):
            em.line(f"q, k, v, {self.gate_params()}{', '.join(f'{s}c' for s in states)},  "
                    "# inputs; checkpoints [B, H, NC, K, V]")
            em.line(f"do, {', '.join(f'd{s}t' for s in states)},  # gradients of o and of the final states")
            em.line(f"dq, dk, dv, {self.gate_params('dg')}{', '.join(f'd{s}0' for s in states)},  "
                    "# dq, dk [B, T, H, NV, K]: per value block")
            em.line(f"{', '.join(f'w{s}' for s in states)},  # [B * H * NV, CHUNK, BK, BV]: one chunk's "
                    "states, per program")
            em.line("T, NV,")
            em.line("H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, "
                    "BV: tl.constexpr,")
            em.line("CHUNK: tl.constexpr,")
        with em.indent("):"):
            em.line('"""Program (i_v, i_bh), backwards in time: chunk by chunk from the last, recompute '
                    "the chunk's")
            em.line('states S_(t-1) from its checkpoint into the buffer, then take each token\'s step '
                    'backwards."""')
            self.prologue()
            em.line("o_w = tl.arange(0, BK)[:, None] * BV + tl.arange(0, BV)[None, :]  # one buffer slot")
            em.line("o_p = (i_bh * NV + i_v).to(tl.int64) * (CHUNK * BK * BV)  # this program's buffer")
            for s in states:
                em.line(f"b_d{s} = tl.load(d{s}t + o_s + o_h, mask=m_h, other=0.0)  # ∂/∂ the state after "
                        "token t")
            em.line("NC = tl.cdiv(T, CHUNK)")
            with em.indent("for i_n in range(0, NC):"):
                em.line("i_c = NC - 1 - i_n")
                em.line("t0 = i_c * CHUNK")
                em.line("L = tl.minimum(T - t0, CHUNK)")
                em.line("o_c = (i_bh * NC + i_c).to(tl.int64) * (K * V)")
                for s in states:
                    em.line(f"b_{s} = tl.load({s}c + o_c + o_h, mask=m_h, other=0.0)")
                with em.indent("for j in range(0, L):  # recompute S_(t-1) of the chunk's tokens"):
                    em.line("t = t0 + j")
                    for s in states:
                        em.line(f"tl.store(w{s} + o_p + j * (BK * BV) + o_w, b_{s})")
                    self.load_token(grads=False)
                    self.step("b_h", "b_m", comments=False)
                em.line("tl.debug_barrier()")
                with em.indent("for j in range(0, L):  # token t, backwards"):
                    em.line("t = t0 + L - 1 - j")
                    for s in states:
                        em.line(f"b_{s} = tl.load(w{s} + o_p + (L - 1 - j) * (BK * BV) + o_w)")
                    self.load_token(grads=True)
                    self.step("b_hn", "b_mn", comments=False)
                    self.step_backward()
                em.line("tl.debug_barrier()  # before the next chunk overwrites the buffer")
            for s in states:
                em.line(f"tl.store(d{s}0 + o_s + o_h, b_d{s}, mask=m_h)")

    def step_backward(self) -> None:
        """Token t's step backwards: from ∂/∂S_t (b_dh, b_dm) to ∂/∂S_(t-1) and the inputs' gradients."""
        em, x = self.em, self.x
        tile_terms: dict[str, list[str]] = {g: [] for g in x.gates}  # [BK, BV] blocks
        vec_terms: dict[str, list[str]] = {g: [] for g in x.gates}   # [BV] blocks (the bias)

        def gate_terms(expr, by: str, terms=tile_terms, printer=self.tile) -> None:
            """∂expr/∂gate · `by` for every gate `expr` reads: its share of that gate's gradient."""
            for g in ir.gate_names(expr):
                terms[g].append(_times(printer(diff(expr, ir.gate_symbol(g))), by))

        if self.after:
            em.line("b_dhn = b_dh + b_q[:, None] * b_do[None, :]  # ∂/∂S_t: later tokens and o_t = S_t^T q_t")
            em.line("b_dq = tl.sum(b_hn * b_do[None, :], 1)")
        else:
            em.line("b_dhn = b_dh  # ∂/∂S_t")
        if x.softmax:
            self.softmax_back("b_dz", "b_hn", "b_dhn")
            em.line(f"b_dh = {self.through_log(x.retain, 'b_dz')}  # through S_t = mass·softmax(z)")
            em.line(f"b_ds = {_times(self.tile(diff(x.retain, S.s)), 'b_dz')}")
            gate_terms(x.retain, "b_dz")
        else:
            em.line(f"b_dh = {_times(self.tile(diff(x.retain, S.w0)), 'b_dhn')}  # through S_t = R(S_(t-1), s_t)")
            em.line(f"b_ds = {_times(self.tile(diff(x.retain, S.s)), 'b_dhn')}")
            gate_terms(x.retain, "b_dhn")
        if x.dgd:  # through -lr k (k^T S_(t-1))
            em.line("b_kd = tl.sum(b_k[:, None] * b_dhn, 0)  # [BV]: k_t^T ∂/∂S_t")
            em.line("b_dh -= b_lr * b_k[:, None] * b_kd[None, :]")
            em.line("b_dkg = -b_lr * (tl.sum(b_dhn * b_kh[None, :], 1) + tl.sum(b_h * b_kd[None, :], 1))")
            if ir.gate_names(x.lr):
                em.line("b_dlr = -b_k[:, None] * b_kh[None, :] * b_dhn  # lr's share, as a tile")
        step = "b_ds"
        if self.momentum:
            em.line("b_dmn = b_dm + b_ds  # ∂/∂M_t")
            em.line(f"b_dm = {_times(self.tile(x.beta), 'b_dmn')}")
            if ir.gate_names(x.beta):
                em.line("b_dbeta = b_m * b_dmn")
                gate_terms(x.beta, "b_dbeta")
            step = "b_dmn"
        em.line(f"b_du = -b_lr * {step}")
        if ir.gate_names(x.lr) or x.implicit:
            em.line(f"b_dlr -= b_u * {step}" if x.dgd else f"b_dlr = -b_u * {step}")
            gate_terms(x.lr, "b_dlr")
        em.line("b_dk = tl.sum(b_du * b_d[None, :], 1)  # through u_t = k_t d_t^T")
        if x.dgd:
            em.line("b_dk += b_dkg")
        em.line("b_dd = tl.sum(b_du * b_k[:, None], 0)")
        gate_terms(x.grad, "b_dd", vec_terms, self.vec)
        dv = []
        if not x.state_free:
            em.line(f"b_de = {_times(self.vec(diff(x.grad, S.e)), 'b_dd')}  # through d_t = dℓ/dy(e_t, ...)")
            if x.norm:
                em.line(f"b_dr = tl.sum({_times(self.vec(diff(x.grad, S.r)), 'b_dd')})")
                em.line("b_de += tl.where(b_norm > 1e-12, b_dr / b_r, 0.0) * b_e  # ∂r/∂e = e / r")
            dv.append("-b_de")
        dgv = diff(x.grad, S.v)
        if dgv != 0:
            dv.insert(0, _times(self.vec(dgv), "b_dd"))
        em.line(f"b_dv = {_join(dv) if dv else 'tl.zeros([BV], dtype=tl.float32)'}")
        if not x.state_free:
            a = "b_a" if self.retained else "b_h"
            em.line(f"b_dk += tl.sum({a} * b_de[None, :], 1)  # through y_t = A_t^T k_t")
            em.line("b_da = b_k[:, None] * b_de[None, :]")
            if self.retained:
                at_zero = x.retain.subs(S.s, 0)
                em.line(f"b_dh += {_times(self.tile(diff(at_zero, S.w0)), 'b_da')}  "
                        "# through A_t = R(S_(t-1), 0)")
                gate_terms(at_zero, "b_da")
            else:
                em.line("b_dh += b_da")
        if x.implicit:
            em.line(f"b_dn = tl.sum({_times(self.tile(diff(x.lr, S.n)), 'b_dlr')})")
            em.line("b_dk += 2.0 * b_dn * b_k  # through n = ||k_t||^2")
        if not self.after:
            em.line("b_dh += b_q[:, None] * b_do[None, :]  # o_t = S_(t-1)^T q_t")
            em.line("b_dq = tl.sum(b_h * b_do[None, :], 1)")
        em.line("o_n = i_t * NV + i_v  # row of (token t, value block i_v) in the per-block partials")
        em.line("tl.store(dq + o_n * K + o_k, b_dq, mask=m_k)")
        em.line("tl.store(dk + o_n * K + o_k, b_dk, mask=m_k)")
        em.line("tl.store(dv + i_t * V + o_v, b_dv, mask=m_v)")
        for g in x.gates:
            self.gate_gradient(g, tile_terms[g], vec_terms[g])

    def gate_gradient(self, g: str, tiles: list[str], vecs: list[str]) -> None:
        em, axis = self.em, self.gate_axis(g)
        b, p = ident(g, "b_dg"), ident(g, "dg")
        tile = _join(tiles) if tiles else None
        if axis == "scalar":
            parts = ([f"tl.sum({tile})"] if tile else []) + ([f"tl.sum({_join(vecs)})"] if vecs else [])
            em.line(f"{b} = {' + '.join(parts)}  # gate {comment(g)}: over the tile")
            em.line(f"tl.store({p} + o_n, {b})")
        elif axis == "key":
            em.line(f"{b} = tl.sum({tile}, 1)  # gate {comment(g)}: over value channels")
            em.line(f"tl.store({p} + o_n * K + o_k, {b}, mask=m_k)")
        else:
            parts = ([f"tl.sum({tile}, 0)"] if tile else []) + ([_join(vecs)] if vecs else [])
            em.line(f"{b} = {' + '.join(parts)}  # gate {comment(g)}: over key channels")
            em.line(f"tl.store({p} + i_t * V + o_v, {b}, mask=m_v)")

    # ---- host side --------------------------------------------------------------------------
    def launchers(self) -> None:
        em, x = self.em, self.x
        gates = self.gate_params()
        states = self.state_args()
        with em.indent("def _config(K, V):"):
            em.line('"""(BK, BV, warps): every key channel in one block, value channels in blocks of '
                    "BV_MAX, and")
            em.line('one warp per WARP_TILE elements of the state tile."""')
            em.line("BK = triton.next_power_of_2(K)")
            if x.norm:
                em.line("BV = triton.next_power_of_2(V)  # ||e|| reads every value channel")
            elif x.softmax and x.axis == 1:
                em.line("BV = triton.next_power_of_2(V)  # the softmax runs over every value channel")
            else:
                em.line("BV = min(triton.next_power_of_2(V), BV_MAX)")
            em.line("return BK, BV, min(MAX_WARPS, max(1, BK * BV // WARP_TILE))")
        em.gap()
        h0 = ", ".join(f"{s}0" for s in states)
        with em.indent(f"def fused_recurrent_fwd(q, k, v, {gates}{h0}, save_checkpoints):"):
            em.line(f'"""q, k [B, T, H, K]; v [B, T, H, V]; {h0} [B, H, K, V] fp32 -> o [B, T, H, V] '
                    "(v's dtype),")
            em.line("the final state(s) [B, H, K, V] fp32 and, when saving, checkpoints [B, H, NC, K, V] "
                    '(else None)."""')
            em.line("B, T, H, K = k.shape")
            em.line("V = v.shape[-1]")
            em.line("BK, BV, warps = _config(K, V)")
            em.line("NV, NC = triton.cdiv(V, BV), triton.cdiv(T, CHUNK)")
            em.line("o = torch.empty_like(v)")
            for s in states:
                em.line(f"{s}t = torch.empty(B, H, K, V, dtype=torch.float32, device=v.device)")
                em.line(f"{s}c = torch.empty(B, H, NC, K, V, dtype=torch.float32, device=v.device) "
                        "if save_checkpoints else None")
            em.line("fused_recurrent_fwd_kernel[(NV, B * H)](")
            em.line(f"    q, k, v, {gates}{h0}, o, {', '.join(f'{s}t' for s in states)}, "
                    f"{', '.join(f'{s}c' for s in states)}, T,")
            em.line("    H=H, K=K, V=V, BK=BK, BV=BV, CHUNK=CHUNK, SAVE_CHECKPOINTS=save_checkpoints,")
            em.line("    num_warps=warps)")
            em.line(f"return o, {', '.join(f'{s}t' for s in states)}, {', '.join(f'{s}c' for s in states)}")
        em.gap()
        hc = ", ".join(f"{s}c" for s in states)
        dht = ", ".join(f"d{s}t" for s in states)
        with em.indent(f"def fused_recurrent_bwd(q, k, v, {gates}{hc}, do, {dht}):"):
            em.line('"""Gradients of q, k, v (their dtypes), of the gates (theirs) and of the initial '
                    'state(s) (fp32)."""')
            em.line("B, T, H, K = k.shape")
            em.line("V = v.shape[-1]")
            em.line("BK, BV, warps = _config(K, V)")
            em.line("NV = triton.cdiv(V, BV)")
            em.line("f32 = dict(dtype=torch.float32, device=v.device)")
            em.line("dq, dk = torch.empty(B, T, H, NV, K, **f32), torch.empty(B, T, H, NV, K, **f32)")
            em.line("dv = torch.empty(B, T, H, V, **f32)")
            for g in x.gates:
                shape = {"scalar": "B, T, H, NV", "key": "B, T, H, NV, K",
                         "value": "B, T, H, V"}[self.gate_axis(g)]
                em.line(f"{ident(g, 'dg')} = torch.empty({shape}, **f32)")
            for s in states:
                em.line(f"d{s}0 = torch.empty(B, H, K, V, **f32)")
                em.line(f"w{s} = torch.empty(B * H * NV, CHUNK, BK, BV, **f32)")
            em.line("fused_recurrent_bwd_kernel[(NV, B * H)](")
            em.line(f"    q, k, v, {gates}{hc}, do.contiguous(), "
                    f"{', '.join(f'd{s}t.contiguous()' for s in states)},")
            em.line(f"    dq, dk, dv, {self.gate_params('dg')}{', '.join(f'd{s}0' for s in states)}, "
                    f"{', '.join(f'w{s}' for s in states)}, T, NV,")
            em.line("    H=H, K=K, V=V, BK=BK, BV=BV, CHUNK=CHUNK, num_warps=warps)")
            outs = ["dq.sum(3).to(q.dtype)", "dk.sum(3).to(k.dtype)", "dv.to(v.dtype)"]
            for g in x.gates:
                d, gname = ident(g, "dg"), ident(g, "g")
                outs.append(f"{d}.sum(3).to({gname}.dtype)" if self.gate_axis(g) != "value"
                            else f"{d}.to({gname}.dtype)")
            outs += [f"d{s}0" for s in states]
            with em.indent("return ("):
                for out in outs:
                    em.line(f"{out},")
            em.line(")")

    def function(self) -> None:
        em = self.em
        gates = self.gate_params()
        states = self.state_args()
        h0 = ", ".join(f"{s}0" for s in states)
        with em.indent("class FusedRecurrentFunction(torch.autograd.Function):"):
            decorators(em, "forward")
            with em.indent(f"def forward(ctx, q, k, v, {gates}{h0}):"):
                em.line(f"outs = fused_recurrent_fwd(q, k, v, {gates}{h0}, "
                        "save_checkpoints=any(ctx.needs_input_grad))")
                n = len(states)
                em.line(f"o, finals, checkpoints = outs[0], outs[1:{1 + n}], outs[{1 + n}:]")
                em.line(f"ctx.save_for_backward(q, k, v, {gates}*checkpoints)")
                em.line("return (o, *finals)")
            em.gap(1)
            decorators(em, "backward")
            dht = ", ".join(f"d{s}t" for s in states)
            with em.indent(f"def backward(ctx, do, {dht}):"):
                first_order_only(em)
                em.line(f"return fused_recurrent_bwd(*ctx.saved_tensors, do, {dht})")

    def public(self) -> None:
        em, lv, x = self.em, self.lv, self.x
        name = ident(lv.name, "level")
        kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
        with em.indent(f"def {name}(q, k, v, *, {kw}initial_state=None, output_final_state=False):"):
            em.line(f'"""Level {comment(lv.name)!r}, fused recurrent (Triton). q, k: [B, T, H, K]; '
                    "v: [B, T, H, V];")
            em.line(f"gates {', '.join(lv.gates) or '(none)'}: [B, T, H] or [B, T, H, K|V]; "
                    "any float dtype (computed in fp32).")
            state = "(S, M), each [B, H, K, V]" if self.momentum else "S [B, H, K, V]"
            em.line(f"initial_state: {state} (default: the reference's initial_state).")
            em.line(f'Returns (o [B, T, H, V] in v\'s dtype, final state {state} float32, or None)."""')
            em.line("B = k.shape[0]")
            em.line("state = initial_state if initial_state is not None else "
                    "default_state(B, torch.float32, k.device)")
            em.line("state = (state,) if torch.is_tensor(state) else tuple(state)")
            em.line("state = [s.to(torch.float32).contiguous() for s in state]")
            unused = [g for g in lv.gates if g not in x.gates]
            if unused:
                em.line(f"# gate(s) {comment(', '.join(unused))}: not read by this level's step")
            args = "".join(f"{ident(g, 'g')}.contiguous(), " for g in x.gates)
            em.line("o, *final = FusedRecurrentFunction.apply(")
            em.line(f"    q.contiguous(), k.contiguous(), v.contiguous(), {args}*state)")
            em.line("return o, (_pack(tuple(final)) if output_final_state else None)")


def _show(expr) -> str:
    return comment(str(expr).replace("gate_", "").replace(str(S.n), "n"))


def _times(coeff: str, x: str) -> str:
    """coeff * x, dropping a factor of ±1."""
    if coeff in ("1.0", "(1.0)"):
        return x
    if coeff in ("-1.0", "(-1.0)"):
        return f"-{x}"
    return f"{coeff} * {x}"


def _join(terms: list[str]) -> str:
    out = terms[0]
    for t in terms[1:]:
        out += f" - {t[1:]}" if t.startswith("-") else f" + {t}"
    return out
