"""Render a delta-family level whose step size varies over value channels, or reads ||k_t||^2 (the
implicit step: Longhorn, MATH.md §2.7), as chunked Triton kernels: `level_<name>_triton_chunk.py`.

Without decay, column j of the state S [K, V] follows its own delta rule with the step eps_(t,j):

    S_t[:, j] = S_(t-1)[:, j] + k_t d_(t,j),   d_t = eps_t * z_t,   z_t = v_t - S_(t-1)^T k_t.

Within a chunk of BT tokens entering at S_0, z_t = r_t - sum_(i<t) G_ti d_i with r = V - K S_0 and
G = K K^T strictly lower: one lower-triangular system per value channel, (I + diag(eps_j) G) d_j =
eps_j r_j. The WY form shares one inverse across channels and so cannot take it; here each program
holds a block of value channels and solves its systems by forward substitution, row by row over the
chunk, vectorised over the channels, in fp32. Then o = Q S_0 + P D (P = Q K^T, masked) and
S_C = S_0 + K^T D. The backward kernel runs the chunks in reverse from ∂/∂S_C and solves the
transposed systems by backward substitution. The step eps_t [B, T, H, V] is computed in PyTorch from
the derived expression (its gradient to the gates and to k through ||k||^2 is autograd's).
"""
from __future__ import annotations

import sympy

import nlc
from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.printer import to_torch
from nlc.derive.rules import LevelRules
from nlc.plan import KernelPlan

from . import triton_chunk_common as common
from .emitter import Emitter, comment, ident, where
from .torch_chunk_decay import gate_names, gate_views, show, step_factors
from .triton_recurrent import decorators, first_order_only

CHUNK = 16  # tokens per system (BT): a forward substitution costs BT steps of [BT, BV] work per chunk


def applies(rules: LevelRules, plan: KernelPlan) -> bool:
    """Whether a delta-family level has a step these kernels take and the WY kernels do not: over
    value channels, or reading ||k_t||^2."""
    if plan.family != "delta" or rules.level.memory.kind != "matrix":
        return False
    try:
        key_step, value_step = step_factors(rules, plan, value_target=False)
    except NotImplementedError:
        return False
    return value_step != 1 or sympy.sympify(key_step).has(S.n)


def unsupported(rules: LevelRules, plan: KernelPlan) -> str | None:
    """Why these kernels cannot run a level `applies` accepts, or None when they can."""
    lv = rules.level
    if plan.decay != 1:
        return (f"a decay ({show(plan.decay)}) beside a step size per value channel or reading ||k||^2: "
                "the per-channel kernels take none")
    step = _step(rules, plan)
    keyed = [g for g in ir.gate_names(step) if lv.gate_axes[g] == "key"]
    if keyed:
        return f"a step size over key channels ({', '.join(keyed)}) beside one over value channels"
    return None


def _step(rules: LevelRules, plan: KernelPlan) -> sympy.Expr:
    key_step, value_step = step_factors(rules, plan, value_target=False)
    return sympy.sympify(key_step) * sympy.sympify(value_step)


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_triton_chunk.py` for a level `unsupported` accepts."""
    return ChannelSystems(rules, plan, model, file).text()


class ChannelSystems:
    """The generated file: header, configuration, the forward and backward kernels, their launchers,
    the autograd.Function and the public op."""

    def __init__(self, rules: LevelRules, plan: KernelPlan, model: str, file: str):
        self.rules, self.lv, self.plan = rules, rules.level, plan
        self.model, self.file = model, file
        self.step = _step(rules, plan)
        self.after = self.lv.read == "after"
        self.em = Emitter()

    def text(self) -> str:
        em = self.em
        self.header()
        common.imports(em, self.lv, "_pack, default_state")
        em.line("# Launch configuration, kept apart from the kernels (results do not depend on it).")
        em.line(f"CHUNK = {CHUNK}  # tokens per chunk (BT, a power of two >= 16): one system per value channel; "
                "mode='triton'")
        em.line("# runs these kernels from CHUNK tokens on, the fused recurrent ones below")
        em.line("AUTO = False  # checked under Triton's interpreter, not yet on a GPU: mode='auto' keeps the fused "
                "recurrent kernels")
        em.line(f"READ_AFTER = {self.after}  # o_t reads S_t (True) or S_(t-1)")
        common.launch_configuration(em)
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
        em, lv = self.em, self.lv
        name = comment(lv.name)
        em.line(f'"""Level {name!r} of model {comment(self.model)!r}: chunked Triton kernels (delta family '
                "with a step per")
        em.line("value channel or through ||k||^2, MATH.md §2.7, §3.2).")
        em.line()
        em.line(f"Generated by nlc {nlc.__version__} from {comment(self.file)}; do not edit. It computes "
                f"what level_{name}.py")
        em.line("(the reference recurrent form) computes, with fp32 states and accumulation.")
        for key, value in lv.describe().items():
            em.line(f"  {key:<10} {comment(value)}")
        em.line(f"  step        eps_t = {show(self.step)}   (n = ||k_t||^2; [B, T, H, V], in PyTorch)")
        em.line("  recurrence  S_t = S_(t-1) + k_t d_t^T,  d_t = eps_t * (v_t - S_(t-1)^T k_t)")
        em.line(f"  read        o_t = {'S_t' if self.after else 'S_(t-1)'}^T q_t")
        em.line("Per chunk of BT tokens (i, j = 1..BT), S_0 the state entering it: r = V - K S_0 and, per value")
        em.line("channel, forward substitution z_i = r_i - sum_(j<i) G_ij d_j, d_i = eps_i z_i with G = K K^T;")
        em.line(f"o = Q S_0 + P D with P_ij = q_i . k_j for j {'<=' if self.after else '<'} i; "
                "S_C = S_0 + K^T D.")
        em.line("One program per (block of value channels, batch·head) runs the chunks in order (forward) or in")
        em.line("reverse (backward: ∂/∂S carried back, the transposed systems by backward substitution).")
        em.line("Layout (fla): q, k [B, T, H, K]; v, eps [B, T, H, V]. State: S [B, H, K, V], float32, row")
        em.line("convention. Saved for the backward pass: each chunk's entering state [B, NT, H, K, V] and z.")
        em.line('"""')

    # ---- kernels ------------------------------------------------------------------------------
    def prologue(self) -> None:
        em = self.em
        em.line("i_v, i_bh = tl.program_id(0), tl.program_id(1)")
        em.line("i_b, i_h = i_bh // H, i_bh % H")
        em.line("o_i = tl.arange(0, BT)  # position in the chunk")
        em.line("o_k = tl.arange(0, BK)")
        em.line("m_k = o_k < K")
        em.line("o_v = i_v * BV + tl.arange(0, BV)")
        em.line("m_v = o_v < V")
        em.line("m_kv = m_k[:, None] & m_v[None, :]")
        em.line("p_kv = o_k[:, None] * V + o_v[None, :]  # offsets in one [K, V] state")
        em.line("m_lower = o_i[:, None] > o_i[None, :]  # j < i: G's support")
        em.line("m_read = o_i[:, None] >= o_i[None, :] if READ_AFTER else m_lower  # P's support")

    def chunk_loads(self, i_t: str) -> None:
        em = self.em
        em.line(f"o_t = {i_t} * BT + o_i  # token")
        em.line("m_t = o_t < T")
        em.line("r_t = ((i_b * T + o_t) * H + i_h).to(tl.int64)  # row of each token in [B, T, H, ...]")
        em.line(f"p_s = ((i_b * NT + {i_t}) * H + i_h).to(tl.int64) * K * V + p_kv  # this chunk's entering state")
        em.line(f"b_q = {common.load_rows('q', 'K')}")
        em.line(f"b_k = {common.load_rows('k', 'K')}")
        em.line(f"b_e = {common.load_rows('eps', 'V')}  # [BT, BV]: eps_i per channel")
        em.line("b_G = tl.where(m_lower, tl.dot(b_k.to(DT), tl.trans(b_k).to(DT), input_precision=DOT), 0.0)")
        em.line("b_P = tl.where(m_read, tl.dot(b_q.to(DT), tl.trans(b_k).to(DT), input_precision=DOT), 0.0)")

    def forward_kernel(self) -> None:
        em = self.em
        em.line('@triton.autotune(configs=CONFIGS, key=["K", "V", "BK", "BV"])')
        em.line('@triton.jit(do_not_specialize=["T", "NT"])')
        em.line("def chunk_channels_fwd_kernel(q, k, v, eps, h0, o, z, h, ht, T, NT, H: tl.constexpr, "
                "K: tl.constexpr,")
        em.line("                              V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, "
                "BV: tl.constexpr,")
        with em.indent("                              READ_AFTER: tl.constexpr, DOT: tl.constexpr, "
                       "DT: tl.constexpr):"):
            em.line('"""Program (value block, batch·head): the chunks in order. Writes o [B, T, H, V], z (the')
            em.line("residuals v_i - S_(i-1)^T k_i) [B, T, H, V] fp32, each chunk's entering state h [B, NT, H, K, V]")
            em.line('fp32 and the final state ht [B, H, K, V]."""')
            self.prologue()
            em.line("b_h = tl.load(h0 + i_bh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0)  # [BK, BV]: S_0")
            with em.indent("for i_t in range(NT):"):
                self.chunk_loads("i_t")
                em.line("tl.store(h + p_s, b_h, mask=m_kv)")
                em.line(f"b_v = {common.load_rows('v', 'V')}")
                em.line("b_r = b_v - tl.dot(b_k.to(DT), b_h.to(DT), input_precision=DOT)  # r = V - K S_0")
                em.line("b_z = tl.zeros([BT, BV], dtype=tl.float32)")
                em.line("b_d = tl.zeros([BT, BV], dtype=tl.float32)  # d = eps * z, rows filled in order")
                with em.indent("for i in range(BT):  # forward substitution, every channel at once"):
                    em.line("m_i = (o_i == i)[:, None]")
                    em.line("b_g = tl.sum(tl.where(m_i, b_G, 0.0), 0)  # [BT]: row i of G")
                    em.line("b_zi = tl.sum(tl.where(m_i, b_r, 0.0), 0) - tl.sum(b_g[:, None] * b_d, 0)  # [BV]")
                    em.line("b_z = tl.where(m_i, b_zi[None, :], b_z)")
                    em.line("b_d = tl.where(m_i, b_e * b_zi[None, :], b_d)")
                em.line(common.store_rows("z", "V", "b_z"))
                em.line("b_o = tl.dot(b_q.to(DT), b_h.to(DT), input_precision=DOT)  # Q S_0")
                em.line("b_o += tl.dot(b_P.to(DT), b_d.to(DT), input_precision=DOT)  # + P D")
                em.line(common.store_rows("o", "V", "b_o"))
                em.line("b_h += tl.dot(tl.trans(b_k).to(DT), b_d.to(DT), input_precision=DOT)  # S_C = S_0 + K^T D")
            em.line("tl.store(ht + i_bh.to(tl.int64) * K * V + p_kv, b_h, mask=m_kv)")

    def backward_kernel(self) -> None:
        em = self.em
        em.line('@triton.autotune(configs=CONFIGS, key=["K", "V", "BK", "BV"])')
        em.line('@triton.jit(do_not_specialize=["T", "NT"])')
        em.line("def chunk_channels_bwd_kernel(q, k, eps, z, h, do, dht, dq, dk, dv, deps, dh0, T, NT, "
                "H: tl.constexpr,")
        em.line("                              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, "
                "BK: tl.constexpr,")
        with em.indent("                              BV: tl.constexpr, READ_AFTER: tl.constexpr, "
                       "DOT: tl.constexpr, DT: tl.constexpr):"):
            em.line('"""Program (value block, batch·head): the chunks in reverse from dht = ∂/∂S_T. Writes dv, deps')
            em.line("[B, T, H, V] and dh0 [B, H, K, V] (this block's channels) and this block's parts of dq, dk")
            em.line('[NV, B, T, H, K], all fp32."""')
            self.prologue()
            em.line("b_dh = tl.load(dht + i_bh.to(tl.int64) * K * V + p_kv, mask=m_kv, other=0.0)  # ∂/∂S_C")
            em.line("p_part = i_v.to(tl.int64) * tl.num_programs(1) * T * K  # this block's [B, T, H, K] of dq, dk")
            with em.indent("for r in range(NT):"):
                em.line("i_t = NT - 1 - r")
                self.chunk_loads("i_t")
                em.line("b_h = tl.load(h + p_s, mask=m_kv, other=0.0)  # S_0")
                em.line(f"b_z = {common.load_rows('z', 'V')}")
                em.line(f"b_do = {common.load_rows('do', 'V')}")
                em.line("b_d = b_e * b_z")
                em.line("# o = Q S_0 + P D and S_C = S_0 + K^T D: ∂/∂D, and dq, dk through P and K^T D")
                em.line("b_dd = tl.dot(tl.trans(b_P).to(DT), b_do.to(DT), input_precision=DOT)")
                em.line("b_dd += tl.dot(b_k.to(DT), b_dh.to(DT), input_precision=DOT)")
                em.line("b_dP = tl.where(m_read, tl.dot(b_do.to(DT), tl.trans(b_d).to(DT), input_precision=DOT), 0.0)")
                em.line("b_dq = tl.dot(b_do.to(DT), tl.trans(b_h).to(DT), input_precision=DOT)")
                em.line("b_dq += tl.dot(b_dP.to(DT), b_k.to(DT), input_precision=DOT)")
                em.line("b_dk = tl.dot(tl.trans(b_dP).to(DT), b_q.to(DT), input_precision=DOT)")
                em.line("b_dk += tl.dot(b_d.to(DT), tl.trans(b_dh).to(DT), input_precision=DOT)")
                em.line("b_dz = tl.zeros([BT, BV], dtype=tl.float32)  # ∂/∂z, rows filled in reverse")
                em.line("b_de = tl.zeros([BT, BV], dtype=tl.float32)")
                with em.indent("for j in range(BT):  # backward substitution: the transposed systems"):
                    em.line("i = BT - 1 - j")
                    em.line("m_i = (o_i == i)[:, None]")
                    em.line("b_g = tl.sum(tl.where((o_i == i)[None, :], b_G, 0.0), 1)  # [BT]: column i of G")
                    em.line("b_ddi = tl.sum(tl.where(m_i, b_dd, 0.0), 0) - tl.sum(b_g[:, None] * b_dz, 0)  "
                            "# ∂/∂d_i, all paths")
                    em.line("b_dz = tl.where(m_i, b_e * b_ddi[None, :], b_dz)")
                    em.line("b_de = tl.where(m_i, b_z * b_ddi[None, :], b_de)")
                em.line("# z = r - G D with r = V - K S_0 and G = K K^T (strictly lower)")
                em.line("b_dG = -tl.where(m_lower, tl.dot(b_dz.to(DT), tl.trans(b_d).to(DT), input_precision=DOT), "
                        "0.0)")
                em.line("b_dk += tl.dot((b_dG + tl.trans(b_dG)).to(DT), b_k.to(DT), input_precision=DOT)")
                em.line("b_dk -= tl.dot(b_dz.to(DT), tl.trans(b_h).to(DT), input_precision=DOT)")
                em.line(common.store_rows("dv", "V", "b_dz"))
                em.line(common.store_rows("deps", "V", "b_de"))
                for x in ("dq", "dk"):
                    em.line(f"tl.store({x} + p_part + r_t[:, None] * K + o_k[None, :], b_{x}, "
                            "mask=m_t[:, None] & m_k[None, :])")
                em.line("# ∂/∂S_0: through S_C, through Q S_0, through r")
                em.line("b_dh += tl.dot(tl.trans(b_q).to(DT), b_do.to(DT), input_precision=DOT)")
                em.line("b_dh -= tl.dot(tl.trans(b_k).to(DT), b_dz.to(DT), input_precision=DOT)")
            em.line("tl.store(dh0 + i_bh.to(tl.int64) * K * V + p_kv, b_dh, mask=m_kv)")

    # ---- host side ----------------------------------------------------------------------------
    def launchers(self) -> None:
        self.em.block('''
def _sizes(k, v):
    """(B, T, H, K, V, NT, BK, BV, DOT, DT): shapes, blocks, fp32 matmuls in full precision for fp32
    inputs (DOT) and the matmul operands' type (DT: the inputs' own; fp32 under the interpreter, whose
    half-precision matmuls are wrong)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), BV_MAX))
    DOT = "ieee" if k.dtype == torch.float32 else "tf32"
    DT = tl.float32 if INTERPRET else MATMUL_TYPES[k.dtype]
    return B, T, H, K, V, triton.cdiv(T, CHUNK), BK, BV, DOT, DT


def chunk_channels_fwd(q, k, v, eps, h0):
    """q, k [B, T, H, K]; v [B, T, H, V]; eps [B, T, H, V] fp32; h0 [B, H, K, V] fp32 -> o [B, T, H, V]
    (v's dtype), the final state [B, H, K, V], the residuals z [B, T, H, V] and the chunks' entering
    states [B, NT, H, K, V] (fp32)."""
    B, T, H, K, V, NT, BK, BV, DOT, DT = _sizes(k, v)
    f32 = dict(dtype=torch.float32, device=k.device)
    o, z = torch.empty_like(v), torch.empty(B, T, H, V, **f32)
    h, ht = torch.empty(B, NT, H, K, V, **f32), torch.empty(B, H, K, V, **f32)
    chunk_channels_fwd_kernel[(triton.cdiv(V, BV), B * H)](
        q, k, v, eps, h0, o, z, h, ht, T, NT, H=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, READ_AFTER=READ_AFTER,
        DOT=DOT, DT=DT)
    return o, ht, z, h


def chunk_channels_bwd(q, k, eps, z, h, do, dht):
    """The gradients of q, k, v, eps and h0 (fp32) from do [B, T, H, V] and dht [B, H, K, V]."""
    B, T, H, K, V, NT, BK, BV, DOT, DT = _sizes(k, z)
    f32 = dict(dtype=torch.float32, device=k.device)
    NV = triton.cdiv(V, BV)
    dq, dk = torch.empty(NV, B, T, H, K, **f32), torch.empty(NV, B, T, H, K, **f32)
    dv, deps, dh0 = torch.empty(B, T, H, V, **f32), torch.empty(B, T, H, V, **f32), torch.empty(B, H, K, V, **f32)
    chunk_channels_bwd_kernel[(NV, B * H)](
        q, k, eps, z, h, do.contiguous(), dht.contiguous(), dq, dk, dv, deps, dh0, T, NT, H=H, K=K, V=V,
        BT=CHUNK, BK=BK, BV=BV, READ_AFTER=READ_AFTER, DOT=DOT, DT=DT)
    return dq.sum(0), dk.sum(0), dv, deps, dh0  # dq, dk: the value blocks' parts summed
''')

    def function(self) -> None:
        em = self.em
        with em.indent("class ChunkChannelsFunction(torch.autograd.Function):"):
            em.line('"""(q, k, v, eps, h0) -> (o, the final state): the kernels above."""')
            em.gap(1)
            decorators(em, "forward")
            with em.indent("def forward(ctx, q, k, v, eps, h0):"):
                em.line("o, ht, z, h = chunk_channels_fwd(q, k, v, eps, h0)")
                em.line("ctx.save_for_backward(q, k, eps, z, h)")
                em.line("ctx.v_dtype = v.dtype")
                em.line("return o, ht")
            em.gap(1)
            decorators(em, "backward")
            with em.indent("def backward(ctx, do, dht):"):
                first_order_only(em)
                em.line("q, k, eps, z, h = ctx.saved_tensors")
                em.line("dht = torch.zeros_like(h[:, 0]) if dht is None else dht")
                em.line("dq, dk, dv, deps, dh0 = chunk_channels_bwd(q, k, eps, z, h, do, dht)")
                em.line("return dq.to(q.dtype), dk.to(k.dtype), dv.to(ctx.v_dtype), deps, dh0")

    def public(self) -> None:
        em, lv, rules = self.em, self.lv, self.rules
        name = ident(lv.name, "level")
        kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
        gates = "[B, T, H] or [B, T, H, V]"
        with em.indent(f"def {name}(q, k, v, *, {kw}initial_state=None, output_final_state=False):"):
            common.public_head(em, lv, "S [B, H, K, V]", gates)
            em.line("(S,) = (state,) if torch.is_tensor(state) else tuple(state)")
            em.line("T, H, V = v.shape[1:]")
            em.line("k = k.contiguous()")
            gate_views(em, rules, [self.step])
            text = to_torch(self.step, gate_names(rules, [self.step]))
            em.line(f"eps = torch.as_tensor({text}, dtype=torch.float32, device=k.device)  "
                    f"{where(lv.algorithm.span) or '#'} eps_t")
            em.line("eps = eps.expand(B, T, H, V).contiguous()  # [B, T, H, V]")
            em.line("o, final = ChunkChannelsFunction.apply(q.contiguous(), k, v.contiguous(), eps,")
            em.line("                                       S.to(torch.float32).contiguous())")
            em.line("return o, (_pack((final,)) if output_final_state else None)")
