"""Render a matrix- or vector-memory level as fused recurrent Triton kernels (decoding and short
sequences): `level_<name>_triton.py`, a real file in the cache (Triton reads kernel source from disk).
A vector memory m [V] (M(x) = x ⊙ m, K = V) is a state tile of one row [1, BV] whose key channel j is
value channel j: key-side blocks broadcast along the row instead of down the column.

The file stacks four layers, as fla's `fused_recurrent.py` does: `@triton.jit` kernels (one program
per batch, head and block of value channels; the state tile [BK, BV] stays in registers for the whole
sequence, fp32) -> launchers (blocks, allocation, grid) -> a `torch.autograd.Function` -> the public
`level_<name>` with the reference op's signature, state layout and return convention.

What one token does is printed from the level's derived rules (sympy -> `triton_printer`): the bias
gradient d = dℓ/dy, elementwise in the error e = Pᵀk - v (or in e and r = ||e||, or free of the
state; or summed over an omega window's tokens, `triton_recurrent_window`), the learning rate and
momentum factor (muon: Newton-Schulz on the whole momentum matrix, `triton_newton_schulz`), and the
retention's elementwise map S = R(S0, s) (elastic net's soft threshold as its branches,
`soft_threshold`), or KL's S = mass·softmax(z) over one axis of the tile with z = R(log S0, s), or DGD's
S = R(S0, s) - lr k (kᵀ S0) (every key channel is in the tile, so kᵀ S0 is one reduction over it), or
an FTRL accumulator A = decay·A + s read through W = psi(A) (lq's mirror maps with the norm of the
whole state; `triton_recurrent_maps` has the softmax and psi).
The gradient point is the state before the token, the retained state, or (`gradient chunk_start(C)`)
F, the state entering the token's gradient chunk: a second tile, set at each chunk's first token;
the backward sums every token's ∂/∂F and hands it to the state at that first token. The retentions
applied at chunk boundaries (MATH.md §3.7) step so too: KL's lag token (the softmax step at a chunk's
first token, z's coefficients on S itself at the others, F the state after it) and lq's map (W =
c·A within a chunk, c the map's slope from the A entering it: a third tile, whose gradient is summed
over the chunk and taken through the slope at its first token).
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

from . import triton_newton_schulz as newton_schulz
from .emitter import Emitter, comment, ident, where
from .triton_printer import diff, join, times, to_triton
from .triton_recurrent_maps import RetentionMaps
from .triton_recurrent_window import OmegaWindow


def unsupported(rules: LevelRules) -> str | None:
    """Why the fused recurrent kernels cannot run this level, or None when they can."""
    lv, ret = rules.level, rules.retention
    if lv.memory.kind not in ("matrix", "vector"):
        return f"a {lv.memory.kind} memory: the fused recurrent kernels hold a matrix state [K, V] or a vector [V]"
    if lv.period is None:
        return "update outer: the memory does not learn in context, so there is no recurrence to fuse"
    if rules.accumulator and lv.grad_at == "retained":
        return "an accumulator's gradient at the retained state is not in the fused recurrent kernels"
    if lv.target == "self" or lv.init_from is not None:
        return "a self-generated target or a restart (init from) is not in the fused recurrent kernels"
    if not rules.accumulator and ret.form not in ("elementwise", "implicit", "threshold", "softmax", "dgd"):
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
        # FTRL (ftrl, lq): the state is the accumulator A_t = decay·A_(t-1) + s_t (w0 stands for A),
        # read through the weights W = psi(A): elementwise in A, or (mirror maps) in A and N = ||A||_p
        self.accumulator, self.psi = rules.accumulator, None
        self.mirror = rules.retention.form == "mirror"
        if self.accumulator:
            self.retain = rules.accumulator_decay() * S.w0 + S.s
            self.psi = rules.retention.new if self.mirror else S.A
            if rules.retention.form == "threshold":  # elastic net: of the centre at w0 = 0, s = A
                self.psi = soft_threshold(rules.retention_new().subs({S.w0: 0, S.s: S.A}), rules.threshold())
            self.norm_p = sympy.sympify(rules.retention.norm_p) if self.mirror else None
        else:
            self.retain = S.w0 + S.s if self.implicit else rules.retention_new()   # R(w0, s)
            if rules.retention.form == "threshold":  # elastic net: the soft threshold of the smooth centre
                self.retain = soft_threshold(self.retain, rules.threshold())
        # psi that reads gates (at the token that made A) has none before the first token: W_(-1) = A_(-1)
        self.psi_gated = self.accumulator and bool(ir.gate_names(self.psi))
        self.dgd = rules.retention.form == "dgd"  # S = retain(S0, s) - lr k (kᵀ S0): delta gradient descent
        # KL: S = mass·softmax(z) over each column's key channels (axis row) or each row's value
        # channels (axis column), z = retain(log S0, s) affine in both; retain holds z then
        self.softmax = rules.retention.form == "softmax"
        if self.softmax:  # over axis 0 or 1 of the state tile [BK, BV]; a vector's, [1, BV]: its V channels
            self.axis = 0 if lv.retention.args["axis"] == "row" and lv.memory.kind == "matrix" else 1
            self.mass = float(lv.retention.args["mass"])
        # kl(apply = chunk), the lag token: within a gradient chunk, z's coefficients on S itself
        self.within = self.retain.subs(S.lw0, S.w0) if lv.lag_token else None
        # lq(apply = chunk): within a gradient chunk W = slope·A, the map's slope at its start's A and N
        self.slope = sympy.sympify(rules.retention.slope) if lv.maps_at_chunks else None
        if self.slope is not None and ir.gate_names(self.slope):
            raise NotImplementedError("a map slope that reads gates is not in the fused recurrent kernels")
        self.lr = sympy.sympify(rules.retention_new() if self.implicit else rules.lr)
        self.beta = sympy.sympify(lv.algorithm.args["beta"]) if lv.algorithm.kind in ("momentum", "muon") else None
        self.state_free = not (self.grad.free_symbols & {S.e, S.r})
        self.norm = S.r in self.grad.free_symbols
        # omega: u_t = Σ_(i = t-WINDOW+1 .. t) gamma_i k_i d_i^T, every d_i at the state token t reads
        self.window = int(lv.bias.args["window"]) if lv.bias.kind == "omega" else 0
        self.gamma = sympy.sympify(lv.bias.args["gamma"]) if self.window else None
        used = [x for x in (self.grad, self.retain, self.lr, self.beta, self.psi, self.gamma) if x is not None]
        self.gates = sorted(set().union(*(ir.gate_names(x) for x in used)))
        self.window_gates = sorted(set(ir.gate_names(self.grad)) | set(ir.gate_names(self.gamma))) \
            if self.window else []


def soft_threshold(centre, threshold) -> sympy.Expr:
    """sign(c)·max(|c| - t, 0) as branches, which sympy differentiates branch by branch; a branch
    holds at |c| = t as well, where the reference's clamp_min passes its gradient through."""
    return sympy.Piecewise((centre - threshold, centre >= threshold), (centre + threshold, centre <= -threshold),
                           (0, True))


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


class _Renderer(RetentionMaps, OmegaWindow):
    def __init__(self, rules: LevelRules, model: str, file: str):
        self.lv, self.x = rules.level, _Exprs(rules)
        self.model, self.file = model, file
        # a vector memory m [V], M(x) = x ⊙ m (K = V): the tile is one row [1, BV], key channel j is
        # value channel j, so key-side blocks broadcast along the row and reduce over nothing
        self.vector = self.lv.memory.kind == "vector"
        self.momentum = self.lv.algorithm.kind == "momentum"
        self.muon = self.lv.algorithm.kind == "muon"  # M_t = beta M_(t-1) + u_t, s_t = -lr NS(M_t)
        self.steps = int(self.lv.algorithm.args["steps"]) if self.muon else 0
        self.period = self.lv.period  # reads see the state committed every PERIOD tokens
        self.retained = self.lv.grad_at == "retained"
        # KL's lag token (MATH.md §3.7): the softmax step at each gradient chunk's first token t0 (its
        # gradient at S_(t0-1)), the affine step on S itself at the others (their gradients at F = S_t0)
        self.lag = self.lv.lag_token
        self.maps = self.lv.maps_at_chunks  # lq(apply = chunk): W = slope(A_(t0-1))·A_t within a chunk
        # gradients at F, the state entering each gradient chunk of GRAD_CHUNK tokens (`chunk_start`)
        self.frozen = self.lv.grad_at == "chunk" and not self.x.state_free and not self.lag
        self.point = (self.frozen or self.lag) and not self.x.state_free  # a tile F in the kernels
        self.after = self.lv.read == "after"
        self.em = Emitter()

    # ---- names ------------------------------------------------------------------------------
    def gate_axis(self, g: str) -> str:
        return self.lv.gate_axes[g]

    def kcol(self, name: str) -> str:
        """A key-side block [BK] (a vector memory's: [BV]) broadcast against the state tile."""
        return f"{name}[None, :]" if self.vector else f"{name}[:, None]"

    def ksum(self, tile: str) -> str:
        """A tile reduced to a key-side block: over value channels (a vector memory's: its one row)."""
        return f"tl.sum({tile}, {0 if self.vector else 1})"

    def tile_names(self) -> dict:
        """Names in the state tile's context [BK, BV]: gates broadcast by their channel axis."""
        view = {"scalar": "", "key": self.kcol(""), "value": "[None, :]"}
        names = {ir.gate_symbol(g): ident(g, "b_g") + view[self.gate_axis(g)] for g in self.x.gates}
        return names | {S.w0: "b_h", S.s: "b_s", S.n: "b_n", S.lw0: "b_lw"}

    def value_names(self, sfx: str = "") -> dict:
        """Names in the value channels' context [BV] (the bias gradient); `sfx` "i": a window token's."""
        names = {ir.gate_symbol(g): ident(g, "b_g" + sfx) for g in self.x.gates}
        return names | {S.e: f"b_e{sfx}", S.r: f"b_r{sfx}", S.v: f"b_v{sfx}"}

    def tile(self, expr) -> str:
        return to_triton(sympy.sympify(expr), self.tile_names())

    def vec(self, expr, sfx: str = "") -> str:
        return to_triton(sympy.sympify(expr), self.value_names(sfx))

    def state_args(self) -> list[str]:
        """The state tensors' short names: h (S, or an accumulator's A) and, with momentum, m (M)."""
        return ["h", "m"] if self.momentum or self.muon else ["h"]

    def saved_args(self) -> list[str]:
        """What the forward checkpoints: the state, an accumulator's weights w (W) and, with an update
        period, the committed tile rd (C) that reads see; with gradients at chunk starts, their point fz
        (F), and with lq's map at chunk starts, its slope sc (c)."""
        return self.state_args() + (["w"] if self.x.accumulator else []) + (["rd"] if self.period > 1 else []) + \
            (["fz"] if self.point else []) + (["sc"] if self.maps else [])

    def gpu_run(self) -> bool:
        """Whether kernels of this kind have run on a GPU: not yet those with KL's softmax, DGD, elastic
        net's threshold, an accumulator, muon, an omega window, an update period or gradients at chunk
        starts, or a vector memory."""
        x = self.x
        return not (x.softmax or x.dgd or x.accumulator or self.muon or x.window or self.period > 1 or
                    self.chunked() or self.vector or self.lv.retention.kind == "elastic")

    def level_params(self) -> str:
        """The kernels' constexpr parameters that depend on the level: muon's orientation flag TALL
        (Newton-Schulz transposes a state with K > V), omega's WINDOW, the update PERIOD and the
        GRAD_CHUNK of gradients at chunk starts."""
        return "".join(f" {name}: tl.constexpr," for name in self.level_constants())

    def level_args(self) -> str:
        return "".join(f" {name}={'K > V' if name == 'TALL' else name}," for name in self.level_constants())

    def chunked(self) -> bool:
        """Whether the kernels step by gradient chunks: a gradient point F, a lag token or a map slope."""
        return self.frozen or self.lag or self.maps

    def level_constants(self) -> list[str]:
        return [name for name, used in (("TALL", self.muon), ("WINDOW", self.x.window), ("PERIOD", self.period > 1),
                                        ("GRAD_CHUNK", self.chunked())) if used]

    def output_tile(self) -> str:
        """The tile o_t reads: the committed C (every PERIOD tokens the read tile) or the read tile."""
        return "b_rd" if self.period > 1 else self.read_tile()

    def commit(self) -> None:
        """C_t = the read tile at each period's last token, else C_(t-1)."""
        self.em.line(f"b_rd = tl.where((t + 1) % PERIOD == 0, {self.read_tile()}, b_rd)  # commit every PERIOD tokens")

    def read_tile(self) -> str:
        """The tile a token reads and takes its gradient at: S, or an accumulator's weights W."""
        return "b_w" if self.x.accumulator else "b_h"

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
        if not self.gpu_run():
            em.line("AUTO = False  # checked under Triton's interpreter, not yet on a GPU: mode='auto' leaves these "
                    "kernels to mode='triton'")
            em.line()
        em.line("# Launch configuration, kept apart from the kernels (results do not depend on it).")
        em.line("BV_MAX = 16  # value channels per program" +
                (" (not here: ||e|| needs every value channel in one program)" if self.x.norm else ""))
        em.line("WARP_TILE = 512  # state-tile elements per warp (16 per thread)")
        em.line("MAX_WARPS = 16")
        em.line("CHUNK = 64  # tokens between saved states: the backward recomputes one chunk at a time")
        if self.muon:
            em.line("MUON_MAX = 64  # the largest K, V: at 128 Newton-Schulz's tl.dot operands outgrow a block's "
                    "shared memory")
        if self.period > 1:
            em.line()
            em.line(f"PERIOD = {self.period}  # the level's update period: reads see the state committed every PERIOD tokens")
        if self.x.window:
            em.line()
            em.line(f"WINDOW = {self.x.window}  # the level's omega window: the tokens whose gradients each step sums")
        if self.chunked():
            em.line()
            em.line(f"GRAD_CHUNK = {self.lv.grad_chunk}  # gradients at the state entering each GRAD_CHUNK tokens" +
                    (" (after its first)" if self.lag else ""))
        em.gap()
        if self.muon:
            newton_schulz.helpers(em)
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
        em.line("Per token t (a vector memory S [V], M(x) = x ⊙ S: read P^T k below as P ⊙ k, k d^T as k ⊙ d):"
                if self.vector else "Per token t (row convention, S [K, V]):")
        at = "R(S_(t-1), 0)  (the retained state)" if self.retained else ("W_(t-1)" if x.accumulator else "S_(t-1)")
        note = "the gradient point"
        if self.lag:
            at = (f"S_(t-1) at a gradient chunk's first token t0 (t % {self.lv.grad_chunk} == 0, the lag token), "
                  "else F = S_t0")
        elif self.frozen:
            at = f"{at.replace('t-1', 't0-1')},  t0 = {self.lv.grad_chunk}·floor(t / {self.lv.grad_chunk})"
            note += ": the state entering t's gradient chunk, F"
        em.line(f"  P_t = {at}  ({note})")
        if x.state_free:
            em.line(f"  d_t = dℓ/dy = {_show(x.grad)}  (free of the state)")
        else:
            em.line("  e_t = P_t^T k_t - v_t" + (",  r_t = ||e_t||" if x.norm else ""))
            em.line(f"  d_t = dℓ/dy = {_show(x.grad)}")
        lr = _show(x.lr) + ("  (n = ||k_t||^2)" if x.implicit else "")
        if self.momentum:
            em.line("  M_t = beta_t M_(t-1) - lr_t k_t d_t^T,  s_t = M_t;  "
                    f"lr = {lr}, beta = {_show(x.beta)}")
        elif self.muon:
            em.line(f"  M_t = beta_t M_(t-1) + k_t d_t^T,  s_t = -lr_t NS_{self.steps}(M_t) (Newton-Schulz);  "
                    f"lr = {lr}, beta = {_show(x.beta)}")
        else:
            em.line(f"  s_t = -lr_t k_t d_t^T;  lr = {lr}")
        if x.softmax:
            over = "key channels (each column)" if x.axis == 0 else "value channels (each row)"
            em.line(f"  S_t = {x.mass!r}·softmax(z) over {over},  z = {_show(x.retain)},")
            em.line("        w0 = S_(t-1), lw0 = log(max(w0, 1e-30))" + (
                "  at t0 only; at the chunk's other tokens" if self.lag else ""))
            if self.lag:
                em.line(f"  S_t = {_show(x.within)}  (z's coefficients on S itself)")
        elif x.dgd:
            em.line(f"  S_t = R(S_(t-1), s_t) - lr_t k_t (k_t^T S_(t-1)),  R = {_show(x.retain)}  (DGD)")
        elif x.accumulator:
            em.line(f"  A_t = {_show(x.retain.subs(S.w0, S.A))}  (the accumulator; the state S is A)")
            p = _show(sympy.nsimplify(x.norm_p)) if x.mirror else None
            norm = f",  N = ||A_t||_{p}" if x.mirror else ""
            if self.maps:
                em.line(f"  W_t = c·A_t,  c = {_show(x.slope)} at N = ||A_(t0-1)||_{p}  (psi's slope at "
                        "the gradient chunk's start, held for the chunk)")
            else:
                em.line(f"  W_t = psi(A_t) = {_show(x.psi)}{norm}")
        else:
            em.line(f"  S_t = R(S_(t-1), s_t) = {_show(x.retain)}  (elementwise)")
        read = ('W_t' if self.after else 'W_(t-1)') if x.accumulator else ('S_t' if self.after else 'S_(t-1)')
        if self.period > 1:
            em.line(f"  C_t = {read.replace('_(t-1)', '_t')} where (t + 1) % {self.period} == 0, else C_(t-1);  "
                    f"C_(-1) = {read.replace('_t', '_(-1)').replace('_(t-1)', '_(-1)')}  (the committed state)")
            read = "C_t" if self.after else "C_(t-1)"
        em.line(f"  o_t = {read}^T q_t")
        em.line("Grid: one program per (block of BV value channels, batch x head); the state tile [BK, BV]")
        em.line("stays in registers for all T tokens. The forward saves the state every CHUNK tokens; the")
        em.line("backward recomputes each chunk's states into a per-program buffer and walks it backwards.")
        em.line("Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; scalar gates [B, T, H]; vector gates")
        state = "(S, M), each" if len(self.state_args()) == 2 else "S"
        em.line(f"[B, T, H, K or V]. State: {state} [B, H, {self.dims()}], float32.")
        em.line('"""')

    # ---- kernels ----------------------------------------------------------------------------
    def gate_params(self, prefix: str = "g") -> str:
        return "".join(f"{ident(g, prefix)}, " for g in self.x.gates)

    def prologue(self) -> None:
        em = self.em
        em.line("i_v, i_bh = tl.program_id(0), tl.program_id(1)")
        em.line("i_b, i_h = i_bh // H, i_bh % H")
        if self.vector:
            em.line("o_v = i_v * BV + tl.arange(0, BV)")
            em.line("m_v = o_v < V")
            em.line("o_k, m_k = o_v, m_v  # M(x) = x ⊙ m: key channel j is value channel j")
            em.line("m_h = m_v[None, :]")
            em.line("o_h = o_v[None, :]  # the tile [1, BV]: its offsets in one state m [V]")
        else:
            em.line("o_k = tl.arange(0, BK)")
            em.line("o_v = i_v * BV + tl.arange(0, BV)")
            em.line("m_k, m_v = o_k < K, o_v < V")
            em.line("m_h = m_k[:, None] & m_v[None, :]")
            em.line("o_h = o_k[:, None] * V + o_v[None, :]  # the tile's offsets in one [K, V] state")
        em.line(f"o_s = i_bh.to(tl.int64) * {self.size()}  # this (batch, head)'s state")

    def dims(self) -> str:
        """The shape of one state after [B, H]: K, V, or a vector memory's V."""
        return "V" if self.vector else "K, V"

    def size(self) -> str:
        """Entries of one state: K * V, or a vector memory's V."""
        return "V" if self.vector else "(K * V)"

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

    def gate_load(self, g: str, row: str = "i_t") -> str:
        p = ident(g, "g")
        at = {"scalar": f"{p} + {row}", "key": f"{p} + {row} * K + o_k, mask=m_k, other=0.0",
              "value": f"{p} + {row} * V + o_v, mask=m_v, other=0.0"}[self.gate_axis(g)]
        return f"tl.load({at}).to(tl.float32)"

    def bias_gradient(self, a: str, sfx: str, c) -> None:
        """b_d<sfx> [BV] = dℓ/dy of the token whose key and value are b_k<sfx>, b_v<sfx>, read at the
        gradient point `a`."""
        em, x = self.em, self.x
        if not x.state_free:
            em.line(f"b_y{sfx} = tl.sum({a} * {self.kcol('b_k' + sfx)}, 0)" + c("# [BV]: y = P_t^T k"))
            e = f"b_y{sfx} - b_v{sfx}"
            em.line(f"b_e{sfx} = {f'tl.where(m_v, {e}, 0.0)' if x.norm else e}" + c("# e"))
        if x.norm:
            em.line(f"b_norm{sfx} = tl.sqrt(tl.sum(b_e{sfx} * b_e{sfx}))")
            em.line(f"b_r{sfx} = tl.maximum(b_norm{sfx}, 1e-12)" + c("# r = ||e||, clamped as the reference does"))
        em.line(f"b_d{sfx} = {self.vec(x.grad, sfx)}" + c(f"{where(self.lv.bias.span) or '#'} [BV]: d = dℓ/dy".strip()))

    def bias_gradient_back(self, sfx: str) -> None:
        """From b_dd<sfx> = ∂/∂d: b_de<sfx> (where d reads the state) and b_dv<sfx>."""
        em, x = self.em, self.x
        dv = []
        if not x.state_free:
            em.line(f"b_de{sfx} = {times(self.vec(diff(x.grad, S.e), sfx), f'b_dd{sfx}')}  # through d = dℓ/dy(e, ...)")
            if x.norm:
                em.line(f"b_dr{sfx} = tl.sum({times(self.vec(diff(x.grad, S.r), sfx), f'b_dd{sfx}')})")
                em.line(f"b_de{sfx} += tl.where(b_norm{sfx} > 1e-12, b_dr{sfx} / b_r{sfx}, 0.0) * b_e{sfx}  "
                        "# ∂r/∂e = e / r")
            dv.append(f"-b_de{sfx}")
        dgv = diff(x.grad, S.v)
        if dgv != 0:
            dv.insert(0, times(self.vec(dgv, sfx), f"b_dd{sfx}"))
        em.line(f"b_dv{sfx} = {join(dv) if dv else 'tl.zeros([BV], dtype=tl.float32)'}")

    def step(self, new: str, new_m: str, comments: bool) -> None:
        """One token's forward: from b_h (and b_m) to `new` (and `new_m`)."""
        em, lv, x = self.em, self.lv, self.x
        c = (lambda text: f"  {text}") if comments else (lambda text: "")
        if comments:
            em.line(f"{where(lv.span)} level {comment(lv.name)}".strip())
        a = self.read_tile()
        if self.retained and not x.state_free:  # the checker allows it after a decay only (elementwise)
            em.line(f"b_a = {self.tile(x.retain.subs(S.s, 0))}" +
                    c(f"{where(lv.retention.span) or '#'} P_t: the retained state".strip()))
            a = "b_a"
        if self.frozen:
            em.line(f"b_fz = tl.where(t % GRAD_CHUNK == 0, {a}, b_fz)" +
                    c("# F: a gradient chunk starts at t, its gradients at the state entering it"))
            a = "b_fz"
        elif self.lag:
            em.line("b_lag = t % GRAD_CHUNK == 0" +
                    c("# the lag token: the exact softmax step, its gradient at S_(t-1)"))
            if self.point:
                em.line(f"b_p = tl.where(b_lag, {a}, b_fz)" + c("# the chunk's other tokens: at F, the state after it"))
                a = "b_p"
        if x.window:
            self.window_gradient(a, c)
        else:
            self.bias_gradient(a, "", c)
        if x.implicit:
            em.line("b_n = tl.sum(b_k * b_k)" + c("# n = ||k_t||^2"))
        em.line(f"b_lr = {self.tile(x.lr)}" + c(f"{where(lv.algorithm.span) or '#'} lr_t".strip()))
        if not x.window:
            em.line(f"b_u = {self.kcol('b_k')} * b_d[None, :]" + c("# [BK, BV]: u_t = k_t d_t^T, the bias gradient"))
        if self.momentum:
            em.line(f"{new_m} = {times(self.tile(x.beta), 'b_m')} - b_lr * b_u" +
                    c("# M_t = beta_t M_(t-1) - lr_t u_t"))
            em.line(f"b_s = {new_m}")
        elif self.muon:  # padded entries kept 0: Newton-Schulz mixes the whole tile
            em.line(f"{new_m} = tl.where(m_h, {times(self.tile(x.beta), 'b_m')} + b_u, 0.0)" +
                    c("# M_t = beta_t M_(t-1) + u_t"))
            em.line(f"b_s = -b_lr * {newton_schulz.forward(em, new_m, self.steps, comments)}" +
                    c("# s_t = -lr_t NS(M_t)"))
        else:
            em.line("b_s = -b_lr * b_u" + c("# s_t = -lr_t u_t"))
        if x.softmax:
            if comments:
                em.line(f"{where(lv.retention.span) or '#'} S_t = R(S_(t-1), s_t) = mass·softmax(z)".strip())
            self.softmax("b_sl" if self.lag else new, x.retain, " = retain(log S_(t-1), s_t)" if comments else "")
            if self.lag:
                em.line(f"{new} = tl.where(b_lag, b_sl, {self.tile(x.within)})" +
                        c("# within a chunk: z's coefficients on S itself"))
                if self.point:
                    em.line(f"b_fz = tl.where(b_lag, {new}, b_fz)" + c("# F = S_t0, after the lag token"))
        elif x.dgd:
            em.line("b_kh = tl.sum(b_k[:, None] * b_h, 0)" + c("# [BV]: k_t^T S_(t-1)"))
            em.line(f"{new} = {self.tile(x.retain)} - b_lr * b_k[:, None] * b_kh[None, :]" +
                    c(f"{where(lv.retention.span) or '#'} S_t = S_(t-1) (decay I - lr k k^T) + s_t".strip()))
        elif x.accumulator:
            em.line(f"{new} = {self.tile(x.retain)}" +
                    c(f"{where(lv.retention.span) or '#'} A_t = decay A_(t-1) + s_t".strip()))
            self.weights(new.replace("b_h", "b_w"), new)
        else:
            em.line(f"{new} = {self.tile(x.retain)}" +
                    c(f"{where(lv.retention.span) or '#'} S_t = R(S_(t-1), s_t)".strip()))

    def map_at_chunk_start(self, comments: bool) -> None:
        """lq(apply = chunk): at a gradient chunk's first token, before its read and step, the map's
        slope from A_(t-1) (held for the chunk) and W_(t-1) = slope·A_(t-1)."""
        if not self.maps:
            return
        em, c = self.em, (lambda text: f"  {text}") if comments else (lambda text: "")
        em.line("b_cs = t % GRAD_CHUNK == 0" + c("# a gradient chunk starts: the map runs on A_(t-1)"))
        if self.x.mirror:
            self.norm("b_h")
        em.line(f"b_sc = tl.where(b_cs, tl.where(m_h, {self.psi_tile(self.x.slope, 'b_h')}, 0.0), b_sc)" +
                c("# the map's slope, held for the chunk"))
        em.line("b_w = tl.where(b_cs, b_sc * b_h, b_w)" + c("# W_(t-1) = slope·A_(t-1)"))

    def forward_kernel(self) -> None:
        em = self.em
        state_in = ", ".join(f"{s}0" for s in self.state_args())
        state_out = ", ".join(f"{s}t" for s in self.state_args())
        checkpoints = ", ".join(f"{s}c" for s in self.saved_args())
        em.line('@triton.jit(do_not_specialize=["T"])')
        with em.indent("def fused_recurrent_fwd_kernel("):
            em.line(f"q, k, v, {self.gate_params()}{state_in},  # inputs; states [B, H, K, V] fp32")
            em.line(f"o, {state_out}, {checkpoints},  # o [B, T, H, V]; final states; checkpoints "
                    "[B, H, NC, K, V]")
            em.line("T,")
            em.line("H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, "
                    "BV: tl.constexpr,")
            em.line("CHUNK: tl.constexpr, SAVE_CHECKPOINTS: tl.constexpr," + self.level_params())
        with em.indent("):"):
            em.line('"""Program (i_v, i_bh): value channels [i_v BV, (i_v + 1) BV) of batch x head i_bh, '
                    "all T tokens."
                    '"""')
            self.prologue()
            em.line("NC = tl.cdiv(T, CHUNK)")
            for s in self.state_args():
                em.line(f"b_{s} = tl.load({s}0 + o_s + o_h, mask=m_h, other=0.0)")
            if self.maps:
                em.line("b_sc = tl.zeros([BK, BV], dtype=tl.float32)  # the map's slope: token 0 sets it")
                em.line("b_w = b_h  # W_(-1): token 0 maps it")
            elif self.x.psi_gated:
                em.line("b_w = b_h  # psi reads gates: the first token reads A itself")
            elif self.x.accumulator:
                self.weights("b_w", "b_h")
            if self.period > 1:
                em.line(f"b_rd = {self.read_tile()}  # C: what reads see, committed every PERIOD tokens")
            if self.point:
                em.line(f"b_fz = {self.read_tile()}  # F: the gradient point, set at each gradient chunk's start")
            with em.indent("for t in range(0, T):"):
                with em.indent("if SAVE_CHECKPOINTS:"):
                    with em.indent("if t % CHUNK == 0:  # the state entering this chunk"):
                        em.line(f"o_c = (i_bh * NC + t // CHUNK).to(tl.int64) * {self.size()}")
                        for s in self.saved_args():
                            em.line(f"tl.store({s}c + o_c + o_h, b_{s}, mask=m_h)")
                self.load_token(grads=False)
                self.map_at_chunk_start(comments=True)
                read = self.output_tile()
                if not self.after:
                    em.line(f"b_o = tl.sum({read} * {self.kcol('b_q')}, 0)  # o_t = S_(t-1)^T q_t: read before write")
                self.step("b_h", "b_m", comments=True)
                if self.period > 1:
                    self.commit()
                if self.after:
                    em.line(f"b_o = tl.sum({read} * {self.kcol('b_q')}, 0)  # o_t = S_t^T q_t")
                em.line("tl.store(o + i_t * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)")
            for s in self.state_args():
                em.line(f"tl.store({s}t + o_s + o_h, b_{s}, mask=m_h)")

    def backward_kernel(self) -> None:
        em, x = self.em, self.x
        states, saved = self.state_args(), self.saved_args()
        em.line('@triton.jit(do_not_specialize=["T"])')
        with em.indent("def fused_recurrent_bwd_kernel("):
            em.line(f"q, k, v, {self.gate_params()}{', '.join(f'{s}c' for s in saved)},  "
                    "# inputs; checkpoints [B, H, NC, K, V]")
            em.line(f"do, {', '.join(f'd{s}t' for s in states)},  # gradients of o and of the final states")
            keys = "[B, T, H, K]: each value block owns its channels" if self.vector else \
                "[B, T, H, NV, K]: per value block"
            em.line(f"dq, dk, dv, {self.gate_params('dg')}{', '.join(f'd{s}0' for s in states)},  # dq, dk {keys}")
            em.line(f"{', '.join(f'w{s}' for s in saved)},  # [B * H * NV, CHUNK, BK, BV]: one chunk's "
                    "states, per program")
            em.line("T, NV,")
            em.line("H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, "
                    "BV: tl.constexpr,")
            em.line("CHUNK: tl.constexpr," + self.level_params())
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
            if x.accumulator:
                em.line("b_dw = tl.zeros([BK, BV], dtype=tl.float32)  # ∂/∂W_t: the weights are not returned")
            if self.period > 1:
                em.line("b_drd = tl.zeros([BK, BV], dtype=tl.float32)  # ∂/∂C_t: nor is the committed tile")
            if self.point:
                em.line("b_dfz = tl.zeros([BK, BV], dtype=tl.float32)  # ∂/∂F: the gradient chunk's tokens so far")
            if self.maps:
                em.line("b_dsc = tl.zeros([BK, BV], dtype=tl.float32)  # ∂/∂slope: the chunk's tokens so far")
            em.line("NC = tl.cdiv(T, CHUNK)")
            with em.indent("for i_n in range(0, NC):"):
                em.line("i_c = NC - 1 - i_n")
                em.line("t0 = i_c * CHUNK")
                em.line("L = tl.minimum(T - t0, CHUNK)")
                em.line(f"o_c = (i_bh * NC + i_c).to(tl.int64) * {self.size()}")
                for s in saved:
                    em.line(f"b_{s} = tl.load({s}c + o_c + o_h, mask=m_h, other=0.0)")
                with em.indent("for j in range(0, L):  # recompute S_(t-1) of the chunk's tokens"):
                    em.line("t = t0 + j")
                    for s in saved:
                        em.line(f"tl.store(w{s} + o_p + j * (BK * BV) + o_w, b_{s})")
                    self.load_token(grads=False)
                    self.map_at_chunk_start(comments=False)
                    self.step("b_h", "b_m", comments=False)
                    if self.period > 1:
                        self.commit()
                em.line("tl.debug_barrier()")
                with em.indent("for j in range(0, L):  # token t, backwards"):
                    em.line("t = t0 + L - 1 - j")
                    for s in saved:
                        em.line(f"b_{s} = tl.load(w{s} + o_p + (L - 1 - j) * (BK * BV) + o_w)")
                    self.load_token(grads=True)
                    self.map_at_chunk_start(comments=False)
                    self.step("b_hn", "b_mn", comments=False)
                    self.step_backward()
                em.line("tl.debug_barrier()  # before the next chunk overwrites the buffer")
            if self.period > 1:
                em.line(f"{'b_dw' if x.accumulator else 'b_dh'} += b_drd  # C_(-1) is the read tile")
            if x.psi_gated:
                em.line("b_dh += b_dw  # the first token read A_(-1) itself")
            elif x.accumulator and not self.maps:  # (with maps at chunk starts, token 0 took it)
                em.line(f"b_h0 = tl.load(hc + (i_bh * NC).to(tl.int64) * {self.size()} + o_h, mask=m_h, other=0.0)  "
                        "# A_(-1): chunk 0's checkpoint")
                em.line(f"b_dh += {self.weights_back('b_h0', 'b_dw')}  # through W_(-1) = psi(A_(-1))")
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
                terms[g].append(times(printer(diff(expr, ir.gate_symbol(g))), by))

        new, d_new, d_base = ("b_wn", "b_dwn", "b_dw") if x.accumulator else ("b_hn", "b_dhn", "b_dh")
        what = "W_t" if x.accumulator else "S_t"
        if self.period > 1:  # o_t reads C_t, which is W_t where token t commits, else C_(t-1)
            em.line("b_cm = (t + 1) % PERIOD == 0  # token t commits: C_t = " + what)
            em.line(f"b_drdn = b_drd + {self.kcol('b_q')} * b_do[None, :]  # ∂/∂C_t: later tokens and o_t = C_t^T q_t"
                    if self.after else "b_drdn = b_drd  # ∂/∂C_t")
            if self.after:
                em.line(f"b_dq = {self.ksum(f'tl.where(b_cm, {new}, b_rd) * b_do[None, :]')}")
            em.line(f"{d_new} = {d_base} + tl.where(b_cm, b_drdn, 0.0)  # ∂/∂{what}")
            em.line("b_drd = tl.where(b_cm, 0.0, b_drdn)  # ∂/∂C_(t-1)")
        elif self.after:
            em.line(f"{d_new} = {d_base} + {self.kcol('b_q')} * b_do[None, :]  # ∂/∂{what}: later tokens and "
                    f"o_t = {what}^T q_t")
            em.line(f"b_dq = {self.ksum(f'{new} * b_do[None, :]')}")
        else:
            em.line(f"{d_new} = {d_base}  # ∂/∂{what}")
        if self.lag and self.point:
            em.line(f"{d_new} += tl.where(b_lag, b_dfz, 0.0)  # F = S_t0: the points of the chunk's other tokens")
            em.line("b_dfz = tl.where(b_lag, 0.0, b_dfz)")
        if self.maps:
            em.line("b_dhn = b_dh + b_sc * b_dwn  # ∂/∂A_t: later tokens and W_t = slope·A_t")
            em.line("b_dsc += b_hn * b_dwn  # ∂/∂slope, over the chunk's tokens")
        elif x.accumulator:
            em.line(f"b_dhn = b_dh + {self.weights_back('b_hn', 'b_dwn', norm=False)}  "
                    "# ∂/∂A_t: later tokens and W_t = psi(A_t)")
            gate_terms(x.psi, "b_dwn", printer=lambda e: self.psi_tile(e, "b_hn"))
        if x.softmax and self.lag:
            self.softmax_back("b_dz", "b_sl", "b_dhn")
            em.line("b_dz = tl.where(b_lag, b_dz, 0.0)  # through the softmax at the lag token only")
            em.line("b_dwi = tl.where(b_lag, 0.0, b_dhn)  # through S_t = within(S_(t-1), s_t) at the others")
            through_w0, through_s = (times(self.tile(diff(x.within, v)), "b_dwi") for v in (S.w0, S.s))
            em.line(f"b_dh = {join([self.through_log(x.retain, 'b_dz'), through_w0])}")
            em.line(f"b_ds = {join([times(self.tile(diff(x.retain, S.s)), 'b_dz'), through_s])}")
            gate_terms(x.retain, "b_dz")
            gate_terms(x.within, "b_dwi")
        elif x.softmax:
            self.softmax_back("b_dz", "b_hn", "b_dhn")
            em.line(f"b_dh = {self.through_log(x.retain, 'b_dz')}  # through S_t = mass·softmax(z)")
            em.line(f"b_ds = {times(self.tile(diff(x.retain, S.s)), 'b_dz')}")
            gate_terms(x.retain, "b_dz")
        else:
            em.line(f"b_dh = {times(self.tile(diff(x.retain, S.w0)), 'b_dhn')}  # through S_t = R(S_(t-1), s_t)")
            em.line(f"b_ds = {times(self.tile(diff(x.retain, S.s)), 'b_dhn')}")
            gate_terms(x.retain, "b_dhn")
        if x.dgd:  # through -lr k (k^T S_(t-1))
            em.line("b_kd = tl.sum(b_k[:, None] * b_dhn, 0)  # [BV]: k_t^T ∂/∂S_t")
            em.line("b_dh -= b_lr * b_k[:, None] * b_kd[None, :]")
            em.line("b_dkg = -b_lr * (tl.sum(b_dhn * b_kh[None, :], 1) + tl.sum(b_h * b_kd[None, :], 1))")
            if ir.gate_names(x.lr):
                em.line("b_dlr = -b_k[:, None] * b_kh[None, :] * b_dhn  # lr's share, as a tile")
        def buffer_back(into: str) -> None:
            """∂/∂M_t (b_dmn) from later tokens and `into`, then ∂/∂M_(t-1) through M_t = beta M_(t-1) + ..."""
            em.line(f"b_dmn = b_dm + {into}  # ∂/∂M_t")
            em.line(f"b_dm = {times(self.tile(x.beta), 'b_dmn')}")
            if ir.gate_names(x.beta):
                em.line("b_dbeta = b_m * b_dmn")
                gate_terms(x.beta, "b_dbeta")

        if self.muon:  # s_t = -lr NS(M_t), M_t = beta M_(t-1) + u_t
            em.line("b_dx = -b_lr * b_ds  # ∂/∂NS(M_t)")
            newton_schulz.backward(em, "b_dx", self.steps)
            buffer_back("b_dx")
            em.line("b_du = b_dmn")
            if ir.gate_names(x.lr):
                em.line(f"b_dlr = -b_x{self.steps} * b_ds")
                gate_terms(x.lr, "b_dlr")
        else:  # s_t = -lr u_t, or with momentum s_t = M_t = beta M_(t-1) - lr u_t
            if self.momentum:
                buffer_back("b_ds")
            step = "b_dmn" if self.momentum else "b_ds"
            em.line(f"b_du = -b_lr * {step}")
            if ir.gate_names(x.lr) or x.implicit:
                em.line(f"b_dlr -= b_u * {step}" if x.dgd else f"b_dlr = -b_u * {step}")
                gate_terms(x.lr, "b_dlr")
        a = "b_a" if self.retained else "b_fz" if self.frozen else "b_p" if self.point else self.read_tile()
        if x.window:
            em.line("b_dk = tl.zeros([BK], dtype=tl.float32)" + ("  # k_t's own: DGD's" if x.dgd else ""))
            if x.dgd:
                em.line("b_dk += b_dkg")
            self.window_backward(a)
        else:
            em.line(f"b_dk = {self.ksum('b_du * b_d[None, :]')}  # through u_t = k_t d_t^T")
            if x.dgd:
                em.line("b_dk += b_dkg")
            em.line(f"b_dd = tl.sum(b_du * {self.kcol('b_k')}, 0)")
            gate_terms(x.grad, "b_dd", vec_terms, self.vec)
            self.bias_gradient_back("")
            if not x.state_free:
                em.line(f"b_dk += {self.ksum(f'{a} * b_de[None, :]')}  # through y_t = P_t^T k_t")
                em.line(f"b_da = {self.kcol('b_k')} * b_de[None, :]")
        if x.accumulator and x.state_free:
            em.line("b_dw = tl.zeros([BK, BV], dtype=tl.float32)  # ∂/∂W_(t-1)")
        if self.frozen:  # b_da = ∂/∂F, the point of every token of the gradient chunk
            em.line("b_dfz += b_da")
            em.line(f"b_fs = t % GRAD_CHUNK == 0  # token t starts its gradient chunk: F = "
                    f"{what.replace('_t', '_(t-1)')}")
            into = "b_dw =" if x.accumulator else "b_dh +="  # an accumulator's ∂/∂W_(t-1) starts here
            em.line(f"{into} tl.where(b_fs, b_dfz, 0.0)")
            em.line("b_dfz = tl.where(b_fs, 0.0, b_dfz)  # ∂/∂F of the chunk before")
        elif self.lag and self.point:
            em.line("b_dh += tl.where(b_lag, b_da, 0.0)  # the lag token's point: S_(t-1)")
            em.line("b_dfz += tl.where(b_lag, 0.0, b_da)  # the others': F")
        elif not x.state_free:  # b_da = ∂/∂P_t
            if x.accumulator:
                em.line("b_dw = b_da  # ∂/∂W_(t-1)")
            elif self.retained:
                at_zero = x.retain.subs(S.s, 0)
                em.line(f"b_dh += {times(self.tile(diff(at_zero, S.w0)), 'b_da')}  "
                        "# through P_t = R(S_(t-1), 0)")
                gate_terms(at_zero, "b_da")
            else:
                em.line("b_dh += b_da")
        if x.implicit:
            em.line(f"b_dn = tl.sum({times(self.tile(diff(x.lr, S.n)), 'b_dlr')})")
            em.line("b_dk += 2.0 * b_dn * b_k  # through n = ||k_t||^2")
        if not self.after:
            read = self.output_tile()
            em.line(f"{read.replace('b_', 'b_d')} += {self.kcol('b_q')} * b_do[None, :]  # o_t = S_(t-1)^T q_t")
            em.line(f"b_dq = {self.ksum(f'{read} * b_do[None, :]')}")
        if self.maps:  # at a chunk start W_(t-1) = slope·A_(t-1), the slope from A_(t-1) too
            em.line("b_dws = tl.where(b_cs, b_dw, 0.0)  # ∂/∂W_(t-1) where the map ran at t")
            em.line("b_dsc += b_h * b_dws")
            em.line(f"b_dh += tl.where(b_cs, b_sc * b_dws + {self.weights_back('b_h', 'b_dsc', psi=self.x.slope)}, 0.0)"
                    "  # through W_(t-1) and the slope")
            em.line("b_dsc = tl.where(b_cs, 0.0, b_dsc)  # the chunk before: its own slope")
            em.line("b_dw = tl.where(b_cs, 0.0, b_dw)  # the old W_(t-1) is not read from t on")
        em.line("o_n = i_t * NV + i_v  # row of (token t, value block i_v) in the per-block partials")
        row = self.key_row("i_t", "o_n")
        em.line(f"tl.store(dq + {row} * K + o_k, b_dq, mask=m_k)")
        em.line(f"{self.put(f'dk + {row} * K + o_k', 'b_dk', 'm_k')}")
        if not x.window:  # a window adds each token's dv from the steps that read it
            em.line("tl.store(dv + i_t * V + o_v, b_dv, mask=m_v)")
        for g in x.gates:
            self.gate_gradient(g, tile_terms[g], vec_terms[g])

    def key_row(self, token: str, partial: str) -> str:
        """The row of a key-side gradient (dq, dk, a key gate's): the token's own row where each value
        block owns its key channels (a vector memory), else its row `partial` among the per-block
        partials [B, T, H, NV, K], summed after the kernel."""
        return token if self.vector else partial

    def put(self, at: str, value: str, mask: str | None) -> str:
        """A gradient's write: a store, or with a window an atomic add (later steps add their shares
        of earlier tokens; each row has one writing program)."""
        op = "tl.atomic_add" if self.x.window else "tl.store"
        return f"{op}({at}, {value}" + (f", mask={mask})" if mask else ")")

    def gate_gradient(self, g: str, tiles: list[str], vecs: list[str]) -> None:
        """Token t's share of gate g's gradient: from tile terms [BK, BV] and bias terms [BV]."""
        em, axis = self.em, self.gate_axis(g)
        if not tiles and not vecs:  # read by the window's bias only: added there
            return
        b, p = ident(g, "b_dg"), ident(g, "dg")
        tile = join(tiles) if tiles else None
        if axis == "scalar":
            parts = ([f"tl.sum({tile})"] if tile else []) + ([f"tl.sum({join(vecs)})"] if vecs else [])
            em.line(f"{b} = {' + '.join(parts)}  # gate {comment(g)}: over the tile")
            em.line(self.put(f"{p} + o_n", b, None))
        elif axis == "key":
            em.line(f"{b} = {self.ksum(tile)}  # gate {comment(g)}: over value channels")
            em.line(self.put(f"{p} + {self.key_row('i_t', 'o_n')} * K + o_k", b, "m_k"))
        else:
            parts = ([f"tl.sum({tile}, 0)"] if tile else []) + ([join(vecs)] if vecs else [])
            em.line(f"{b} = {' + '.join(parts)}  # gate {comment(g)}: over key channels")
            em.line(self.put(f"{p} + i_t * V + o_v", b, "m_v"))

    # ---- host side --------------------------------------------------------------------------
    def launchers(self) -> None:
        em, x = self.em, self.x
        gates = self.gate_params()
        states, saved = self.state_args(), self.saved_args()
        with em.indent("def _config(K, V):"):
            em.line('"""(BK, BV, warps): every key channel in one block, value channels in blocks of '
                    "BV_MAX, and")
            em.line('one warp per WARP_TILE elements of the state tile."""')
            if self.muon:
                with em.indent("if max(K, V) > MUON_MAX:"):
                    em.line('raise ValueError(f"muon\'s fused recurrent kernels hold the whole [K, V] state in one '
                            'program: K and V up to {MUON_MAX}, not {K} and {V} (mode=\'chunk\' or \'reference\' '
                            'run any size)")')
                em.line("BK, BV = max(16, triton.next_power_of_2(K)), max(16, triton.next_power_of_2(V))  "
                        "# Newton-Schulz: the whole state, in tl.dot's least block")
            else:
                em.line("BK = 1  # a vector memory: the state tile is one row" if self.vector else
                        "BK = triton.next_power_of_2(K)")
                if x.norm:
                    em.line("BV = triton.next_power_of_2(V)  # ||e|| reads every value channel")
                elif x.mirror:
                    em.line("BV = triton.next_power_of_2(V)  # the mirror map's norm spans the whole state")
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
                em.line(f"{s}t = torch.empty(B, H, {self.dims()}, dtype=torch.float32, device=v.device)")
            for s in saved:
                em.line(f"{s}c = torch.empty(B, H, NC, {self.dims()}, dtype=torch.float32, device=v.device) "
                        "if save_checkpoints else None")
            em.line("fused_recurrent_fwd_kernel[(NV, B * H)](")
            em.line(f"    q, k, v, {gates}{h0}, o, {', '.join(f'{s}t' for s in states)}, "
                    f"{', '.join(f'{s}c' for s in saved)}, T,")
            em.line("    H=H, K=K, V=V, BK=BK, BV=BV, CHUNK=CHUNK, SAVE_CHECKPOINTS=save_checkpoints," +
                    self.level_args())
            em.line("    num_warps=warps)")
            em.line(f"return o, {', '.join(f'{s}t' for s in states)}, {', '.join(f'{s}c' for s in saved)}")
        em.gap()
        hc = ", ".join(f"{s}c" for s in saved)
        dht = ", ".join(f"d{s}t" for s in states)
        with em.indent(f"def fused_recurrent_bwd(q, k, v, {gates}{hc}, do, {dht}):"):
            em.line('"""Gradients of q, k, v (their dtypes), of the gates (theirs) and of the initial '
                    'state(s) (fp32)."""')
            em.line("B, T, H, K = k.shape")
            em.line("V = v.shape[-1]")
            em.line("BK, BV, warps = _config(K, V)")
            em.line("NV = triton.cdiv(V, BV)")
            em.line("f32 = dict(dtype=torch.float32, device=v.device)")
            new = "torch.zeros" if x.window else "torch.empty"  # a window adds into its rows
            keys = "B, T, H, K" if self.vector else "B, T, H, NV, K"  # a vector memory: no partials
            em.line(f"dq, dk = torch.empty({keys}, **f32), {new}({keys}, **f32)")
            em.line(f"dv = {new}(B, T, H, V, **f32)")
            for g in x.gates:
                shape = {"scalar": "B, T, H, NV", "key": keys, "value": "B, T, H, V"}[self.gate_axis(g)]
                em.line(f"{ident(g, 'dg')} = {new}({shape}, **f32)")
            for s in states:
                em.line(f"d{s}0 = torch.empty(B, H, {self.dims()}, **f32)")
            for s in saved:
                em.line(f"w{s} = torch.empty(B * H * NV, CHUNK, BK, BV, **f32)")
            em.line("fused_recurrent_bwd_kernel[(NV, B * H)](")
            em.line(f"    q, k, v, {gates}{hc}, do.contiguous(), "
                    f"{', '.join(f'd{s}t.contiguous()' for s in states)},")
            em.line(f"    dq, dk, dv, {self.gate_params('dg')}{', '.join(f'd{s}0' for s in states)}, "
                    f"{', '.join(f'w{s}' for s in saved)}, T, NV,")
            em.line(f"    H=H, K=K, V=V, BK=BK, BV=BV, CHUNK=CHUNK,{self.level_args()} num_warps=warps)")
            summed = {"scalar": ".sum(3)", "key": "" if self.vector else ".sum(3)", "value": ""}  # over partials
            outs = [f"dq{summed['key']}.to(q.dtype)", f"dk{summed['key']}.to(k.dtype)", "dv.to(v.dtype)"]
            for g in x.gates:
                d, gname = ident(g, "dg"), ident(g, "g")
                outs.append(f"{d}{summed[self.gate_axis(g)]}.to({gname}.dtype)")
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
            state = f"(S, M), each [B, H, {self.dims()}]" if len(self.state_args()) == 2 else f"S [B, H, {self.dims()}]"
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


