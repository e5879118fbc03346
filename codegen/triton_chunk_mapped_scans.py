"""Render a mapped-family level whose step is not dgd's closed form (MATH.md §3.6-3.8: ATLAS's
Muon and omega windows, momentum, elastic's soft threshold, KL's softmax, FTRL accumulators) as
Triton scans beside PyTorch matmuls: `level_<name>_triton_chunk.py`, a real file in the cache.

Every gradient of a chunk is taken at the weights W_0 entering it, so one forward and one vjp give
every token's gradient g_t (a window sum of a_i ⊗ δ_i) before any weight moves. What stays sequential
is then elementwise in each state tensor, or (Muon) independent per token:

    M_t = beta_t M_(t-1) + c_t g_t      (momentum: c = -lr, s = M; muon: c = 1)   scan kernel
    X_t = NS(M_t)                       (muon: Newton-Schulz on every token's M_t)  PyTorch matmuls
    W_t = R(W_(t-1), s_t, gates_t)      (the derived retention map; KL: a softmax)  scan kernel

An FTRL accumulator (lq, ftrl) scans A_t = decay_t A_(t-1) + s_t instead and reads W_t = psi(A_t), the
reference's own map (a q-norm over each whole tensor, or a soft threshold) batched over tokens in PyTorch.

Each scan kernel runs one program per (batch·head, tile of the tensor) over the chunk's tokens, the
map R and its partial derivatives printed from the derived sympy expression; a softmax keeps its
whole axis in the tile. Their backward kernels run the tokens in reverse. The gradients, Newton-Schulz
(the reference's own function) and the reads at every token's weights are batched PyTorch products;
each chunk runs under activation checkpointing, so training keeps the state entering each chunk.
"""
from __future__ import annotations

from types import SimpleNamespace

import sympy

import nlc
from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.printer import to_torch
from nlc.derive.rules import ALGORITHM_TEXT, LevelRules
from nlc.plan import KernelPlan

from . import torch_arch
from . import triton_chunk_common as common
from .emitter import Emitter, comment, ident, where
from .torch_chunk_common import render_layer_grads, render_product, show
from .torch_reference import self_target
from .triton_chunk_frozen_mlp import MlpKernels
from .triton_printer import diff, times, to_triton
from .triton_recurrent import decorators, first_order_only, soft_threshold
from .triton_recurrent_maps import RetentionMaps

BLOCK = 64  # rows and columns of a state tile per program, where the map is elementwise
MAX_AXIS = 1024  # a softmax's axis lies whole in one tile
_BETA, _LR = sympy.Symbol("beta"), sympy.Symbol("lr")  # the momentum scan's per-token coefficients


def unsupported(rules: LevelRules, plan: KernelPlan) -> str | None:
    """Why these scans cannot run a mapped level outside dgd's closed form, or None when they can."""
    lv, ret = rules.level, rules.retention
    if not rules.accumulator and ret.form not in ("elementwise", "threshold", "softmax"):
        return f"retention {lv.retention.kind} is a {ret.form} map, not in the mapped scan kernels"
    if lv.lag_token:
        return "kl(apply = chunk)'s lag token keeps its per-token maps in the chunked PyTorch form"
    if lv.algorithm.kind not in ("gd", "momentum", "muon", "ftrl"):
        return f"{lv.algorithm.kind} steps are not in the mapped scan kernels"
    scans = MappedScans(rules, plan, "", "")
    reads = {role: ir.gate_names(expr) for role, expr in scans.coefficients().items()}
    for role, gates in {**reads, "retention": scans.map_gates, "map psi": scans.psi_gates}.items():
        vector = [g for g in gates if lv.gate_axes[g] != "scalar"]
        if vector:
            return f"the {role} reads per-channel gate(s) {', '.join(vector)}: the kernels take one per token"
    vector = [g for g in ir.gate_names(rules.bias.grad) if lv.gate_axes[g] != "scalar"]
    if vector:
        return f"the bias gradient reads per-channel gate(s) {', '.join(vector)}: not in the kernels"
    if ret.form == "softmax" and max(torch_arch.hidden_size(lv), lv.d_key, lv.d_value) > MAX_AXIS:
        return f"a softmax axis over {MAX_AXIS} entries: the scan holds it in one tile"
    try:
        scans.text()
    except NotImplementedError as err:  # a function the Triton printer has no form for
        return str(err)
    return None


class _Scan(RetentionMaps):
    """One elementwise scan h_t = R(h_(t-1), x_t, rows_t) over [I, O] tiles: its forward and backward
    kernels and autograd.Function `name`. `rows`: (symbol, name) of per-token scalars the map reads;
    `softmax`: (axis, mass) when h_t = mass·softmax(R(log h_(t-1), x_t)) over that axis of the tile."""

    def __init__(self, em: Emitter, name: str, expr, rows, softmax=None):
        self.em, self.name, self.expr, self.rows = em, name, sympy.sympify(expr), rows
        self.x = SimpleNamespace(axis=softmax[0], mass=softmax[1]) if softmax else None  # RetentionMaps reads x

    def tile_names(self) -> dict:
        return {sym: f"b_{name}" for sym, name in self.rows} | {S.w0: "b_h", S.s: "b_s", S.lw0: "b_lw"}

    def tile(self, expr) -> str:
        return to_triton(sympy.sympify(expr), self.tile_names())

    def row_args(self, prefix: str = "") -> str:
        return "".join(f"{prefix}{name}, " for _, name in self.rows)

    def prologue(self) -> None:
        em = self.em
        em.line("i_bh, i_i, i_o = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)")
        em.line("o_i = i_i * BI + tl.arange(0, BI)")
        em.line("o_o = i_o * BO + tl.arange(0, BO)")
        em.line("m_h = (o_i[:, None] < I) & (o_o[None, :] < O)")
        em.line("p_h = o_i[:, None] * O + o_o[None, :]  # offsets in one [I, O] tensor")

    def load_rows(self, used=None) -> None:
        """Each row's value at token t (those in `used`, when given)."""
        for sym, name in self.rows:
            if used is None or sym in used:
                self.em.line(f"b_{name} = tl.load({name} + i_bh * L + t)")

    def backward_symbols(self) -> set:
        """The symbols a token's vjp reads: those of the map's partial derivatives (a softmax's, and
        its log of h_(t-1), always read h_(t-1))."""
        z = self.expr
        used = set().union(*(diff(z, sym).free_symbols for sym in (S.w0, S.lw0, S.s, *(r for r, _ in self.rows))))
        used = {S.w0 if sym == S.lw0 else sym for sym in used}
        return used | {S.w0} if self.x is not None else used

    def kernels(self) -> None:
        em, sizes = self.em, "L, I, O, BI: tl.constexpr, BO: tl.constexpr"
        em.line('@triton.autotune(configs=CONFIGS, key=["I", "O", "BI", "BO"])')
        em.line('@triton.jit(do_not_specialize=["L"])')
        with em.indent(f"def {self.name}_fwd_kernel(h0, x, {self.row_args()}h, {sizes}):"):
            em.line(f'"""Program (bh, i, o): tile (i, o) of h_t = {self.doc()} for t < L;')
            em.line('h0 [BH, I, O], x and h [BH, L, I, O], the rows [BH, L]."""')
            self.prologue()
            em.line("b_h = tl.load(h0 + i_bh * I * O + p_h, mask=m_h, other=0.0)")
            with em.indent("for t in range(L):"):
                em.line("p_t = (i_bh * L + t) * I * O + p_h")
                em.line("b_s = tl.load(x + p_t, mask=m_h, other=0.0)")
                self.load_rows()
                if self.x is None:
                    em.line(f"b_h = tl.where(m_h, {self.tile(self.expr)}, 0.0)")
                else:
                    self.softmax("b_h", self.expr, "")
                em.line("tl.store(h + p_t, b_h, mask=m_h)")
        em.gap()
        em.line('@triton.autotune(configs=CONFIGS, key=["I", "O", "BI", "BO"])')
        em.line('@triton.jit(do_not_specialize=["L"])')
        with em.indent(f"def {self.name}_bwd_kernel(h0, x, {self.row_args()}h, dh, dh0, dx, {self.row_args('d')}"
                       f"{sizes}):"):
            em.line('"""Program (bh, i, o): the tokens in reverse, from dh = ∂/∂h [BH, L, I, O]: dh0, dx and')
            em.line('this tile\'s part of each row\'s gradient, d<row> [BH, tiles, L]."""')
            self.prologue()
            if self.rows:
                em.line("i_part = (i_bh * tl.num_programs(1) + i_i) * tl.num_programs(2) + i_o  # this tile's row of "
                        "the parts")
            em.line("b_dw = tl.zeros([BI, BO], dtype=tl.float32)  # ∂/∂h_t, carried back")
            with em.indent("for r in range(L):"):
                em.line("t = L - 1 - r")
                em.line("p_t = (i_bh * L + t) * I * O + p_h")
                em.line("b_dw += tl.load(dh + p_t, mask=m_h, other=0.0)")
                used = self.backward_symbols()
                if S.w0 in used:
                    with em.indent("if t > 0:"):
                        em.line("b_h = tl.load(h + p_t - I * O, mask=m_h, other=0.0)  # h_(t-1)")
                    with em.indent("else:"):
                        em.line("b_h = tl.load(h0 + i_bh * I * O + p_h, mask=m_h, other=0.0)")
                if S.s in used:
                    em.line("b_s = tl.load(x + p_t, mask=m_h, other=0.0)")
                self.load_rows(used)
                self.backward_step()
            em.line("tl.store(dh0 + i_bh * I * O + p_h, b_dw, mask=m_h)")
        em.gap()

    def doc(self) -> str:
        text = show(self.expr)
        return text if self.x is None else f"{self.x.mass!r}·softmax({text}, axis {self.x.axis})"

    def backward_step(self) -> None:
        """One token's vjp: dx, the rows' parts, and ∂/∂h_(t-1) into b_dw (emitted inside the loop)."""
        em, z = self.em, self.expr
        if self.x is None:
            by, through_h = "b_dw", times(self.tile(diff(z, S.w0)), "b_dw")
        else:
            em.line("b_w = tl.load(h + p_t, mask=m_h, other=0.0)  # h_t")
            em.line("b_lw = tl.log(tl.maximum(b_h, 1e-30))")
            self.softmax_back("b_dz", "b_w", "b_dw")
            by, through_h = "b_dz", self.through_log(z, "b_dz")
        em.line(f"tl.store(dx + p_t, tl.where(m_h, {times(self.tile(diff(z, S.s)), by)}, 0.0), mask=m_h)")
        for sym, name in self.rows:
            part = times(self.tile(diff(z, sym)), by)
            em.line(f"tl.store(d{name} + i_part * L + t, tl.sum(tl.where(m_h, {part}, 0.0)))")
        em.line(f"b_dw = tl.where(m_h, {through_h}, 0.0)")

    def function(self) -> None:
        em, whole = self.em, self.x is not None
        rows = self.row_args().rstrip(", ") or "none"
        with em.indent(f"class {self.name.title().replace('_', '')}Scan(torch.autograd.Function):"):
            em.line(f'"""h_t = {self.doc()}: h0 [B, H, I, O], x [B, H, L, I, O],')
            em.line(f'the rows ({rows}) [B, H, L] -> h [B, H, L, I, O], fp32."""')
            em.gap(1)
            decorators(em, "forward")
            with em.indent("def forward(ctx, h0, x, *rows):"):
                em.line("h0, x, rows = h0.contiguous(), x.contiguous(), [r.contiguous() for r in rows]")
                em.line("B, H, L, I, O = x.shape")
                em.line("h = torch.empty_like(x)")
                em.line(f"blocks = _blocks(I, O, {self.x.axis if whole else None})")
                em.line(f"{self.name}_fwd_kernel[_grid(B * H, I, O, blocks)](h0, x, *rows, h, L, I, O, *blocks)")
                em.line("ctx.save_for_backward(h0, x, h, *rows)")
                em.line("ctx.blocks = blocks")
                em.line("return h")
            em.gap(1)
            decorators(em, "backward")
            with em.indent("def backward(ctx, dh):"):
                first_order_only(em)
                em.line("h0, x, h, *rows = ctx.saved_tensors")
                em.line("B, H, L, I, O = x.shape")
                em.line("grid = _grid(B * H, I, O, ctx.blocks)")
                em.line("dh0, dx = torch.empty_like(h0), torch.empty_like(x)")
                em.line("parts = grid[1] * grid[2]  # one part of each row's gradient per tile")
                em.line("drows = [torch.empty(B, H, parts, L, dtype=x.dtype, device=x.device) for _ in rows]")
                em.line(f"{self.name}_bwd_kernel[grid](h0, x, *rows, h, dh.contiguous(), dh0, dx, *drows, L, I, O,")
                em.line(f"{' ' * (len(self.name) + 12)}*ctx.blocks)")
                em.line("return (dh0, dx, *(d.sum(2) for d in drows))  # the tiles' parts summed")


class MappedScans:
    """The file for one level: its scans (`_Scan`), the bias map D = dℓ/dy as the frozen MLP file's
    kernels, and the PyTorch loop over chunks."""

    def __init__(self, rules: LevelRules, plan: KernelPlan, model: str, file: str):
        lv = self.lv = rules.level
        self.rules, self.plan, self.model, self.file = rules, plan, model, file
        # ftrl's step is gd's, s_t = -lr_t g_t: its accumulator is the retention's (rules.accumulator)
        self.alg = "gd" if lv.algorithm.kind == "ftrl" else lv.algorithm.kind
        self.omega = lv.bias.kind == "omega"
        ret = rules.retention
        self.accumulator = rules.accumulator
        self.retain = rules.retention_new()
        if self.accumulator:  # FTRL: the scan is the accumulator's, its map psi runs in PyTorch
            self.retain = rules.accumulator_decay() * S.w0 + S.s
        elif ret.form == "threshold":  # elastic net: the soft threshold of the smooth centre
            self.retain = soft_threshold(self.retain, rules.threshold())
        self.map_gates = ir.gate_names(self.retain)
        self.psi_gates = rules.psi_gates()
        # a softmax over the rows (axis 0) or columns (axis 1) of a weight [I, O]; a bias [O] scans as
        # one column [O, 1] or one row [1, O] so that its softmax runs over the same axis of its tile
        self.axis = None if ret.form != "softmax" else 0 if lv.retention.args["axis"] == "row" else 1
        self.em = Emitter()
        self.bias = MlpKernels(rules, plan, model, file)
        self.bias.em = self.em

    def chunk_gates(self) -> list[str]:
        """The gates a chunk's maps read: the retention scan's, and an accumulator's psi's."""
        return sorted(set(self.map_gates) | set(self.psi_gates))

    def coefficients(self) -> dict:
        """The per-token coefficients computed in PyTorch (role -> sympy expression in gates)."""
        lv, coeffs = self.lv, {"lr": sympy.sympify(self.rules.lr)}
        if self.alg in ("momentum", "muon"):
            coeffs["beta"] = sympy.sympify(lv.algorithm.args["beta"])
        if self.omega:
            coeffs["gamma"] = sympy.sympify(lv.bias.args["gamma"])
        return coeffs

    def scans(self) -> list[_Scan]:
        em, out = self.em, []
        if self.alg == "momentum":
            out.append(_Scan(em, "momentum", _BETA * S.w0 - _LR * S.s, [(_BETA, "beta"), (_LR, "lr")]))
        elif self.alg == "muon":
            out.append(_Scan(em, "momentum", _BETA * S.w0 + S.s, [(_BETA, "beta")]))
        rows = [(ir.gate_symbol(g), ident(g, "g")) for g in self.map_gates]
        mass = float(self.lv.retention.args["mass"]) if self.axis is not None else None
        out.append(_Scan(em, "retention", self.retain, rows, None if self.axis is None else (self.axis, mass)))
        return out

    def text(self) -> str:
        em, lv = self.em, self.lv
        self.header()
        names = "N_PARAMS, _pack, default_state, memory_forward" + (", newton_schulz" if self.alg == "muon" else "") \
            + (", psi" if self.accumulator else "")
        common.imports(em, lv, names, "from nlc.runtime.vjp import tapped_vjp")
        em.line(f"CHUNK = {int(self.plan.chunk)}  # tokens whose gradients are taken at one W_0 (gradient chunk_start)")
        em.line(f"LAYERS = {tuple(torch_arch.layers(lv))!r}  # per layer: index of its weight, of its bias (or None)")
        if self.omega:
            em.line(f"WINDOW = {int(lv.bias.args['window'])}  # tokens in an omega window")
        if self.alg == "muon":
            em.line(f"NS_STEPS = {int(lv.algorithm.args['steps'])}  # Newton-Schulz steps per token")
        em.line(f"BIAS_AXIS = {3 if self.axis == 0 else 2}  # a bias [O] scans as one "
                f"{'column [O, 1]' if self.axis == 0 else 'row [1, O]'}")
        em.line("AUTO = False  # checked under Triton's interpreter, not yet on a GPU: mode='auto' keeps the "
                "chunked PyTorch form, mode='triton' runs these kernels")
        em.line(f"BLOCK = {BLOCK}  # rows and columns of a state tile per program (a softmax's axis lies whole in it)")
        em.line('INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"')
        em.line("# one configuration under the interpreter, or when NLC_TRITON_AUTOTUNE=0 (tests: no tuning runs)")
        em.line('TUNE = not INTERPRET and os.environ.get("NLC_TRITON_AUTOTUNE", "1") != "0"')
        em.line("CONFIGS = [triton.Config({}, num_warps=4)] if not TUNE else [triton.Config({}, num_warps=w) "
                "for w in (2, 4, 8)]")
        em.gap()
        scans = self.scans()
        for scan in scans:
            scan.kernels()
        self.bias.bias_kernels()
        em.gap()
        self.tiles()
        em.gap()
        if self.accumulator:
            self.psi()
            em.gap()
        for scan in scans:
            scan.function()
            em.gap()
        self.bias.bias_function()
        em.gap()
        for part in (render_product, render_layer_grads):
            part(em)
            em.gap()
        self.grads()
        em.gap()
        self.chunk()
        em.gap()
        self.public()
        return em.text()

    def header(self) -> None:
        em, lv = self.em, self.lv
        em.line(f'"""Level {comment(lv.name)!r} of model {comment(self.model)!r}: Triton scans and PyTorch '
                "matmuls (mapped family,")
        em.line("MATH.md §3.6-3.8).")
        em.line()
        em.line(f"Generated by nlc {nlc.__version__} from {comment(self.file)}; do not edit. It computes "
                f"what level_{comment(lv.name)}.py")
        em.line("(the reference recurrent form) computes, in fp32.")
        for key, value in lv.describe().items():
            em.line(f"  {key:<10} {comment(value)}")
        em.line(f"  step       {ALGORITHM_TEXT[lv.algorithm.kind]}")
        em.line(f"  d = dℓ/dy = {show(self.bias.grad)}   (e = y - v" + (", r = ||e||)" if self.bias.norm else ")"))
        em.line("Per chunk of L <= CHUNK tokens, W_0 the weights entering it, one forward and one vjp at W_0 give")
        em.line("each layer's input a_i and output gradient δ_i (LAYERS); every token's gradient is then")
        if self.omega:
            em.line("  g_t = sum_(t - WINDOW < i <= t) a_i ⊗ gamma_i δ_i   (the window reaches into the previous "
                    f"chunk; gamma = {show(lv.bias.args['gamma'])})")
        else:
            em.line("  g_t = a_t ⊗ δ_t   (a bias: δ_t)")
        em.line("and token by token, with the coefficients " + ", ".join(
            f"{role} = {show(expr)}" for role, expr in self.coefficients().items() if role != "gamma") + ":")
        em.line({"gd": "  s_t = -lr_t g_t",
                 "momentum": "  M_t = beta_t M_(t-1) - lr_t g_t,  s_t = M_t          (scan kernel)",
                 "muon": "  M_t = beta_t M_(t-1) + g_t,  s_t = -lr_t NS(M_t)      (scan kernel; NS in PyTorch, "
                         "a bias takes -lr_t M_t)"}[self.alg])
        retain = show(self.retain)
        if self.axis is not None:
            retain = f"{lv.retention.args['mass']}·softmax({retain}) over each {comment(lv.retention.args['axis'])}"
        if self.accumulator:
            em.line(f"  A_t = {retain}   (scan kernel; w0 = A_(t-1), the FTRL accumulator: the state)")
            em.line("  W_t = psi(A_t)   (the reference's map, every token's at once in PyTorch)")
        else:
            em.line(f"  W_t = {retain}   (scan kernel; w0 = W_(t-1))")
        em.line(f"  o_t = M(W_{{t{'' if lv.read == 'after' else '-1'}}}; q_t)   (each token at its own weights, "
                "batched products)")
        em.line("The scans run one program per (batch·head, tile of a state tensor) over the chunk's tokens;")
        em.line("their backward kernels run them in reverse. Each chunk runs under activation checkpointing.")
        em.line("Layout: q, k [B, T, H, K]; v [B, T, H, V]; gates [B, T, H]; inside, [B, H, T, ...] fp32. The")
        em.line(f"state is the reference's: {comment(', '.join(n for n, _, _ in torch_arch.param_layout(lv)))}"
                + (" (the accumulators A)" if self.accumulator else "")
                + (" and their momenta" if torch_arch.has_buffers(lv) else "") + ", float32.")
        em.line('"""')

    def tiles(self) -> None:
        self.em.block('''
def _blocks(I, O, axis):
    """(BI, BO): a program's tile of a tensor [I, O], at most BLOCK each way but whole along a softmax's
    axis (0 or 1; None: elementwise)."""
    BI = triton.next_power_of_2(I) if axis == 0 else min(BLOCK, triton.next_power_of_2(I))
    BO = triton.next_power_of_2(O) if axis == 1 else min(BLOCK, triton.next_power_of_2(O))
    return BI, BO


def _grid(BH, I, O, blocks):
    return BH, triton.cdiv(I, blocks[0]), triton.cdiv(O, blocks[1])


def _scan(scan, h0, x, *rows):
    """scan.apply on one state tensor: a weight h0 [B, H, I, O] with x [B, H, L, I, O], or a bias h0
    [B, H, O] with x [B, H, L, O] (as a tile of one row or column, BIAS_AXIS). Returns h [B, H, L, ...]."""
    if h0.dim() == 4:
        return scan.apply(h0, x, *rows)
    return scan.apply(h0.unsqueeze(BIAS_AXIS), x.unsqueeze(BIAS_AXIS + 1), *rows).squeeze(BIAS_AXIS + 1)


def _recomputed(chunk, *args):
    """chunk(*args), under activation checkpointing when autograd is on: its scans and reads run again
    in the backward pass, so training keeps the state entering each chunk, not every token's weights."""
    if not torch.is_grad_enabled():
        return chunk(*args)
    return torch.utils.checkpoint.checkpoint(chunk, *args, use_reentrant=False)


def _per_token(c, x):
    """A per-token coefficient c [B, H, L] shaped against x [B, H, L, ...]."""
    return c.reshape(c.shape + (1,) * (x.dim() - 3))
''')

    def psi(self) -> None:
        """`_psi`: the reference's map psi on every token's accumulator at once."""
        self.em.block('''
def _psi(A, *gates):
    """W_t = psi(A_t) for every token: A [B, H, L, ...] folded into the reference's [B, H·L, ...] (its
    q-norm runs over each token's whole tensor), the gates [B, H, L]. Returns W [B, H, L, ...]."""
    B, H, L = A.shape[:3]
    gates = (g.reshape((B, H * L) + (1,) * (A.dim() - 3)) for g in gates)
    return psi(A.flatten(1, 2), *gates).unflatten(1, (H, L))
''')

    def grads(self) -> None:
        em = self.em
        with em.indent("def _grads(inputs, deltas, off, L):"):
            em.line('"""Every token\'s gradient at W_0, per state tensor: g_t [B, H, L, I, O] (a weight, from the')
            em.line("layer's inputs [B, H, N, I] and deltas [B, H, N, O]) or [B, H, L, O] (a bias), over the")
            em.line('N = off + L tokens from the first one a window reads."""')
            em.line("grads = [None] * N_PARAMS")
            with em.indent("for (w, c), a, d in zip(LAYERS, inputs, deltas):"):
                em.line("grads[w] = _window(a[..., :, None] * d[..., None, :], off, L)  # a_i ⊗ δ_i")
                with em.indent("if c is not None:"):
                    em.line("grads[c] = _window(d, off, L)")
            em.line("return grads")
        em.gap()
        with em.indent("def _window(u, off, L):"):
            if not self.omega:
                em.line('"""g_t = u_t: one token each (u [B, H, L, ...], off = 0)."""')
                em.line("return u")
                return
            em.line('"""g_t = sum_(w < WINDOW) u_(off + t - w) over the tokens there are (u [B, H, off + L, ...])."""')
            em.line("g = u[:, :, off:off + L]")
            with em.indent("for w in range(1, WINDOW):"):
                em.line("first = min(max(w - off, 0), L)  # tokens before it have no token w back")
                em.line("shifted = u[:, :, off + first - w:off + L - w]")
                em.line("g = g + torch.cat([torch.zeros_like(g[:, :, :first]), shifted], dim=2)")
            em.line("return g")

    def chunk(self) -> None:
        em, lv = self.em, self.lv
        rows = "lr, beta" if self.alg != "gd" else "lr"
        names = self.chunk_gates()
        gates = ", ".join(ident(g, "g") for g in names)
        acc = self.accumulator
        with em.indent(f"def _chunk(q, inputs, deltas, off, coefficients, gates, params, buffers{', entry' if acc else ''}):"):
            em.line('"""One chunk of L tokens: q [B, H, L, K], inputs and deltas per layer at W_0 (`_layer_grads`),')
            if acc:
                em.line(f"coefficients ({rows}), the gates of the accumulator and of psi ({gates or 'none'}) [B, H, L]")
                em.line("and the weights entering the chunk (psi(A_0), entry). Returns (o [B, H, L, V], the")
                em.line('accumulators and the momenta after the chunk, its last weights)."""')
            else:
                em.line(f"coefficients ({rows}) and the retention's gates ({gates or 'none'}) [B, H, L]. Returns")
                em.line('(o [B, H, L, V], the weights and the momenta after the chunk)."""')
            em.line(f"{rows}{',' if self.alg == 'gd' else ''} = coefficients")
            if gates:
                em.line(f"{gates}{',' if len(names) == 1 else ''} = gates")
            em.line("grads = _grads(inputs, deltas, off, q.shape[2])")
            span = where(lv.algorithm.span) or "#"
            if self.alg == "gd":
                em.line("momenta = ()")
                em.line(f"steps = [-_per_token(lr, g) * g for g in grads]  {span} s_t = -lr_t g_t")
            elif self.alg == "momentum":
                em.line(f"momenta = [_scan(MomentumScan, m, g, beta, lr) for m, g in zip(buffers, grads)]  {span}")
                em.line("steps = momenta")
            else:
                em.line(f"momenta = [_scan(MomentumScan, m, g, beta) for m, g in zip(buffers, grads)]  {span}")
                em.line("steps = [-_per_token(lr, m) * (newton_schulz(m, NS_STEPS) if m.dim() == 5 else m) "
                        "for m in momenta]")
            args = "".join(f", {ident(g, 'g')}" for g in self.map_gates)
            if acc:
                em.line(f"accumulators = [_scan(RetentionScan, a, s{args}) for a, s in zip(params, steps)]  "
                        f"{where(lv.retention.span) or '#'} A_t")
                args = "".join(f", {ident(g, 'g')}" for g in self.psi_gates)
                em.line(f"weights = [_psi(a{args}) for a in accumulators]  # W_t = psi(A_t)")
            else:
                em.line(f"weights = [_scan(RetentionScan, w, s{args}) for w, s in zip(params, steps)]  "
                        f"{where(lv.retention.span) or '#'} W_t")
            if lv.read == "after":
                em.line("reads = weights  # read after the write: W_t")
            else:
                em.line("reads = [torch.cat([w0.unsqueeze(2), w[:, :, :-1]], dim=2) for w0, w in "
                        f"zip({'entry' if acc else 'params'}, weights)]  # read before: W_(t-1)")
            em.gap(1)
            with em.indent("def layer(i, h, W, b):"):
                em.line("w_index, b_index = LAYERS[i]")
                em.line("o = (h[..., None, :] @ reads[w_index]).squeeze(-2)  # each token at its own weights")
                em.line("return o if b_index is None else o + reads[b_index]")
            em.line("o = memory_forward(params, q, layer=layer)")
            if acc:
                em.line("last = tuple(w[:, :, -1] for w in weights)")
                em.line("return o, tuple(a[:, :, -1] for a in accumulators), tuple(m[:, :, -1] for m in momenta), last")
            else:
                em.line("return o, tuple(w[:, :, -1] for w in weights), tuple(m[:, :, -1] for m in momenta)")

    def public(self) -> None:
        em, lv = self.em, self.lv
        kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
        with em.indent(f"def {ident(lv.name, 'level')}(q, k, v, *, {kw}initial_state=None, "
                       "output_final_state=False):"):
            names = ", ".join(comment(n) for n, _, _ in torch_arch.param_layout(lv))
            common.public_head(em, lv, f"({names}" + (" and their momenta)" if torch_arch.has_buffers(lv) else ")")
                               + " as the reference's")
            em.line("state = (state,) if torch.is_tensor(state) else tuple(state)")
            em.line("state = tuple(s.to(torch.float32) for s in state)")
            em.line("params, buffers = state[:N_PARAMS], state[N_PARAMS:]")
            if self.accumulator and self.psi_gates:
                em.line("weights = params  # as the reference: psi needs a token's gates, the first read uses A")
            elif self.accumulator:
                em.line("weights = tuple(psi(a) for a in params)  # W_0 = psi(A_0)")
            em.line("qh, kh, vh = (x.transpose(1, 2).to(torch.float32) for x in (q, k, v))  # [B, H, T, D]")
            coeffs = self.coefficients()
            used = set(self.chunk_gates()).union(*(ir.gate_names(e) for e in coeffs.values()))
            heads = {ir.gate_symbol(g): ident(g, "gh") for g in lv.gates}
            for g in lv.gates:
                if g in used:
                    em.line(f"{ident(g, 'gh')} = {ident(g, 'g')}.transpose(1, 2).to(torch.float32)  "
                            f"# gate {comment(g)} [B, H, T]")
            for g in self.bias.bias_gates:
                em.line(f"{ident(g, 'go')} = {ident(g, 'g')}.transpose(1, 2).to(torch.float32)[..., None]  "
                        f"# bias gate {comment(g)} [B, H, T, 1]")
            for role, expr in coeffs.items():
                text = to_torch(expr, heads)
                text = text if expr.free_symbols else f"torch.full_like(kh[..., 0], {text})"
                em.line(f"{role} = {text}  # {role}_t [B, H, T]")
            em.line("outputs = []")
            with em.indent("for start in range(0, kh.shape[2], CHUNK):"):
                em.line(f"{where(lv.span)} level {comment(lv.name)}: one chunk of L <= CHUNK tokens".strip())
                em.line("end = min(start + CHUNK, kh.shape[2])")
                em.line("lo = max(start - (WINDOW - 1), 0)  # windows reach back into the previous chunk"
                        if self.omega else "lo = start")
                at = "weights" if self.accumulator else "params"
                target = self_target(lv, "vh[:, :, lo:end]", at)
                args = "".join(f", {ident(g, 'go')}[:, :, lo:end]" for g in self.bias.bias_gates)
                em.line(f"inputs, deltas = _layer_grads({at}, kh[:, :, lo:end], {target}{args})  "
                        f"{where((lv.bias.inner or lv.bias).span) or '#'} a_i, δ_i at W_0")
                if self.omega:
                    em.line("deltas = [gamma[:, :, lo:end, None] * d for d in deltas]  # gamma_i δ_i")
                rows = ["lr"] + (["beta"] if self.alg != "gd" else [])
                em.line(f"coefficients = {_tuple(f'{r}[:, :, start:end]' for r in rows)}")
                em.line(f"gates = {_tuple(ident(g, 'gh') + '[:, :, start:end]' for g in self.chunk_gates())}")
                if self.accumulator:
                    em.line("o, params, buffers, weights = _recomputed(_chunk, qh[:, :, start:end], inputs, deltas,")
                    em.line("                                          start - lo, coefficients, gates, params, "
                            "buffers, weights)")
                else:
                    em.line("o, params, buffers = _recomputed(_chunk, qh[:, :, start:end], inputs, deltas, start - lo,")
                    em.line("                                 coefficients, gates, params, buffers)")
                em.line("outputs.append(o)")
            em.line("o = torch.cat(outputs, dim=2).transpose(1, 2)  # [B, T, H, V]")
            em.line("return o.to(v.dtype), (_pack(params + buffers) if output_final_state else None)")


def _tuple(items) -> str:
    """Python source of a tuple of the given expressions."""
    items = list(items)
    return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
