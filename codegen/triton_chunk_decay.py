"""Render a decay-family level (linear attention, RetNet, Mamba2, GLA; MATH.md §3.1) as chunked Triton
kernels, forward and backward: `level_<name>_triton_chunk.py`.

S_t = Diag(a_t) S_(t-1) + b_t k_t v_t^T, the decay a_t a scalar or a vector over key channels, the step
size b_t a scalar. A scalar decay: within a chunk one masked, decayed matmul P = (Q U^T) * exp(go_i - g_j)
and the chunk-start term, across chunks the state recurrence; those kernels are in `triton_chunk_common`
(the delta family's without the WY/UT form: the values written are v itself). This module says which
levels qualify (printed from the derived rules), what the generated docstring states, and renders a
per-key-channel decay (GLA) with `ChannelKernels`.

A per-key-channel decay has cumulative logs g [BT, K] per chunk, and the reads within a chunk
A_ij = sum_c q_ic u_jc exp(go_ic - g_jc) are no longer one matmul: exp(-g) over a whole chunk overflows
fp32 once a decays fast (log a = -5 a token reaches -320 in 64 tokens). So A is built by sub-chunks of
BC = 16 tokens (fla's secondary chunking, written anew here), every exponent <= 0 (for a_t <= 1):

  a block of sub-chunks m < n (rows i in n, columns j in m) is one matmul relative to g_p, p the token
  before sub-chunk n: (exp(go_i - g_p) q_i) . (exp(g_p - g_j) u_j);
  a diagonal block is summed column by column, exp(go_i - g_j) only where token i reads token j.

Kernels: gate (cumulative logs per channel) -> intra (A, [B, T, H, BT] fp32) -> state -> output
(O = (exp(go) Q) S_0 + A D); backward: state_bwd (A^T dO) -> grads (the terms through the states, and
∂/∂A = dO D^T) -> intra_bwd (the terms through A by the same blocks: the column side of an off-diagonal
block relative to the last token of its sub-chunk; then dg = q dq - u du, the chunk end's term apart)
-> gate_bwd (reversed cumulative sums per channel, then the gates through sympy derivatives).
Per-channel decays in the delta family, and step sizes over channels, keep a clear reason and run the
fused recurrent kernels.
"""
from __future__ import annotations

import sympy

from nlc import ir
from nlc.derive.rules import LevelRules
from nlc.plan import KernelPlan

from . import triton_chunk_common as common
from .emitter import comment, ident, where
from .torch_chunk_decay import paren, show
from .triton_printer import to_triton


# the value kernels' signatures end in their sizes and matmul settings
VALUE_SIZES = ("V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr, "
               "DT: tl.constexpr):")


def exp_where(mask: str, x: str) -> str:
    """exp(x) where `mask` holds, else 0, as exp(-inf): the pairs it leaves out (a token and one it does not
    read, a token past the end) may have positive exponents, which are never taken."""
    return f'tl.exp(tl.where({mask}, {x}, float("-inf")))'


def unsupported(rules: LevelRules, plan: KernelPlan) -> str | None:
    """Why the chunked Triton kernels cannot run this level, or None when they can."""
    return common.unsupported(rules, plan, "decay")


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_triton_chunk.py` for a decay-family level `unsupported` accepts."""
    form = common.chunk_form(rules, plan)
    math_lines = [
        f"  recurrence  S_t = {'Diag(a_t)' if form.channels else 'a_t'} S_(t-1) + b_t k_t v_t^T",
        f"  decay       a_t = {show(form.decay)}" + ("   (per key channel)" if form.channels else ""),
        f"  step size   b_t = {show(form.step)}",
        f"  read        o_t = {'S_t' if form.read == 'g' else 'S_(t-1)'}^T q_t",
    ]
    return common.render(rules, plan, model, file, math_lines)


class ChannelKernels(common.Kernels):
    """The file for a per-key-channel decay: g, gb [B, T, H, K]; the reads within a chunk by sub-chunks
    (`intra_fwd_kernel`, `intra_bwd_kernel`); the state kernels of `Kernels` with per-channel factors."""

    GATES = "[B, T, H] or [B, T, H, K]"
    SHAPE = 4  # the gate kernels take B, T, H, K

    # ---- names and snippets -----------------------------------------------------------------
    def tile_names(self) -> dict:
        """Gate symbols -> their blocks in a [BT, BK] context: key-channel gates [BT, BK], scalar ones
        [BT, 1]."""
        return {ir.gate_symbol(g): ident(g, "b_g") + ("" if self.keyed(g) else "[:, None]") for g in self.f.gates}

    def keyed(self, gate: str) -> bool:
        return self.lv.gate_axes[gate] == "key"

    def rows(self, x: str) -> str:
        return x

    def keys(self, x: str) -> str:
        return f"{x}[:, None]"

    def reads(self) -> tuple[str, str]:
        self.em.line(f"b_A = tl.load(A + r_t[:, None] * BT + o_i[None, :], mask=m_t[:, None] & ({self.read_mask()}), "
                     "other=0.0)  # [BT, BT]: the reads within the chunk")
        return "b_A", "A"

    def load_cumulative(self, name: str, rows: str = "r_t", mask: str = "m_t", to: str = "") -> None:
        """b_<name> (or `to`): the cumulative logs g or gb of some tokens' rows, [rows, BK] fp32."""
        what = "cumulative log decay per key channel" if name == "g" else "the same up to the token before"
        self.em.line(f"{to or 'b_' + name} = {common.load_rows(name, 'K', False, rows, mask)}  # {what}")

    def token_load(self, name: str) -> str:
        return common.load_rows(name, "K", False)

    def load_tokens(self) -> None:
        self.load_cumulative("g")
        if self.f.before:
            self.load_cumulative("gb")
        if self.f.stepped:
            self.em.line("b_beta = tl.load(beta + r_t, mask=m_t, other=0.0)  # [BT]: step size b_t")

    def load_gates(self) -> None:
        for g in self.f.gates:
            at = common.load_rows(ident(g, "g"), "K", other="1.0") if self.keyed(g) else \
                f"tl.load({ident(g, 'g')} + r_t, mask=m_t, other=1.0).to(tl.float32)"
            self.em.line(f"{ident(g, 'b_g')} = {at}  # gate {comment(g)}: {'[BT, BK]' if self.keyed(g) else '[BT]'}")

    def last_token(self) -> None:
        """b_glast [BK]: g at the chunk's last token, and b_r [BT, BK]: the decay from token j to the end."""
        em = self.em
        em.line("i_last = tl.minimum(T - i_t * BT, BT) - 1  # the chunk's last token")
        em.line("b_glast = tl.load(g + ((i_b * T + i_t * BT + i_last) * H + i_h).to(tl.int64) * K + o_k, mask=m_k, "
                "other=0.0)")
        em.line("b_r = tl.where(m_t[:, None], tl.exp(b_glast[None, :] - b_g), 0.0)  # [BT, BK]: prod_(j<r<=C) a_r")

    def read_ops(self) -> tuple[str, str]:
        """(token i reads token j, in a sub-chunk's positions o_c against j; j reads i)."""
        return (">=", "<=") if self.f.read == "g" else (">", "<")

    # ---- the file ---------------------------------------------------------------------------
    def configuration(self) -> None:
        em = self.em
        em.line("CHUNK = 64  # tokens per chunk (BT): a power of two, at least 16")
        em.line("SUB = 16  # tokens per sub-chunk (BC) of the reads within a chunk: a power of two, at least 16")
        common.launch_configuration(em)
        em.line("AUTO = False  # checked under Triton's interpreter, not yet on a GPU: mode='auto' keeps the fused "
                "recurrent")
        em.line("# kernels, mode='triton' runs these from CHUNK tokens on")

    def parts(self) -> list:
        return [self.gate_fwd_kernel, self.intra_fwd_kernel, self.state_kernel, self.output_kernel,
                self.state_bwd_kernel, self.grads_kernel, self.intra_bwd_kernel, self.gate_bwd_kernel,
                self.launchers, self.function]

    def method(self) -> None:
        em, f = self.em, self.f
        op = "<=" if f.read == "g" else "<"
        em.line("Per chunk of BT = CHUNK tokens (i, j = 1..BT), S_0 the state entering it, u_j = b_j k_j the write "
                "keys,")
        em.line("g_i = sum_(r<=i) log a_r within the chunk per key channel c (gb_i = g_(i-1)), go = "
                f"{f.read} (the reads'):")
        em.line(f"  O = (exp(go) * Q) S_0 + A V,  A_ij = sum_c q_ic u_jc exp(go_ic - g_jc) for j {op} i")
        em.line("  S_C = Diag(exp(g_C)) S_0 + (exp(g_C - G) * U)^T V")
        em.line("A by sub-chunks of BC = SUB tokens so that no exponent is positive (exp(-g) over a whole chunk")
        em.line("overflows when a decays fast): a block of sub-chunks m < n is one matmul of exp(go_i - g_p) q_i")
        em.line("and exp(g_p - g_j) u_j, p the token before sub-chunk n; a diagonal block is summed column by")
        em.line("column. The backward takes the same blocks through dA = dO V^T (a column side relative to the")
        em.line("last token of its sub-chunk), then dg = q * dq - u * du (+ the chunk end's term).")
        em.line("Decays are taken in log space (as fla's kernels): a_t must be positive.")
        em.line("Kernels: gate -> intra (A) -> state (over chunks) -> output; backward: intra (A again), "
                "state_bwd (over")
        em.line("chunks, backwards) -> grads (through the states) -> intra_bwd (through A) -> gate_bwd.")

    # ---- kernels ----------------------------------------------------------------------------
    def gate_fwd_kernel(self) -> None:
        em, f = self.em, self.f
        self.kernel_head('"H", "K", "BT", "BK"', (
            f"chunk_gate_fwd_kernel({self.gate_args('g')}{self.token_args()}T, H: tl.constexpr, K: tl.constexpr, "
            "BT: tl.constexpr,", "BK: tl.constexpr):"),
            ["Program (i_t, i_bh): the derived decay per key channel (as cumulative logs) and step size of one",
             "chunk's tokens."])
        with em.indent():
            self.prologue()
            self.load_gates()
            em.line(f"b_a = {to_triton(f.decay, self.tile_names())}  {where(self.lv.retention.span) or '#'} "
                    f"[BT, BK]: a_t = {show(f.decay)}")
            em.line("b_la = tl.where(m_t[:, None] & m_k[None, :], tl.log(b_a), 0.0)  # log a_t")
            em.line("b_g = tl.cumsum(b_la, 0)  # g_i = sum_(r<=i) log a_r, per key channel")
            em.line(self.store("g", "K", "b_g"))
            if f.before:
                em.line(self.store("gb", "K", "(b_g - b_la)") + "  # gb_i = g_(i-1)")
            if f.stepped:
                self.store_step()

    def gate_bwd_kernel(self) -> None:
        em, f = self.em, self.f
        grads = "dg, " + ("dgb, " if f.before else "") + ("dbeta, " if f.stepped else "")
        self.kernel_head('"H", "K", "BT", "BK"', (
            f"chunk_gate_bwd_kernel({self.gate_args('g')}{grads}{self.gate_args('dg')}T, H: tl.constexpr, "
            "K: tl.constexpr,", "BT: tl.constexpr, BK: tl.constexpr):"),
            ["Program (i_t, i_bh): the gates' gradients from those of g, gb (per key channel) and b_t (sympy",
             "derivatives); a scalar gate sums its key channels."])
        with em.indent():
            self.prologue()
            self.load_gates()
            if not all(self.keyed(g) for g in f.gates):
                em.line("m_tk = m_t[:, None] & m_k[None, :]  # a scalar gate sums these key channels")
            self.log_decay_grads()  # per key channel: [BT, BK]
            log_decay = sympy.log(f.decay)
            for g in f.gates:
                x, terms = ir.gate_symbol(g), []
                d = sympy.diff(log_decay, x)
                if d != 0:
                    term = f"b_dla * {paren(to_triton(d, self.tile_names()))}"
                    terms.append(term if self.keyed(g) else f"tl.sum(tl.where(m_tk, {term}, 0.0), 1)")
                d = sympy.diff(f.step, x)
                if d != 0:
                    terms.append(f"b_dbeta * {self.printed(d)}")
                zeros = "tl.zeros([BT, BK], dtype=tl.float32)" if self.keyed(g) else "tl.zeros([BT], dtype=tl.float32)"
                em.line(f"{ident(g, 'b_dg')} = {' + '.join(terms) or zeros}  # gate {comment(g)}")
                if self.keyed(g):
                    em.line(self.store(ident(g, "dg"), "K", ident(g, "b_dg")))
                else:
                    em.line(f"tl.store({ident(g, 'dg')} + r_t, {ident(g, 'b_dg')}.to("
                            f"{ident(g, 'dg')}.dtype.element_ty), mask=m_t)")

    def sub_chunk(self) -> None:
        """A sub-chunk kernel's prologue: program (i_c, i_t, i_bh), its rows (o_t, m_t, r_t: tokens i_c BC
        .. i_c BC + BC - 1 of chunk i_t) and L, the chunk's tokens."""
        em = self.em
        em.line("i_c, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)")
        em.line("i_b, i_h = i_bh // H, i_bh % H")
        em.line("L = tl.minimum(T - i_t * BT, BT)  # tokens in this chunk")
        em.line("o_c = tl.arange(0, BC)  # position in a sub-chunk")
        em.line("o_t = i_t * BT + i_c * BC + o_c  # this sub-chunk's tokens")
        em.line("m_t = o_t < T")
        em.line("r_t = ((i_b * T + o_t) * H + i_h).to(tl.int64)  # row of each token in [B, T, H, ...]")
        em.line("o_k = tl.arange(0, BK)")
        em.line("m_k = o_k < K")

    def at_token(self, i: str, mask: str = "m_k") -> str:
        """g at token `i` of the sequence, [BK]."""
        return f"tl.load(g + ((i_b * T + {i}) * H + i_h).to(tl.int64) * K + o_k, mask={mask}, other=0.0)"

    def boundary(self) -> None:
        """i_p, b_gp [BK]: the token before this sub-chunk (the chunk's last where the sub-chunk lies past
        it) and g there: the reference point of the blocks left of the diagonal."""
        em = self.em
        em.line("i_p = i_t * BT + tl.minimum(i_c * BC, L) - 1  # p: the token before this sub-chunk")
        em.line(f"b_gp = {self.at_token('i_p', 'tl.where(i_c > 0, m_k, False)')}")

    def sub_block(self, i: str) -> None:
        """o_m, m_m, r_m: the tokens of sub-chunk `i` of this chunk."""
        em = self.em
        em.line(f"o_m = i_t * BT + {i} * BC + o_c  # tokens of sub-chunk {i[2:]}")
        em.line("m_m = o_m < T")
        em.line("r_m = ((i_b * T + o_m) * H + i_h).to(tl.int64)")

    def block_keys(self) -> None:
        """b_km, b_gm [BC, BK]: the write keys u_j and g_j of sub-chunk m's tokens."""
        em = self.em
        em.line(f"b_km = {common.load_rows('k', 'K', rows='r_m', mask='m_m')}")
        if self.f.stepped:
            em.line("b_km = b_km * tl.load(beta + r_m, mask=m_m, other=0.0)[:, None]  # u_j = b_j k_j")
        self.load_cumulative("g", "r_m", "m_m", "b_gm")

    def token(self) -> None:
        """i_j, r_j, m_j and b_kj = u_j, b_gj = g_j [BK]: token j of this sub-chunk."""
        em = self.em
        em.line("i_j = i_t * BT + i_c * BC + j  # token j of the sub-chunk")
        em.line("r_j = ((i_b * T + i_j) * H + i_h).to(tl.int64)")
        # (not m_k & (i_j < T): the interpreter refuses a block & a scalar as a mask)
        em.line("m_j = tl.where(i_j < T, m_k, False)  # m_k, if token j is in the sequence")
        em.line("b_kj = tl.load(k + r_j * K + o_k, mask=m_j, other=0.0).to(tl.float32)")
        if self.f.stepped:
            em.line("b_kj = b_kj * tl.load(beta + r_j, mask=i_j < T, other=0.0)  # u_j = b_j k_j")
        em.line("b_gj = tl.load(g + r_j * K + o_k, mask=m_j, other=0.0)")

    def sub_chunk_head(self, name: str, args: str, doc: list[str]) -> None:
        """A sub-chunk kernel's decorators, signature (`args`, then the sizes), docstring and prologue."""
        self.kernel_head('"H", "K", "BT", "BC", "BK"', (
            f"{name}({args}T, H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,",
            "BK: tl.constexpr, DOT: tl.constexpr, DT: tl.constexpr):"), doc)
        with self.em.indent():
            self.sub_chunk()

    def intra_fwd_kernel(self) -> None:
        em, f = self.em, self.f
        go, (reads, _) = f"b_{f.read}", self.read_ops()
        self.sub_chunk_head("chunk_intra_fwd_kernel", f"q, k, {self.token_args()}A, ", [
            "Program (i_c, i_t, i_bh): the rows of sub-chunk i_c in chunk i_t's reads A [BT, BT] (fp32),",
            f"A_ij = sum_c q_ic u_jc exp(go_ic - g_jc) for j {'<=' if f.read == 'g' else '<'} i: the diagonal "
            "block column by column, the blocks left",
            "of it as matmuls relative to g_p (p: the token before the sub-chunk); every exponent <= 0. The",
            "blocks right of the diagonal are not written (readers mask them)."])
        with em.indent():
            em.line(f"b_q = {self.load('q', 'K')}")
            self.load_cumulative(f.read)
            em.line("# the diagonal block, column by column: exp(go_i - g_j) where token i reads token j")
            em.line("b_A = tl.zeros([BC, BC], dtype=tl.float32)")
            with em.indent("for j in range(0, BC):"):
                self.token()
                em.line(f"m_ij = (o_c {reads} j) & m_t  # the rows that read token j")
                decay = exp_where("m_ij[:, None]", f"{go} - b_gj[None, :]")
                em.line(f"b_Aj = tl.sum(b_q * b_kj[None, :] * {decay}, 1)")
                em.line("b_A = tl.where(o_c[None, :] == j, b_Aj[:, None], b_A)")
            em.line("tl.store(A + r_t[:, None] * BT + (i_c * BC + o_c)[None, :], b_A, mask=m_t[:, None])")
            em.line("# blocks left of the diagonal (sub-chunks m < i_c), one matmul each relative to g_p")
            self.boundary()
            em.line(f"b_qg = b_q * {exp_where('m_t[:, None]', f'{go} - b_gp[None, :]')}  # go_i <= g_p")
            with em.indent("for i_m in range(0, i_c):"):
                self.sub_block("i_m")
                self.block_keys()
                em.line("b_kg = b_km * tl.exp(b_gp[None, :] - b_gm)  # g_p <= g_j")
                em.line("b_A = tl.dot(b_qg.to(DT), tl.trans(b_kg).to(DT), input_precision=DOT)")
                em.line("tl.store(A + r_t[:, None] * BT + (i_m * BC + o_c)[None, :], b_A, mask=m_t[:, None])")

    def output_kernel(self) -> None:
        em, f = self.em, self.f
        self.kernel_head('"H", "K", "V", "BT", "BV"', (
            f"chunk_output_fwd_kernel(q, v, {f.read}, A, h, o, T, NT, H: tl.constexpr, K: tl.constexpr,",
            VALUE_SIZES), ["Program (i_v, i_t, i_bh): the outputs of one chunk, value channels [i_v BV, "
                           "(i_v + 1) BV)."])
        with em.indent():
            self.prologue(value_block=True)
            self.state_tile()
            em.line(f"b_q = {self.load('q', 'K')}")
            self.load_cumulative(f.read)
            em.line(f"b_h = tl.load(h + {self.per_chunk()} + o_kv, mask=m_kv, other=0.0)  # S_0")
            em.line(f"b_o = tl.dot((b_q * tl.exp(b_{f.read})).to(DT), b_h.to(DT), input_precision=DOT)  "
                    "# [BT, BV]: (exp(go) * Q) S_0")
            reads, _ = self.reads()
            em.line(f"b_d = {self.load('v', 'V')}")
            em.line(f"b_o += tl.dot({reads}.to(DT), b_d.to(DT), input_precision=DOT)  # + A V")
            em.line(self.store("o", "V", "b_o"))

    def grads_kernel(self) -> None:
        em, f = self.em, self.f
        self.kernel_head('"H", "K", "V", "BT", "BV"', (
            f"chunk_grads_bwd_kernel(k, v, {self.token_args()}h, dh, do, dA, dq, dk, dg, T, NT, H: tl.constexpr, "
            "K: tl.constexpr,", VALUE_SIZES), [
            "Program (i_t, i_bh): one chunk's gradients through the states it reads (S_0, saved in h) and",
            "writes (S_C, ∂/∂ it in dh): of q (into dq), of the write keys u (into dk), of g at the chunk's",
            "last token (into dg, zero elsewhere); and dA = dO V^T where token i reads token j.",
            "chunk_intra_bwd_kernel adds the terms within the chunk."])
        with em.indent():
            self.prologue()
            em.line(f"b_k = {self.load('k', 'K')}")
            self.load_tokens()
            self.write_keys()
            self.value_sums()
            em.line("# the reads of S_0: O = (exp(go) * Q) S_0 + A V")
            em.line(f"b_dq = b_dq * tl.exp(b_{f.read})")
            em.line(f"tl.store(dA + r_t[:, None] * BT + o_i[None, :], tl.where({self.read_mask()}, b_dP, 0.0), "
                    "mask=m_t[:, None])")
            em.line("# the state leaving the chunk: S_C = Diag(exp(g_C)) S_0 + (exp(g_C - G) * U)^T V")
            self.last_token()
            em.line("b_du = b_dkr * b_r  # ∂/∂u_j")
            em.line("b_dglast = tl.exp(b_glast) * b_hdh + tl.sum(b_du * b_kb, 0)  # [BK]: ∂/∂g_C")
            em.line(self.store("dq", "K", "b_dq"))
            em.line(self.store("dk", "K", "b_du") + "  # ∂/∂u so far: chunk_intra_bwd_kernel makes it dk")
            em.line(self.store("dg", "K", "tl.where((o_i == i_last)[:, None], b_dglast[None, :], 0.0)"))

    def intra_bwd_kernel(self) -> None:
        em, f = self.em, self.f
        go, (reads, read_by) = f"b_{f.read}", self.read_ops()
        outs = "dq, dk, dg, " + ("dgb, " if f.before else "") + ("dbeta, " if f.stepped else "")
        self.sub_chunk_head("chunk_intra_bwd_kernel", f"q, k, {self.token_args()}dA, {outs}", [
            "Program (i_c, i_t, i_bh): adds to the rows of sub-chunk i_c in chunk i_t the terms through A",
            "(dq_i += sum_j dA_ij exp(go_i - g_j) u_j, du_j += sum_i dA_ij exp(go_i - g_j) q_i), by the blocks of",
            "chunk_intra_fwd_kernel (every exponent <= 0), to those through the states (chunk_grads_bwd_kernel);",
            "then dk = b * du" + (", ∂/∂b" if f.stepped else "") +
            " and the cumulative logs': ∂/∂go_i = q_i * dq_i, ∂/∂g_j -= u_j * du_j."])
        with em.indent():
            em.line(f"b_q = {self.load('q', 'K')}")
            em.line(f"b_k = {self.load('k', 'K')}")
            self.load_tokens()
            self.write_keys()
            em.line("# dq over sub-chunks m < i_c: matmuls relative to g_p, the token before this sub-chunk")
            self.boundary()
            em.line("b_dq = tl.zeros([BC, BK], dtype=tl.float32)")
            with em.indent("for i_m in range(0, i_c):"):
                self.sub_block("i_m")
                self.block_keys()
                em.line("b_dA = tl.load(dA + r_t[:, None] * BT + (i_m * BC + o_c)[None, :], mask=m_t[:, None], "
                        "other=0.0)")
                em.line("b_dq += tl.dot(b_dA.to(DT), (b_km * tl.exp(b_gp[None, :] - b_gm)).to(DT), "
                        "input_precision=DOT)  # g_p <= g_j")
            em.line(f"b_dq = b_dq * {exp_where('m_t[:, None]', f'{go} - b_gp[None, :]')}  # go_i <= g_p")
            em.line("# du over sub-chunks m > i_c: matmuls relative to g_l, this sub-chunk's last token")
            em.line("i_l = i_t * BT + tl.minimum((i_c + 1) * BC, L) - 1  # l")
            em.line(f"b_gl = {self.at_token('i_l')}")
            em.line("b_du = tl.zeros([BC, BK], dtype=tl.float32)")
            with em.indent("for i_m in range(i_c + 1, tl.cdiv(L, BC)):"):
                self.sub_block("i_m")
                em.line(f"b_qm = {common.load_rows('q', 'K', rows='r_m', mask='m_m')}")
                self.load_cumulative(f.read, "r_m", "m_m", "b_gom")
                em.line("b_dA = tl.load(dA + r_m[:, None] * BT + (i_c * BC + o_c)[None, :], mask=m_m[:, None], "
                        "other=0.0)")
                em.line(f"b_qg = b_qm * {exp_where('m_m[:, None]', 'b_gom - b_gl[None, :]')}  # go_i <= g_l")
                em.line("b_du += tl.dot(tl.trans(b_dA).to(DT), b_qg.to(DT), input_precision=DOT)")
            em.line(f"b_du = b_du * {exp_where('m_t[:, None]', 'b_gl[None, :] - b_g')}  # g_l <= g_j")
            em.line("# the diagonal block, token by token: column j of dA for dq, row j for du")
            with em.indent("for j in range(0, BC):"):
                self.token()
                em.line("b_qj = tl.load(q + r_j * K + o_k, mask=m_j, other=0.0).to(tl.float32)")
                goj = "b_gj"
                if f.read == "gb":
                    em.line("b_gbj = tl.load(gb + r_j * K + o_k, mask=m_j, other=0.0)")
                    goj = "b_gbj"
                em.line(f"m_ij = (o_c {reads} j) & m_t  # the rows that read token j")
                em.line(f"m_ji = tl.where(i_j < T, o_c {read_by} j, False)  # the rows token j reads")
                em.line("b_dAj = tl.load(dA + r_t * BT + i_c * BC + j, mask=m_ij, other=0.0)  # dA_ij")
                em.line("b_dAr = tl.load(dA + r_j * BT + i_c * BC + o_c, mask=m_ji, other=0.0)  # dA_ji")
                reads_j, read_by_j = exp_where("m_ij[:, None]", f"{go} - b_gj[None, :]"), \
                    exp_where("m_ji[:, None]", f"{goj}[None, :] - b_g")
                em.line(f"b_dq += b_dAj[:, None] * b_kj[None, :] * {reads_j}")
                em.line(f"b_du += b_dAr[:, None] * b_qj[None, :] * {read_by_j}")
            em.line("# add the terms through the states (chunk_grads_bwd_kernel), then finish")
            em.line(f"b_dq += {self.load('dq', 'K', False)}")
            em.line(f"b_du += {self.load('dk', 'K', False)}")
            em.line(self.store("dq", "K", "b_dq"))
            if f.stepped:
                em.line(self.store("dk", "K", "(b_du * b_beta[:, None])") + "  # u_j = b_j k_j")
                em.line("tl.store(dbeta + r_t, tl.sum(b_du * b_k, 1), mask=m_t)")
            else:
                em.line(self.store("dk", "K", "b_du"))
            em.line("# the cumulative logs: ∂/∂go_i = q_i * dq_i (reads), ∂/∂g_j = -u_j * du_j (writes)")
            dgo = " + b_q * b_dq" if f.read == "g" else ""
            em.line(f"b_dg = {self.load('dg', 'K', False)} - b_kb * b_du{dgo}")
            em.line(self.store("dg", "K", "b_dg"))
            if f.before:
                em.line(self.store("dgb", "K", "(b_q * b_dq)"))

    # ---- host side --------------------------------------------------------------------------
    def launcher_parts(self) -> list:
        return [self.sizes_launcher, self.gate_fwd_launcher, self.states_launcher, self.intra_launcher,
                self.output_launcher, self.bwd_launcher, self.gate_bwd_launcher]

    def intra_launcher(self) -> None:
        em, tok = self.em, self.token_args()
        with em.indent(f"def chunk_intra(q, k, {tok.rstrip(', ')}):"):
            em.line('"""The reads within each chunk, A [B, T, H, BT] fp32: row i holds token i\'s weights on its '
                    'chunk\'s')
            em.line('tokens j (only the blocks j <= i are written)."""')
            em.line("B, T, H, K, _, BT, NT, BK, _, DOT, DT = _sizes(k, k)  # (no value sizes here)")
            em.line("BC = min(SUB, BT)")
            em.line("A = torch.empty(B, T, H, BT, dtype=torch.float32, device=k.device)")
            em.line("chunk_intra_fwd_kernel[(BT // BC, NT, B * H)](")
            em.line(f"    q, k, {tok}A, T, H=H, K=K, BT=BT, BC=BC, BK=BK, DOT=DOT, DT=DT)")
            em.line("return A")

    def bwd_launcher(self) -> None:
        em, f, tok = self.em, self.f, self.token_args()
        with em.indent(f"def chunk_bwd(q, k, v, {tok}h0, do, dht):"):
            em.line('"""Gradients of q, k, v (fp32)' + (", of b_t [B, T, H]" if f.stepped else "") + ", of g" +
                    (", gb" if f.before else "") + " [B, T, H, K] fp32 and of the initial state (fp32).")
            em.line('The chunk states and the reads A are recomputed (a state pass, an intra pass), not saved."""')
            em.line("B, T, H, K, V, BT, NT, BK, BV, DOT, DT = _sizes(k, v)")
            em.line(f"_, h = chunk_states(k, v, {tok}h0)")
            em.line(f"A = chunk_intra(q, k, {tok.rstrip(', ')})")
            em.line("f32 = dict(dtype=torch.float32, device=k.device)")
            em.line("dh, dh0 = k.new_empty(B, NT, H, K, V), torch.empty(B, H, K, V, **f32)")
            em.line("dv = torch.empty(B, T, H, V, **f32)")
            em.line("chunk_state_bwd_kernel[(triton.cdiv(V, BV), B * H)](")
            em.line(f"    q, k, A, {tok}do.contiguous(), dht.contiguous(), dh, dh0, dv, T, NT,")
            em.line("    H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, DOT=DOT, DT=DT)")
            em.line("dA = torch.empty(B, T, H, BT, **f32)")
            em.line("dq, dk, dg = (torch.empty(B, T, H, K, **f32) for _ in range(3))")
            em.line("chunk_grads_bwd_kernel[(NT, B * H)](")
            em.line(f"    k, v, {tok}h, dh, do.contiguous(), dA, dq, dk, dg, T, NT,")
            em.line("    H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, DOT=DOT, DT=DT)")
            extra = [x for x, on in (("dgb", f.before), ("dbeta", f.stepped)) if on]
            if f.before:
                em.line("dgb = torch.empty(B, T, H, K, **f32)")
            if f.stepped:
                em.line("dbeta = torch.empty(B, T, H, **f32)")
            em.line("BC = min(SUB, BT)")
            em.line("chunk_intra_bwd_kernel[(BT // BC, NT, B * H)](")
            em.line(f"    q, k, {tok}dA, dq, dk, dg, {''.join(x + ', ' for x in extra)}T, H=H, K=K, BT=BT, BC=BC, "
                    "BK=BK, DOT=DOT, DT=DT)")
            outs = ["dq", "dk", "dv"] + [x for x, on in (("dbeta", f.stepped), ("dg", True), ("dgb", f.before)) if on]
            em.line(f"return {', '.join(outs)}, dh0")
