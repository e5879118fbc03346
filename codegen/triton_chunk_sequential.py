"""Render a level of the *sequential* family (an update every token, each gradient at the state the
previous token left; codegen/torch_chunk_sequential.py) as Triton kernels:
`level_<name>_triton_chunk.py`, a real file in the cache (Triton reads kernel source from disk).

No chunk-parallel form is exact for these levels, so the kernels run the tokens in order, one
program per (batch, head) holding the whole per-token step: the MLP's forward at W_{t-1} on the key
(and the query), the bias map D = dℓ/dy, one sweep back over the layers for each layer's δ_i, and the
rank-1 steps W_i ← a_t W_i − eta_t a_i ⊗ δ_i (with momentum, M_i ← beta_t M_i − lr_t a_i ⊗ δ_i and then
W_i ← a_t W_i + c_t M_i, the momenta after the weights in the state, their cotangent carried beside the
weights' in the backward), then, for elastic net, the soft threshold W ← sign(W) max(|W| − tau_t, 0)
(the backward passes W's cotangent where W ≠ 0). The state lives in global memory, flat per (batch,
head), and the layer products stream it in [BLOCK, BLOCK] tiles, so any width fits (a program's
phases are ordered by barriers). The forward keeps each token's vectors (O(T·d)) and a copy of the
state every CHUNK tokens; the backward kernel replays each CHUNK-token segment from its copy and runs
the exact adjoint of one token at a time in reverse, as the PyTorch form's `_Sequential.backward`.

The file is generated per level: the layer sizes and the offsets of every vector are constants, the
activation and its two derivatives, the bias map and its vjp are printed from the level's
definitions (the bias from the derived sympy gradient), and the per-layer calls are unrolled.
"""
from __future__ import annotations

import math

import sympy

import nlc
from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.printer import to_torch
from nlc.derive.rules import LevelRules
from nlc.plan import KernelPlan

from . import torch_arch
from .emitter import Emitter, comment, ident, where
from .torch_chunk_common import show
from .torch_chunk_sequential import COEFFICIENT_TEXT, coefficient_span, coefficients, copies_every
from .torch_reference import render_nesting_doc
from .triton_printer import diff, to_triton
from .triton_recurrent import AMP_IMPORT, decorators, first_order_only

MAX_V = 8192  # the bias map holds a token's value channels in one block
# act(z), then (act'(z), act''(z)) of each activation, as Triton source over a [BLOCK_N] block z
_ACTIVATIONS = {
    "gelu": ("0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))",
             "pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327\n"
             "return 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * pdf, pdf * (2.0 - z * z)"),
    "silu": ("z * tl.sigmoid(z)",
             "s = tl.sigmoid(z)\n"
             "return s * (1.0 + z * (1.0 - s)), s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))"),
    "tanh": ("2.0 * tl.sigmoid(2.0 * z) - 1.0",
             "t = 2.0 * tl.sigmoid(2.0 * z) - 1.0\n"
             "return 1.0 - t * t, -2.0 * t * (1.0 - t * t)"),
    "relu": ("tl.maximum(z, 0.0)",
             "return tl.where(z > 0, 1.0, 0.0), tl.zeros_like(z)"),
}


def unsupported(rules: LevelRules, plan: KernelPlan) -> str | None:
    """Why these kernels cannot run this level, or None when they can."""
    from . import triton_recurrent
    lv, m = rules.level, rules.level.memory
    if plan.family != "sequential":
        return f"plan family {plan.family!r}, not 'sequential'"
    if m.kind == "matrix" and triton_recurrent.unsupported(rules) is None:
        return "a matrix memory's per-token steps are its fused recurrent kernels' (mode='triton' runs them)"
    if m.kind == "mlp" and m.depth > 1 and m.act not in _ACTIVATIONS:
        return f"activation {m.act} has no Triton form here"
    if lv.target != "value":
        return "a self-generated target (value self(...)) is not in the sequential Triton kernels"
    if lv.initialises:
        return "a level others restart from returns its period states: not in the sequential Triton kernels"
    vector = [g for g in ir.gate_names(rules.bias.grad) if lv.gate_axes[g] != "scalar"]
    if vector:
        return f"the bias gradient reads per-channel gate(s) {', '.join(vector)}: not in the kernels"
    if lv.d_value > MAX_V:
        return f"{lv.d_value} value channels: the bias map holds at most {MAX_V} in one block"
    try:
        SequentialKernels(rules, plan, "", "").text()
    except NotImplementedError as err:  # a function the Triton printer has no form for
        return str(err)
    return None


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_triton_chunk.py` for a level `unsupported` accepts."""
    return SequentialKernels(rules, plan, model, file).text()


class _Layout:
    """Named spans of a flat fp32 buffer: `add(name, size)` places `name` after the previous ones."""

    def __init__(self):
        self.spans: list[tuple[str, int, int]] = []
        self.size = 0

    def add(self, name: str, size: int) -> None:
        self.spans.append((name, self.size, size))
        self.size += size


class SequentialKernels:
    """The file for one level: a chain of LAYERS products (torch_arch.layers), 1-based names W1, A1, ..."""

    def __init__(self, rules: LevelRules, plan: KernelPlan, model: str, file: str):
        lv = self.lv = rules.level
        self.rules, self.plan, self.model, self.file = rules, plan, model, file
        self.coeffs = coefficients(rules, plan)  # role -> sympy: decay, step (gd) or decay, lr, scale, beta
        self.momentum = lv.algorithm.kind == "momentum"
        self.step_role = "lr" if self.momentum else "step"  # the coefficient on the rank-1 step
        self.threshold = "threshold" in self.coeffs  # elastic net: W = soft(a W + c s, tau)
        self.grad = sympy.sympify(rules.bias.grad).subs(S.y, S.e + S.v)  # d(e, r, v, gates)
        self.norm = S.r in self.grad.free_symbols
        self.bias_gates = ir.gate_names(self.grad)
        self.layers = torch_arch.layers(lv)
        self.names = [n for n, _, _ in torch_arch.param_layout(lv)]
        hidden = torch_arch.hidden_size(lv)
        dims = [lv.d_key] + [hidden] * (len(self.layers) - 1) + [lv.d_value]
        self.sizes = [(dims[i], dims[i + 1]) for i in range(len(self.layers))]  # (I, O) per layer
        self.residual = lv.memory.kind == "mlp" and lv.memory.residual
        self.after = lv.read == "after"
        self.nested = lv.init_from is not None
        self.state, self.row, self.work = _Layout(), _Layout(), _Layout()
        self._layouts()
        self.em = Emitter()

    # ---- layouts -----------------------------------------------------------------------------
    def _layouts(self) -> None:
        """state: the parameters in param_layout's order; row: one token's saved vectors (the forward
        part A1, Z1, A2, ..., Y first: a read's row is that part alone), then δ_i and back_i; work:
        the backward's vectors of one token."""
        shapes = {n: math.prod(self._dims(s)) for n, s, _ in torch_arch.param_layout(self.lv)}
        for name in self.names:
            self.state.add(name, shapes[name])
        self.params_size = self.state.size
        if self.momentum:  # each weight's momentum, in the same order
            for name in self.names:
                self.state.add(f"M_{name}", shapes[name])
        L = len(self.layers)
        for i, (I, O) in enumerate(self.sizes, 1):
            self.row.add(f"A{i}", I)
            if i < L:
                self.row.add(f"Z{i}", O)
        self.row.add("Y", self.sizes[-1][1])
        self.read_size = self.row.size
        for i, (I, O) in enumerate(self.sizes, 1):
            self.row.add(f"D{i}", O)
            if i > 1:
                self.row.add(f"BK{i}", I)
        V = self.sizes[-1][1]
        self.work.add("DO", V)
        self.work.add("DY", V)
        # by name, then layer: a key's span DZ_i lies as far from DZ_1 as the read's DZR_i from DZR_1
        for name, side in (("DZ", 1), ("DA", 0), ("DZR", 1), ("DAR", 0), ("AW", 1), ("WD", 0)):
            for i, size in enumerate(self.sizes, 1):
                self.work.add(f"{name}{i}", size[side])
        for i, (I, O) in enumerate(self.sizes, 1):
            if i > 1:
                self.work.add(f"DB{i}", I)
            if i < L:
                self.work.add(f"DZX{i}", O)

    def _dims(self, shape) -> list[int]:
        sizes = {"K": self.lv.d_key, "V": self.lv.d_value, "HIDDEN": torch_arch.hidden_size(self.lv)}
        return [sizes[s] for s in shape]

    def weight(self, i: int) -> str:
        return f"{self.names[self.layers[i - 1][0]].upper()}_AT"

    def bias(self, i: int) -> str | None:
        b = self.layers[i - 1][1]
        return None if b is None else f"{self.names[b].upper()}_AT"

    def stepped(self, at: str | None) -> str | None:
        """Where the rank-1 step lands for a weight or bias at offset `at`: itself (gd) or its momentum."""
        return None if at is None else f"M_{at}" if self.momentum else at

    # ---- the file ----------------------------------------------------------------------------
    def text(self) -> str:
        self.header()
        self.preamble()
        for part in (self.helpers, self.level_functions, self.chain_functions, self.forward_kernel,
                     self.backward_kernel, self.function, self.public):
            self.em.gap()
            part()
        return self.em.text()

    def header(self) -> None:
        em, lv = self.em, self.lv
        em.line(f'"""Level {comment(lv.name)!r} of model {comment(self.model)!r}: Triton kernels of the '
                "sequential family")
        em.line("(the tokens in order, MATH.md §2, §4.2's fastest CMS level).")
        em.line()
        em.line(f"Generated by nlc {nlc.__version__} from {comment(self.file)}; do not edit. It computes what "
                "the reference")
        em.line(f"op in {ident(lv.name, 'level')}.py computes, up to round-off.")
        for key, value in lv.describe().items():
            em.line(f"  {key:<10} {comment(value)}")
        for role, expr in self.coeffs.items():
            em.line(f"  {role} = {show(expr)}   ({COEFFICIENT_TEXT[role]})")
        em.line()
        em.line("One program per (batch, head) runs every token t, with W = W_{t-1} (layer i: input a_i,")
        em.line("pre-activation z_i = a_i W_i (+ b_i); a_1 the key):")
        em.line("  y = M(W; k_t) (a read before the write: M(W; q_t)),  δ_L = dℓ/dy at (y, v_t)")
        em.line("  back_i = W_i δ_i,  δ_(i-1) = back_i ⊙ act'(z_(i-1))   (one sweep back over the layers)")
        if self.momentum:
            em.line("  M_i ← beta_t M_i − lr_t a_i ⊗ δ_i  (a bias's: − lr_t δ_i),  W_i ← a_t W_i + c_t M_i   in place")
        else:
            em.line("  W_i ← a_t W_i − eta_t a_i ⊗ δ_i  (b_i ← a_t b_i − eta_t δ_i)   in place")
        if self.threshold:
            em.line("  then W ← sign(W) max(|W| − tau_t, 0) on every weight (the soft threshold)")
        em.line("The state is flat per (batch, head) in global memory ([B H, STATE_SIZE] fp32); the products")
        em.line("stream it in [BLOCK, BLOCK] tiles and every helper ends with a barrier, so a phase reads")
        em.line("what the one before wrote. The forward keeps each token's vectors (a row of ROW_SIZE) and")
        em.line("a copy of the state every CHUNK tokens; the backward kernel replays each CHUNK-token segment")
        em.line("from its copy and runs the exact adjoint of one token at a time, in reverse.")
        if self.nested:
            em.line(f"Nested: at every token j·RESTART (j >= 1) the state restarts from level "
                    f"{comment(lv.init_from)}'s")
            em.line("(`restart_states`, entry j - 1); the cotangent of the state there goes to that entry.")
        em.line('"""')

    def preamble(self) -> None:
        em, lv = self.em, self.lv
        em.line("import torch")
        em.line("import triton")
        em.line("import triton.language as tl")
        em.line()
        em.line(AMP_IMPORT)
        em.line()
        em.line(f"from .{ident(lv.name, 'level')} import N_PARAMS, _pack, default_state")
        em.gap()
        em.line(f"CHUNK = {copies_every(self.rules, self.plan)}  # tokens between the state copies the "
                "backward replays from" + (" (divides RESTART)" if self.nested else ""))
        if self.nested:
            em.line(f"RESTART = {lv.restart}  # restart from level {comment(lv.init_from)}'s state every "
                    "RESTART tokens")
        em.line("# checked under Triton's interpreter, not yet on a GPU: mode='auto' keeps the PyTorch form,")
        em.line("# mode='triton' runs these kernels")
        em.line("AUTO = False")
        em.line(f"READ_AFTER = {self.after}  # the read sees W_t (else W_{{t-1}}, before the write)")
        em.line(f"COEFFS = {tuple(self.coeffs)!r}  # the per-token coefficients, in order ([B, H, T])")
        em.line("N_COEFFS = len(COEFFS)")
        em.line("N_STATE = " + ("2 * N_PARAMS  # the state tensors: the weights, then their momenta" if self.momentum
                                else "N_PARAMS  # the state tensors: the weights"))
        em.line("NUM_WARPS = 4")
        em.line("BLOCK = tl.constexpr(64)  # rows and columns of a weight tile")
        em.line("BLOCK_N = tl.constexpr(1024)  # entries of a vector block")
        V = self.sizes[-1][1]
        em.line(f"BV = tl.constexpr({triton_pow2(V)})  # the bias map's block: every value channel")
        em.line(f"K = tl.constexpr({self.sizes[0][0]})")
        em.line(f"V = tl.constexpr({V})")
        if len(self.layers) > 1:
            em.line(f"HIDDEN = tl.constexpr({self.sizes[0][1]})")
        self.layout_constants("one (batch, head)'s state, flat: each parameter row-major" +
                              (", then each one's momentum" if self.momentum else ""), self.state, "STATE_SIZE")
        em.line(f"PARAMS_SIZE = tl.constexpr({self.params_size})  # the weights' part of the state")
        self.layout_constants("one token's saved vectors: the forward part (a read's row: READ_SIZE) "
                              "then δ_i and back_i = W_i δ_i", self.row, "ROW_SIZE")
        em.line(f"READ_SIZE = tl.constexpr({self.read_size})")
        self.layout_constants("the backward's vectors of one token", self.work, "WORK_SIZE")
        em.line("# where layer i's span lies in a per-layer group (DZ, DA, ...): of its outputs, of its inputs")
        for side, name in ((1, "OUT"), (0, "IN")):
            at = 0
            for i, size in enumerate(self.sizes, 1):
                em.line(f"{name}{i}_AT = tl.constexpr({at})")
                at += size[side]

    def layout_constants(self, doc: str, layout: _Layout, total: str) -> None:
        em = self.em
        em.line(f"# {doc}")
        for name, start, _size in layout.spans:
            em.line(f"{name.upper()}_AT = tl.constexpr({start})")
        em.line(f"{total} = tl.constexpr({layout.size})")

    # ---- helpers (the same in every file) ------------------------------------------------------
    def helpers(self) -> None:
        self.em.block(_HELPERS)

    # ---- the level's own elementwise maps -----------------------------------------------------
    def level_functions(self) -> None:
        em, m = self.em, self.lv.memory
        deep = len(self.layers) > 1
        act, slopes = _ACTIVATIONS[m.act] if deep else ("z", "return tl.full(z.shape, 1.0, tl.float32), "
                                                        "tl.zeros_like(z)")
        em.line("@triton.jit")
        with em.indent("def _act(z):"):
            em.line(f'"""The activation {m.act if deep else "(none: one layer)"} of a block z."""')
            em.line(f"return {act}")
        em.gap()
        em.line("@triton.jit")
        with em.indent("def _slopes(z):"):
            em.line("\"\"\"act'(z), act''(z) of a block z.\"\"\"")
            em.block(slopes)
        em.gap()
        em.block(_ELEMENTWISE)
        em.gap()
        if self.threshold:
            em.block(_THRESHOLD)
            em.gap()
        self.bias_functions()

    def elem(self, expr) -> str:
        """A bias expression over [BV] blocks (e, v) and scalars (r, the gates)."""
        names = {ir.gate_symbol(g): ident(g, "b_g") for g in self.bias_gates}
        names |= {S.e: "b_e", S.r: "b_r", S.v: "b_v"}
        expr = sympy.sympify(expr)
        text = to_triton(expr, names)
        return text if expr.free_symbols & {S.e, S.v} else f"({text} + tl.zeros([BV], dtype=tl.float32))"

    def times(self, expr, by: str) -> str:
        expr = sympy.sympify(expr)
        if expr in (1, -1):
            return by if expr == 1 else f"-{by}"
        return f"{self.elem(expr)} * {by}"

    def bias_functions(self) -> None:
        em, lv = self.em, self.lv
        span = where((lv.bias.inner or lv.bias).span) or "#"
        gates = "".join(f", {ident(g, 'b_g')}" for g in self.bias_gates)
        em.line("@triton.jit")
        with em.indent(f"def _bias_grad(y, v, d{gates}):"):
            em.line('"""d [V] = dℓ/dy at y [V] (fp32) and v [V] (this token\'s values), the bias\'s gates'
                    ' (scalars)."""')
            self.bias_prologue()
            em.line(f"tl.store(d + o_v, {self.elem(self.grad)}, mask=m_v)  {span} D = dℓ/dy")
            em.line("tl.debug_barrier()")
        em.gap()
        em.line("@triton.jit")
        dgates = "".join(f", {ident(g, 'dg')}" for g in self.bias_gates)
        with em.indent(f"def _bias_vjp(y, v, dd, dy, dv{gates}{dgates}):"):
            em.line('"""dy, dv [V] = ∂<dd, dℓ/dy>/∂y, /∂v at y, v [V]; the gates\' at pointers dg_*."""')
            derivatives = [diff(self.grad, x) for x in (S.e, S.r, S.v, *map(ir.gate_symbol, self.bias_gates))]
            self.bias_prologue(self.norm or any(d.free_symbols & {S.e, S.v} for d in derivatives))
            em.line("b_dd = tl.load(dd + o_v, mask=m_v, other=0.0)")
            em.line(f"b_de = {self.times(diff(self.grad, S.e), 'b_dd')}  # through D = d(e, ...)")
            if self.norm:
                em.line(f"b_dr = tl.sum(tl.where(m_v, {self.times(diff(self.grad, S.r), 'b_dd')}, 0.0), 0)")
                em.line("b_de += tl.where(b_norm > 1e-12, b_dr / b_r, 0.0) * b_e  # ∂r/∂e = e / r")
            em.line("b_de = tl.where(m_v, b_de, 0.0)")
            em.line("tl.store(dy + o_v, b_de, mask=m_v)")
            dgv = diff(self.grad, S.v)
            em.line(f"tl.store(dv + o_v, {self.times(dgv, 'b_dd') + ' - b_de' if dgv != 0 else '-b_de'}, "
                    "mask=m_v)")
            for g in self.bias_gates:
                dg = self.times(diff(self.grad, ir.gate_symbol(g)), "b_dd")
                em.line(f"tl.store({ident(g, 'dg')}, tl.sum(tl.where(m_v, {dg}, 0.0), 0))")
            em.line("tl.debug_barrier()")

    def bias_prologue(self, values: bool = True) -> None:
        """Offsets, mask and, where the printed expressions read them (`values`), b_v, b_e (and b_r)."""
        em = self.em
        em.line("o_v = tl.arange(0, BV)")
        em.line("m_v = o_v < V")
        if not values:
            return
        em.line("b_y = tl.load(y + o_v, mask=m_v, other=0.0)")
        em.line("b_v = tl.load(v + o_v, mask=m_v, other=0.0).to(tl.float32)")
        em.line("b_e = tl.where(m_v, b_y - b_v, 0.0)")
        if self.norm:
            em.line("b_norm = tl.sqrt(tl.sum(b_e * b_e, 0))")
            em.line("b_r = tl.maximum(b_norm, 1e-12)  # r = ||e||, clamped as the reference does")

    # ---- the chain of layers, unrolled ---------------------------------------------------------
    def chain_functions(self) -> None:
        em, L = self.em, len(self.layers)
        em.line("@triton.jit")
        with em.indent("def _memory_forward(p, row):"):
            em.line('"""y = M(p; a_1) for the state p and a row holding a_1 at A1_AT: writes z_i, a_(i+1), y."""')
            for i, (I, O) in enumerate(self.sizes, 1):
                b = self.bias(i)
                out = f"row + Z{i}_AT" if i < L else "row + Y_AT"
                em.line(f"_vec_mat(row + A{i}_AT, p + {self.weight(i)}, {f'p + {b}' if b else 'p'}, {out}, "
                        f"{self.dim(I)}, {self.dim(O)}, {b is not None}, False)")
                if i < L:
                    em.line(f"_activate(row + Z{i}_AT, row + A{i + 1}_AT, {self.dim(O)})")
            if self.residual:
                em.line("_scale_add(row + Y_AT, row + A1_AT, row + Y_AT, 1.0, 1.0, V)  # the residual")
        em.gap()
        em.line("@triton.jit")
        with em.indent("def _deltas(p, row):"):
            em.line(f'"""δ_i of every layer from δ_{L} (at D{L}_AT), one sweep back at the state p: '
                    'back_i = W_i δ_i."""')
            for i in range(L, 1, -1):
                I, O = self.sizes[i - 1]
                em.line(f"_mat_vec(p + {self.weight(i)}, row + D{i}_AT, row + BK{i}_AT, {self.dim(I)}, "
                        f"{self.dim(O)}, False)")
                em.line(f"_times_slope(row + BK{i}_AT, row + Z{i - 1}_AT, row + D{i - 1}_AT, {self.dim(I)})")
        em.gap()
        em.line("@triton.jit")
        then = ", then the soft threshold" if self.threshold else ""
        with em.indent(f"def _step(p, out, row, {', '.join(self.coeffs)}):"):
            if self.momentum:
                em.line('"""out = the state after the token (out may be p): M_i ← beta M_i − lr a_i ⊗ δ_i, then')
                em.line(f'W_i ← decay W_i + scale M_i{then}."""')
                self.rank_one_steps("beta", "-lr")
                em.line("_scale_add(p, out + PARAMS_SIZE, out, decay, scale, PARAMS_SIZE)  # the weights")
            else:
                em.line(f'"""out = the state after the token: W_i ← decay W_i − step a_i ⊗ δ_i{then} (out may be p)."""')
                self.rank_one_steps("decay", "-step")
            if self.threshold:
                em.line("_soft_threshold(out, threshold, PARAMS_SIZE)")
        em.gap()
        em.line("@triton.jit")
        with em.indent("def _memory_backward(p, row, dy, dz, da, work, EXTRA: tl.constexpr):"):
            em.line('"""Back through y = M(p; a_1) from dy [V] into the spans dz_i = dz + OUT{i}_AT,')
            em.line("da_i = da + IN{i}_AT (the key's DZ, DA or the read's DZR, DAR in work); EXTRA: the step's")
            em.line("cotangents of δ_i (work DZX_i) and of a_i (work WD_i) join dz_i and da_i (the key's row).")
            em.line('da_1 is dx less a residual."""')
            for i in range(L, 0, -1):
                I, O = self.sizes[i - 1]
                dz, da = f"dz + OUT{i}_AT", f"da + IN{i}_AT"
                if i == L:
                    em.line(f"_copy(dy, {dz}, {self.dim(O)})")
                else:
                    em.line(f"_times_slope(da + IN{i + 1}_AT, row + Z{i}_AT, {dz}, {self.dim(O)})")
                    with em.indent("if EXTRA:"):
                        em.line(f"_scale_add({dz}, work + DZX{i}_AT, {dz}, 1.0, 1.0, {self.dim(O)})")
                em.line(f"_mat_vec(p + {self.weight(i)}, {dz}, {da}, {self.dim(I)}, {self.dim(O)}, False)")
                with em.indent("if EXTRA:"):
                    em.line(f"_scale_add({da}, work + WD{i}_AT, {da}, 1.0, 1.0, {self.dim(I)})")

    def rank_one_steps(self, scale: str, alpha: str) -> None:
        """out's span of each weight (or momentum) = scale · p's + alpha a_i ⊗ δ_i (a bias's: + alpha δ_i)."""
        em = self.em
        for i, (I, O) in enumerate(self.sizes, 1):
            w = self.stepped(self.weight(i))
            em.line(f"_outer(p + {w}, out + {w}, row + A{i}_AT, row + D{i}_AT, {scale}, {alpha}, {self.dim(I)}, "
                    f"{self.dim(O)})")
            b = self.stepped(self.bias(i))
            if b:
                em.line(f"_scale_add(p + {b}, row + D{i}_AT, out + {b}, {scale}, {alpha}, {self.dim(O)})")

    def coefficient_args(self, prefix: str = "") -> str:
        """The kernels' coefficient pointers: decay, step (gd) or decay, lr, scale, beta."""
        return "".join(f"{prefix}{role}, " for role in self.coeffs)

    def load_coefficients(self) -> str:
        return ", ".join(f"tl.load({role} + i_bh * T + t)" for role in self.coeffs)

    def dim(self, n: int) -> str:
        """A layer size by the name of a constant that holds it (K, then V, then HIDDEN)."""
        return "K" if n == self.lv.d_key else "V" if n == self.lv.d_value else "HIDDEN"

    # ---- the kernels ---------------------------------------------------------------------------
    def restart_arg(self, launch: bool = False) -> str:
        """The kernels' RESTART argument (a nested level's only)."""
        if not self.nested:
            return ""
        return "RESTART=RESTART, " if launch else "RESTART: tl.constexpr, "

    def token_gates(self, prefix: str = "g") -> str:
        return "".join(f"{ident(g, prefix)}, " for g in self.bias_gates)

    def load_gates(self) -> None:
        for g in self.bias_gates:
            self.em.line(f"{ident(g, 'b_g')} = tl.load({ident(g, 'g')} + i_bh * T + t)  # gate {comment(g)}")

    def forward_kernel(self) -> None:
        em = self.em
        em.line("@triton.jit")
        em.line("def sequential_fwd_kernel(")
        em.line(f"    q, k, v, {self.coefficient_args()}{self.token_gates()}state, copies, saved, reads, restarts, o,")
        em.line(f"    T, J, H: tl.constexpr, CHUNK: tl.constexpr, {self.restart_arg()}SHARED: tl.constexpr,")
        em.line("    NESTED: tl.constexpr,")
        em.line("):")
        with em.indent():
            em.line('"""Program (b, h): the tokens of one (batch, head) in order. q, k [B, T, H, K], v, o')
            em.line(f"[B, T, H, V]; {self.coefficient_args()}the bias's gates [B H, T] fp32; state [B H, STATE_SIZE] fp32,")
            em.line("stepped in place; copies [B H, cdiv(T, CHUNK), STATE_SIZE] (W_(t-1) at every t = 0 mod")
            em.line("CHUNK); saved [B H, T, ROW_SIZE]; reads [B H, T, READ_SIZE] (a read's vectors; unused when")
            em.line("SHARED: the read before the write is the key's forward); restarts [B H, J, STATE_SIZE]")
            em.line("(NESTED).\"\"\"")
            em.line("i_bh = tl.program_id(0).to(tl.int64)  # offsets may pass 2^31")
            em.line("i_b, i_h = i_bh // H, i_bh % H")
            em.line("state += i_bh * STATE_SIZE")
            with em.indent("for t in range(T):"):
                em.line("x_t = (i_b * T + t) * H + i_h  # this token's row of q, k, v, o")
                em.line("row = saved + (i_bh * T + t) * ROW_SIZE")
                em.line("read = reads + (i_bh * T + t) * READ_SIZE")
                if self.nested:
                    with em.indent("if NESTED:"):
                        with em.indent("if (t > 0) & (t % RESTART == 0):  # W_(t-1) is restart state t // RESTART - 1"):
                            em.line("_copy(restarts + (i_bh * J + t // RESTART - 1) * STATE_SIZE, state, STATE_SIZE)")
                with em.indent("if t % CHUNK == 0:"):
                    em.line("_copy(state, copies + (i_bh * tl.cdiv(T, CHUNK) + t // CHUNK) * STATE_SIZE, STATE_SIZE)")
                em.line("_copy(k + x_t * K, row + A1_AT, K)")
                em.line("_memory_forward(state, row)  # at W_(t-1)")
                if not self.after:
                    with em.indent("if SHARED:"):
                        em.line("_copy(row + Y_AT, o + x_t * V, V)  # the read before the write is the key's")
                    with em.indent("else:"):
                        em.line("_copy(q + x_t * K, read + A1_AT, K)")
                        em.line("_memory_forward(state, read)")
                        em.line("_copy(read + Y_AT, o + x_t * V, V)")
                self.load_gates()
                L = len(self.layers)
                gates = "".join(f", {ident(g, 'b_g')}" for g in self.bias_gates)
                em.line(f"_bias_grad(row + Y_AT, v + x_t * V, row + D{L}_AT{gates})")
                em.line("_deltas(state, row)")
                em.line(f"_step(state, state, row, {self.load_coefficients()})")
                if self.after:
                    em.line("_copy(q + x_t * K, read + A1_AT, K)")
                    em.line("_memory_forward(state, read)  # at W_t")
                    em.line("_copy(read + Y_AT, o + x_t * V, V)")

    def backward_kernel(self) -> None:
        em = self.em
        em.line("@triton.jit")
        em.line("def sequential_bwd_kernel(")
        em.line(f"    q, k, v, do, {self.coefficient_args()}{self.token_gates()}copies, saved, reads, states, dstate, work,")
        em.line(f"    dq, dk, dv, {self.coefficient_args('d')}{self.token_gates('dg')}"
                "drestarts,")
        em.line(f"    T, J, H: tl.constexpr, CHUNK: tl.constexpr, {self.restart_arg()}SHARED: tl.constexpr,")
        em.line("    NESTED: tl.constexpr, " + " ".join(f"NEED_{role.upper()}: tl.constexpr," for role in self.coeffs))
        em.line("):")
        with em.indent():
            em.line('"""Program (b, h): the adjoint of the tokens in reverse. dstate [B H, STATE_SIZE]: Ŵ, the')
            em.line("cotangent of the final state on entry, of the initial state on exit; states [B H, CHUNK + 1,")
            em.line("STATE_SIZE]: a segment's W_(t-1), replayed; work [B H, WORK_SIZE]; dq, dk [B, T, H, K], dv")
            em.line(f"[B, T, H, V], {self.coefficient_args('d')}the gates' [B H, T], drestarts [B H, J, STATE_SIZE] fp32.\"\"\"")
            em.line("i_bh = tl.program_id(0).to(tl.int64)  # offsets may pass 2^31")
            em.line("i_b, i_h = i_bh // H, i_bh % H")
            em.line("dstate += i_bh * STATE_SIZE")
            em.line("states += i_bh * (CHUNK + 1) * STATE_SIZE")
            em.line("work += i_bh * WORK_SIZE")
            em.line("n_segments = tl.cdiv(T, CHUNK)")
            with em.indent("for s in range(n_segments):"):
                em.line("start = (n_segments - 1 - s) * CHUNK")
                em.line("n = tl.minimum(CHUNK, T - start)")
                em.line("_copy(copies + (i_bh * n_segments + start // CHUNK) * STATE_SIZE, states, STATE_SIZE)")
                with em.indent("for j in range(n):  # replay the segment as the forward stepped"):
                    em.line("t = start + j")
                    em.line("_step(states + j * STATE_SIZE, states + (j + 1) * STATE_SIZE, saved + (i_bh * T + t) * "
                            "ROW_SIZE,")
                    em.line(f"      {self.load_coefficients()})")
                with em.indent("for jj in range(n):"):
                    em.line("j = n - 1 - jj")
                    em.line("t = start + j")
                    self.token_adjoint()
                if self.nested:
                    with em.indent("if NESTED:"):
                        with em.indent("if (start > 0) & (start % RESTART == 0):  # W_(start-1) was a restart state:"):
                            em.line("_copy(dstate, drestarts + (i_bh * J + start // RESTART - 1) * STATE_SIZE, "
                                    "STATE_SIZE)")
                            em.line("_scale_add(dstate, dstate, dstate, 0.0, 0.0, STATE_SIZE)  # none flows on")

    def token_adjoint(self) -> None:
        """The adjoint of token t, with P = W_(t-1) (states + j), N = W_t, Ŵ = dstate (of W_t)."""
        em, L = self.em, len(self.layers)
        em.line("x_t = (i_b * T + t) * H + i_h")
        em.line("P = states + j * STATE_SIZE")
        em.line("row = saved + (i_bh * T + t) * ROW_SIZE")
        em.line("read = saved + (i_bh * T + t) * ROW_SIZE if SHARED else reads + (i_bh * T + t) * READ_SIZE")
        em.line("a_t = tl.load(decay + i_bh * T + t)")
        em.line(f"eta = tl.load({self.step_role} + i_bh * T + t)")
        em.line("_copy(do + x_t * V, work + DO_AT, V)")
        if self.after:
            em.line("# the read at W_t: its weights' cotangent joins Ŵ first")
            em.line("_memory_backward(P + STATE_SIZE, read, work + DO_AT, work + DZR1_AT, work + DAR1_AT, work, False)")
            self.dx("dq", "DAR1_AT", "DO_AT")
            for i, (I, O) in enumerate(self.sizes, 1):
                em.line(f"_outer(dstate + {self.weight(i)}, dstate + {self.weight(i)}, read + A{i}_AT, "
                        f"work + DZR{i}_AT, 1.0, 1.0, {self.dim(I)}, {self.dim(O)})")
                b = self.bias(i)
                if b:
                    em.line(f"_scale_add(dstate + {b}, work + DZR{i}_AT, dstate + {b}, 1.0, 1.0, {self.dim(O)})")
        if self.threshold:
            em.line("# W_t = soft(w, tau_t): w's cotangent is Ŵ where W_t ≠ 0 (|w| > tau_t), tau's −Σ Ŵ sign(W_t)")
            em.line("b_dtau = _threshold_back(dstate, P + STATE_SIZE, PARAMS_SIZE)")
            with em.indent("if NEED_THRESHOLD:"):
                em.line("tl.store(dthreshold + i_bh * T + t, b_dtau)")
        if self.momentum:
            em.line("# W_t = a_t W_(t-1) + c_t M_t: M̂ (the momenta's cotangent, after Ŵ) takes c_t Ŵ")
            with em.indent("if NEED_SCALE:"):
                em.line("tl.store(dscale + i_bh * T + t, _dot(dstate, P + STATE_SIZE + PARAMS_SIZE, PARAMS_SIZE))")
            em.line("_scale_add(dstate + PARAMS_SIZE, dstate, dstate + PARAMS_SIZE, 1.0, tl.load(scale + i_bh * T + t), "
                    "PARAMS_SIZE)")
        with em.indent("if NEED_DECAY:"):
            em.line("tl.store(ddecay + i_bh * T + t, _dot(dstate, P, PARAMS_SIZE))")
        target, hat = ("M", "M̂") if self.momentum else ("W", "Ŵ")
        em.line(f"# the step −eta Σ_i a_i ⊗ δ_i into {target}: aW_i = a_i {hat}_i (+ its bias's), Wd_i = {hat}_i δ_i")
        for i, (I, O) in enumerate(self.sizes, 1):
            w, b = self.stepped(self.weight(i)), self.stepped(self.bias(i))
            em.line(f"_vec_mat(row + A{i}_AT, dstate + {w}, {f'dstate + {b}' if b else 'dstate'}, "
                    f"work + AW{i}_AT, {self.dim(I)}, {self.dim(O)}, {b is not None}, False)")
            em.line(f"_mat_vec(dstate + {w}, row + D{i}_AT, work + WD{i}_AT, {self.dim(I)}, {self.dim(O)}, False)")
        with em.indent(f"if NEED_{self.step_role.upper()}:"):
            for i, (_, O) in enumerate(self.sizes, 1):
                em.line(f"b_ds {'=' if i == 1 else '+='} _dot(work + AW{i}_AT, row + D{i}_AT, {self.dim(O)})")
            em.line(f"tl.store(d{self.step_role} + i_bh * T + t, -b_ds)")
        if self.momentum:
            em.line("# M_t = beta_t M_(t-1) − lr_t u_t: beta's cotangent, then M̂_(t-1) = beta_t M̂_t")
            with em.indent("if NEED_BETA:"):
                em.line("tl.store(dbeta + i_bh * T + t, _dot(dstate + PARAMS_SIZE, P + PARAMS_SIZE, PARAMS_SIZE))")
            em.line("_scale_add(dstate + PARAMS_SIZE, dstate + PARAMS_SIZE, dstate + PARAMS_SIZE, "
                    "tl.load(beta + i_bh * T + t), 0.0, PARAMS_SIZE)")
        em.line("# ∂/∂δ_i = −eta aW_i (in AW_i), ∂/∂a_i = −eta Wd_i (in WD_i)")
        for i, (I, O) in enumerate(self.sizes, 1):
            em.line(f"_scale_add(work + AW{i}_AT, work + AW{i}_AT, work + AW{i}_AT, -eta, 0.0, {self.dim(O)})")
            em.line(f"_scale_add(work + WD{i}_AT, work + WD{i}_AT, work + WD{i}_AT, -eta, 0.0, {self.dim(I)})")
        if L > 1:
            em.line("# back through the sweep δ_i = back_(i+1) ⊙ act'(z_i), back_(i+1) = W_(i+1) δ_(i+1)")
        for i in range(1, L):
            I2, O2 = self.sizes[i]
            em.line(f"_curvature(work + AW{i}_AT, row + Z{i}_AT, row + BK{i + 1}_AT, work + DB{i + 1}_AT, "
                    f"work + DZX{i}_AT, {self.dim(I2)})")
            em.line(f"_vec_mat(work + DB{i + 1}_AT, P + {self.weight(i + 1)}, P, work + AW{i + 1}_AT, "
                    f"{self.dim(I2)}, {self.dim(O2)}, False, True)")
        gates = "".join(f", tl.load({ident(g, 'g')} + i_bh * T + t)" for g in self.bias_gates)
        dgates = "".join(f", {ident(g, 'dg')} + i_bh * T + t" for g in self.bias_gates)
        em.line(f"_bias_vjp(row + Y_AT, v + x_t * V, work + AW{L}_AT, work + DY_AT, dv + x_t * V{gates}{dgates})")
        em.line("# back through the forward at W_(t-1): the key's row, then the read's (before the write)")
        em.line("_memory_backward(P, row, work + DY_AT, work + DZ1_AT, work + DA1_AT, work, True)")
        self.dx("dk", "DA1_AT", "DY_AT")
        if not self.after:
            em.line("_memory_backward(P, read, work + DO_AT, work + DZR1_AT, work + DAR1_AT, work, False)")
            self.dx("dq", "DAR1_AT", "DO_AT")
        em.line("# Ŵ_(t-1) = a_t Ŵ_t + Σ a ⊗ dz (+ back cotangent ⊗ δ)")
        for i, (I, O) in enumerate(self.sizes, 1):
            w, b, dI, dO = self.weight(i), self.bias(i), self.dim(I), self.dim(O)
            em.line(f"_outer(dstate + {w}, dstate + {w}, row + A{i}_AT, work + DZ{i}_AT, a_t, 1.0, {dI}, {dO})")
            if not self.after:
                em.line(f"_outer(dstate + {w}, dstate + {w}, read + A{i}_AT, work + DZR{i}_AT, 1.0, 1.0, {dI}, {dO})")
            if i > 1:
                em.line(f"_outer(dstate + {w}, dstate + {w}, work + DB{i}_AT, row + D{i}_AT, 1.0, 1.0, {dI}, {dO})")
            if b:
                em.line(f"_scale_add(dstate + {b}, work + DZ{i}_AT, dstate + {b}, a_t, 1.0, {dO})")
                if not self.after:
                    em.line(f"_scale_add(dstate + {b}, work + DZR{i}_AT, dstate + {b}, 1.0, 1.0, {dO})")

    def dx(self, name: str, da: str, dy: str) -> None:
        """Store a row's input cotangent: da_1, plus the output's for a residual."""
        if self.residual:
            self.em.line(f"_scale_add(work + {da}, work + {dy}, {name} + x_t * K, 1.0, 1.0, K)")
        else:
            self.em.line(f"_copy(work + {da}, {name} + x_t * K, K)")

    # ---- autograd.Function and the op ----------------------------------------------------------
    def function(self) -> None:
        em = self.em
        em.block(_PACKING)
        em.gap()
        with em.indent("class _Sequential(torch.autograd.Function):"):
            em.line('"""forward(n_gates, q, k, v, *coeffs, *gates, *params, *restarts): q, k [B, T, H, K], v')
            em.line("[B, T, H, V]; the N_COEFFS coefficients of COEFFS [B, H, T]; the bias's n_gates gates [B, H, T];")
            em.line("the N_STATE state tensors [B, H, ...]; the restart states [B, J, H, ...] (none: no restarts).")
            em.line('Returns o [B, T, H, V] and the final state tensors (fp32)."""')
            em.gap(1)
            decorators(em, "forward")
            with em.indent("def forward(ctx, n_gates, q, k, v, *rest):"):
                em.line("coeffs, rest = rest[:N_COEFFS + n_gates], rest[N_COEFFS + n_gates:]  # with the gates")
                em.line("params, restarts = rest[:N_STATE], rest[N_STATE:]")
                em.line("B, T, H = k.shape[:3]")
                em.line("shared = not READ_AFTER and _aliased(q, k)  # the read before the write is the key's forward")
                em.line("q, k, v = q.contiguous(), k.contiguous(), v.contiguous()")
                em.line("dtypes = [x.dtype for x in coeffs]")
                em.line("coeffs = [_token_rows(x) for x in coeffs]  # [B H, T] fp32")
                em.line("state = _flat(params)")
                em.line("copies = state.new_empty(B * H, triton.cdiv(T, CHUNK), state.shape[1])")
                em.line("saved = state.new_empty(B * H, T, ROW_SIZE)")
                em.line("reads = saved if shared else state.new_empty(B * H, T, READ_SIZE)")
                em.line("starts = _flat_restarts(restarts) if restarts else state[:, None]  # [B H, J, STATE_SIZE]")
                em.line("o = torch.empty_like(v)")
                em.line("sequential_fwd_kernel[(B * H,)](q, k, v, *coeffs, state, copies, saved, reads, starts, o, T,")
                em.line(f"                                starts.shape[1], H=H, CHUNK=CHUNK, {self.restart_arg(True)}"
                        "SHARED=shared,")
                em.line("                                NESTED=bool(restarts),")
                em.line("                                num_warps=NUM_WARPS)")
                em.line("ctx.save_for_backward(q, k, v, *coeffs, copies, saved, reads)")
                em.line("ctx.shared, ctx.n_gates, ctx.starts = shared, n_gates, starts.shape")
                em.line("ctx.dtypes = dtypes")
                em.line("ctx.shapes = [(p.shape, p.dtype) for p in params] + [(r.shape, r.dtype) for r in restarts]")
                em.line("return (o, *_unflat(state, [(p.shape, torch.float32) for p in params]))")
            em.gap(1)
            decorators(em, "backward")
            with em.indent("def backward(ctx, do, *dfinal):"):
                first_order_only(em)
                em.line("q, k, v, *rest = ctx.saved_tensors")
                em.line("coeffs, (copies, saved, reads) = rest[:N_COEFFS + ctx.n_gates], rest[N_COEFFS + ctx.n_gates:]")
                em.line("B, T, H = k.shape[:3]")
                em.line("needs = ctx.needs_input_grad[4:4 + N_COEFFS]  # of each coefficient")
                em.line("dstate = _flat(dfinal)  # Ŵ: the final state's cotangent, then the initial state's")
                em.line("states = dstate.new_empty(B * H, CHUNK + 1, dstate.shape[1])")
                em.line("work = dstate.new_zeros(B * H, WORK_SIZE)")
                em.line("dq, dk = (torch.empty(k.shape, dtype=torch.float32, device=k.device) for _ in range(2))")
                em.line("dv = torch.empty(v.shape, dtype=torch.float32, device=v.device)")
                em.line("dcoeffs = [torch.zeros_like(c) for c in coeffs]")
                em.line("drestarts = dstate.new_zeros(ctx.starts)")
                em.line("sequential_bwd_kernel[(B * H,)](q, k, v, do.contiguous(), *coeffs, copies, saved, reads, "
                        "states, dstate,")
                em.line("                                work, dq, dk, dv, *dcoeffs, drestarts, T, ctx.starts[1], H=H,")
                em.line(f"                                CHUNK=CHUNK, {self.restart_arg(True)}SHARED=ctx.shared,")
                em.line("                                NESTED=len(ctx.shapes) > N_STATE,")
                em.line("                                **{f'NEED_{role.upper()}': need for role, need in zip(COEFFS, needs)},")
                em.line("                                num_warps=NUM_WARPS)")
                em.line("dcoeffs = [d.view(B, H, T).to(dtype) for d, dtype in zip(dcoeffs, ctx.dtypes)]")
                em.line("dcoeffs[:N_COEFFS] = [d if need else None for d, need in zip(dcoeffs, needs)]")
                em.line("dparams = _unflat(dstate, ctx.shapes[:N_STATE])")
                em.line("drest = _unflat_restarts(drestarts, ctx.shapes[N_STATE:], B, H)")
                em.line("return (None, dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *dcoeffs, *dparams, *drest)")

    def public(self) -> None:
        em, lv = self.em, self.lv
        kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
        nest = "restart_states=None, " if self.nested else ""
        with em.indent(f"def {ident(lv.name, 'level')}(q, k, v, *, {kw}{nest}initial_state=None, "
                       "output_final_state=False):"):
            em.line(f'"""Level {comment(lv.name)!r}, tokens in order (Triton). q, k: [B, T, H, K]; v: [B, T, H, V]; '
                    f"gates {', '.join(lv.gates) or '(none)'}:")
            em.line("[B, T, H]; float32, bfloat16 or float16 (the state and accumulation in fp32).")
            em.line("initial_state: a tuple of [B, H, ...] per state tensor (default: the reference's).")
            em.line("Returns (o [B, T, H, V] in v's dtype, final state float32, or None)" +
                    ("." if self.nested else '."""'))
            if self.nested:
                render_nesting_doc(em, lv)
                em.line('"""')
            em.line("B, T, H = k.shape[:3]")
            em.line("state = initial_state if initial_state is not None else default_state(B, torch.float32, k.device)")
            em.line("params = (state,) if torch.is_tensor(state) else tuple(state)[:N_STATE]")
            heads = {ir.gate_symbol(g): ident(g, "gh") for g in lv.gates}
            used = set().union(*(ir.gate_names(e) for e in self.coeffs.values()))
            for g in lv.gates:
                if g in used:
                    em.line(f"{ident(g, 'gh')} = {ident(g, 'g')}.transpose(1, 2)  # gate {comment(g)} [B, H, T]")
            em.line("ones = torch.ones(B, H, T, dtype=torch.float32, device=k.device)")
            for role, expr in self.coeffs.items():
                text = to_torch(expr, heads) if expr.free_symbols else repr(float(expr))
                em.line(f"{role} = ({text}) * ones  {where(coefficient_span(lv, role)) or '#'} "
                        f"{COEFFICIENT_TEXT[role]}, [B, H, T]")
            gates = "".join(f"{ident(g, 'g')}.transpose(1, 2), " for g in self.bias_gates)
            restarts = ", *(restart_states or ())" if self.nested else ""
            em.line(f"{where(lv.span)} level {comment(lv.name)}: the tokens in order".strip())
            em.line(f"o, *final = _Sequential.apply({len(self.bias_gates)}, q, k, v, {', '.join(self.coeffs)}, "
                    f"{gates}*params{restarts})")
            em.line("return o, (_pack(tuple(final)) if output_final_state else None)")


def triton_pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


_HELPERS = '''
@triton.jit
def _vec_mat(x, W, b, out, I: tl.constexpr, O: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """out [O] (+)= x [I] W [I, O] (+ b [O]); W row-major, x fp32."""
    for o0 in range(0, O, BLOCK):
        o_o = o0 + tl.arange(0, BLOCK)
        m_o = o_o < O
        b_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, I, BLOCK):
            o_i = i0 + tl.arange(0, BLOCK)
            m_i = o_i < I
            b_x = tl.load(x + o_i, mask=m_i, other=0.0)
            b_w = tl.load(W + o_i[:, None] * O + o_o[None, :], mask=m_i[:, None] & m_o[None, :], other=0.0)
            b_acc += tl.sum(b_x[:, None] * b_w, 0)
        if HAS_BIAS:
            b_acc += tl.load(b + o_o, mask=m_o, other=0.0)
        if ACC:
            b_acc += tl.load(out + o_o, mask=m_o, other=0.0)
        tl.store(out + o_o, b_acc, mask=m_o)
    tl.debug_barrier()


@triton.jit
def _mat_vec(W, d, out, I: tl.constexpr, O: tl.constexpr, ACC: tl.constexpr):
    """out [I] (+)= W [I, O] d [O]; W row-major."""
    for i0 in range(0, I, BLOCK):
        o_i = i0 + tl.arange(0, BLOCK)
        m_i = o_i < I
        b_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for o0 in range(0, O, BLOCK):
            o_o = o0 + tl.arange(0, BLOCK)
            m_o = o_o < O
            b_d = tl.load(d + o_o, mask=m_o, other=0.0)
            b_w = tl.load(W + o_i[:, None] * O + o_o[None, :], mask=m_i[:, None] & m_o[None, :], other=0.0)
            b_acc += tl.sum(b_w * b_d[None, :], 1)
        if ACC:
            b_acc += tl.load(out + o_i, mask=m_i, other=0.0)
        tl.store(out + o_i, b_acc, mask=m_i)
    tl.debug_barrier()


@triton.jit
def _outer(W, out, x, d, scale, alpha, I: tl.constexpr, O: tl.constexpr):
    """out [I, O] = scale W + alpha x [I] ⊗ d [O] (out may be W)."""
    for i0 in range(0, I, BLOCK):
        o_i = i0 + tl.arange(0, BLOCK)
        m_i = o_i < I
        b_x = tl.load(x + o_i, mask=m_i, other=0.0)
        for o0 in range(0, O, BLOCK):
            o_o = o0 + tl.arange(0, BLOCK)
            m_o = o_o < O
            b_d = tl.load(d + o_o, mask=m_o, other=0.0)
            o_w = o_i[:, None] * O + o_o[None, :]
            m_w = m_i[:, None] & m_o[None, :]
            b_w = tl.load(W + o_w, mask=m_w, other=0.0)
            tl.store(out + o_w, scale * b_w + alpha * b_x[:, None] * b_d[None, :], mask=m_w)
    tl.debug_barrier()


@triton.jit
def _scale_add(x, y, out, a, b, N: tl.constexpr):
    """out [N] = a x + b y (out may be x or y)."""
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_x = tl.load(x + o_n, mask=m_n, other=0.0)
        b_y = tl.load(y + o_n, mask=m_n, other=0.0)
        tl.store(out + o_n, a * b_x + b * b_y, mask=m_n)
    tl.debug_barrier()


@triton.jit
def _copy(x, out, N: tl.constexpr):
    """out [N] = x [N], converted to out's type."""
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        tl.store(out + o_n, tl.load(x + o_n, mask=m_n, other=0.0).to(out.dtype.element_ty), mask=m_n)
    tl.debug_barrier()


@triton.jit
def _dot(x, y, N: tl.constexpr):
    """Σ_n x[n] y[n] over [N] fp32 vectors."""
    b_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_acc += tl.load(x + o_n, mask=m_n, other=0.0) * tl.load(y + o_n, mask=m_n, other=0.0)
    return tl.sum(b_acc, 0)
'''

_ELEMENTWISE = '''
@triton.jit
def _activate(z, out, N: tl.constexpr):
    """out [N] = act(z)."""
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        tl.store(out + o_n, _act(tl.load(z + o_n, mask=m_n, other=0.0)), mask=m_n)
    tl.debug_barrier()


@triton.jit
def _times_slope(x, z, out, N: tl.constexpr):
    """out [N] = x ⊙ act'(z)."""
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        slope, _ = _slopes(tl.load(z + o_n, mask=m_n, other=0.0))
        tl.store(out + o_n, tl.load(x + o_n, mask=m_n, other=0.0) * slope, mask=m_n)
    tl.debug_barrier()


@triton.jit
def _curvature(dd, z, back, dback, dzx, N: tl.constexpr):
    """Back through δ = back ⊙ act'(z) from dd = ∂/∂δ [N]: dback = dd ⊙ act'(z),
    dzx = dd ⊙ back ⊙ act''(z)."""
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        slope, curve = _slopes(tl.load(z + o_n, mask=m_n, other=0.0))
        b_dd = tl.load(dd + o_n, mask=m_n, other=0.0)
        tl.store(dback + o_n, b_dd * slope, mask=m_n)
        tl.store(dzx + o_n, b_dd * tl.load(back + o_n, mask=m_n, other=0.0) * curve, mask=m_n)
    tl.debug_barrier()
'''

_THRESHOLD = '''
@triton.jit
def _soft_threshold(x, tau, N: tl.constexpr):
    """x [N] ← sign(x) max(|x| − tau, 0), in place."""
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_x = tl.load(x + o_n, mask=m_n, other=0.0)
        b_m = tl.maximum(tl.abs(b_x) - tau, 0.0)
        tl.store(x + o_n, tl.where(b_x < 0, -b_m, b_m), mask=m_n)
    tl.debug_barrier()


@triton.jit
def _threshold_back(dw, w, N: tl.constexpr):
    """Back through w = soft(c, tau) from dw [N] at the thresholded w [N]: dw ← dw where w ≠ 0 (|c| > tau),
    in place; returns ∂/∂tau = −Σ dw sign(w)."""
    b_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        o_n = n0 + tl.arange(0, BLOCK_N)
        m_n = o_n < N
        b_w = tl.load(w + o_n, mask=m_n, other=0.0)
        b_dw = tl.where(b_w != 0, tl.load(dw + o_n, mask=m_n, other=0.0), 0.0)
        b_acc += tl.where(b_w > 0, b_dw, -b_dw)
        tl.store(dw + o_n, b_dw, mask=m_n)
    tl.debug_barrier()
    return -tl.sum(b_acc, 0)
'''

_PACKING = '''
def _aliased(a, b):
    """Whether two tensors are views of the same memory with the same layout (the same values)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _token_rows(x):
    """[B, H, T] -> [B H, T] fp32, contiguous."""
    return x.float().reshape(-1, x.shape[-1]).contiguous()


def _flat(tensors):
    """State tensors [B, H, ...] -> [B H, STATE_SIZE] fp32 (a new tensor)."""
    return torch.cat([x.float().reshape(x.shape[0] * x.shape[1], -1) for x in tensors], 1).contiguous()


def _unflat(flat, shapes):
    """[B H, STATE_SIZE] -> state tensors of the given (shape, dtype) (fp32 where given fp32)."""
    out, at = [], 0
    for shape, dtype in shapes:
        size = shape[2:].numel()
        out.append(flat[:, at:at + size].reshape(shape).to(dtype))
        at += size
    return out


def _flat_restarts(restarts):
    """Restart states [B, J, H, ...] per tensor -> [B H, J, STATE_SIZE] fp32."""
    B, J, H = restarts[0].shape[:3]
    return torch.cat([r.float().transpose(1, 2).reshape(B * H, J, -1) for r in restarts], 2).contiguous()


def _unflat_restarts(flat, shapes, B, H):
    """[B H, J, STATE_SIZE] -> per restart tensor [B, J, H, ...] of the given (shape, dtype)."""
    out, at = [], 0
    for shape, dtype in shapes:
        size = shape[3:].numel()
        part = flat[:, :, at:at + size].reshape(B, H, shape[1], *shape[3:]).transpose(1, 2)
        out.append(part.to(dtype))
        at += size
    return out
'''
