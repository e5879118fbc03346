"""Render a frozen-gradient level with a linear memory (a matrix W, or an MLP of depth 1 with nothing
around its product; MATH.md §3.4, §3.6) as chunked Triton kernels, forward and backward:
`level_<name>_triton_chunk.py`, a real file in the cache (Triton reads kernel source from disk). An
MLP memory's file comes from triton_chunk_frozen_mlp.py, which reuses these coefficient kernels, and
so does a level with an lq map or KL's lag token at chunk boundaries (a step between chunks that its
PyTorch loop runs).

Every gradient of a chunk of C tokens (the spec's `gradient chunk_start(C)`: part of the rule, so the
file's CHUNK is C, passed to the kernels as the constexpr C, in a block of BT >= 16 rows) is taken at
the chunk-start state W_0: E = K W_0 - V, then D = dℓ/dy, elementwise in E (or in E and r = ||e||),
printed from sympy, and token j's gradient is u_j = k_j d_j^T. The optimizer (gd, or momentum M) under the affine retention
W_t = a_t W_(t-1) + c_t s_t is then a pair of scalar linear scans, in closed form from log-space
products within the chunk (stable P·N coefficients, every factor bounded):

  gd        W_t = b_t W_0 - sum_j G[t, j] u_j,                G[t, j] = P[t, j] c_j lr_j
  momentum  W_t = b_t W_0 + f_t M_0 - sum_j G[t, j] u_j,      G = P N,  N[i, j] = c_i Pm[i, j] lr_j,
            M_t = m_t M_0 - sum_j Pm[t, j] lr_j u_j,           f = P (c m)

P[t, i] = prod_(i<r<=t) a_r, b_t = prod_(r<=t) a_r (Pm, m: the same of beta). Reads use the dual form
O = diag(b) Q W_0 + diag(f) Q M_0 - (G ⊙ Q K^T) D (rows shifted by one token for read before), and
row L-1 is the state carried to the next chunk.

An omega window (`bias omega(window = c, gamma) of <bias>`, MATH.md §3.8) replaces u_t by g_t =
sum_i Ω[t, i] u_i, Ω[t, i] = gamma_i over the c tokens up to t. So a chunk sums the gradients of its
window's CW = C + c - 1 rows j (the c - 1 tokens before it, re-evaluated at W_0, none before the
call's first token; then its own): K, V and D take a row per window row, copied per chunk on the host
(`_windows`, whose backward sums a token's rows over the windows that hold it, so the kernels never
write one token from two programs), and G and the carried rows become G Ω [L, CW], printed inside
every kernel from the band mask and gamma's gates at the window's rows. Gamma's gradient comes back
through Ω: ∂/∂gamma_j = sum_t [Ω[t, j] != 0] (G^T ∂/∂(G Ω) + the carried rows' outer products)[t, j].

Kernels: state (over chunks: saves each chunk's entering state in fp32 and D) -> output (per chunk
and value block); backward: state_bwd (over chunks, backwards: ∂/∂ each chunk's leaving state) ->
grads (per chunk: q, k, v, and the coefficients' gradients back through the log-space products to
the gates, by sympy derivatives). Each value block is independent except for ||e||-type biases,
whose kernels hold every value channel in one block.
"""
from __future__ import annotations

import sympy

import nlc
from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.rules import ALGORITHM_TEXT, LevelRules
from nlc.plan import KernelPlan

from . import triton_chunk_common as common
from .emitter import Emitter, comment, ident, where
from .torch_chunk_common import show
from .triton_printer import diff, to_triton
from .triton_recurrent import decorators, first_order_only

ROLES = {"a": "the retention's factor on the old state", "c": "its factor on the step",
         "lr": "the learning rate", "beta": "the momentum's factor"}


def linear_memory(memory: ir.Memory) -> bool:
    """M(W; x) = x W: a matrix, or an MLP of depth 1 with no residual, gate, bias or norm."""
    return memory.kind == "matrix" or (memory.kind == "mlp" and memory.depth == 1 and not (
        memory.residual or memory.gated or memory.bias) and memory.norm == "none")


def unsupported(rules: LevelRules, plan: KernelPlan) -> str | None:
    """Why the chunked Triton kernels cannot run this level, or None when they can."""
    lv = rules.level
    if plan.family != "frozen":
        return f"plan family {plan.family!r}, not 'frozen'"
    if lv.target != "value" or lv.init_from is not None:
        return "a self-generated target or a restart (init from) is not in the chunked frozen kernels"
    vector = [g for g in ir.gate_names(rules.bias.grad) if lv.gate_axes[g] != "scalar"]
    if vector:
        return f"the bias gradient reads per-channel gate(s) {', '.join(vector)}: not in the kernels"
    try:
        _kernels(rules.level)(rules, plan, "", "").text()
    except NotImplementedError as err:  # a function the Triton printer has no form for
        return str(err)
    return None


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_triton_chunk.py` for a level `unsupported` accepts."""
    return _kernels(rules.level)(rules, plan, model, file).text()


def _kernels(lv: ir.Level):
    """The renderer of a level's file: these kernels for a linear memory (one matrix), or those of
    triton_chunk_frozen_mlp.py (its matmuls in PyTorch, its chunks in a PyTorch loop) for an MLP memory
    and for a step between chunks that is not linear in the state (an lq map at chunk boundaries, KL's
    lag token): that loop runs it, where these kernels carry the state across chunks in one launch."""
    if linear_memory(lv.memory) and not (lv.maps_at_chunks or lv.lag_token):
        return _Kernels
    from .triton_chunk_frozen_mlp import MlpKernels  # it builds on _Kernels: imported after this module
    return MlpKernels


class _Kernels:
    BIAS_ON_WINDOW_ROWS = True  # the bias map runs in these kernels, at the window's rows (omega)

    def __init__(self, rules: LevelRules, plan: KernelPlan, model: str, file: str):
        lv = self.lv = rules.level
        self.rules, self.plan, self.model, self.file = rules, plan, model, file
        self.momentum = lv.algorithm.kind == "momentum"
        self.after = lv.read == "after"
        self.mapped = lv.maps_at_chunks  # an lq map at chunk boundaries: reads of psi_scale(A_0)·A_t
        self.lag = lv.lag_token  # KL's softmax step at each chunk's first token, apart from the scans
        self.roles = {"a": sympy.sympify(plan.decay), "c": sympy.sympify(plan.scale),
                      "lr": sympy.sympify(rules.lr)}
        if self.momentum:
            self.roles["beta"] = sympy.sympify(lv.algorithm.args["beta"])
        self.grad = sympy.sympify(rules.bias.grad).subs(S.y, S.e + S.v)  # d(e, r, v, gates)
        self.state_free = not (self.grad.free_symbols & {S.e, S.r})
        self.norm = S.r in self.grad.free_symbols
        self.bias_gates = ir.gate_names(self.grad)
        # an omega window (MATH.md §3.8): token t's gradient is sum_i Ω[t, i] u_i over its WINDOW tokens,
        # Ω[t, i] = gamma_i; the gradients are those of the chunk's window rows j (the WINDOW - 1 tokens
        # before it, then its own), all at W_0, and the scan coefficients become G Ω
        self.omega = lv.bias.kind == "omega"
        self.gamma = sympy.sympify(lv.bias.args["gamma"]) if self.omega else None
        self.j = "j" if self.omega else "t"  # the rows of the gradients a chunk sums: r_j, m_j or r_t, m_t
        self.BJ = "BW" if self.omega else "BT"
        self.G, self.gc, self.hc = ("b_Gw", "b_gcw", "b_hcw") if self.omega else ("b_Gr", "b_gc", "b_hc")
        windowed = self.omega and self.BIAS_ON_WINDOW_ROWS  # the bias map at the window's rows, here
        used = [*self.roles.values()] + ([] if windowed else [self.grad])
        self.gates = sorted(set().union(*(ir.gate_names(x) for x in used)))  # read at the chunk's rows
        self.window_gates = sorted(set(self.bias_gates if windowed else []) | set(ir.gate_names(self.gamma))) \
            if self.omega else []  # read at its window's rows
        # where the bias map reads its gates and rows: the window's rows j, or the chunk's (or those of
        # the MLP file's bias kernels) t
        self.bias_prefix, self.bias_block, self.bias_rows = ("b_gw", "BW", "j") if windowed else ("b_g", "BT", "t")
        self.em = Emitter()

    # ---- names and printed expressions -------------------------------------------------------
    def tok(self, expr) -> str:
        """A per-token expression over the gates' [BT] blocks, as a [BT] block."""
        expr = sympy.sympify(expr)
        text = to_triton(expr, {ir.gate_symbol(g): ident(g, "b_g") for g in self.gates})
        return text if expr.free_symbols else f"({text} + tl.zeros([BT], dtype=tl.float32))"

    def window_tok(self, expr) -> str:
        """A per-token expression over the window gates' [BW] blocks (the chunk's window rows), as a [BW] block."""
        expr = sympy.sympify(expr)
        text = to_triton(expr, {ir.gate_symbol(g): ident(g, "b_gw") for g in self.window_gates})
        return text if expr.free_symbols else f"({text} + tl.zeros([BW], dtype=tl.float32))"

    def elem(self, expr) -> str:
        """An expression of the bias gradient over [BT, BV] blocks ([BW, BV] on an omega window's rows;
        e, v; r and gates by row)."""
        names = {ir.gate_symbol(g): ident(g, self.bias_prefix) + "[:, None]" for g in self.bias_gates}
        names |= {S.e: "b_e", S.r: "b_r[:, None]", S.v: "b_v"}
        expr = sympy.sympify(expr)
        text = to_triton(expr, names)
        return text if expr.free_symbols else f"({text} + tl.zeros([{self.bias_block}, BV], dtype=tl.float32))"

    def times(self, expr, by: str, printer=None) -> str:
        """expr * by, printed by `printer` (default `elem`), dropping a factor of ±1."""
        expr = sympy.sympify(expr)
        if expr in (1, -1):
            return by if expr == 1 else f"-{by}"
        return f"{(printer or self.elem)(expr)} * {by}"

    def gate_names(self, prefix: str = "g") -> list[str]:
        """The gate tensors' names: those read at the chunk's rows (`prefix`), then those read at its
        window's rows (`prefix` + w, [B, NT, CW, H] each)."""
        return [ident(g, prefix) for g in self.gates] + [ident(g, prefix + "w") for g in self.window_gates]

    def gate_args(self, prefix: str = "g") -> str:
        return "".join(f"{name}, " for name in self.gate_names(prefix))

    def states(self, prefix: str = "", suffix: str = "") -> str:
        """The state tensors' names, h (W) and, with momentum, hm (M), with a prefix and suffix."""
        return ", ".join(f"{prefix}{s}{suffix}" for s in (["h", "hm"] if self.momentum else ["h"]))

    # ---- the file ----------------------------------------------------------------------------
    def text(self) -> str:
        em = self.em
        self.header()
        self.preamble("_pack, default_state")
        common.launch_configuration(em)
        em.line(f"NORM = {self.norm}  # the bias reads ||e||: every value channel in one block")
        em.gap()
        self.helpers()
        for kernel in (self.state_kernel, self.output_kernel, self.state_bwd_kernel, self.grads_kernel,
                       self.launchers, self.function, self.public):
            em.gap()
            kernel()
        return em.text()

    def preamble(self, names: str, runtime: str = "") -> None:
        """The imports (`names` from the level's reference module, the `runtime` import line) and CHUNK."""
        common.imports(self.em, self.lv, names, runtime)
        self.em.line(f"CHUNK = {int(self.plan.chunk)}  # tokens per gradient chunk: the spec's "
                "`gradient chunk_start`, part of the rule")
        self.em.line("AUTO = False  # checked under Triton's interpreter, not yet on a GPU: mode='auto' keeps the "
                     "chunked PyTorch form, mode='triton' runs these kernels")
        if self.omega:
            self.em.line(f"WINDOW = {int(self.lv.bias.args['window'])}  # the omega window: token t's gradient "
                         "sums those of its last WINDOW tokens")
            self.em.line("CW = CHUNK + WINDOW - 1  # rows of a chunk's window: the WINDOW - 1 tokens before it, "
                         "then its own")

    def header(self) -> None:
        em = self.em
        em.line(f'"""Level {comment(self.lv.name)!r} of model {comment(self.model)!r}: chunked Triton kernels '
                "(frozen-gradient family,")
        em.line("MATH.md §3.4-3.6).")
        self.summary("with fp32 states and accumulation")
        em.line(f"  d = dℓ/dy = {show(self.grad)}" + ("  (free of the state)" if self.state_free
                                                        else "  (e = y - v" + (", r = ||e||)" if self.norm
                                                                                 else ")")))
        em.line("Per chunk of L <= CHUNK tokens (t, i, j = 0..L-1), W_0 (and M_0) the state entering it:")
        em.line("  E = K W_0 - V,  D = d(E, ...) [L, V]: every gradient at W_0, u_j = k_j d_j^T")
        em.line("  P[t, i] = prod_(i<r<=t) a_r, b_t = prod_(r<=t) a_r (log space, signs apart)")
        if self.momentum:
            em.line("  Pm, m: the same of beta;  N[i, j] = c_i Pm[i, j] lr_j,  G = P N,  f = P (c m)")
            em.line("  W_t = b_t W_0 + f_t M_0 - sum_j G[t, j] u_j,  M_t = m_t M_0 - sum_j Pm[t, j] lr_j u_j")
            em.line("  O = diag(b) Q W_0 + diag(f) Q M_0 - (G ⊙ Q K^T) D")
        else:
            em.line("  G[t, j] = P[t, j] c_j lr_j;  W_t = b_t W_0 - sum_j G[t, j] u_j")
            em.line("  O = diag(b) Q W_0 - (G ⊙ Q K^T) D")
        em.line("  " + ("reads after the write (row t)" if self.after else
                        "reads before the write: rows of b, f, G at t - 1 (b = 1, f = 0, G = 0 at t = 0)") +
                "; the state carried on is row L-1")
        self.window_doc("K, V and D")
        em.line("Kernels: state (over chunks) -> output; backward: state_bwd (over chunks, backwards) -> grads.")
        em.line("Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; gates [B, T, H]. State: " +
                ("(W, M), each" if self.momentum else "W") + " [B, H, K, V], float32,")
        em.line("row convention: o_t = W_t^T q_t. Per-chunk states [B, NT, H, K, V] float32.")
        em.line('"""')

    def window_doc(self, rows: str) -> None:
        """The docstring's lines on an omega window (`rows`: what the window's rows hold)."""
        if not self.omega:
            return
        em = self.em
        em.line(f"Omega window (MATH.md §3.8): u_t is replaced by g_t = sum_i Ω[t, i] u_i, Ω[t, i] = gamma_i = "
                f"{show(self.gamma)}")
        em.line("for the WINDOW tokens i up to t. A chunk's gradients are those of its window's CW = CHUNK + "
                "WINDOW - 1")
        em.line("rows j: the WINDOW - 1 tokens before it (re-evaluated at W_0, none before the call's first), "
                "then its own.")
        em.line(f"So {rows} have a row per window row j, and G (and the carried rows) become G Ω [L, CW]")
        em.line("(gamma is in the coefficients: ∂/∂gamma comes back through Ω). Inputs at the window's rows "
                "are copied")
        em.line("per chunk (`_windows`, [.., NT, CW, ..]); its backward sums each token's rows.")

    def summary(self, precision: str) -> None:
        """The docstring's provenance and the level's rule: its fields, step and scan roles."""
        em, lv = self.em, self.lv
        em.line()
        em.line(f"Generated by nlc {nlc.__version__} from {comment(self.file)}; do not edit. It computes "
                f"what level_{comment(lv.name)}.py")
        em.line(f"(the reference recurrent form) computes, {precision}.")
        for key, value in lv.describe().items():
            em.line(f"  {key:<10} {comment(value)}")
        em.line(f"  step       {ALGORITHM_TEXT[lv.algorithm.kind]}")
        for role, expr in self.roles.items():
            em.line(f"  {role + '_t':<10} = {show(expr)}   ({ROLES[role]})")

    def decorate(self, key: str) -> None:
        self.em.line(f"@triton.autotune(configs=CONFIGS, key=[{key}])")
        self.em.line('@triton.jit(do_not_specialize=["T"])')

    def helpers(self) -> None:
        self.em.block('''
@triton.jit
def log_products(b_x, m_t):
    """Products of a per-token factor x [BT] within the chunk, in log space: (log|x_t|, g_t =
    sum_(r<=t) log|x_r|, s_t = the sign of prod_(r<=t) x_r); tokens past the chunk's end count as 1,
    and 0 as the smallest normal float32."""
    b_lx = tl.where(m_t, tl.log(tl.maximum(tl.abs(b_x), 1.1754943508222875e-38)), 0.0)
    b_neg = tl.where(m_t & (b_x < 0), 1, 0)
    return b_lx, tl.cumsum(b_lx, 0), 1.0 - 2.0 * (tl.cumsum(b_neg, 0) % 2).to(tl.float32)


@triton.jit
def segments(b_gt, b_st, b_g, b_s, m):
    """[BT, BT]: s_t s_j exp(gt_t - g_j), the product of the factors between j and t, where m (else 0)."""
    b_x = tl.where(m, b_gt[:, None] - b_g[None, :], 0.0)
    return tl.where(m, tl.exp(b_x) * (b_st[:, None] * b_s[None, :]), 0.0)


@triton.jit
def at(b_x, m_l):
    """The entry of a [BT] block where m_l (one token)."""
    return tl.sum(tl.where(m_l, b_x, 0.0), 0)


@triton.jit
def suffix_sums(b_x):
    """[BT]: sum_(t>=r) x_t."""
    return tl.sum(b_x, 0) - tl.cumsum(b_x, 0) + b_x
''')

    # ---- emitted pieces ----------------------------------------------------------------------
    def ids(self, value_block: bool, chunk_program: bool) -> None:
        em = self.em
        if value_block and chunk_program:
            em.line("i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)")
        elif value_block:
            em.line("i_v, i_bh = tl.program_id(0), tl.program_id(1)")
        else:
            em.line("i_t, i_bh = tl.program_id(0), tl.program_id(1)")
        em.line("i_b, i_h = i_bh // H, i_bh % H")
        em.line("o_i = tl.arange(0, BT)  # position in the chunk")
        em.line("o_k = tl.arange(0, BK)")
        em.line("m_k = o_k < K")
        if value_block:
            self.value_block()

    def value_block(self) -> None:
        em = self.em
        em.line("o_v = i_v * BV + tl.arange(0, BV)")
        em.line("m_v = o_v < V")
        em.line("o_kv = o_k[:, None] * V + o_v[None, :]  # the tile's offsets in one [K, V] state")
        em.line("m_kv = m_k[:, None] & m_v[None, :]")

    def chunk_rows(self) -> None:
        em = self.em
        em.line("o_t = i_t * C + o_i  # token")
        em.line("m_t = (o_i < C) & (o_t < T)")
        em.line("r_t = ((i_b * T + o_t) * H + i_h).to(tl.int64)  # row of each token in [B, T, H, ...]")
        em.line("i_last = tl.minimum(T - i_t * C, C) - 1  # the chunk's last token")
        if self.omega:
            self.window_rows()

    def window_rows(self) -> None:
        """The rows j of chunk i_t's omega window: o_j, its token o_tj, m_j (a token of this call) and r_j."""
        em = self.em
        em.line("o_j = tl.arange(0, BW)  # row of the chunk's window: the CW - C = WINDOW - 1 tokens before it, "
                "then its own")
        em.line("o_tj = i_t * C - (CW - C) + o_j  # token")
        em.line("m_j = (o_j < CW) & (o_tj >= 0) & (o_tj < T)  # none before the call's first token")
        em.line(self.window_row())

    def window_row(self) -> str:
        return "r_j = (((i_b * NT + i_t) * CW + o_j) * H + i_h).to(tl.int64)  # row of each in [B, NT, CW, H, ...]"

    def load(self, name: str, dim: str, rows: str = "t") -> str:
        """A block of rows r_<rows> (mask m_<rows>): a chunk's tokens (t) or its window's rows (j)."""
        return common.load_rows(name, dim, rows=f"r_{rows}", mask=f"m_{rows}")

    def store(self, name: str, dim: str, value: str, rows: str = "t") -> str:
        return common.store_rows(name, dim, value, rows=f"r_{rows}", mask=f"m_{rows}")

    def per_chunk(self) -> str:
        """Offset of chunk i_t's state of (batch, head) in [B, NT, H, K, V]."""
        return "((i_b * NT + i_t) * H + i_h).to(tl.int64) * (K * V)"

    def dot(self, a: str, b: str, exact: bool = False) -> str:
        """a @ b: the inputs' matmul type (DT, DOT), or fp32 for the coefficients (exact)."""
        if exact:
            return f'tl.dot({a}, {b}, input_precision="ieee")'
        return f"tl.dot(({a}).to(DT), ({b}).to(DT), input_precision=DOT)"

    def coefficients(self, read: bool, carry: bool) -> None:
        """The chunk's per-token factors and scan coefficients: b_Gr [BT, BT], b_br, b_fr [BT] on the
        read side (`read`); b_gc, b_hc [BT] (rows L-1 of G and Pm lr) and b_bl, b_fl, b_ml (`carry`)."""
        em, lv = self.em, self.lv
        for g in self.gates:
            em.line(f"{ident(g, 'b_g')} = tl.load({ident(g, 'g')} + r_t, mask=m_t, other=0.5)"
                    f".to(tl.float32)  # gate {comment(g)}")
        spans = {"a": lv.retention.span, "c": lv.retention.span, "lr": lv.algorithm.span,
                 "beta": lv.algorithm.span}
        pad = {"a": "1.0", "c": "0.0", "lr": "0.0", "beta": "1.0"}
        for role, expr in self.roles.items():
            em.line(f"b_{role} = tl.where(m_t, {self.tok(expr)}, {pad[role]})  "
                    f"{where(spans[role]) or '#'} {role}_t = {show(expr)}")
        if self.lag:
            em.line(f"m_lag = o_i == 0  {where(lv.retention.span) or '#'} KL's lag token, the chunk's first: its step "
                    "is taken apart,")
            em.line("# so in the scans it is the identity (a = 1, lr = 0" + (", beta = 1, c = 0)" if self.momentum
                                                                               else ")"))
            em.line("b_a, b_lr = tl.where(m_lag, 1.0, b_a), tl.where(m_lag, 0.0, b_lr)")
            if self.momentum:
                em.line("b_beta, b_c = tl.where(m_lag, 1.0, b_beta), tl.where(m_lag, 0.0, b_c)")
        em.line("b_la, b_ga, b_sa = log_products(b_a, m_t)  # log a_t, g_t = log b_t and the sign of b_t")
        if read or self.momentum:
            em.line("m_c = o_i[:, None] >= o_i[None, :]  # causal: j <= t")
        if self.momentum:
            em.line("b_lm, b_gm, b_sm = log_products(b_beta, m_t)")
            em.line("b_Pm = segments(b_gm, b_sm, b_gm, b_sm, m_c)  # Pm[i, j] = prod_(j<r<=i) beta_r")
            em.line("b_mi = b_sm * tl.exp(b_gm)  # m_i = prod_(r<=i) beta_r")
            em.line("b_N = b_c[:, None] * b_Pm * b_lr[None, :]  # N[i, j] = c_i Pm[i, j] lr_j")
            em.line("b_cm = b_c * b_mi")
        else:
            em.line("b_w = b_c * b_lr  # the step's weight c_j lr_j")
        if read:
            if self.after:
                em.line("b_gr, b_sr, m_r = b_ga, b_sa, m_c  # reads after the write: row t")
            else:
                em.line("b_gr, b_sr = b_ga - b_la, tl.where(b_a < 0, -b_sa, b_sa)  # reads before the write: "
                        "row t - 1")
                em.line("m_r = o_i[:, None] > o_i[None, :]")
            em.line("b_Pr = segments(b_gr, b_sr, b_ga, b_sa, m_r)  # the read's P[t, i]")
            em.line("b_br = b_sr * tl.exp(b_gr)  # the read's b_t")
            if self.momentum:
                em.line(f"b_Gr = {self.dot('b_Pr', 'b_N', exact=True)}  # G = P N")
                em.line("b_fr = tl.sum(b_Pr * b_cm[None, :], 1)  # f = P (c m)")
            else:
                em.line("b_Gr = b_Pr * b_w[None, :]  # G[t, j] = P[t, j] c_j lr_j")
        if carry:
            em.line("m_l = o_i == i_last")
            em.line("m_e = o_i <= i_last")
            em.line("b_gl, b_sl = at(b_ga, m_l), at(b_sa, m_l)")
            em.line("b_rho = tl.where(m_e, tl.exp(tl.where(m_e, b_gl - b_ga, 0.0)) * (b_sl * b_sa), 0.0)  "
                    "# P[L-1, j]")
            em.line("b_bl = b_sl * tl.exp(b_gl)  # b_(L-1)")
            if self.momentum:
                em.line("b_gc = tl.sum(b_rho[:, None] * b_N, 0)  # G[L-1, j]")
                em.line("b_fl = tl.sum(b_rho * b_cm, 0)  # f_(L-1)")
                em.line("b_gml, b_sml = at(b_gm, m_l), at(b_sm, m_l)")
                em.line("b_pm = tl.where(m_e, tl.exp(tl.where(m_e, b_gml - b_gm, 0.0)) * (b_sml * b_sm), 0.0)  "
                        "# Pm[L-1, j]")
                em.line("b_hc = b_pm * b_lr  # Pm[L-1, j] lr_j: the momentum's row")
                em.line("b_ml = b_sml * tl.exp(b_gml)  # m_(L-1)")
            else:
                em.line("b_gc = b_rho * b_w  # G[L-1, j]")
        if self.omega:
            self.window(read, carry)

    def window(self, read: bool, carry: bool) -> None:
        """The omega window Ω [BT, BW] of chunk i_t and the coefficients of its rows' gradients: b_Gw = G Ω
        (`read`); b_gcw, b_hcw = the carried rows of G Ω and Pm lr Ω (`carry`)."""
        em = self.em
        for g in self.window_gates:
            em.line(f"{ident(g, 'b_gw')} = tl.load({ident(g, 'gw')} + r_j, mask=m_j, other=0.5).to(tl.float32)  "
                    f"# gate {comment(g)} at the window's rows")
        em.line(f"b_gam = tl.where(m_j, {self.window_tok(self.gamma)}, 0.0)  {where(self.lv.bias.span) or '#'} "
                f"gamma_j = {show(self.gamma)}")
        em.line("m_O = m_t[:, None] & m_j[None, :] & (o_j[None, :] >= o_i[:, None]) & "
                "(o_j[None, :] <= o_i[:, None] + CW - C)  # row j: one of the WINDOW tokens up to t")
        em.line("b_O = tl.where(m_O, b_gam[None, :], 0.0)  # Ω[t, j] = gamma_j")
        if read:
            em.line(f"b_Gw = {self.dot('b_Gr', 'b_O', exact=True)}  # G Ω: the reads' coefficients of the "
                    "rows' gradients")
        if carry:
            em.line("b_gcw = tl.sum(b_gc[:, None] * b_O, 0)  # (G Ω)[L-1, j]: the carried row")
            if self.momentum:
                em.line("b_hcw = tl.sum(b_hc[:, None] * b_O, 0)  # (Pm lr Ω)[L-1, j]: the momentum's")

    def error(self) -> None:
        """b_e [BT, BV] = K W_0 - V at the chunk-start state b_h (and b_norm, b_r for ||e||)."""
        em = self.em
        em.line(f"b_e = {self.dot('b_k', 'b_h')} - b_v  # E = K W_0 - V")
        self.error_norm()

    def error_norm(self) -> None:
        """b_norm, b_r = ||e|| per row of b_e, where the bias reads it."""
        if self.norm:
            self.em.line("b_norm = tl.sqrt(tl.sum(b_e * b_e, 1))")
            self.em.line("b_r = tl.maximum(b_norm, 1e-12)  # r = ||e||, clamped as the reference does")

    def error_bwd(self) -> None:
        """b_de [BT, BV]: ∂/∂E from b_dd = ∂/∂D."""
        em = self.em
        em.line(f"b_de = {self.times(diff(self.grad, S.e), 'b_dd')}  # through D = d(E, ...)")
        if self.norm:
            em.line(f"b_dr = tl.sum({self.times(diff(self.grad, S.r), 'b_dd')}, 1)")
            em.line("b_de += tl.where(b_norm > 1e-12, b_dr / b_r, 0.0)[:, None] * b_e  # ∂r/∂e = e / r")
        em.line(f"b_de = tl.where(m_{self.bias_rows}[:, None] & m_v[None, :], b_de, 0.0)")

    def value_grad(self) -> None:
        """b_dd [BT, BV] = ∂/∂D: the reads' -(G ⊙ Q K^T)^T dO and the carried rows' terms."""
        em = self.em
        em.line(f"b_kdh = {self.dot('b_k', 'b_dh')}  # K dW_L")
        em.line(f"b_dd = -{self.dot(f'tl.trans({self.G} * b_A)', 'b_do')} - {self.gc}[:, None] * b_kdh")
        if self.momentum:
            em.line(f"b_kdm = {self.dot('b_k', 'b_dm')}  # K dM_L")
            em.line(f"b_dd -= {self.hc}[:, None] * b_kdm")

    def kernel_head(self, name: str, args: str, doc: list[str], key: str) -> None:
        em = self.em
        self.decorate(key)
        em.line(f"def {name}(")
        em.line(f"        {args.rstrip(', ')},")
        em.line("        T, NT, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, "
                "BT: tl.constexpr, BK: tl.constexpr,")
        em.line("        BV: tl.constexpr, DOT: tl.constexpr, DT: tl.constexpr" +
                (", CW: tl.constexpr, BW: tl.constexpr):" if self.omega else "):"))
        with em.indent():
            em.line(f'"""{doc[0]}')
            for text in doc[1:]:
                em.line(text)
            em.line('"""')

    # ---- kernels -----------------------------------------------------------------------------
    def state_kernel(self) -> None:
        em, lv = self.em, self.lv
        self.kernel_head("chunk_state_fwd_kernel",
                         f"k, v, {self.gate_args()}{self.states(suffix='0')}, {self.states()}, d, "
                         f"{self.states(suffix='t')},",
                         ["Program (i_v, i_bh): value channels [i_v BV, (i_v + 1) BV) of the state of batch "
                          "x head i_bh,",
                          "chunk by chunk: saves the state entering each chunk (fp32) and D = dℓ/dy at it " +
                          ("[B, NT, CW, H, V]" if self.omega else "[B, T, H, V] (fp32).")] +
                         (["(fp32, at its window's rows)."] if self.omega else []), '"H", "K", "V", "BT", "BV"')
        with em.indent():
            self.ids(value_block=True, chunk_program=False)
            em.line("o_s = i_bh.to(tl.int64) * (K * V)  # this (batch, head)'s state")
            em.line("b_h = tl.load(h0 + o_s + o_kv, mask=m_kv, other=0.0)  # [BK, BV] fp32: W_0")
            if self.momentum:
                em.line("b_m = tl.load(hm0 + o_s + o_kv, mask=m_kv, other=0.0)  # M_0")
            with em.indent("for i_t in range(0, NT):"):
                self.chunk_rows()
                em.line(f"tl.store(h + {self.per_chunk()} + o_kv, b_h, mask=m_kv)")
                if self.momentum:
                    em.line(f"tl.store(hm + {self.per_chunk()} + o_kv, b_m, mask=m_kv)")
                em.line(f"b_k = {self.load('k', 'K', self.j)}")
                em.line(f"b_v = {self.load('v', 'V', self.j)}")
                self.coefficients(read=False, carry=True)
                if not self.state_free:
                    self.error()
                em.line(f"b_d = tl.where(m_{self.j}[:, None] & m_v[None, :], {self.elem(self.grad)}, 0.0)  "
                        f"{where((lv.bias.inner or lv.bias).span) or '#'} D = dℓ/dy at W_0")
                em.line(self.store("d", "V", "b_d", self.j))
                em.line(f"b_kd = {self.dot('tl.trans(b_k)', f'{self.gc}[:, None] * b_d')}  "
                        f"# sum_j {'(G Ω)' if self.omega else 'G'}[L-1, j] k_j d_j^T")
                if self.momentum:
                    em.line(f"b_km = {self.dot('tl.trans(b_k)', f'{self.hc}[:, None] * b_d')}")
                    em.line("b_h, b_m = b_bl * b_h + b_fl * b_m - b_kd, b_ml * b_m - b_km  # row L-1: W_L, M_L")
                else:
                    em.line("b_h = b_bl * b_h - b_kd  # row L-1: W_L")
            em.line("tl.store(ht + o_s + o_kv, b_h, mask=m_kv)")
            if self.momentum:
                em.line("tl.store(hmt + o_s + o_kv, b_m, mask=m_kv)")

    def output_kernel(self) -> None:
        em = self.em
        self.kernel_head("chunk_output_fwd_kernel", f"q, k, d, {self.gate_args()}{self.states()}, o,",
                         ["Program (i_v, i_t, i_bh): the outputs of one chunk, value channels [i_v BV, "
                          "(i_v + 1) BV)."], '"H", "K", "V", "BT", "BV"')
        with em.indent():
            self.ids(value_block=True, chunk_program=True)
            self.chunk_rows()
            em.line(f"b_q = {self.load('q', 'K')}")
            em.line(f"b_k = {self.load('k', 'K', self.j)}")
            self.coefficients(read=True, carry=False)
            em.line(f"b_h = tl.load(h + {self.per_chunk()} + o_kv, mask=m_kv, other=0.0)  # W_0")
            em.line(f"b_o = b_br[:, None] * {self.dot('b_q', 'b_h')}  # diag(b) Q W_0")
            if self.momentum:
                em.line(f"b_m = tl.load(hm + {self.per_chunk()} + o_kv, mask=m_kv, other=0.0)  # M_0")
                em.line(f"b_o += b_fr[:, None] * {self.dot('b_q', 'b_m')}  # + diag(f) Q M_0")
            em.line(f"b_A = {self.dot('b_q', 'tl.trans(b_k)')}  # q_t . k_j")
            em.line(f"b_d = {self.load('d', 'V', self.j)}")
            G = "G Ω" if self.omega else "G"
            em.line(f"b_o -= {self.dot(f'{self.G} * b_A', 'b_d')}  # - ({G} ⊙ Q K^T) D")
            em.line(self.store("o", "V", "b_o"))

    def state_bwd_kernel(self) -> None:
        em = self.em
        self.kernel_head("chunk_state_bwd_kernel",
                         f"q, k, v, {self.gate_args()}{self.states()}, do, {self.states('d', 't')}, "
                         f"{self.states('d')}, {self.states('d', '0')},",
                         ["Program (i_v, i_bh), chunks backwards: saves ∂/∂ the state leaving each chunk "
                          "(dh" + (", dhm" if self.momentum else "") + ") and",
                          "ends with ∂/∂ the initial state."], '"H", "K", "V", "BT", "BV"')
        with em.indent():
            self.ids(value_block=True, chunk_program=False)
            em.line("o_s = i_bh.to(tl.int64) * (K * V)")
            em.line("b_dh = tl.load(dht + o_s + o_kv, mask=m_kv, other=0.0)  # [BK, BV] fp32: ∂/∂ the final W")
            if self.momentum:
                em.line("b_dm = tl.load(dhmt + o_s + o_kv, mask=m_kv, other=0.0)  # ∂/∂ the final M")
            with em.indent("for i_n in range(0, NT):"):
                em.line("i_t = NT - 1 - i_n")
                self.chunk_rows()
                em.line(f"tl.store(dh + {self.per_chunk()} + o_kv, b_dh, mask=m_kv)")
                if self.momentum:
                    em.line(f"tl.store(dhm + {self.per_chunk()} + o_kv, b_dm, mask=m_kv)")
                em.line(f"b_q = {self.load('q', 'K')}")
                em.line(f"b_k = {self.load('k', 'K', self.j)}")
                em.line(f"b_do = {self.load('do', 'V')}")
                self.coefficients(read=True, carry=True)
                em.line(f"b_A = {self.dot('b_q', 'tl.trans(b_k)')}")
                self.value_grad()
                em.line(f"b_dhn = b_bl * b_dh + {self.dot('tl.trans(b_q)', 'b_br[:, None] * b_do')}  "
                        "# ∂/∂W_0: the carry and diag(b) Q W_0")
                if not self.state_free:
                    em.line(f"b_h = tl.load(h + {self.per_chunk()} + o_kv, mask=m_kv, other=0.0)")
                    em.line(f"b_v = {self.load('v', 'V', self.j)}")
                    self.error()
                    self.error_bwd()
                    em.line(f"b_dhn += {self.dot('tl.trans(b_k)', 'b_de')}  # through E = K W_0 - V")
                if self.momentum:
                    em.line(f"b_dm = b_fl * b_dh + b_ml * b_dm + {self.dot('tl.trans(b_q)', 'b_fr[:, None] * b_do')}")
                em.line("b_dh = b_dhn")
            em.line("tl.store(dh0 + o_s + o_kv, b_dh, mask=m_kv)")
            if self.momentum:
                em.line("tl.store(dhm0 + o_s + o_kv, b_dm, mask=m_kv)")

    def grads_kernel(self) -> None:
        em, mom, j, BJ = self.em, self.momentum, self.j, self.BJ
        gc, hc, dgc, dhc = self.gc, self.hc, "b_d" + self.gc[2:], "b_d" + self.hc[2:]
        rows = " (k, v, D and their gradients at the window's rows)" if self.omega else ""
        self.kernel_head("chunk_grads_bwd_kernel",
                         f"q, k, v, {self.gate_args()}{self.states()}, d, {self.states('d')}, do, dq, dk, dv, "
                         f"{self.gate_args('dg')}",
                         ["Program (i_t, i_bh): one chunk's gradients of q, k, v and the gates, from the saved "
                          "states entering",
                          "it (h" + (", hm" if mom else "") + "), ∂/∂ those leaving it (dh" +
                          (", dhm" if mom else "") + f") and D{rows}."], '"H", "K", "V", "BT", "BV"')
        with em.indent():
            self.ids(value_block=False, chunk_program=True)
            self.chunk_rows()
            em.line(f"b_q = {self.load('q', 'K')}")
            em.line(f"b_k = {self.load('k', 'K', j)}")
            self.coefficients(read=True, carry=True)
            em.line(f"b_A = {self.dot('b_q', 'tl.trans(b_k)')}")
            em.line(f"o_c = {self.per_chunk()}")
            G = "(G Ω)" if self.omega else "G"
            zeros = [("b_dOD", f"[BT, {BJ}]", "dO D^T"), ("b_dqh", "[BT, BK]", "dO W_0^T"),
                     ("b_dkh", f"[{BJ}, BK]", "D dW_L^T"), (dgc, f"[{BJ}]", f"∂/∂{G}[L-1, j]"),
                     ("b_dbr", "[BT]", "∂/∂ the read's b_t")]
            if not self.state_free:
                zeros.append(("b_dke", f"[{BJ}, BK]", "dE W_0^T"))
            if mom:
                zeros += [("b_dqm", "[BT, BK]", "dO M_0^T"), ("b_dkm", f"[{BJ}, BK]", "D dM_L^T"),
                          (dhc, f"[{BJ}]", "∂/∂(Pm lr" + (" Ω" if self.omega else "") + ")[L-1, j]"),
                          ("b_dfr", "[BT]", "∂/∂ the read's f_t")]
            zeros += [(ident(g, "b_dd"), f"[{BJ}]", f"∂/∂ gate {comment(g)} through D") for g in self.bias_gates]
            for name, shape, what in zeros:
                em.line(f"{name} = tl.zeros({shape}, dtype=tl.float32)  # {what}")
            em.line("b_dbl = 0.0  # ∂/∂b_(L-1)")
            if mom:
                em.line("b_dfl = 0.0  # ∂/∂f_(L-1)")
                em.line("b_dml = 0.0  # ∂/∂m_(L-1)")
            with em.indent("for i_v in range(0, tl.cdiv(V, BV)):"):
                self.value_block()
                em.line("b_h = tl.load(h + o_c + o_kv, mask=m_kv, other=0.0)")
                em.line("b_dh = tl.load(dh + o_c + o_kv, mask=m_kv, other=0.0)")
                if mom:
                    em.line("b_m = tl.load(hm + o_c + o_kv, mask=m_kv, other=0.0)")
                    em.line("b_dm = tl.load(dhm + o_c + o_kv, mask=m_kv, other=0.0)")
                em.line(f"b_do = {self.load('do', 'V')}")
                em.line(f"b_d = {self.load('d', 'V', j)}")
                em.line(f"b_v = {self.load('v', 'V', j)}")
                self.value_grad()
                if self.state_free:
                    em.line(f"b_de = tl.zeros([{BJ}, BV], dtype=tl.float32)  # D is free of the state")
                else:
                    self.error()
                    self.error_bwd()
                    em.line(f"b_dke += {self.dot('b_de', 'tl.trans(b_h)')}")
                dgv = diff(self.grad, S.v)
                dv = f"{self.times(dgv, 'b_dd')} - b_de" if dgv != 0 else "-b_de"
                em.line(self.store("dv", "V", dv, j))
                for g in self.bias_gates:
                    dg = self.times(diff(self.grad, ir.gate_symbol(g)), "b_dd")
                    em.line(f"{ident(g, 'b_dd')} += tl.sum(tl.where(m_{j}[:, None] & m_v[None, :], {dg}, 0.0), 1)")
                em.line(f"b_dOD += {self.dot('b_do', 'tl.trans(b_d)')}")
                em.line(f"b_dqh += {self.dot('b_do', 'tl.trans(b_h)')}")
                em.line(f"b_dkh += {self.dot('b_d', 'tl.trans(b_dh)')}")
                em.line(f"{dgc} -= tl.sum(b_kdh * b_d, 1)")
                em.line(f"b_dbr += tl.sum(b_do * {self.dot('b_q', 'b_h')}, 1)")
                em.line("b_dbl += tl.sum(b_h * b_dh)")
                if mom:
                    em.line(f"b_dqm += {self.dot('b_do', 'tl.trans(b_m)')}")
                    em.line(f"b_dkm += {self.dot('b_d', 'tl.trans(b_dm)')}")
                    em.line(f"{dhc} -= tl.sum(b_kdm * b_d, 1)")
                    em.line(f"b_dfr += tl.sum(b_do * {self.dot('b_q', 'b_m')}, 1)")
                    em.line("b_dfl += tl.sum(b_m * b_dh)")
                    em.line("b_dml += tl.sum(b_m * b_dm)")
            em.line(f"# q and k: reads O = diag(b) Q W_0 (+ diag(f) Q M_0) - ({G} ⊙ Q K^T) D, the carry and E")
            em.line(f"b_dA = -b_dOD * {self.G}")
            em.line(f"b_d{self.G[2:]} = -b_dOD * b_A  # ∂/∂{G} of the reads")
            dq = "b_br[:, None] * b_dqh" + (" + b_fr[:, None] * b_dqm" if mom else "")
            em.line(f"b_dq = {dq} + {self.dot('b_dA', 'b_k')}")
            dk = ("" if self.state_free else "b_dke ") + f"- {gc}[:, None] * b_dkh" + \
                (f" - {hc}[:, None] * b_dkm" if mom else "")
            em.line(f"b_dk = {dk} + {self.dot('tl.trans(b_dA)', 'b_q')}")
            em.line(self.store("dq", "K", "b_dq"))
            em.line(self.store("dk", "K", "b_dk", j))
            if self.omega:
                self.window_bwd()
            self.coefficients_bwd()
            self.gate_grads(through_bias=not self.omega)  # an omega window's bias gates: at its rows
            self.window_gate_grads()

    def window_bwd(self) -> None:
        """From ∂/∂(G Ω) (b_dGw) and ∂/∂ the window's carried rows (b_dgcw, b_dhcw) to ∂/∂G, ∂/∂ the
        carried rows of G (and Pm lr) and ∂/∂gamma_j (b_dgam)."""
        em = self.em
        em.line("# Ω backwards: ∂/∂G, ∂/∂ the carried rows and ∂/∂gamma_j = sum_t ∂/∂Ω[t, j] "
                "(where Ω is gamma_j)")
        dO = f"{self.dot('tl.trans(b_Gr)', 'b_dGw', exact=True)} + b_gc[:, None] * b_dgcw[None, :]"
        if self.momentum:
            dO += " + b_hc[:, None] * b_dhcw[None, :]"
        em.line(f"b_dgam = tl.sum(tl.where(m_O, {dO}, 0.0), 0)")
        em.line(f"b_dGr = {self.dot('b_dGw', 'tl.trans(b_O)', exact=True)}")
        em.line("b_dgc = tl.sum(b_O * b_dgcw[None, :], 1)")
        if self.momentum:
            em.line("b_dhc = tl.sum(b_O * b_dhcw[None, :], 1)")

    def coefficients_bwd(self, read: bool = True) -> None:
        """From ∂/∂ the scan coefficients (b_dGr, b_dbr, b_dgc, b_dbl; with momentum b_dfr, b_dhc, b_dfl,
        b_dml) to ∂/∂ log|a|, c, lr (and log|beta|) of each token; without `read`, from the carried
        row's alone (b_dgc, b_dbl, ...: a kernel that computes no reads)."""
        em = self.em
        em.line("# the scan coefficients, backwards through the log-space products")
        if read:
            em.line("b_dgr = b_dbr * b_br  # ∂/∂ the read's cumulative log")
        em.line("b_dga = tl.where(m_l, b_dbl * b_bl, 0.0)  # ∂/∂g_t (b_(L-1) = exp g_(L-1))")
        if self.momentum:
            em.line("b_dN = " + (f"{self.dot('tl.trans(b_Pr)', 'b_dGr', exact=True)} + " if read else "") +
                    "b_rho[:, None] * b_dgc[None, :]")
            if read:
                em.line(f"b_dP = {self.dot('b_dGr', 'tl.trans(b_N)', exact=True)} + b_dfr[:, None] * b_cm[None, :]")
                em.line("b_dPr = b_dP * b_Pr")
                em.line("b_dgr += tl.sum(b_dPr, 1)")
                em.line("b_dga -= tl.sum(b_dPr, 0)")
            em.line("b_drho = (tl.sum(b_N * b_dgc[None, :], 1) + b_dfl * b_cm) * b_rho  # ∂/∂ log P[L-1, j]")
            em.line("b_dga += tl.where(m_l, tl.sum(b_drho, 0), 0.0) - b_drho")
            em.line("b_dcm = " + ("tl.sum(b_Pr * b_dfr[:, None], 0) + " if read else "") + "b_dfl * b_rho  # ∂/∂(c m)")
            em.line("b_dNN = b_dN * b_N")
            em.line("b_dc = tl.sum(b_dN * b_Pm * b_lr[None, :], 1) + b_dcm * b_mi")
            em.line("b_dlr = tl.sum(b_dN * b_Pm * b_c[:, None], 0) + b_dhc * b_pm")
            em.line("b_dhh = b_dhc * b_hc")
            em.line("b_dgm = tl.sum(b_dNN, 1) - tl.sum(b_dNN, 0) + b_dcm * b_cm - b_dhh")
            em.line("b_dgm += tl.where(m_l, tl.sum(b_dhh, 0) + b_dml * b_ml, 0.0)")
            em.line("b_dlbeta = suffix_sums(b_dgm)  # ∂/∂ log|beta_r| = sum_(t>=r) ∂/∂gm_t")
        else:
            em.line("b_dw = " + ("tl.sum(b_dGr * b_Pr, 0) + " if read else "") + "b_dgc * b_rho  # ∂/∂(c_j lr_j)")
            if read:
                em.line("b_dGG = b_dGr * b_Gr")
                em.line("b_dgr += tl.sum(b_dGG, 1)")
                em.line("b_dga -= tl.sum(b_dGG, 0)")
            em.line("b_dgg = b_dgc * b_gc")
            em.line("b_dga += tl.where(m_l, tl.sum(b_dgg, 0), 0.0) - b_dgg")
            em.line("b_dc, b_dlr = b_dw * b_lr, b_dw * b_c")
        if not read:
            em.line("b_dla = suffix_sums(b_dga)  # ∂/∂ log|a_r| = sum_(t>=r) ∂/∂g_t")
        elif self.after:
            em.line("b_dla = suffix_sums(b_dga + b_dgr)  # ∂/∂ log|a_r| = sum_(t>=r) ∂/∂g_t")
        else:
            em.line("b_dla = suffix_sums(b_dga) + suffix_sums(b_dgr) - b_dgr  # the read's g_t sums r < t")
        if self.lag:
            em.line("# the lag token's factors in the scans are constants: no gradient to its gates through them")
            names = ["b_dla", "b_dc", "b_dlr"] + (["b_dlbeta"] if self.momentum else [])
            for name in names:
                em.line(f"{name} = tl.where(m_lag, 0.0, {name})")

    def gate_grads(self, through_bias: bool = True) -> None:
        """Store each gate's gradient through the scan coefficients (and through D: `through_bias`)."""
        em = self.em
        by = {"a": ("b_dla", sympy.log), "c": ("b_dc", None), "lr": ("b_dlr", None),
              "beta": ("b_dlbeta", sympy.log)}
        for g in self.gates:
            x, terms = ir.gate_symbol(g), []
            for role, expr in self.roles.items():
                name, fn = by[role]
                d = diff(fn(expr) if fn else expr, x)
                if d != 0:
                    terms.append(self.times(d, name, self.tok))
            if through_bias and g in self.bias_gates:
                terms.append(ident(g, "b_dd"))
            total = " + ".join(terms) or "tl.zeros([BT], dtype=tl.float32)"
            em.line(f"tl.store({ident(g, 'dg')} + r_t, ({total}).to({ident(g, 'dg')}.dtype.element_ty), "
                    f"mask=m_t)  # gate {comment(g)}")

    def window_gate_grads(self) -> None:
        """Store the gradients of the gates read at the window's rows (omega): through gamma (b_dgam) and,
        where the bias map runs in these kernels, through D. A token's rows in the windows of several
        chunks are summed by the backward of `_windows`."""
        em = self.em
        for g in self.window_gates:
            terms = []
            d = diff(self.gamma, ir.gate_symbol(g))
            if d != 0:
                terms.append(self.times(d, "b_dgam", self.window_tok))
            if self.BIAS_ON_WINDOW_ROWS and g in self.bias_gates:
                terms.append(ident(g, "b_dd"))
            total = " + ".join(terms) or "tl.zeros([BW], dtype=tl.float32)"
            em.line(f"tl.store({ident(g, 'dgw')} + r_j, ({total}).to({ident(g, 'dgw')}.dtype.element_ty), "
                    f"mask=m_j)  # gate {comment(g)} at the window's rows")

    # ---- host side ---------------------------------------------------------------------------
    def launchers(self) -> None:
        em, mom = self.em, self.momentum
        gates = self.gate_args()
        if self.omega:
            render_windows(em)
            em.gap()
        sizes = "B, T, H, K, V, BT, NT, BK, BV, DOT, DT" + (", BW" if self.omega else "")
        with em.indent("def _sizes(q, v):"):
            em.line(f'"""({sizes}): shapes; BT, BK, BV{", BW" if self.omega else ""} blocks of at least 16 '
                    "(tl.dot's least),")
            em.line("DOT and DT the matmuls' precision and operand type (see the decay family's kernels).\"\"\"")
            em.line("B, T, H, K = q.shape")
            em.line("V = v.shape[-1]")
            em.line("BT, BK = max(16, triton.next_power_of_2(CHUNK)), max(16, triton.next_power_of_2(K))")
            em.line("BV = max(16, triton.next_power_of_2(V) if NORM else min(triton.next_power_of_2(V), BV_MAX))")
            em.line('DOT = "ieee" if q.dtype == torch.float32 else "tf32"')
            em.line("DT = tl.float32 if INTERPRET else MATMUL_TYPES[q.dtype]")
            if self.omega:
                em.line("BW = max(16, triton.next_power_of_2(CW))")
                em.line("BV = min(BV, 32) if BW * BK >= 128 * 128 and not NORM else BV  # [BW, BK] tiles this wide: "
                        "fewer value channels per block")
            em.line("return B, T, H, K, V, BT, triton.cdiv(T, CHUNK), BK, BV, DOT, DT" +
                    (", BW" if self.omega else ""))
        em.gap()
        launch = "T, NT, H=H, K=K, V=V, C=CHUNK, BT=BT, BK=BK, BV=BV, DOT=DOT, DT=DT" + \
            (", CW=CW, BW=BW" if self.omega else "")
        rows = "B, NT, CW, H" if self.omega else "B, T, H"
        with em.indent(f"def chunk_fwd(q, k, v, {gates}{self.states(suffix='0')}):"):
            em.line('"""-> o [B, T, H, V] (v\'s dtype), the final state(s) [B, H, K, V] fp32, the states '
                    "entering each chunk")
            em.line(f'[B, NT, H, K, V] fp32 and D [{rows}, V] fp32.' +
                    (" k, v and the gates read at the window's rows (gw_):" if self.omega else '"""'))
            if self.omega:
                em.line('[B, NT, CW, H, ...], each chunk\'s window rows (`_windows`)."""')
            em.line(f"{sizes} = _sizes(q, v)")
            em.line("f32 = dict(dtype=torch.float32, device=q.device)")
            for s in (["h", "hm"] if mom else ["h"]):
                em.line(f"{s}, {s}t = torch.empty(B, NT, H, K, V, **f32), torch.empty(B, H, K, V, **f32)")
            em.line(f"d = torch.empty({rows}, V, **f32)")
            em.line("chunk_state_fwd_kernel[(triton.cdiv(V, BV), B * H)](")
            em.line(f"    k, v, {gates}{self.states(suffix='0')}, {self.states()}, d, {self.states(suffix='t')}, "
                    f"{launch})")
            em.line("o = torch.empty(B, T, H, V, dtype=v.dtype, device=v.device)" if self.omega
                    else "o = torch.empty_like(v)")
            em.line("chunk_output_fwd_kernel[(triton.cdiv(V, BV), NT, B * H)](")
            em.line(f"    q, k, d, {gates}{self.states()}, o, {launch})")
            em.line(f"return o, {self.states(suffix='t')}, {self.states()}, d")
        em.gap()
        with em.indent(f"def chunk_bwd(q, k, v, {gates}{self.states()}, d, do, {self.states('d', 't')}):"):
            em.line('"""Gradients of q, k, v and the gates (fp32, each in its input\'s layout) and of the initial '
                    'state(s) (fp32)."""')
            em.line(f"{sizes} = _sizes(q, v)")
            em.line("f32 = dict(dtype=torch.float32, device=q.device)")
            for s in (["h", "hm"] if mom else ["h"]):
                em.line(f"d{s}, d{s}0 = torch.empty(B, NT, H, K, V, **f32), torch.empty(B, H, K, V, **f32)")
            em.line("chunk_state_bwd_kernel[(triton.cdiv(V, BV), B * H)](")
            em.line(f"    q, k, v, {gates}{self.states()}, do, {self.states('d', 't')}, {self.states('d')}, "
                    f"{self.states('d', '0')}, {launch})")
            em.line("dq, dk, dv = torch.empty_like(q, **f32), torch.empty_like(k, **f32), torch.empty_like(v, **f32)")
            dgates = self.gate_args("dg")
            for g, dg in zip(self.gate_names(), self.gate_names("dg")):
                em.line(f"{dg} = torch.empty_like({g}, **f32)")
            em.line("chunk_grads_bwd_kernel[(NT, B * H)](")
            em.line(f"    q, k, v, {gates}{self.states()}, d, {self.states('d')}, do, dq, dk, dv, {dgates}{launch})")
            em.line(f"return dq, dk, dv, {dgates}{self.states('d', '0')}")

    def function(self) -> None:
        em = self.em
        gates, n = self.gate_args(), len(self.gates) + len(self.window_gates)
        with em.indent("class ChunkFunction(torch.autograd.Function):"):
            decorators(em, "forward")
            with em.indent(f"def forward(ctx, q, k, v, {gates}{self.states(suffix='0')}):"):
                em.line(f"o, {self.states(suffix='t')}, {self.states()}, d = chunk_fwd(q, k, v, {gates}"
                        f"{self.states(suffix='0')})")
                em.line(f"ctx.save_for_backward(q, k, v, {gates}{self.states()}, d)")
                em.line(f"return o, {self.states(suffix='t')}")
            em.gap(1)
            decorators(em, "backward")
            with em.indent(f"def backward(ctx, do, {self.states('d', 't')}):"):
                first_order_only(em)
                em.line("q, k, v, *saved = ctx.saved_tensors")
                for s in (["h", "hm"] if self.momentum else ["h"]):
                    em.line(f"d{s}t = torch.zeros_like(saved[{n}][:, 0]) if d{s}t is None else d{s}t.contiguous()")
                em.line(f"dq, dk, dv, *rest = chunk_bwd(q, k, v, *saved, do.contiguous(), "
                        f"{self.states('d', 't')})")
                em.line("return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), " +
                        "".join(f"rest[{i}].to(saved[{i}].dtype), " for i in range(n)) +
                        f"*rest[{n}:]")

    def public(self) -> None:
        em, lv = self.em, self.lv
        kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
        state = "(W, M), each [B, H, K, V]" if self.momentum else "W [B, H, K, V]"
        with em.indent(f"def {ident(lv.name, 'level')}(q, k, v, *, {kw}initial_state=None, "
                       "output_final_state=False):"):
            common.public_head(em, lv, state)
            em.line("state = (state,) if torch.is_tensor(state) else tuple(state)")
            unused = [g for g in lv.gates if g not in self.gates + self.window_gates]
            if unused:
                em.line(f"# gate(s) {comment(', '.join(unused))}: not read by this level's rule")
            args = "".join(f"{ident(g, 'g')}.contiguous(), " for g in self.gates)
            kv = "k.contiguous(), v.contiguous()"
            if self.omega:
                em.line("# k, v and the gates the bias and gamma read: each chunk's window rows [B, NT, CW, H, ...]")
                kv = "_windows(k, 1), _windows(v, 1)"
                args += "".join(f"_windows({ident(g, 'g')}, 1), " for g in self.window_gates)
            em.line(f"o, *final = ChunkFunction.apply(q.contiguous(), {kv}, "
                    f"{args}*(s.to(torch.float32).contiguous() for s in state))")
            em.line("return o, (_pack(tuple(final)) if output_final_state else None)")


def render_windows(em: Emitter) -> None:
    """`_windows`: the per-chunk copies of an omega window's rows (the host side of both frozen kernel files)."""
    em.block('''
def _windows(x, dim):
    """Each chunk's omega window along x's token dimension `dim`: [.., T, ..] -> [.., NT, CW, ..], row j of
    chunk n the token n CHUNK - (WINDOW - 1) + j (zero where that is before the call's first token or past
    its last). Its backward sums each token's rows over the windows that hold it."""
    T = x.shape[dim]
    NT = triton.cdiv(T, CHUNK)
    zeros = lambda n: x.new_zeros(x.shape[:dim] + (n,) + x.shape[dim + 1:])
    x = torch.cat([zeros(WINDOW - 1), x, zeros(NT * CHUNK - T)], dim)
    return x.unfold(dim, CW, CHUNK).movedim(-1, dim + 1).contiguous()
''')
