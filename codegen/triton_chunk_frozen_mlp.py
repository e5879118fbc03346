"""Render a frozen-gradient level with an MLP memory (depth >= 2, or a depth-1 layer with a residual,
gate, bias or norm around it; MATH.md §3.4-3.6), or any memory with a step between chunks that is not
linear in the state (below), as chunked Triton kernels beside PyTorch matmuls:
`level_<name>_triton_chunk.py`, a real file in the cache (Triton reads kernel source from disk).

Every gradient of a chunk of C tokens is taken at the chunk-start weights W_0 (`gradient
chunk_start(C)`), and one layer's is an outer product a_j ⊗ δ_j of its input and its output's
gradient (torch_chunk_frozen.py). What is a matmul stays in PyTorch: per chunk, in order, the MLP at
W_0 on the keys and one vjp (`_layer_grads`, nlc.codegen.torch_chunk_common) and the state carried to
the next chunk (`_carried`, nlc.codegen.torch_chunk_frozen). The rest are Triton kernels, each with a
hand-written backward (autograd differentiates the PyTorch parts, the vjp twice):
  coefficients  the momentum/decay scans within every chunk at once, in the stable log-space P·N
                form of the linear kernels (triton_chunk_frozen.py): the reads' G, b, f and the carried
                row (their backward runs through the same log-space products to the gates);
  bias          D = dℓ/dy, elementwise in e = y - v (r = ||e||, the gates), printed from sympy;
  dual read     one layer's products of every token at its own weights, all chunks at once:
                x_t W_t (+ β_t) = b_t (x_t W_0 (+ β_0)) + f_t (x_t M_0 (+ μ_0)) - sum_j G[t, j] (x_t·a_j (+ 1)) δ_j,
                so the per-token weights are never built; memory_forward supplies what lies between
                the layers (activation, gate, norm, residual).
Steps between chunks that are not linear in the state run in that loop too, so a matrix memory with
one of them gets this file as well: an lq map at chunk boundaries (`lq(apply = chunk)`, MATH.md §3.7:
each chunk's W_0 = psi_scale(A_0)·A_0 enters the reads, whose steps' part `_scaled` multiplies by each
state tensor's slope) and KL's lag token (`kl(apply = chunk)`: the softmax step of each chunk's first
token, `_lag_step`, before the chunk's gradients; the coefficient kernels make that token the identity
in the scans, and a read before the write puts back its read of the state entering the chunk).
An omega window (MATH.md §3.8) works as in the linear kernels (triton_chunk_frozen.py): the per-chunk
loop runs `_layer_grads` on the window's P + L tokens (`_with_tail`, the c - 1 before the chunk at
its W_0) and pads them to the window's CW rows (`_padded`); the coefficient kernels print G Ω and the
carried rows (gamma's gates at the window's rows, `_windows`), and the reads take a_j, δ_j per window
row. The bias map and its gates stay in PyTorch's loop, so autograd sums a token's window rows there.
"""
from __future__ import annotations

from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.printer import to_torch

from . import torch_arch
from . import triton_chunk_common as common
from .emitter import comment, ident, where
from .torch_chunk_common import render_layer_grads, render_product, show
from .torch_chunk_frozen import _render_carried, _render_lag_step, render_with_tail
from .triton_chunk_frozen import _Kernels, render_windows
from .triton_printer import diff
from .triton_recurrent import decorators, first_order_only


class MlpKernels(_Kernels):
    """The file for one level: the scan and read kernels of `_Kernels` over the coefficient blocks it
    prints, with an MLP's layers in PyTorch."""
    BIAS_ON_WINDOW_ROWS = False  # the bias kernels run on the window's tokens in PyTorch's loop (omega)
    READS = True  # the coefficient kernels give the reads' coefficients too, not only the carried row's

    def text(self) -> str:
        em, lv = self.em, self.lv
        self.header()
        names = "N_PARAMS, _pack, default_state, memory_forward" + (
            ", psi_scale" if self.mapped else ", _per_tensor, retain" if self.lag else "")
        self.preamble(names, "from nlc.runtime.vjp import tapped_vjp")
        em.line(f"LAYERS = {tuple(torch_arch.layers(lv))!r}  # per layer: index of its weight, of its bias (or None)")
        common.launch_configuration(em)
        em.gap()
        self.helpers()
        for part in (self.coefficient_kernels, self.bias_kernels, self.read_fwd_kernel, self.read_bwd_kernel,
                     self.coefficient_function, self.bias_function, self.read_function):
            em.gap()
            part()
        for part in (render_product, render_layer_grads, _render_carried) + (
                (render_windows, render_with_tail, render_padded) if self.omega else ()) + (
                (render_scaled,) if self.mapped else ()):
            em.gap()
            part(em)
        if self.lag:
            _render_lag_step(em, self.momentum)
        em.gap()
        self.public()
        return em.text()

    def title(self, family: str) -> None:
        """The docstring's first lines: the level, its model and `family`, its rule and D = dℓ/dy."""
        em, lv = self.em, self.lv
        em.line(f'"""Level {comment(lv.name)!r} of model {comment(self.model)!r}: chunked Triton kernels and '
                "PyTorch matmuls")
        em.line(f"({family}).")
        self.summary("in fp32")
        em.line(f"  d = dℓ/dy = {show(self.grad)}   (e = y - v" + (", r = ||e||)" if self.norm else ")"))

    def header(self) -> None:
        em = self.em
        self.title("frozen-gradient family, an MLP memory; MATH.md §3.4-3.6")
        em.line("Per chunk of L <= CHUNK tokens (t, j = 0..L-1), W_0 (and M_0) the state entering it, each")
        em.line("layer of the chain (LAYERS) a product h @ W (+ β) with token j's gradient a_j ⊗ δ_j (δ_j):")
        em.line("  P[t, i] = prod_(i<r<=t) a_r, b_t = prod_(r<=t) a_r (log space, signs apart)")
        if self.momentum:
            em.line("  Pm, m: the same of beta;  N[i, j] = c_i Pm[i, j] lr_j,  G = P N,  f = P (c m)")
            em.line("  W_t = b_t W_0 + f_t M_0 - sum_j G[t, j] a_j ⊗ δ_j,  M_t = m_t M_0 - sum_j Pm[t, j] lr_j a_j ⊗ δ_j")
        else:
            em.line("  G[t, j] = P[t, j] c_j lr_j;  W_t = b_t W_0 - sum_j G[t, j] a_j ⊗ δ_j")
        em.line("  " + ("reads after the write (row t)" if self.after else
                        "reads before the write: rows of b, f, G at t - 1 (b = 1, f = 0, G = 0 at t = 0)") +
                "; the state carried on is row L-1")
        self.window_doc("a_j, δ_j")
        self.map_doc()
        em.line("Triton: the coefficients (all chunks at once), D = dℓ/dy, and each layer's read in dual form")
        em.line("(all chunks at once, at the saved chunk-start states); PyTorch: per chunk in order, the MLP at")
        em.line("W_0 on the keys with one vjp (a_j, δ_j) and the carried state; each kernel has its backward.")
        self.layout_doc()

    def layout_doc(self) -> None:
        """The docstring's last lines: the layouts of the inputs and the state; its end."""
        em = self.em
        em.line("Layout: q, k [B, T, H, K]; v [B, T, H, V]; gates [B, T, H]; inside, [B, H, T, ...] fp32. The")
        em.line(f"state is the reference's: {comment(', '.join(self.state_names()))}, float32.")
        em.line('"""')

    def map_doc(self) -> None:
        """The docstring's lines on a step between chunks that is not linear in the state."""
        em = self.em
        if self.mapped:
            em.line("lq map at chunk boundaries (lq(apply = chunk), MATH.md §3.7): the state is an accumulator A,")
            em.line("W_0 = psi(A_0) = r A_0 with r = psi_scale(A_0) per state tensor, and within the chunk the weights")
            em.line("are r A_t: the reads' W_0 and M_0 enter scaled, and their steps' part takes a_j r_W (with a layer")
            em.line("bias, a_j r_W / r_β and δ_j r_β, so that (x·a_j + 1) δ_j reads r_W x·a_j δ_j + r_β δ_j); the")
            em.line("carried rows stay in A.")
        if self.lag:
            em.line("KL's lag token (kl(apply = chunk), MATH.md §3.7): each chunk's first token takes the exact")
            em.line("softmax step W_1 = retain(W_0, -lr u), its gradient u at the state entering the chunk")
            em.line("(`_lag_step`, in PyTorch's loop); in the scans that token is the identity (a = 1, lr = 0" +
                    (", beta = 1, c = 0)" if self.momentum else ")") + " and the")
            em.line("chunk's other gradients are taken at W_1" +
                    (", its read (read before) at the state entering the chunk." if not self.after else "."))

    def state_names(self) -> list[str]:
        names = [n for n, _, _ in torch_arch.param_layout(self.lv)]
        return names + ([f"M_{n}" for n in names] if self.momentum else [])

    def dot(self, a: str, b: str, exact: bool = False) -> str:
        """a @ b on fp32 blocks: at the inputs' precision DOT, or exactly for the coefficients."""
        precision = '"ieee"' if exact else "DOT"
        return f"tl.dot({a}, {b}, input_precision={precision})"

    def jit(self, key: str, dynamic: str) -> None:
        self.em.line(f"@triton.autotune(configs=CONFIGS, key=[{key}])")
        self.em.line(f'@triton.jit(do_not_specialize=["{dynamic}"])')

    def head(self, name: str, args: str, sizes: str, doc: str) -> None:
        em = self.em
        em.line(f"def {name}(")
        em.line(f"        {args.rstrip(', ')},")
        em.line(f"        {sizes}):")
        with em.indent():
            em.block(f'"""{doc}"""')

    # ---- the scan coefficients ---------------------------------------------------------------
    def outputs(self) -> list[tuple[str, str]]:
        """(name, kind) of the coefficient tensors: kind 'tt' [B, H, NT, BT, BT], 't' [B, H, T] per token,
        'c' [B, H, NT] per chunk; with an omega window 'tw' [B, H, NT, BT, BW] (G Ω) and 'w' [B, H, NT, CW]
        per window row."""
        window = "w" if self.omega else "t"  # an omega window's carried rows: [B, H, NT, CW]
        out = [(self.G[2:], "tw" if self.omega else "tt"), ("br", "t")] + ([("fr", "t")] if self.momentum else [])
        out = out if self.READS else []
        out += [(self.gc[2:], window)] + ([(self.hc[2:], window)] if self.momentum else [])
        return out + [("bl", "c")] + ([("fl", "c"), ("ml", "c")] if self.momentum else [])

    def chunk_prologue(self) -> None:
        em = self.em
        em.line("i_t, i_bh = tl.program_id(0), tl.program_id(1)")
        em.line("o_i = tl.arange(0, BT)  # position in the chunk")
        em.line("o_t = i_t * C + o_i  # token")
        em.line("m_t = (o_i < C) & (o_t < T)")
        em.line("r_t = (i_bh * T + o_t).to(tl.int64)  # row of each token in [B, H, T]")
        em.line("i_last = tl.minimum(T - i_t * C, C) - 1  # the chunk's last token")
        em.line("o_c = (i_bh * NT + i_t).to(tl.int64)  # this chunk in [B, H, NT]")
        if self.READS:
            em.line("m_tt = m_t[:, None] & m_t[None, :]")
            em.line("o_tt = o_c * (BT * BT) + o_i[:, None] * BT + o_i[None, :]  # its [BT, BT] block")
        if self.omega:
            self.window_rows()
            em.line("m_tw = m_t[:, None] & m_j[None, :]")
            em.line("o_tw = o_c * (BT * BW) + o_i[:, None] * BW + o_j[None, :]  # its [BT, BW] block")

    def window_row(self) -> str:
        return "r_j = ((i_bh * NT + i_t) * CW + o_j).to(tl.int64)  # row of each in [B, H, NT, CW, ...]"

    def coefficient_kernels(self) -> None:
        em, names, mom = self.em, self.outputs(), self.momentum
        sizes = "T, NT, C: tl.constexpr, BT: tl.constexpr" + \
            (", CW: tl.constexpr, BW: tl.constexpr" if self.omega else "")
        if self.omega:
            read = "G Ω [B, H, NT, BT, BW]"
            carry = f"(G Ω)[L-1, j]{', (Pm lr Ω)[L-1, j]' if mom else ''} [B, H, NT, CW]"
            gates = "the gates [B, H, T] (gamma's at the window's rows, [B, H, NT, CW])"
        else:
            read, carry = "G [B, H, NT, BT, BT]", f"G[L-1, j]{', Pm[L-1, j] lr_j' if mom else ''} [B, H, T]"
            gates = "the gates [B, H, T]"
        reads = f"the reads' {read} (zero outside the chunk), b_t" + (", f_t" if mom else "") + " [B, H, T];\n"
        docs = ("Program (i_t, i_bh): the scan coefficients of chunk i_t of batch x head i_bh (fp32), from\n"
                f"{gates}: {reads if self.READS else ''}the carried row's {carry} and b" +
                (", f, m" if mom else "") + " at L-1 [B, H, NT].",
                "Program (i_t, i_bh): ∂/∂ the gates of chunk i_t's tokens from ∂/∂ its coefficients (the\n"
                "forward kernel's outputs, prefixed d), back through the log-space products.")
        # per kind: offsets; the mask of loads (None: whole blocks, zero outside where `block`) and of stores
        layout = {"tt": ("o_tt", None, None), "tw": ("o_tw", None, None), "t": ("r_t", "m_t", "m_t"),
                  "c": ("o_c", "", ""), "w": ("o_c * CW + o_j", "m_j", "o_j < CW")}
        for backward, doc in zip((False, True) if self.gates else (False,), docs):  # no gate: constants
            em.gap()
            self.jit('"BT"', "T")
            args = (f"{', '.join('d' + n for n, _ in names)}, {self.gate_args('dg')}" if backward
                    else f"{', '.join(n for n, _ in names)},")
            self.head(f"chunk_coefficients_{'bwd' if backward else 'fwd'}_kernel", self.gate_args() + args,
                      sizes, doc)
            with em.indent():
                self.chunk_prologue()
                self.coefficients(read=self.READS, carry=True)
                for name, kind in names:
                    offset, load_mask, store_mask = layout[kind]
                    if backward:
                        if load_mask is None:
                            em.line(f"b_d{name} = tl.where(m_{kind}, tl.load(d{name} + {offset}), 0.0)")
                        else:
                            mask = f", mask={load_mask}, other=0.0" if load_mask else ""
                            em.line(f"b_d{name} = tl.load(d{name} + {offset}{mask})")
                    elif store_mask is None:
                        em.line(f"tl.store({name} + {offset}, tl.where(m_{kind}, b_{name}, 0.0))")
                    else:
                        note = "  # every row of the window: zero where it has no token" if kind == "w" else ""
                        em.line(f"tl.store({name} + {offset}, b_{name}{f', mask={store_mask}' if store_mask else ''})"
                                + note)
                if backward:
                    if self.omega:
                        self.window_bwd()
                    self.coefficients_bwd(self.READS)
                    self.gate_grads(through_bias=False)
                    self.window_gate_grads()

    def coefficient_function(self) -> None:
        em, names = self.em, self.outputs()
        shapes = {"tt": "(B, H, NT, BT, BT)", "t": "(B, H, T)", "c": "(B, H, NT)", "tw": "(B, H, NT, BT, BW)",
                  "w": "(B, H, NT, CW)"}
        blocks = "BT, BW" if self.omega else "BT"
        launch = "T, NT, C=CHUNK, BT=BT" + (", CW=CW, BW=BW" if self.omega else "")
        with em.indent("class _Coefficients(torch.autograd.Function):"):
            em.line('"""The scan coefficients of every chunk, (' + ", ".join(n for n, _ in names) +
                    "), from the gates [B, H, T] fp32")
            if self.omega:
                em.line("(then those read at the window's rows, [B, H, NT, CW])")
            em.line('(`like` [B, H, T, ...] gives the sizes and device)."""')
            em.gap(1)
            decorators(em, "forward")
            with em.indent("def forward(ctx, like, *gates):"):
                em.line("B, H, T = like.shape[:3]")
                em.line("NT, BT = triton.cdiv(T, CHUNK), max(16, triton.next_power_of_2(CHUNK))")
                if self.omega:
                    em.line("BW = max(16, triton.next_power_of_2(CW))")
                em.line("f32 = dict(dtype=torch.float32, device=like.device)")
                em.line(f"shapes = {', '.join(shapes[k] for _, k in names)}")
                em.line("out = tuple(torch.empty(s, **f32) for s in shapes)")
                em.line(f"chunk_coefficients_fwd_kernel[(NT, B * H)](*gates, *out, {launch})")
                em.line("ctx.save_for_backward(*gates)")
                em.line(f"ctx.sizes = T, NT, {blocks}")
                em.line("return out")
            em.gap(1)
            decorators(em, "backward")
            with em.indent("def backward(ctx, *grads):"):
                first_order_only(em)
                if not self.gates:
                    em.line("return (None,)  # the coefficients read no gate: constants")
                    return
                em.line(f"gates, (T, NT, {blocks}) = ctx.saved_tensors, ctx.sizes")
                em.line("dgates = [torch.empty_like(g) for g in gates]")
                em.line("B, H = grads[0].shape[:2]")
                em.line("chunk_coefficients_bwd_kernel[(NT, B * H)](*gates, *(g.contiguous() for g in grads), *dgates,")
                em.line(f"                                           {launch})")
                em.line("return (None, *dgates)")

    # ---- the bias's elementwise map D = dℓ/dy ----------------------------------------------
    def bias_gate_args(self, prefix: str) -> str:
        return "".join(f"{ident(g, prefix)}, " for g in self.bias_gates)

    def bias_prologue(self) -> None:
        em = self.em
        em.line("o_r = tl.program_id(0) * BT + tl.arange(0, BT)  # rows of [N, V]")
        em.line("m_t = o_r < N")
        em.line("o_v = tl.arange(0, BV)")
        em.line("m_v = o_v < V")
        em.line("o_rv = o_r.to(tl.int64)[:, None] * V + o_v[None, :]")
        em.line("m_rv = m_t[:, None] & m_v[None, :]")
        em.line("b_y = tl.load(y + o_rv, mask=m_rv, other=0.0)")
        em.line("b_v = tl.load(v + o_rv, mask=m_rv, other=0.0)")
        for g in self.bias_gates:
            em.line(f"{ident(g, 'b_g')} = tl.load({ident(g, 'g')} + o_r, mask=m_t, other=0.5)  # gate {comment(g)}")
        em.line("b_e = b_y - b_v")
        self.error_norm()

    def bias_kernels(self) -> None:
        em, lv = self.em, self.lv
        sizes = "N, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr"
        span = where((lv.bias.inner or lv.bias).span) or "#"
        self.jit('"V", "BV"', "N")
        self.head("bias_fwd_kernel", f"y, v, {self.bias_gate_args('g')}d,", sizes,
                  "Program i: rows [i BT, (i + 1) BT) of D = dℓ/dy [N, V] at y, v [N, V] (N = B H L tokens,\n"
                  "every value channel in one block), the bias's gates [N].")
        with em.indent():
            self.bias_prologue()
            em.line(f"tl.store(d + o_rv, {self.elem(self.grad)}, mask=m_rv)  {span} D = dℓ/dy")
        em.gap()
        self.jit('"V", "BV"', "N")
        self.head("bias_bwd_kernel", f"y, v, {self.bias_gate_args('g')}dd, dy, dv, {self.bias_gate_args('dg')}",
                  sizes, "Program i: ∂/∂y, ∂/∂v and ∂/∂ the gates of rows [i BT, (i + 1) BT) from dd = ∂/∂D.")
        with em.indent():
            self.bias_prologue()
            em.line("b_dd = tl.load(dd + o_rv, mask=m_rv, other=0.0)")
            self.error_bwd()
            em.line("tl.store(dy + o_rv, b_de, mask=m_rv)")
            dgv = diff(self.grad, S.v)
            em.line(f"tl.store(dv + o_rv, {self.times(dgv, 'b_dd') + ' - b_de' if dgv != 0 else '-b_de'}, mask=m_rv)")
            for g in self.bias_gates:
                dg = self.times(diff(self.grad, ir.gate_symbol(g)), "b_dd")
                em.line(f"tl.store({ident(g, 'dg')} + o_r, tl.sum(tl.where(m_rv, {dg}, 0.0), 1), mask=m_t)")

    def bias_function(self) -> None:
        em = self.em
        with em.indent("class _OutputGrad(torch.autograd.Function):"):
            em.line('"""D = dℓ/dy (bias kernels): y, v [B, H, L, V] fp32, the bias\'s gates [B, H, L, 1]."""')
            em.gap(1)
            decorators(em, "forward")
            with em.indent("def forward(ctx, y, v, *gates):"):
                em.line("y, v, gates = y.contiguous(), v.contiguous(), [g.contiguous() for g in gates]")
                em.line("d = torch.empty_like(y)")
                em.line("N, V = y.numel() // y.shape[-1], y.shape[-1]")
                em.line("BV = max(16, triton.next_power_of_2(V))")
                em.line("bias_fwd_kernel[(triton.cdiv(N, 16),)](y, v, *gates, d, N, V=V, BT=16, BV=BV)")
                em.line("ctx.save_for_backward(y, v, *gates)")
                em.line("return d")
            em.gap(1)
            decorators(em, "backward")
            with em.indent("def backward(ctx, dd):"):
                first_order_only(em)
                em.line("y, v, *gates = ctx.saved_tensors")
                em.line("dy, dv, dgates = torch.empty_like(y), torch.empty_like(v), [torch.empty_like(g) for g in gates]")
                em.line("N, V = y.numel() // y.shape[-1], y.shape[-1]")
                em.line("BV = max(16, triton.next_power_of_2(V))")
                em.line("bias_bwd_kernel[(triton.cdiv(N, 16),)](y, v, *gates, dd.contiguous(), dy, dv, *dgates, N,")
                em.line("                                       V=V, BT=16, BV=BV)")
                em.line("return (dy, dv, *dgates)")
        em.gap()
        with em.indent("def output_grad(y, v, *gates):"):
            em.line('"""dℓ/dy for y, v [B, H, L, V] (the reference\'s output_grad, by the bias kernels)."""')
            em.line("return _OutputGrad.apply(y, v, *gates)")

    # ---- the reads in dual form --------------------------------------------------------------
    def read_args(self) -> str:
        return "x, a, d, w, wb, " + ("m, mb, " if self.momentum else "") + "Gr, br, " + \
            ("fr, " if self.momentum else "")

    def weights(self) -> list[tuple[str, str, str]]:
        """(chunk-start tensor, its bias, its read coefficient): W_0, and M_0 with momentum."""
        return [("w", "wb", "br")] + ([("m", "mb", "fr")] if self.momentum else [])

    def read_prologue(self, block_o: bool) -> None:
        """Program ids, the chunk's rows, its G block and read coefficients, and S = X A^T (+ 1) over
        blocks of BI input channels."""
        em = self.em
        em.line("i_o, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)" if block_o else
                "i_t, i_bh = tl.program_id(0), tl.program_id(1)")
        em.line("o_i = tl.arange(0, BT)")
        em.line("o_t = i_t * C + o_i")
        em.line("m_t = (o_i < C) & (o_t < T)")
        em.line("r_t = (i_bh * T + o_t).to(tl.int64)  # row of each token in [B, H, T]")
        em.line("o_c = (i_bh * NT + i_t).to(tl.int64)  # this chunk in [B, H, NT]")
        if self.omega:
            self.window_rows()
            em.line("b_G = tl.load(Gr + o_c * (BT * BW) + o_i[:, None] * BW + o_j[None, :])  # [BT, BW]: G Ω")
        else:
            em.line("b_G = tl.load(Gr + o_c * (BT * BT) + o_i[:, None] * BT + o_i[None, :])  # [BT, BT]")
        for _, _, coef in self.weights():
            em.line(f"b_{coef} = tl.load({coef} + r_t, mask=m_t, other=0.0)")
        em.line(f"b_S = tl.zeros([BT, {self.BJ}], dtype=tl.float32)  # x_t·a_j")
        if block_o:
            self.value_tile(load_d=True)
            for state, _, _ in self.weights():
                em.line(f"b_x{state} = tl.zeros([BT, BO], dtype=tl.float32)  # " +
                        ("X W_0 (+ β_0)" if state == "w" else "X M_0 (+ μ_0)"))
        with em.indent("for i_k in range(0, tl.cdiv(I, BI)):"):
            self.key_tile(load_a=True)
            em.line(f"b_S += {self.dot('b_x', 'tl.trans(b_a)')}")
            if block_o:
                self.weight_tile()
                for state, _, _ in self.weights():
                    em.line(f"b_x{state} += {self.dot('b_x', self.tile(state))}")
        with em.indent("if BIAS:"):
            em.line("b_S += 1.0  # (x_t, 1)·(a_j, 1): the bias's gradient is δ_j")
            if block_o:
                for state, bias, _ in self.weights():
                    em.line(f"b_x{state} += {self.bias_row(bias)}")

    def key_tile(self, load_a: bool) -> None:
        """Input channels [i_k BI, (i_k + 1) BI): x [BT, BI] (and a [BT, BI], or [BW, BI] at an omega
        window's rows: offsets o_jk, mask m_jk)."""
        em, j = self.em, self.j
        em.line("o_k = i_k * BI + tl.arange(0, BI)")
        em.line("m_tk = m_t[:, None] & (o_k < I)[None, :]")
        em.line("o_tk = r_t[:, None] * I + o_k[None, :]")
        em.line("b_x = tl.load(x + o_tk, mask=m_tk, other=0.0)")
        if self.omega:
            em.line("m_jk = m_j[:, None] & (o_k < I)[None, :]")
            em.line("o_jk = r_j[:, None] * I + o_k[None, :]")
        if load_a:
            em.line(f"b_a = tl.load(a + o_{j}k, mask=m_{j}k, other=0.0)")

    def value_tile(self, load_d: bool) -> None:
        """Output channels [i_o BO, (i_o + 1) BO): dout [BT, BO] (and δ [BT, BO], or [BW, BO] at an omega
        window's rows: offsets o_jv, mask m_jv)."""
        em, j = self.em, self.j
        em.line("o_v = i_o * BO + tl.arange(0, BO)")
        em.line("m_v = o_v < O")
        em.line("m_tv = m_t[:, None] & m_v[None, :]")
        em.line("o_tv = r_t[:, None] * O + o_v[None, :]")
        if self.omega:
            em.line("m_jv = m_j[:, None] & m_v[None, :]")
            em.line("o_jv = r_j[:, None] * O + o_v[None, :]")
        if load_d:
            em.line(f"b_d = tl.load(d + o_{j}v, mask=m_{j}v, other=0.0)  # δ [{self.BJ}, BO]")

    def weight_tile(self) -> None:
        self.em.line("o_w = o_c * (I * O) + o_k[:, None] * O + o_v[None, :]  # tile (i_k, i_o) of this chunk's weights")
        self.em.line("m_kv = (o_k < I)[:, None] & m_v[None, :]")

    def tile(self, state: str) -> str:
        """The [BI, BO] tile (i_k, i_o) of this chunk's start weights `state` (after `weight_tile`)."""
        return f"tl.load({state} + o_w, mask=m_kv, other=0.0)"

    def bias_row(self, bias: str) -> str:
        return f"tl.load({bias} + o_c * O + o_v, mask=m_v, other=0.0)[None, :]"

    def read_sizes(self) -> str:
        return ("T, NT, I: tl.constexpr, O: tl.constexpr, C: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr, "
                "BO: tl.constexpr,\n        BIAS: tl.constexpr, DOT: tl.constexpr" +
                (", CW: tl.constexpr, BW: tl.constexpr" if self.omega else ""))

    def read_fwd_kernel(self) -> None:
        em = self.em
        self.jit('"I", "O", "BT", "BI", "BO", "BIAS"', "T")
        extra = " + f_t (x_t M_0 (+ μ_0))" if self.momentum else ""
        if self.omega:
            G, rows = "(G Ω)", ("x [B, H, T, I]; a [B, H, NT CW, I] and d (δ) [B, H, NT CW, O] at each chunk's "
                                "window rows;\n")
        else:
            G, rows = "G", "x, a [B, H, T, I]; d (δ) [B, H, T, O]; "
        self.head("dual_read_fwd_kernel", f"{self.read_args()}out,", self.read_sizes(),
                  "Program (i_o, i_t, i_bh): output channels [i_o BO, (i_o + 1) BO) of one layer's product for\n"
                  "chunk i_t's tokens, each at its own weights, in dual form:\n"
                  f"  out_t = b_t (x_t W_0 (+ β_0)){extra} - sum_j {G}[t, j] (x_t·a_j (+ 1)) δ_j.\n"
                  f"{rows}the chunk-start weights w" +
                  (", m" if self.momentum else "") + " [B, H, NT, I, O] and biases wb" +
                  (", mb" if self.momentum else "") + " [B, H, NT, O]\n(BIAS); out [B, H, T, O].")
        with em.indent():
            self.read_prologue(block_o=True)
            terms = " + ".join(f"b_{coef}[:, None] * b_x{state}" for state, _, coef in self.weights())
            em.line(f"b_o = {terms} - {self.dot('b_G * b_S', 'b_d')}")
            em.line("tl.store(out + o_tv, b_o, mask=m_tv)")

    def read_bwd_kernel(self) -> None:
        em, mom = self.em, self.momentum
        grads = "dx, da, dd, dw, dwb, " + ("dm, dmb, " if mom else "") + "dGr, dbr" + (", dfr" if mom else "")
        self.jit('"I", "O", "BT", "BI", "BO", "BIAS"', "T")
        self.head("dual_read_bwd_kernel", f"{self.read_args()}dout, {grads},", self.read_sizes(),
                  "Program (i_t, i_bh): ∂/∂ every input of dual_read_fwd_kernel over chunk i_t, from dout = ∂/∂out;\n"
                  f"the weights' and biases' per chunk, G's as a [BT, {self.BJ}] block (zero outside the chunk).")
        with em.indent():
            self.read_prologue(block_o=False)
            em.line(f"b_dP = tl.zeros([BT, {self.BJ}], dtype=tl.float32)  # ∂/∂(G ⊙ S)")
            for _, _, coef in self.weights():
                em.line(f"b_d{coef} = tl.zeros([BT], dtype=tl.float32)")
            em.line("# per block of output channels: ∂/∂δ, ∂/∂ the biases, the read coefficients and G ⊙ S")
            with em.indent("for i_o in range(0, tl.cdiv(O, BO)):"):
                self.value_tile(load_d=True)
                em.line("b_do = tl.load(dout + o_tv, mask=m_tv, other=0.0)")
                for state, _, _ in self.weights():
                    em.line(f"b_x{state} = tl.zeros([BT, BO], dtype=tl.float32)")
                with em.indent("for i_k in range(0, tl.cdiv(I, BI)):"):
                    self.key_tile(load_a=False)
                    self.weight_tile()
                    for state, _, _ in self.weights():
                        em.line(f"b_x{state} += {self.dot('b_x', self.tile(state))}")
                for state, bias, coef in self.weights():
                    with em.indent("if BIAS:"):
                        em.line(f"b_x{state} += {self.bias_row(bias)}")
                        em.line(f"tl.store(d{bias} + o_c * O + o_v, tl.sum(b_{coef}[:, None] * b_do, 0), mask=m_v)")
                    em.line(f"b_d{coef} += tl.sum(b_do * b_x{state}, 1)")
                em.line(f"b_dP -= {self.dot('b_do', 'tl.trans(b_d)')}")
                em.line(f"tl.store(dd + o_{self.j}v, -{self.dot('tl.trans(b_G * b_S)', 'b_do')}, mask=m_{self.j}v)")
            em.line("b_dS = b_dP * b_G")
            em.line("# per block of input channels: ∂/∂x, ∂/∂a and the chunk-start weights' tiles")
            with em.indent("for i_k in range(0, tl.cdiv(I, BI)):"):
                self.key_tile(load_a=True)
                em.line(f"b_dx = {self.dot('b_dS', 'b_a')}")
                em.line(f"tl.store(da + o_{self.j}k, {self.dot('tl.trans(b_dS)', 'b_x')}, mask=m_{self.j}k)")
                with em.indent("for i_o in range(0, tl.cdiv(O, BO)):"):
                    self.value_tile(load_d=False)
                    em.line("b_do = tl.load(dout + o_tv, mask=m_tv, other=0.0)")
                    self.weight_tile()
                    for state, _, coef in self.weights():
                        em.line(f"b_do{state} = b_{coef}[:, None] * b_do")
                        em.line(f"b_dx += {self.dot(f'b_do{state}', f'tl.trans({self.tile(state)})')}")
                        em.line(f"tl.store(d{state} + o_w, {self.dot('tl.trans(b_x)', f'b_do{state}')}, mask=m_kv)")
                em.line("tl.store(dx + o_tk, b_dx, mask=m_tk)")
            rows, block, mask = ("o_j", "BW", "m_j") if self.omega else ("o_i", "BT", "m_t")
            em.line(f"m_t{self.j} = m_t[:, None] & {mask}[None, :]")
            em.line(f"tl.store(dGr + o_c * (BT * {block}) + o_i[:, None] * {block} + {rows}[None, :], "
                    f"tl.where(m_t{self.j}, b_dP * b_S, 0.0))")
            for _, _, coef in self.weights():
                em.line(f"tl.store(d{coef} + r_t, b_d{coef}, mask=m_t)")

    def read_function(self) -> None:
        em, mom = self.em, self.momentum
        args = "x, a, d, w, wb, " + ("m, mb, " if mom else "") + "Gr, br" + (", fr" if mom else "")
        with em.indent("class _DualRead(torch.autograd.Function):"):
            em.line('"""One layer\'s product of every token at its own weights (dual_read kernels): x, a [B, H, T, I],')
            em.line("d [B, H, T, O], the chunk-start weights [B, H, NT, I, O] and biases [B, H, NT, O] (or None),")
            em.line('the coefficients from _Coefficients; `dot` the matmuls\' precision. -> [B, H, T, O] fp32."""')
            em.gap(1)
            decorators(em, "forward")
            with em.indent(f"def forward(ctx, dot, {args}):"):
                em.line(f"ctx.save_for_backward({args})")
                em.line("ctx.dot = dot")
                em.line(f"return _read(dot, {args}, None)")
            em.gap(1)
            decorators(em, "backward")
            with em.indent("def backward(ctx, dout):"):
                first_order_only(em)
                em.line("return (None, *_read(ctx.dot, *ctx.saved_tensors, dout.contiguous()))")
        em.gap()
        with em.indent(f"def _read(dot, {args}, dout):"):
            em.line('"""dual_read_fwd_kernel\'s output (dout None), or the gradients of its inputs (None for a missing bias)."""')
            em.line("B, H, T, I = x.shape")
            em.line("NT, O = w.shape[2], w.shape[-1]")
            em.line("BT = max(16, triton.next_power_of_2(CHUNK))")
            em.line("BI, BO = (min(max(16, triton.next_power_of_2(n)), BV_MAX) for n in (I, O))  # channel blocks")
            em.line("sizes = dict(I=I, O=O, C=CHUNK, BT=BT, BI=BI, BO=BO, BIAS=wb is not None, DOT=dot" +
                    (", CW=CW, BW=max(16, triton.next_power_of_2(CW)))" if self.omega else ")"))
            em.line(f"inputs = ({args})")
            em.line("# a missing bias (None) is passed as a tensor the kernels never touch without BIAS")
            with em.indent("if dout is None:"):
                em.line("out = torch.empty(B, H, T, O, dtype=torch.float32, device=x.device)")
                em.line("dual_read_fwd_kernel[(triton.cdiv(O, BO), NT, B * H)](")
                em.line("    *(w if t is None else t for t in inputs), out, T, NT, **sizes)")
                em.line("return out")
            if self.omega:  # the padded window rows (_padded) of a and d are not written: zero, as constants
                em.line("grads = [None if t is None else (torch.zeros_like(t) if i in (1, 2) else torch.empty_like(t))")
                em.line("         for i, t in enumerate(inputs)]")
            else:
                em.line("grads = [None if t is None else torch.empty_like(t) for t in inputs]")
            em.line("dual_read_bwd_kernel[(NT, B * H)](*(w if t is None else t for t in inputs), dout,")
            em.line("                                  *(grads[3] if t is None else t for t in grads), T, NT, **sizes)")
            em.line("return grads")
        em.gap()
        with em.indent("def _dual_layer(dot, buffers, inputs, deltas, coefficients):"):
            em.line('"""The `layer` hook of memory_forward that reads every token at its own weights (_DualRead):')
            em.line("buffers: the chunk-start optimizer buffers per state tensor [B, H, NT, ...]; inputs, deltas per")
            em.line('layer [B, H, T, I|O] (a_j, δ_j of every chunk); coefficients (G, b' +
                    (", f" if mom else "") + ') for the reads."""')
            with em.indent("def layer(i, x, W, bias):"):
                if mom:
                    em.line("w, c = LAYERS[i]")
                    em.line("momenta = buffers[w], None if c is None else buffers[c]")
                    em.line("return _DualRead.apply(dot, x.contiguous(), inputs[i], deltas[i], W, bias, *momenta, "
                            "*coefficients)")
                else:
                    em.line("return _DualRead.apply(dot, x.contiguous(), inputs[i], deltas[i], W, bias, *coefficients)")
            em.line("return layer")

    # ---- the op ------------------------------------------------------------------------------
    def public(self) -> None:
        em, lv, mom, omega = self.em, self.lv, self.momentum, self.omega
        kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
        G, gc, hc = self.G[2:], self.gc[2:], self.hc[2:]
        with em.indent(f"def {ident(lv.name, 'level')}(q, k, v, *, {kw}initial_state=None, "
                       "output_final_state=False):"):
            common.public_head(em, lv, f"({', '.join(comment(n) for n in self.state_names())}) as the reference's")
            em.line("state = (state,) if torch.is_tensor(state) else tuple(state)")
            em.line("state = tuple(s.to(torch.float32) for s in state)")
            em.line("params, buffers = state[:N_PARAMS], state[N_PARAMS:]")
            em.line('dot = "ieee" if q.dtype == torch.float32 else "tf32"  # the kernels\' matmul precision')
            em.line("qh, kh, vh = (x.transpose(1, 2).to(torch.float32).contiguous() for x in (q, k, v))  # [B, H, T, D]")
            lag_gates = sorted(ir.gate_names(self.rules.retention_new())) if self.lag else []
            read = sorted(set(self.gates) | set(self.window_gates) | set(lag_gates))
            unused = [g for g in lv.gates if g not in read]
            if unused:
                em.line(f"# gate(s) {comment(', '.join(unused))}: not read by this level's rule")
            for g in read:
                em.line(f"{ident(g, 'gh')} = {ident(g, 'g')}.transpose(1, 2).to(torch.float32).contiguous()  "
                        f"# gate {comment(g)} [B, H, T]")
            gates = [ident(g, "gh") for g in self.gates]
            if omega:
                gates += [f"_windows({ident(g, 'gh')}, 2)" for g in self.window_gates]
                if self.window_gates:
                    em.line("# gamma's gates at each chunk's window rows, [B, H, NT, CW]: the coefficients' G Ω")
            names = [n for n, _ in self.outputs()]
            em.line(f"{where(lv.algorithm.span) or '#'} {comment(lv.algorithm.describe())}: the scans' coefficients")
            em.line(f"{', '.join(names)} = _Coefficients.apply(kh, {', '.join(gates)})")
            if self.lag:
                self.lag_coefficients(lag_gates)
            bias = [f"{ident(g, 'gh')}[..., None].split(CHUNK, 2)" for g in self.bias_gates]
            carried = [gc] + ([hc] if mom else [])
            by_chunk = [f"{x}.unbind(2)" if omega else f"{x}.split(CHUNK, 2)" for x in carried]
            em.line("chunks = zip(" + ", ".join(["kh.split(CHUNK, 2)", "vh.split(CHUNK, 2)"] + by_chunk +
                                                ["bl.unbind(2)"] + (["fl.unbind(2)", "ml.unbind(2)"] if mom else []) +
                                                bias) + ")")
            em.line("starts, inputs, deltas = [], [[] for _ in LAYERS], [[] for _ in LAYERS]")
            bias_c = [f"{ident(g, 'go')}_c" for g in self.bias_gates]
            if omega:
                tail = ", ".join(f"{x}[:, :, :0]" for x in ["kh", "vh"] + [f"{ident(g, 'gh')}[..., None]"
                                                                           for g in self.bias_gates])
                em.line(f"tail = ({tail})  # the tokens before a chunk that its windows reach")
            row = ["k_c", "v_c"] + [f"{x}_c" for x in carried] + ["bl_c"] + (["fl_c", "ml_c"] if mom else [])
            if self.lag and not self.after:
                em.line("o_lag = []  # per chunk, the lag token's read of the state entering it [B, H, 1, V]")
            loop = f"for n, ({', '.join(row + bias_c)}) in enumerate(chunks):" if self.lag else \
                f"for {', '.join(row + bias_c)} in chunks:"
            with em.indent(loop):
                em.line(f"{where(lv.span)} level {comment(lv.name)}, one chunk: k_c [B, H, L, K], v_c [B, H, L, V]")
                span = where((lv.bias.inner or lv.bias).span) or "#"
                rows = ["k_c", "v_c"] + bias_c
                if self.lag:
                    self.lag_token(rows, span)
                at = "params"
                if self.mapped:
                    em.line(f"scales = tuple(psi_scale(x) for x in params)  {where(lv.retention.span) or '#'} the lq "
                            "map's slope at the chunk start, [B, H, 1, ...]")
                    em.line("weights = tuple(r * x for r, x in zip(scales, params))  # W_0 = psi(A_0)")
                    em.line("starts.append(weights + tuple(r * m for r, m in zip(scales, buffers)))  "
                            "# the state entering it, as the reads see it")
                    at = "weights"
                else:
                    em.line("starts.append(params + buffers)  # " + ("W_1: the state the chunk's scans start from"
                                                                     if self.lag else "the state entering it"))
                if omega:
                    window = [r[:-2] + "_w" for r in rows]
                    em.line(f"({', '.join(window)}), tail = _with_tail(tail, ({', '.join(rows)}))  "
                            "# the window's P + L tokens")
                    rows = window
                em.line(f"a, d = _layer_grads({at}, {', '.join(rows)})  {span} per layer at "
                        f"{'W_1' if self.lag else 'W_0'}")
                read_a, read_d = ("a_r", "d_r") if self.mapped else ("a", "d")
                if self.mapped:
                    em.line("a_r, d_r = _scaled(a, d, scales)  # as the reads of r A_t take them")
                if omega:
                    pairs = [("a", "d")] + ([("a_r", "d_r")] if self.mapped else [])
                    em.line(", ".join(f"{x}, {y}" for x, y in pairs) + " = " +
                            ", ".join(f"_padded({x}, k_c.shape[2]), _padded({y}, k_c.shape[2])" for x, y in pairs) +
                            "  # [B, H, CW, ...]: the window's rows")
                with em.indent("for i in range(len(LAYERS)):"):
                    em.line(f"inputs[i].append({read_a}[i])")
                    em.line(f"deltas[i].append({read_d}[i])")
                em.line("# row L - 1 of the coefficients: the state carried on")
                if mom:
                    em.line(f"params, buffers = (_carried((params, buffers), (bl_c, fl_c), {gc}_c, a, d),")
                    em.line(f"                   _carried((buffers,), (ml_c,), {hc}_c, a, d))")
                else:
                    em.line(f"params = _carried((params,), (bl_c,), {gc}_c, a, d)")
            em.line("starts = [torch.stack(s, 2) for s in zip(*starts)]  # per state tensor [B, H, NT, ...]")
            em.line("inputs, deltas = [torch.cat(x, 2) for x in inputs], [torch.cat(x, 2) for x in deltas]" +
                    ("  # [B, H, NT CW, ...]" if omega else ""))
            coefficients = f"({G}, br, fr)" if mom else f"({G}, br)"
            em.line(f"layer = _dual_layer(dot, starts[N_PARAMS:], inputs, deltas, {coefficients})")
            em.line("o = memory_forward(starts[:N_PARAMS], qh, layer=layer)  # [B, H, T, V], each token at its own weights")
            if self.lag and not self.after:
                em.line("# each chunk's first token read before its step: the state entering the chunk")
                em.line("o = o.index_copy(2, torch.arange(0, o.shape[2], CHUNK, device=o.device), torch.cat(o_lag, 2))")
            em.line("return o.transpose(1, 2).to(v.dtype), (_pack(params + buffers) if output_final_state else None)")

    def lag_coefficients(self, gates: list[str]) -> None:
        """at_lag: per chunk, its first token's lr (and beta) and the retention's gates, [B, H] each."""
        em, lv = self.em, self.lv
        heads = {ir.gate_symbol(g): f"{ident(g, 'gh')}[..., ::CHUNK]" for g in lv.gates}
        values = [("lr", self.roles["lr"])] + ([("beta", self.roles["beta"])] if self.momentum else [])
        em.line(f"{where(lv.retention.span) or '#'} KL's lag token: each chunk's first token takes the exact softmax "
                "step apart (_lag_step),")
        em.line("# with its own rates and gates, [B, H, NT]; the coefficient kernels make it the identity in the scans")
        for role, expr in values:
            text = to_torch(expr, heads)
            em.line(f"{role}_lag = " + (text if expr.free_symbols else f"torch.full_like(kh[:, :, ::CHUNK, 0], {text})"))
        lags = [f"{role}_lag" for role, _ in values] + [f"{ident(g, 'gh')}[..., ::CHUNK]" for g in gates]
        em.line(f"at_lag = tuple(zip(*(x.unbind(-1) for x in ({', '.join(lags)},))))")

    def lag_token(self, rows: list[str], span: str) -> None:
        """In the chunk loop: the lag token's read (read before), its gradient at the entering state and
        the softmax step, before the chunk's other tokens."""
        em = self.em
        if not self.after:
            em.line("o_lag.append(memory_forward(params, qh[:, :, n * CHUNK:n * CHUNK + 1]))  "
                    "# the lag token's read: before its step")
        first = ", ".join(f"{x}[:, :, :1]" for x in rows)
        em.line(f"a, d = _layer_grads(params, {first})  {span} the lag token's gradient, at the entering state")
        state = "params, buffers" if self.momentum else "params"
        em.line(f"{state} = _lag_step({state}, a, d, *at_lag[n])  {where(self.lv.retention.span)} the softmax step: W_1")


def render_scaled(em) -> None:
    """`_scaled`: a chunk's layer gradients as the dual reads take them under an lq map at chunk
    boundaries."""
    em.block('''
def _scaled(inputs, deltas, scales):
    """The layer gradients a_j, δ_j [B, H, L, I|O] as the dual reads of r A_t take them (r per state
    tensor [B, H, 1, ...], psi_scale at the chunk start): a read's steps part is r_W x·a_j δ_j
    (+ r_β δ_j for a layer bias), and the kernels' (x·a_j + 1) δ_j gives it with a_j r_W / r_β and δ_j r_β
    (a_j r_W alone without a bias). psi_scale keeps r finite and above 0."""
    out_a, out_d = [], []
    for (w, c), a, d in zip(LAYERS, inputs, deltas):
        if c is None:
            out_a.append(a * scales[w])
            out_d.append(d)
        else:
            r = scales[c][..., None]  # [B, H, 1, 1]
            out_a.append(a * (scales[w] / r))
            out_d.append(d * r)
    return out_a, out_d
''')


def render_padded(em) -> None:
    """`_padded`: a chunk's window rows as all CW rows of its window (omega)."""
    em.block('''
def _padded(rows, L):
    """Per tensor, a chunk's window rows [B, H, P + L, D] (its own L tokens last) as all CW rows of its
    window: zero rows for the WINDOW - 1 - P before the call's first token and the CHUNK - L past a short
    last chunk."""
    return [torch.nn.functional.pad(x, (0, 0, WINDOW - 1 - (x.shape[2] - L), CHUNK - L)) for x in rows]
''')
