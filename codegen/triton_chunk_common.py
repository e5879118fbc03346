"""Chunked Triton kernels (forward and backward) shared by the decay and delta families (MATH.md §3.1-3.3):
`level_<name>_triton_chunk.py`, a real file in the cache (Triton reads kernel source from disk).

A chunk of BT tokens (i, j = 1..BT), S_0 [K, V] the state entering it, u_j = b_j k_j the write keys
(b_t the step size, a scalar) and g_i = sum_(r<=i) log a_r the decay's cumulative log within the chunk
(gb_i = g_(i-1)); the error side reads ge = g (the delta rule's error at the decayed state) or gb (at
the old one), the read side go = g (read after write) or gb (before). D [BT, V] are the values written:
v itself (decay family) or the pseudo-values of the WY/UT form (delta family)

    D = U - W S_0,   U = A V,   W = A (exp(ge) * K),   A = (I + G)^-1,
    G_ij = exp(ge_i - g_j) (k_i . u_j) for j < i (else 0), inverted in fp32 by forward substitution;
    O   = (exp(go) * Q) S_0 + P D,   P_ij = exp(go_i - g_j) (q_i . u_j) for j <= i (after) or j < i;
    S_C = exp(g_C) S_0 + (exp(g_C - g_j) * U_w)^T D,   U_w [BT, K] the write keys u_j.

Kernels, fla's split (fla/ops/common/chunk_delta_h.py, chunk_o.py, gated_delta_rule/wy_fast.py):
gate (the derived decay and step size, printed from sympy), wy (delta: A, W, U per chunk), state (the
recurrence over chunks: one program per block of value channels, saving each chunk's entering state
and, for the delta family, D), output (per chunk and value block). Backward: state_bwd (the
recurrence backwards: ∂/∂ each chunk's leaving state, and ∂/∂D), grads (per chunk: q, k, v, step and
cumulative-log gradients from the saved states) and gate_bwd (reversed cumulative sums within the
chunk, then the gates through sympy derivatives). Decays are taken in log space, as fla does: a_t > 0.

A decay per key channel (GLA) has g [B, T, H, K] and its reads within a chunk by sub-chunks: the decay
family's `ChannelKernels` (triton_chunk_decay.py), a subclass of `Kernels` that shares the state
kernels through the per-token factors `rows`/`keys` and the reads `reads` (P here, A loaded there),
and overrides the rest (`parts`, `launcher_parts`). The delta family has no per-channel form.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy

import nlc
from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.rules import LevelRules
from nlc.plan import KernelPlan

from .emitter import Emitter, comment, ident, where
from .torch_chunk_decay import decay_axis, show, step_factors
from .torch_reference import render_nesting_doc
from .triton_printer import to_triton
from .triton_recurrent import AMP_IMPORT, decorators, first_order_only


@dataclass(frozen=True)
class ChunkForm:
    """What one level's chunked kernels compute: the family (delta or decay), the decay a_t (sympy,
    1: none) and the step size b_t (sympy, scalar, 1: none), the cumulative logs the error (delta)
    and the reads see ('g' or 'gb'), and whether the decay is per key channel (`channels`: g is
    [B, T, H, K], the decay family's `ChannelKernels`) or one scalar per token (g is [B, T, H])."""
    delta: bool
    decay: sympy.Expr
    step: sympy.Expr
    error: str
    read: str
    gates: tuple[str, ...]
    channels: bool = False

    @property
    def decayed(self) -> bool:
        return self.decay != 1

    @property
    def stepped(self) -> bool:
        return self.step != 1

    @property
    def before(self) -> bool:
        """Whether the kernels need gb = g_(i-1) (the error or the reads see the state before token i)."""
        return self.decayed and "gb" in ((self.error, self.read) if self.delta else (self.read,))


def chunk_form(rules: LevelRules, plan: KernelPlan) -> ChunkForm:
    """The form of a decay- or delta-family plan; NotImplementedError says why it has none."""
    lv, delta = rules.level, plan.family == "delta"
    if plan.family not in ("decay", "delta"):
        raise NotImplementedError(f"plan family {plan.family!r} has no chunked Triton kernels")
    if lv.memory.kind != "matrix":
        raise NotImplementedError(f"a {lv.memory.kind} memory: the chunked kernels hold a matrix state")
    channels = decay_axis(rules, plan) == "key"
    if channels and delta:
        raise NotImplementedError("a per-key-channel decay in the delta family has no chunked Triton kernels "
                                  "(its WY/UT system would be decayed per channel; the fused recurrent "
                                  "kernels run it)")
    key_step, value_step = step_factors(rules, plan, value_target=not delta)
    if value_step != 1:
        raise NotImplementedError(f"a step size over value channels ({show(value_step)}) needs a "
                                  "system per value channel: not in the chunked Triton kernels")
    if sympy.sympify(key_step).has(S.n):
        raise NotImplementedError("a step size that reads ||k_t||^2 (the implicit step) is not in the "
                                  "chunked Triton kernels")
    if any(lv.gate_axes[g] != "scalar" for g in ir.gate_names(key_step)):
        raise NotImplementedError(f"a step size over key channels ({show(key_step)}) is not in the "
                                  "chunked Triton kernels")
    decay, step = sympy.sympify(plan.decay), sympy.sympify(key_step)
    gates = tuple(sorted(set(ir.gate_names(decay)) | set(ir.gate_names(step))))
    form = ChunkForm(delta, decay, step, "g" if lv.grad_at == "retained" else "gb",
                     "g" if lv.read == "after" else "gb", gates, channels)
    renderer(form)(form, rules, "", "", []).text()  # a function the Triton printer has no form for raises
    return form


def renderer(form: ChunkForm) -> type[Kernels]:
    """The class that renders `form`: `Kernels`, or for a per-key-channel decay the decay family's
    `ChannelKernels` (a subclass, in triton_chunk_decay.py, which imports this module)."""
    if form.channels:
        from .triton_chunk_decay import ChannelKernels
        return ChannelKernels
    return Kernels


def imports(em: Emitter, lv: ir.Level, names: str, runtime: str = "") -> None:
    """A kernel file's imports: os, torch, triton, nlc.runtime.amp (for its autograd.Functions), the
    `runtime` line (a further import from nlc.runtime) if given, and `names` from the level's
    reference module."""
    em.line("import os")
    em.line()
    em.line("import torch")
    em.line("import triton")
    em.line("import triton.language as tl")
    em.line()
    em.line(AMP_IMPORT)
    if runtime:
        em.line(runtime)
    em.line()
    em.line(f"from .{ident(lv.name, 'level')} import {names}")
    em.gap()


def load_rows(name: str, dim: str, fp32: bool = True, rows: str = "r_t", mask: str = "m_t",
              other: str = "0.0") -> str:
    """A chunk's rows of a [B, T, H, dim] tensor (rows r_t, mask m_t, or those given): [BT, BK] (dim K)
    or [BT, BV] (dim V, block i_v), in fp32 unless `fp32` is False; `other` where masked."""
    o, m = ("o_k", "m_k") if dim == "K" else ("o_v", "m_v")
    cast = ".to(tl.float32)" if fp32 else ""
    return (f"tl.load({name} + {rows}[:, None] * {dim} + {o}[None, :], "
            f"mask={mask}[:, None] & {m}[None, :], other={other}){cast}")


def store_rows(name: str, dim: str, value: str, rows: str = "r_t", mask: str = "m_t") -> str:
    """Store `value` into a chunk's rows of a [B, T, H, dim] tensor (rows r_t, mask m_t, or those given),
    in the tensor's dtype."""
    o, m = ("o_k", "m_k") if dim == "K" else ("o_v", "m_v")
    return (f"tl.store({name} + {rows}[:, None] * {dim} + {o}[None, :], "
            f"{value}.to({name}.dtype.element_ty), mask={mask}[:, None] & {m}[None, :])")


def launch_configuration(em: Emitter) -> None:
    """The generated file's launch settings (results do not depend on them): value channels per
    program, the interpreter switch, the autotuning configurations and the matmul operand types."""
    em.line("BV_MAX = 64  # value channels per program of the state and output kernels")
    em.line('INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"')
    em.line("# one configuration under the interpreter, or when NLC_TRITON_AUTOTUNE=0 (tests: no tuning runs)")
    em.line('TUNE = not INTERPRET and os.environ.get("NLC_TRITON_AUTOTUNE", "1") != "0"')
    em.line("# the untuned one pipelines two stages deep: three need more shared memory than an H100 block")
    em.line("# has at head dim 128 (tests/triton/test_sm90_compile.py)")
    em.line("CONFIGS = [triton.Config({}, num_warps=4, num_stages=2)] if not TUNE else [")
    em.line("    triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (2, 3, 4)]")
    em.line("MATMUL_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}")


def unsupported(rules: LevelRules, plan: KernelPlan, family: str) -> str | None:
    """Why the chunked Triton kernels cannot run this level of plan family `family`, or None."""
    if plan.family != family:
        return f"plan family {plan.family!r}, not {family!r}"
    try:
        chunk_form(rules, plan)
    except NotImplementedError as err:
        return str(err)
    return None


class Kernels:
    """The generated file: header, configuration, kernels, launchers, autograd.Function, public op."""

    def __init__(self, form: ChunkForm, rules: LevelRules, model: str, file: str, math_lines):
        self.f, self.lv = form, rules.level
        self.model, self.file, self.math_lines = model, file, math_lines
        self.em = Emitter()

    # ---- names and snippets -----------------------------------------------------------------
    def names(self) -> dict:
        return {ir.gate_symbol(g): ident(g, "b_g") for g in self.f.gates}

    def printed(self, expr) -> str:
        """A derived scalar expression over the gates' [BT] blocks, as a [BT] block."""
        expr = sympy.sympify(expr)
        text = to_triton(expr, self.names())
        return text if expr.free_symbols else f"({text} + tl.zeros([BT], dtype=tl.float32))"

    def gate_args(self, prefix: str) -> str:
        return "".join(f"{ident(g, prefix)}, " for g in self.f.gates)

    def token_args(self) -> str:
        """The gate kernels' outputs the other kernels read: g (, gb) and beta, as arguments."""
        f = self.f
        return ("g, " if f.decayed else "") + ("gb, " if f.before else "") + ("beta, " if f.stepped else "")

    def prologue(self, chunked: bool = True, value_block: bool = False) -> None:
        em = self.em
        if value_block:
            em.line("i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)")
        else:
            em.line("i_t, i_bh = tl.program_id(0), tl.program_id(1)")
        em.line("i_b, i_h = i_bh // H, i_bh % H")
        em.line("o_i = tl.arange(0, BT)  # position in the chunk")
        if chunked:
            self.chunk_rows()
        em.line("o_k = tl.arange(0, BK)")
        em.line("m_k = o_k < K")
        if value_block:
            em.line("o_v = i_v * BV + tl.arange(0, BV)")
            em.line("m_v = o_v < V")

    def chunk_rows(self) -> None:
        em = self.em
        em.line("o_t = i_t * BT + o_i  # token")
        em.line("m_t = o_t < T")
        em.line("r_t = ((i_b * T + o_t) * H + i_h).to(tl.int64)  # row of each token in [B, T, H, ...]")

    def load(self, name: str, dim: str, fp32: bool = True) -> str:
        return load_rows(name, dim, fp32)

    def store(self, name: str, dim: str, value: str) -> str:
        return store_rows(name, dim, value)

    def load_tokens(self) -> None:
        """b_g, b_gb (as needed) and b_beta of the chunk's tokens."""
        em, f = self.em, self.f
        if f.decayed:
            em.line("b_g = tl.load(g + r_t, mask=m_t, other=0.0)  # [BT]: cumulative log decay in the chunk")
        if f.before:
            em.line("b_gb = tl.load(gb + r_t, mask=m_t, other=0.0)  # [BT]: the same up to the token before")
        if f.stepped:
            em.line("b_beta = tl.load(beta + r_t, mask=m_t, other=0.0)  # [BT]: step size b_t")

    def rows(self, x: str) -> str:
        """`x`, a per-token factor of the decay ([BT] here), as a factor of a [BT, BK] tile."""
        return f"{x}[:, None]"

    def keys(self, x: str) -> str:
        """`x`, a factor of the decay over the whole chunk (a scalar here), as a factor of a [BK, BV]
        state tile."""
        return x

    def reads(self) -> tuple[str, str]:
        """Emit the chunk's masked reads [BT, BT]; (their expression, their name in comments)."""
        self.read_matrix()
        return "b_P * b_M", "P"

    def write_keys(self) -> None:
        em = self.em
        if self.f.stepped:
            em.line("b_kb = b_k * b_beta[:, None]  # [BT, BK]: write keys u_j = b_j k_j")
        else:
            em.line("b_kb = b_k  # write keys u_j = k_j (no step size)")

    def last_token(self) -> None:
        """b_glast: g at the chunk's last token, and b_r [BT]: the decay from token j to the chunk end."""
        em = self.em
        em.line("i_last = tl.minimum(T - i_t * BT, BT) - 1  # the chunk's last token")
        em.line("b_glast = tl.load(g + ((i_b * T + i_t * BT + i_last) * H + i_h).to(tl.int64))")
        em.line("b_r = tl.where(m_t, tl.exp(b_glast - b_g), 0.0)  # [BT]: prod_(j<r<=C) a_r")

    def read_mask(self) -> str:
        return "o_i[:, None] >= o_i[None, :]" if self.f.read == "g" else "o_i[:, None] > o_i[None, :]"

    def read_matrix(self, name: str = "b_P") -> None:
        """name [BT, BT]: P_ij = exp(go_i - g_j) (q_i . u_j), masked to the tokens each read sees."""
        em, f = self.em, self.f
        em.line(f"{name} = tl.dot(b_q.to(DT), tl.trans(b_kb).to(DT), input_precision=DOT)  # q_i . u_j")
        em.line(f"m_P = {self.read_mask()}  # the writes token i reads")
        if f.decayed:
            em.line(f"b_M = tl.where(m_P, tl.exp(b_{f.read}[:, None] - b_g[None, :]), 0.0)  # prod_(j<r<=i) a_r")
        else:
            em.line("b_M = m_P.to(tl.float32)")

    def state_tile(self) -> None:
        em = self.em
        em.line("o_kv = o_k[:, None] * V + o_v[None, :]  # the tile's offsets in one [K, V] state")
        em.line("m_kv = m_k[:, None] & m_v[None, :]")

    def per_chunk(self) -> str:
        """Offset of chunk i_t's state of (batch, head) in [B, NT, H, K, V]."""
        return "((i_b * NT + i_t) * H + i_h).to(tl.int64) * (K * V)"

    # ---- the file ---------------------------------------------------------------------------
    def text(self) -> str:
        em = self.em
        self.header()
        imports(em, self.lv, "_pack, default_state")
        em.line("# Launch configuration, kept apart from the kernels (results do not depend on it).")
        self.configuration()
        em.gap()
        for part in self.parts():
            part()
            em.gap()
        self.public()
        return em.text()

    def configuration(self) -> None:
        self.em.line("CHUNK = 64  # tokens per chunk (BT): a power of two, at least 16")
        launch_configuration(self.em)

    def parts(self) -> list:
        """The file's kernels, in launch order (forward, then backward), then the host side."""
        f = self.f
        return ([self.gate_fwd_kernel] * bool(f.gates) + [self.wy_kernel] * f.delta +
                [self.state_kernel, self.output_kernel, self.state_bwd_kernel, self.grads_kernel] +
                [self.gate_bwd_kernel] * bool(f.gates) + [self.launchers, self.function])

    def header(self) -> None:
        em, lv, f = self.em, self.lv, self.f
        name = comment(lv.name)
        family = "delta family, MATH.md §3.2-3.3" if f.delta else "decay family, MATH.md §3.1"
        em.line(f'"""Level {name!r} of model {comment(self.model)!r}: chunked Triton kernels ({family}).')
        em.line()
        em.line(f"Generated by nlc {nlc.__version__} from {comment(self.file)}; do not edit. It computes "
                f"what level_{name}.py")
        em.line("(the reference recurrent form) computes, with fp32 states and accumulation.")
        for key, value in lv.describe().items():
            em.line(f"  {key:<10} {comment(value)}")
        for text in self.math_lines:
            em.line(text)
        self.method()
        em.line(f"Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; gates {self.GATES}. State: S [B, H, K, V], "
                "float32,")
        em.line("row convention: o_t = S_t^T q_t. Per-chunk states [B, NT, H, K, V] in the inputs' dtype.")
        em.line('"""')

    GATES = "[B, T, H]"  # the gates' shapes, as the docstrings state them
    SHAPE = 3  # the sizes of k the gate kernels take: B, T, H

    def method(self) -> None:
        """The docstring's lines on how the kernels compute: per chunk, then the kernels in order."""
        em, f = self.em, self.f
        em.line("Per chunk of BT = CHUNK tokens (i, j = 1..BT), S_0 the state entering it, u_j = b_j k_j "
                "the write keys,")
        em.line("g_i = sum_(r<=i) log a_r within the chunk (gb_i = g_(i-1)), D the values written"
                + (" (the pseudo-values):" if f.delta else " (v):"))
        if f.delta:
            em.line(f"  G_ij = exp({f.error}_i - g_j) (k_i . u_j) for j < i;  A = (I + G)^-1 "
                    "(forward substitution, fp32)")
            em.line(f"  W = A (exp({f.error}) * K),  U = A V,  D = U - W S_0")
        op = "<=" if f.read == "g" else "<"
        em.line(f"  O = (exp({f.read}) * Q) S_0 + P D,  P_ij = exp({f.read}_i - g_j) (q_i . u_j) for j {op} i")
        em.line("  S_C = exp(g_C) S_0 + sum_j exp(g_C - g_j) u_j D_j^T")
        if f.decayed:
            em.line("Decays are taken in log space (as fla's kernels): a_t must be positive.")
        em.line("Kernels: " + ("gate -> " if f.gates else "") + ("wy -> " if f.delta else "")
                + "state (over chunks) -> output; backward: state_bwd (over chunks, backwards) -> grads"
                + (" -> gate_bwd." if f.gates else "."))

    def decorate(self, key: str) -> None:
        self.em.line(f"@triton.autotune(configs=CONFIGS, key=[{key}])")
        self.em.line('@triton.jit(do_not_specialize=["T"])')

    def kernel_head(self, key: str, signature: tuple[str, str], doc: list[str]) -> None:
        """A kernel's decorators (autotuned on `key`), its signature (the def line from the name on, and
        the line continuing it) and its docstring's lines; the body follows under `em.indent()`."""
        em = self.em
        self.decorate(key)
        with em.indent(f"def {signature[0]}"):
            em.line(signature[1])
            lines = ['"""' + doc[0], *doc[1:]]
            lines[-1] += '"""'
            for text in lines:
                em.line(text)

    # ---- kernels ----------------------------------------------------------------------------
    def gate_fwd_kernel(self) -> None:
        em, f, lv = self.em, self.f, self.lv
        outs = self.token_args()
        self.decorate('"H", "BT"')
        with em.indent(f"def chunk_gate_fwd_kernel({self.gate_args('g')}{outs}T, H: tl.constexpr, "
                       "BT: tl.constexpr):"):
            em.line('"""Program (i_t, i_bh): the derived decay (as cumulative logs) and step size of one '
                    'chunk\'s tokens."""')
            em.line("i_t, i_bh = tl.program_id(0), tl.program_id(1)")
            em.line("i_b, i_h = i_bh // H, i_bh % H")
            em.line("o_i = tl.arange(0, BT)")
            self.chunk_rows()
            for g in f.gates:
                em.line(f"{ident(g, 'b_g')} = tl.load({ident(g, 'g')} + r_t, mask=m_t, other=1.0)"
                        f".to(tl.float32)  # gate {comment(g)}")
            if f.decayed:
                em.line(f"b_a = {self.printed(f.decay)}  {where(lv.retention.span) or '#'} a_t = "
                        f"{show(f.decay)}")
                em.line("b_la = tl.where(m_t, tl.log(b_a), 0.0)  # log a_t")
                em.line("b_g = tl.cumsum(b_la, 0)  # g_i = sum_(r<=i) log a_r")
                em.line("tl.store(g + r_t, b_g, mask=m_t)")
                if f.before:
                    em.line("tl.store(gb + r_t, b_g - b_la, mask=m_t)  # gb_i = g_(i-1)")
            if f.stepped:
                self.store_step()

    def store_step(self) -> None:
        """b_beta [BT]: the step size b_t, printed from sympy, stored to beta."""
        em, f = self.em, self.f
        em.line(f"b_beta = {self.printed(f.step)}  {where(self.lv.algorithm.span) or '#'} b_t = {show(f.step)}")
        em.line("tl.store(beta + r_t, b_beta, mask=m_t)")

    def gate_bwd_kernel(self) -> None:
        em, f = self.em, self.f
        grads = ("dg, " if f.decayed else "") + ("dgb, " if f.before else "") + ("dbeta, " if f.stepped else "")
        self.decorate('"H", "BT"')
        with em.indent(f"def chunk_gate_bwd_kernel({self.gate_args('g')}{grads}{self.gate_args('dg')}T, "
                       "H: tl.constexpr, BT: tl.constexpr):"):
            em.line('"""Program (i_t, i_bh): the gates\' gradients from those of g, gb and b_t (sympy '
                    'derivatives)."""')
            em.line("i_t, i_bh = tl.program_id(0), tl.program_id(1)")
            em.line("i_b, i_h = i_bh // H, i_bh % H")
            em.line("o_i = tl.arange(0, BT)")
            self.chunk_rows()
            for g in f.gates:
                em.line(f"{ident(g, 'b_g')} = tl.load({ident(g, 'g')} + r_t, mask=m_t, other=1.0)"
                        f".to(tl.float32)")
            self.log_decay_grads()
            log_decay = sympy.log(f.decay)
            for g in f.gates:
                x, terms = ir.gate_symbol(g), []
                for by, expr in (("b_dla", log_decay if f.decayed else 0), ("b_dbeta", f.step)):
                    d = sympy.diff(expr, x) if expr != 0 else 0
                    if d != 0:
                        terms.append(f"{by} * {self.printed(d)}")
                total = " + ".join(terms) or "tl.zeros([BT], dtype=tl.float32)"
                em.line(f"{ident(g, 'b_dg')} = {total}  # gate {comment(g)}")
                em.line(f"tl.store({ident(g, 'dg')} + r_t, {ident(g, 'b_dg')}.to("
                        f"{ident(g, 'dg')}.dtype.element_ty), mask=m_t)")

    def log_decay_grads(self) -> None:
        """b_dla: ∂/∂ log a_r of the chunk's tokens from the gradients of g and gb (reversed cumulative
        sums), and b_dbeta: the step size's."""
        em, f = self.em, self.f
        if f.decayed:
            em.line(f"b_dg = {self.token_load('dg')}")
            dla = "tl.sum(b_dg, 0) - tl.cumsum(b_dg, 0) + b_dg"
            if f.before:
                em.line(f"b_dgb = {self.token_load('dgb')}")
                dla += " + tl.sum(b_dgb, 0) - tl.cumsum(b_dgb, 0)"
            em.line("# d log a_r = sum_(i>=r) dg_i + sum_(i>r) dgb_i: reversed cumulative sums in the chunk")
            em.line(f"b_dla = {dla}")
        if f.stepped:
            em.line("b_dbeta = tl.load(dbeta + r_t, mask=m_t, other=0.0)")

    def token_load(self, name: str) -> str:
        """The chunk's rows of a per-token tensor of the decay's cumulative logs (or their gradients)."""
        return f"tl.load({name} + r_t, mask=m_t, other=0.0)"

    def wy_kernel(self) -> None:
        em, f = self.em, self.f
        self.decorate('"H", "K", "V", "BT"')
        with em.indent(f"def chunk_wy_fwd_kernel(k, v, {self.token_args()}A, w, u, T, H: tl.constexpr, "
                       "K: tl.constexpr, V: tl.constexpr,"):
            em.line("BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr, DT: tl.constexpr):")
        with em.indent():
            em.line('"""Program (i_t, i_bh): one chunk\'s A = (I + G)^-1 [BT, BT] (fp32), W [BT, K] and '
                    'U [BT, V]."""')
            self.prologue()
            em.line(f"b_k = {self.load('k', 'K')}")
            self.load_tokens()
            self.write_keys()
            em.line("b_G = tl.dot(b_k.to(DT), tl.trans(b_kb).to(DT), input_precision=DOT)  # k_i . u_j")
            em.line("m_G = (o_i[:, None] > o_i[None, :]) & m_t[:, None]  # strictly lower")
            if f.decayed:
                em.line(f"b_G = b_G * tl.where(m_G, tl.exp(b_{f.error}[:, None] - b_g[None, :]), 0.0)")
            else:
                em.line("b_G = tl.where(m_G, b_G, 0.0)")
            em.line("# (I + G)^-1 by forward substitution, row by row: A_i = e_i - sum_(j<i) G_ij A_j")
            em.line("b_A = -b_G")
            with em.indent("for i in range(1, BT):"):
                em.line("m_r = o_i == i")
                em.line("b_a = tl.sum(tl.where(m_r[:, None], b_A, 0.0), 0)  # row i of -G")
                em.line("b_a = b_a + tl.where(o_i < i, tl.sum(b_a[:, None] * b_A, 0), 0.0)")
                em.line("b_A = tl.where(m_r[:, None], b_a[None, :], b_A)")
            em.line("b_A += (o_i[:, None] == o_i[None, :]).to(tl.float32)")
            em.line("tl.store(A + r_t[:, None] * BT + o_i[None, :], b_A, mask=m_t[:, None])")
            ke = f"b_k * tl.exp(b_{f.error})[:, None]" if f.decayed else "b_k"
            em.line(f"b_w = tl.dot(b_A.to(DT), ({ke}).to(DT), input_precision=DOT)  # W = A (exp(ge) K)")
            em.line(self.store("w", "K", "b_w"))
            with em.indent("for i_v in range(0, tl.cdiv(V, BV)):"):
                em.line("o_v = i_v * BV + tl.arange(0, BV)")
                em.line("m_v = o_v < V")
                em.line(f"b_v = {self.load('v', 'V')}")
                em.line("b_u = tl.dot(b_A.to(DT), b_v.to(DT), input_precision=DOT)  # U = A V")
                em.line(self.store("u", "V", "b_u"))

    def state_kernel(self) -> None:
        em, f = self.em, self.f
        src = "w, u, " if f.delta else "v, "
        outs = "h, v_new, ht, " if f.delta else "h, ht, "
        self.decorate('"H", "K", "V", "BT", "BV"')
        with em.indent(f"def chunk_state_fwd_kernel(k, {src}{self.token_args()}h0, {outs}T, NT, "
                       "H: tl.constexpr, K: tl.constexpr,"):
            em.line("V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, "
                    "DOT: tl.constexpr, DT: tl.constexpr):")
        with em.indent():
            em.line('"""Program (i_v, i_bh): value channels [i_v BV, (i_v + 1) BV) of the state of batch x '
                    'head i_bh,')
            em.line("chunk by chunk: saves the state entering each chunk" +
                    (" and the chunk's pseudo-values D" if f.delta else "") + '."""')
            em.line("i_v, i_bh = tl.program_id(0), tl.program_id(1)")
            em.line("i_b, i_h = i_bh // H, i_bh % H")
            em.line("o_i = tl.arange(0, BT)")
            em.line("o_k = tl.arange(0, BK)")
            em.line("m_k = o_k < K")
            em.line("o_v = i_v * BV + tl.arange(0, BV)")
            em.line("m_v = o_v < V")
            self.state_tile()
            em.line("o_s = i_bh.to(tl.int64) * (K * V)  # this (batch, head)'s state")
            em.line("b_h = tl.load(h0 + o_s + o_kv, mask=m_kv, other=0.0)  # [BK, BV] fp32: S_0")
            with em.indent("for i_t in range(0, NT):"):
                self.chunk_rows()
                em.line(f"tl.store(h + {self.per_chunk()} + o_kv, b_h.to(h.dtype.element_ty), mask=m_kv)")
                if f.delta:
                    em.line(f"b_w = {self.load('w', 'K')}")
                    em.line(f"b_d = {self.load('u', 'V')} - tl.dot(b_w.to(DT), b_h.to(DT), "
                            "input_precision=DOT)  # D = U - W S_0")
                    em.line(self.store("v_new", "V", "b_d"))
                else:
                    em.line(f"b_d = {self.load('v', 'V')}  # D = V")
                em.line(f"b_k = {self.load('k', 'K')}")
                self.load_tokens()
                self.write_keys()
                if f.decayed:
                    self.last_token()
                    em.line(f"b_kb = b_kb * {self.rows('b_r')}  # write keys decayed to the chunk end")
                    em.line(f"b_h = b_h * {self.keys('tl.exp(b_glast)')}")
                em.line("b_h += tl.dot(tl.trans(b_kb).to(DT), b_d.to(DT), input_precision=DOT)  "
                        "# S_C = exp(g_C) S_0 + sum_j ...")
            em.line("tl.store(ht + o_s + o_kv, b_h, mask=m_kv)")

    def output_kernel(self) -> None:
        em, f = self.em, self.f
        d = "v_new" if f.delta else "v"
        self.decorate('"H", "K", "V", "BT", "BV"')
        with em.indent(f"def chunk_output_fwd_kernel(q, k, {d}, {self.token_args()}h, o, T, NT, "
                       "H: tl.constexpr, K: tl.constexpr,"):
            em.line("V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, "
                    "DOT: tl.constexpr, DT: tl.constexpr):")
        with em.indent():
            em.line('"""Program (i_v, i_t, i_bh): the outputs of one chunk, value channels [i_v BV, '
                    '(i_v + 1) BV)."""')
            self.prologue(value_block=True)
            self.state_tile()
            em.line(f"b_q = {self.load('q', 'K')}")
            em.line(f"b_k = {self.load('k', 'K')}")
            self.load_tokens()
            self.write_keys()
            em.line(f"b_h = tl.load(h + {self.per_chunk()} + o_kv, mask=m_kv, other=0.0)  # S_0")
            em.line("b_o = tl.dot(b_q.to(DT), b_h.to(DT), input_precision=DOT)  # [BT, BV]: Q S_0")
            if f.decayed:
                em.line(f"b_o = b_o * tl.exp(b_{f.read})[:, None]")
            self.read_matrix()
            em.line(f"b_d = {self.load(d, 'V')}")
            em.line("b_o += tl.dot((b_P * b_M).to(DT), b_d.to(DT), input_precision=DOT)  # + P D")
            em.line(self.store("o", "V", "b_o"))

    def state_bwd_kernel(self) -> None:
        em, f = self.em, self.f
        w = "w, " if f.delta else ("A, " if f.channels else "")
        dd = "dv_new" if f.delta else "dv"
        read = "A" if f.channels else "P"
        self.decorate('"H", "K", "V", "BT", "BV"')
        with em.indent(f"def chunk_state_bwd_kernel(q, k, {w}{self.token_args()}do, dht, dh, dh0, {dd}, T, NT, "
                       "H: tl.constexpr, K: tl.constexpr,"):
            em.line("V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, "
                    "DOT: tl.constexpr, DT: tl.constexpr):")
        with em.indent():
            em.line('"""Program (i_v, i_bh), chunks backwards: saves ∂/∂ the state leaving each chunk '
                    '(dh), and ∂/∂D')
            em.line(("(the pseudo-values)" if f.delta else "(= ∂/∂v)") +
                    f" = {read}^T dO + (exp(g_C - g_j) u_j) . dS_C; ends with ∂/∂ the initial state."'"""')
            em.line("i_v, i_bh = tl.program_id(0), tl.program_id(1)")
            em.line("i_b, i_h = i_bh // H, i_bh % H")
            em.line("o_i = tl.arange(0, BT)")
            em.line("o_k = tl.arange(0, BK)")
            em.line("m_k = o_k < K")
            em.line("o_v = i_v * BV + tl.arange(0, BV)")
            em.line("m_v = o_v < V")
            self.state_tile()
            em.line("o_s = i_bh.to(tl.int64) * (K * V)")
            em.line("b_dh = tl.load(dht + o_s + o_kv, mask=m_kv, other=0.0)  # [BK, BV] fp32: ∂/∂ the final state")
            with em.indent("for i_n in range(0, NT):"):
                em.line("i_t = NT - 1 - i_n")
                self.chunk_rows()
                em.line(f"tl.store(dh + {self.per_chunk()} + o_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)")
                em.line(f"b_q = {self.load('q', 'K')}")
                em.line(f"b_k = {self.load('k', 'K')}")
                self.load_tokens()
                self.write_keys()
                em.line(f"b_do = {self.load('do', 'V')}")
                reads, read = self.reads()
                em.line(f"b_dd = tl.dot(tl.trans({reads}).to(DT), b_do.to(DT), input_precision=DOT)  # {read}^T dO")
                if f.decayed:
                    self.last_token()
                    em.line(f"b_dd += tl.dot((b_kb * {self.rows('b_r')}).to(DT), b_dh.to(DT), input_precision=DOT)")
                    em.line(f"b_qo = b_q * {self.rows(f'tl.exp(b_{f.read})')}")
                    em.line(f"b_dh = b_dh * {self.keys('tl.exp(b_glast)')}")
                else:
                    em.line("b_dd += tl.dot(b_kb.to(DT), b_dh.to(DT), input_precision=DOT)")
                    em.line("b_qo = b_q")
                em.line(self.store(dd, "V", "b_dd"))
                em.line("b_dh += tl.dot(tl.trans(b_qo).to(DT), b_do.to(DT), input_precision=DOT)  "
                        "# through O's S_0 term")
                if f.delta:
                    em.line(f"b_w = {self.load('w', 'K')}")
                    em.line("b_dh -= tl.dot(tl.trans(b_w).to(DT), b_dd.to(DT), input_precision=DOT)  "
                            "# through D = U - W S_0")
            em.line("tl.store(dh0 + o_s + o_kv, b_dh, mask=m_kv)")

    def grads_kernel(self) -> None:
        em, f = self.em, self.f
        ins = "q, k, v, " + self.token_args() + ("A, " if f.delta else "") + "h, dh, " + \
            ("v_new, dv_new, " if f.delta else "") + "do, "
        outs = "dq, dk, " + ("dv, " if f.delta else "") + ("dbeta, " if f.stepped else "") + \
            ("dg, " if f.decayed else "") + ("dgb, " if f.before else "")
        self.decorate('"H", "K", "V", "BT", "BV"')
        with em.indent(f"def chunk_grads_bwd_kernel({ins}{outs}T, NT, H: tl.constexpr, K: tl.constexpr, "
                       "V: tl.constexpr,"):
            em.line("BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr, DT: tl.constexpr):")
        with em.indent():
            em.line('"""Program (i_t, i_bh): one chunk\'s gradients of q, k' + (", v" if f.delta else "") +
                    (", b" if f.stepped else "") + (" and of the cumulative logs g" +
                                                    (", gb" if f.before else "") if f.decayed else "") + ",")
            em.line('from the saved states entering (h) and ∂/∂ the states leaving (dh) the chunk."""')
            self.prologue()
            em.line(f"b_q = {self.load('q', 'K')}")
            em.line(f"b_k = {self.load('k', 'K')}")
            self.load_tokens()
            self.write_keys()
            self.value_sums()
            em.line("# reads: O = (exp(go) Q) S_0 + P D")
            self.read_matrix()
            em.line("b_dP = b_dP * b_M")
            if f.decayed:
                em.line(f"b_dq = b_dq * tl.exp(b_{f.read})[:, None]")
                em.line("b_ds = b_dP * b_P  # ∂/∂ the exponent go_i - g_j of each read")
                em.line("b_dgo = tl.sum(b_dq * b_q, 1) + tl.sum(b_ds, 1)")
                em.line("b_dgw = -tl.sum(b_ds, 0)  # ∂/∂g_j from the write side")
            em.line("b_dq += tl.dot(b_dP.to(DT), b_kb.to(DT), input_precision=DOT)")
            em.line("b_dkb = tl.dot(tl.trans(b_dP).to(DT), b_q.to(DT), input_precision=DOT)  # ∂/∂u")
            em.line("# the state leaving the chunk: S_C = exp(g_C) S_0 + sum_j exp(g_C - g_j) u_j D_j^T")
            if f.decayed:
                self.last_token()
                em.line("b_dkb += b_dkr * b_r[:, None]")
                em.line("b_dr = tl.sum(b_dkr * b_kb, 1) * b_r  # ∂/∂(g_C - g_j)")
                em.line("b_dglast = tl.exp(b_glast) * tl.sum(b_hdh, 0) + tl.sum(b_dr, 0)")
                em.line("b_dgw -= b_dr")
            else:
                em.line("b_dkb += b_dkr")
            if f.delta:
                em.line("# D = U - W S_0, U = A V, W = A Ke with Ke = exp(ge) K, A = (I + G)^-1")
                if f.decayed:
                    em.line(f"b_ke = b_k * tl.exp(b_{f.error})[:, None]")
                else:
                    em.line("b_ke = b_k")
                em.line("b_dA += tl.dot(b_dw.to(DT), tl.trans(b_ke).to(DT), input_precision=DOT)")
                em.line("b_dke = tl.dot(tl.trans(b_A).to(DT), b_dw.to(DT), input_precision=DOT)")
                if f.decayed:
                    em.line(f"b_dk = b_dke * tl.exp(b_{f.error})[:, None]")
                    em.line("b_dge = tl.sum(b_dke * b_ke, 1)")
                else:
                    em.line("b_dk = b_dke")
                em.line("b_dG = -tl.dot(tl.trans(b_A).to(DT), tl.dot(b_dA.to(DT), tl.trans(b_A).to(DT), "
                        "input_precision=DOT).to(DT),")
                em.line("                input_precision=DOT)  # ∂/∂G = -A^T dA A^T")
                em.line("m_G = (o_i[:, None] > o_i[None, :]) & m_t[:, None]")
                if f.decayed:
                    em.line(f"b_dG = b_dG * tl.where(m_G, tl.exp(b_{f.error}[:, None] - b_g[None, :]), 0.0)")
                    em.line("b_ds = b_dG * tl.dot(b_k.to(DT), tl.trans(b_kb).to(DT), input_precision=DOT)")
                    em.line("b_dge += tl.sum(b_ds, 1)")
                    em.line("b_dgw -= tl.sum(b_ds, 0)")
                else:
                    em.line("b_dG = tl.where(m_G, b_dG, 0.0)")
                em.line("b_dk += tl.dot(b_dG.to(DT), b_kb.to(DT), input_precision=DOT)")
                em.line("b_dkb += tl.dot(tl.trans(b_dG).to(DT), b_k.to(DT), input_precision=DOT)")
            else:
                em.line("b_dk = tl.zeros([BT, BK], dtype=tl.float32)")
            if f.stepped:
                em.line("b_dk += b_dkb * b_beta[:, None]  # u_j = b_j k_j")
                em.line("b_dbeta = tl.sum(b_dkb * b_k, 1)")
                em.line("tl.store(dbeta + r_t, b_dbeta, mask=m_t)")
            else:
                em.line("b_dk += b_dkb")
            em.line(self.store("dq", "K", "b_dq"))
            em.line(self.store("dk", "K", "b_dk"))
            if f.decayed:
                sums = {"g": ["b_dgw", "tl.where(o_i == i_last, b_dglast, 0.0)"], "gb": []}
                sums[f.read].append("b_dgo")
                if f.delta:
                    sums[f.error].append("b_dge")
                em.line(f"tl.store(dg + r_t, {' + '.join(sums['g'])}, mask=m_t)")
                if f.before:
                    em.line(f"tl.store(dgb + r_t, {' + '.join(sums['gb'])}, mask=m_t)")

    def value_sums(self) -> None:
        """The grads kernel's sums over value blocks: b_dq = dO S_0^T, b_dkr = D dS_C^T, b_dP = dO D^T
        (and b_hdh, the delta family's b_dw, b_dA)."""
        em, f = self.em, self.f
        em.line(f"o_h = {self.per_chunk()}")
        em.line("b_dq = tl.zeros([BT, BK], dtype=tl.float32)  # dO S_0^T")
        em.line("b_dkr = tl.zeros([BT, BK], dtype=tl.float32)  # D dS_C^T")
        em.line("b_dP = tl.zeros([BT, BT], dtype=tl.float32)  # dO D^T")
        if f.decayed:
            em.line("b_hdh = tl.zeros([BK], dtype=tl.float32)  # <S_0, dS_C> by key channel")
        if f.delta:
            em.line("b_dw = tl.zeros([BT, BK], dtype=tl.float32)  # -dD S_0^T")
            em.line("b_dA = tl.zeros([BT, BT], dtype=tl.float32)  # dD V^T + dW (exp(ge) K)^T")
            em.line("b_A = tl.load(A + r_t[:, None] * BT + o_i[None, :], mask=m_t[:, None], other=0.0)")
        d = "v_new" if f.delta else "v"
        with em.indent("for i_v in range(0, tl.cdiv(V, BV)):"):
            em.line("o_v = i_v * BV + tl.arange(0, BV)")
            em.line("m_v = o_v < V")
            self.state_tile()
            em.line("b_h = tl.load(h + o_h + o_kv, mask=m_kv, other=0.0)")
            em.line("b_dh = tl.load(dh + o_h + o_kv, mask=m_kv, other=0.0)")
            em.line(f"b_do = {self.load('do', 'V')}")
            em.line(f"b_d = {self.load(d, 'V')}")
            em.line("b_dP += tl.dot(b_do.to(DT), tl.trans(b_d).to(DT), input_precision=DOT)")
            em.line("b_dq += tl.dot(b_do.to(DT), tl.trans(b_h).to(DT), input_precision=DOT)")
            em.line("b_dkr += tl.dot(b_d.to(DT), tl.trans(b_dh).to(DT), input_precision=DOT)")
            if f.decayed:
                em.line("b_hdh += tl.sum(b_h.to(tl.float32) * b_dh.to(tl.float32), 1)")
            if f.delta:
                em.line(f"b_dd = {self.load('dv_new', 'V')}")
                em.line(f"b_v = {self.load('v', 'V')}")
                em.line("b_dw -= tl.dot(b_dd.to(DT), tl.trans(b_h).to(DT), input_precision=DOT)")
                em.line("b_dA += tl.dot(b_dd.to(DT), tl.trans(b_v).to(DT), input_precision=DOT)")
                em.line("b_dv = tl.dot(tl.trans(b_A).to(DT), b_dd.to(DT), input_precision=DOT)  "
                        "# U = A V")
                em.line(self.store("dv", "V", "b_dv"))

    # ---- host side --------------------------------------------------------------------------
    def launchers(self) -> None:
        """The host side: one launcher per kernel (or pair of kernels), in launch order."""
        for launcher in self.launcher_parts():
            launcher()
            self.em.gap()

    def launcher_parts(self) -> list:
        gates = bool(self.f.gates)
        return ([self.sizes_launcher] + [self.gate_fwd_launcher] * gates +
                [self.states_launcher, self.output_launcher, self.bwd_launcher] + [self.gate_bwd_launcher] * gates)

    def sizes_launcher(self) -> None:
        em = self.em
        with em.indent("def _sizes(k, v):"):
            em.line('"""(B, T, H, K, V, BT, NT, BK, BV, DOT, DT): shapes, blocks, fp32 matmuls in full precision '
                    'for fp32')
            em.line("inputs (DOT) and the matmul operands' type (DT: the inputs' own; fp32 under the interpreter, "
                    'whose')
            em.line('half-precision matmuls are wrong)."""')
            em.line("B, T, H, K = k.shape")
            em.line("V = v.shape[-1]")
            em.line("BT = CHUNK")
            em.line("BK = triton.next_power_of_2(K)")
            em.line("# a key block over 256 wide takes half the value channels: the gradient kernel's blocks at")
            em.line("# K = 512 and BV = 64 need more shared memory than an H100 block has (test_sm90_compile)")
            em.line("BV = min(triton.next_power_of_2(V), BV_MAX if BK <= 256 else BV_MAX // 2)")
            em.line('DOT = "ieee" if k.dtype == torch.float32 else "tf32"')
            em.line("DT = tl.float32 if INTERPRET else MATMUL_TYPES[k.dtype]")
            em.line("return B, T, H, K, V, BT, triton.cdiv(T, BT), BK, BV, DOT, DT")

    def gate_fwd_launcher(self) -> None:
        em, f = self.em, self.f
        gates = self.gate_args("g")
        tok = self.token_args()
        K = ", K" if f.channels else ""  # the cumulative logs per key channel: [B, T, H, K]
        with em.indent(f"def chunk_gate_fwd({gates}B, T, H{K}):"):
            outs = [x for x, on in (("g", f.decayed), ("gb", f.before), ("beta", f.stepped)) if on]
            if f.channels:
                shapes = ", ".join(x for x in outs if x != "beta") + " [B, T, H, K]" + \
                    (", beta [B, T, H]" if f.stepped else "")
            else:
                shapes = ", ".join(outs) + " [B, T, H]"
            em.line(f'"""The gates {self.GATES} -> {shapes} fp32."""')
            em.line("f32 = dict(dtype=torch.float32, device=" + ident(f.gates[0], "g") + ".device)")
            for x in outs:
                em.line(f"{x} = torch.empty(B, T, H{'' if x == 'beta' else K}, **f32)")
            em.line("chunk_gate_fwd_kernel[(triton.cdiv(T, CHUNK), B * H)](")
            keys = ", K=K, BK=triton.next_power_of_2(K)" if f.channels else ""
            em.line(f"    {gates}{tok}T, H=H, BT=CHUNK{keys})")
            em.line(f"return {', '.join(outs)}{',' if len(outs) == 1 else ''}")

    def states_launcher(self) -> None:
        em, f = self.em, self.f
        tok = self.token_args()
        with em.indent(f"def chunk_states(k, v, {tok}h0):"):
            em.line('"""k [B, T, H, K]; v [B, T, H, V]; h0 [B, H, K, V] fp32 -> the final state [B, H, K, V] fp32, '
                    'the states')
            em.line("entering each chunk [B, NT, H, K, V]" +
                    (", the pseudo-values D [B, T, H, V], A [B, T, H, BT] and W [B, T, H, K]" if f.delta
                     else "") + '."""')
            em.line("B, T, H, K, V, BT, NT, BK, BV, DOT, DT = _sizes(k, v)")
            if f.delta:
                em.line("A = torch.empty(B, T, H, BT, dtype=torch.float32, device=k.device)")
                em.line("w, u = torch.empty_like(k), torch.empty_like(v)")
                em.line("chunk_wy_fwd_kernel[(NT, B * H)](")
                em.line(f"    k, v, {tok}A, w, u, T, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, DOT=DOT, DT=DT)")
            em.line("h = k.new_empty(B, NT, H, K, V)")
            em.line("ht = torch.empty(B, H, K, V, dtype=torch.float32, device=k.device)")
            src, outs = ("w, u, ", "h, v_new, ht, ") if f.delta else ("v, ", "h, ht, ")
            if f.delta:
                em.line("v_new = torch.empty_like(v)")
            em.line("chunk_state_fwd_kernel[(triton.cdiv(V, BV), B * H)](")
            em.line(f"    k, {src}{tok}h0, {outs}T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, DOT=DOT, DT=DT)")
            em.line("return ht, h" + (", v_new, A, w" if f.delta else ""))

    def output_launcher(self) -> None:
        em, f = self.em, self.f
        tok = self.token_args()
        d = "v_new" if f.delta else "v"
        with em.indent(f"def chunk_output(q, k, {d}, {tok}h):"):
            em.line('"""The outputs o [B, T, H, V] (v\'s dtype) from the states entering each chunk' +
                    (' and the reads within\n    it (A, from chunk_intra)."""' if f.channels else '."""'))
            em.line(f"B, T, H, K, V, BT, NT, BK, BV, DOT, DT = _sizes(k, {d})")
            if f.channels:
                em.line(f"A = chunk_intra(q, k, {tok.rstrip(', ')})")
            em.line(f"o = torch.empty_like({d})")
            em.line("chunk_output_fwd_kernel[(triton.cdiv(V, BV), NT, B * H)](")
            args = f"q, {d}, {f.read}, A, h, o" if f.channels else f"q, k, {d}, {tok}h, o"
            em.line(f"    {args}, T, NT, H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, DOT=DOT, DT=DT)")
            em.line("return o")

    def bwd_launcher(self) -> None:
        em, f = self.em, self.f
        tok = self.token_args()
        with em.indent(f"def chunk_bwd(q, k, v, {tok}h0, do, dht):"):
            em.line('"""Gradients of q, k, v (fp32)' + (", of b_t" if f.stepped else "") +
                    (", of g" + (", gb" if f.before else "") if f.decayed else "") +
                    ' [B, T, H] fp32 and of the initial state')
            em.line('(fp32). The chunk states are recomputed from h0 (one forward state pass), not saved."""')
            em.line("B, T, H, K, V, BT, NT, BK, BV, DOT, DT = _sizes(k, v)")
            em.line(f"_, h{', v_new, A, w' if f.delta else ''} = chunk_states(k, v, {tok}h0)")
            em.line("f32 = dict(dtype=torch.float32, device=k.device)")
            em.line("dh, dh0 = k.new_empty(B, NT, H, K, V), torch.empty(B, H, K, V, **f32)")
            dd = "dv_new" if f.delta else "dv"
            em.line(f"{dd} = torch.empty(B, T, H, V, **f32)")
            w = "w, " if f.delta else ""
            em.line("chunk_state_bwd_kernel[(triton.cdiv(V, BV), B * H)](")
            em.line(f"    q, k, {w}{tok}do.contiguous(), dht.contiguous(), dh, dh0, {dd}, T, NT,")
            em.line("    H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, DOT=DOT, DT=DT)")
            em.line("dq, dk = torch.empty(B, T, H, K, **f32), torch.empty(B, T, H, K, **f32)")
            outs = ["dq", "dk"]
            if f.delta:
                em.line("dv = torch.empty(B, T, H, V, **f32)")
                outs.append("dv")
            for x, on in (("dbeta", f.stepped), ("dg", f.decayed), ("dgb", f.before)):
                if on:
                    em.line(f"{x} = torch.empty(B, T, H, **f32)")
                    outs.append(x)
            ins = "q, k, v, " + tok + ("A, " if f.delta else "") + "h, dh, " + \
                ("v_new, dv_new, " if f.delta else "") + "do.contiguous(), "
            em.line("chunk_grads_bwd_kernel[(NT, B * H)](")
            em.line(f"    {ins}{', '.join(outs)}, T, NT,")
            em.line("    H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, DOT=DOT, DT=DT)")
            if not f.delta:
                outs.insert(2, "dv")
            em.line(f"return {', '.join(outs)}, dh0")

    def gate_bwd_launcher(self) -> None:
        em, f = self.em, self.f
        gates = self.gate_args("g")
        grads = [x for x, on in (("dg", f.decayed), ("dgb", f.before), ("dbeta", f.stepped)) if on]
        with em.indent(f"def chunk_gate_bwd({gates}{', '.join(grads)}):"):
            em.line(f'"""The gates\' gradients {self.GATES} (their shapes and dtypes)."""' if f.channels else
                    '"""The gates\' gradients [B, T, H] (their dtypes)."""')
            em.line("B, T, H, K = dg.shape" if f.channels else f"B, T, H = {ident(f.gates[0], 'g')}.shape")
            for g in f.gates:
                em.line(f"{ident(g, 'dg')} = torch.empty_like({ident(g, 'g')})")
            em.line("chunk_gate_bwd_kernel[(triton.cdiv(T, CHUNK), B * H)](")
            keys = ", K=K, BK=triton.next_power_of_2(K)" if f.channels else ""
            em.line(f"    {gates}{', '.join(grads)}, {self.gate_args('dg')}T, H=H, BT=CHUNK{keys})")
            em.line(f"return {', '.join(ident(g, 'dg') for g in f.gates)}" +
                    ("," if len(f.gates) == 1 else ""))

    def function(self) -> None:
        em, f = self.em, self.f
        gates = self.gate_args("g")
        tok = self.token_args()
        with em.indent("class ChunkFunction(torch.autograd.Function):"):
            decorators(em, "forward")
            with em.indent(f"def forward(ctx, q, k, v, {gates}h0):"):
                if f.gates:
                    em.line(f"{tok.rstrip(', ')}{',' if tok.count(',') == 1 else ''} = "
                            f"chunk_gate_fwd({gates}*k.shape[:{self.SHAPE}])")
                if f.delta:
                    em.line(f"ht, h, v_new = chunk_states(k, v, {tok}h0)[:3]")
                    em.line(f"o = chunk_output(q, k, v_new, {tok}h)")
                else:
                    em.line(f"ht, h = chunk_states(k, v, {tok}h0)")
                    em.line(f"o = chunk_output(q, k, v, {tok}h)")
                em.line(f"ctx.save_for_backward(q, k, v, {gates}{tok}h0)")
                em.line("return o, ht")
            em.gap(1)
            decorators(em, "backward")
            with em.indent("def backward(ctx, do, dht):"):
                first_order_only(em)
                n = len(f.gates)
                em.line("q, k, v, *rest, h0 = ctx.saved_tensors")
                if f.gates:
                    em.line(f"gates, tokens = rest[:{n}], rest[{n}:]")
                else:
                    em.line("tokens = rest")
                em.line("dht = torch.zeros_like(h0) if dht is None else dht")
                grads = [x for x, on in (("dbeta", f.stepped), ("dg", f.decayed), ("dgb", f.before)) if on]
                em.line(f"dq, dk, dv, {''.join(x + ', ' for x in grads)}dh0 = chunk_bwd(q, k, v, *tokens, h0, "
                        "do, dht)")
                if f.gates:
                    order = [x for x in ("dg", "dgb", "dbeta") if x in grads]
                    em.line(f"dgates = chunk_gate_bwd(*gates, {', '.join(order)})")
                    em.line("return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *dgates, dh0")
                else:
                    em.line("return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dh0")

    def public(self) -> None:
        em, lv, f = self.em, self.lv, self.f
        name = ident(lv.name, "level")
        kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
        with em.indent(f"def {name}(q, k, v, *, {kw}initial_state=None, output_final_state=False):"):
            public_head(em, lv, "S [B, H, K, V]", self.GATES)
            em.line("(S,) = (state,) if torch.is_tensor(state) else tuple(state)")
            unused = [g for g in lv.gates if g not in f.gates]
            if unused:
                em.line(f"# gate(s) {comment(', '.join(unused))}: not read by this level's rule")
            args = "".join(f"{ident(g, 'g')}.contiguous(), " for g in f.gates)
            em.line("o, final = ChunkFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), "
                    f"{args}S.to(torch.float32).contiguous())")
            em.line("return o, (_pack((final,)) if output_final_state else None)")


def public_head(em: Emitter, lv: ir.Level, state: str, gates: str = "[B, T, H]") -> None:
    """The public op's docstring (`state`: the state's layout, `gates`: the gates') and its first
    lines, up to `state`: the given initial state or the reference's (fp32)."""
    em.line(f'"""Level {comment(lv.name)!r}, chunked (Triton). q, k: [B, T, H, K]; v: [B, T, H, V]; '
            f"gates {', '.join(lv.gates) or '(none)'}:")
    em.line(f"{gates}; float32, bfloat16 or float16 (states and accumulation in fp32).")
    em.line(f"initial_state: {state} (default: the reference's initial_state).")
    nested = lv.init_from is not None or bool(lv.initialises)
    em.line(f"Returns (o [B, T, H, V] in v's dtype, final state {state} float32, or None)" +
            ("." if nested else '."""'))
    if nested:
        render_nesting_doc(em, lv)
        em.line('"""')
    em.line(f"{where(lv.span)} level {comment(lv.name)}".strip())
    em.line("B = k.shape[0]")
    em.line("state = initial_state if initial_state is not None else "
            "default_state(B, torch.float32, k.device)")


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str, math_lines) -> str:
    """The source of `level_<name>_triton_chunk.py` for a level `unsupported` accepts."""
    form = chunk_form(rules, plan)
    return renderer(form)(form, rules, model, file, math_lines).text()
