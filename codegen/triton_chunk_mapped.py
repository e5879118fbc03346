"""Render a mapped-family level (MATH.md §3.6) as chunked Triton kernels beside PyTorch matmuls:
`level_<name>_triton_chunk.py`, a real file in the cache (Triton reads kernel source from disk).

What these kernels cover is delta gradient descent with plain gradient steps (Hope's and
self-modifying Titans' memories; `torch_chunk_mapped_dgd.applies`): per gradient chunk, every weight
W [I, O] of a layer with input a_t and output gradient δ_t at the chunk-start weights moves by

    W_t = (decay_t I - lr_t a_t a_tᵀ) W_(t-1) + a_t (-lr_t δ_t)ᵀ,

the delta family's gated delta rule S_t = a_t S_(t-1) - b_t k_t (S_(t-1)ᵀ k_t - v_t)ᵀ with keys a_t,
values -δ_t, step size b_t = lr_t and the error at the old state. So each layer runs the delta family's
generated kernels (`triton_chunk_common.Kernels`: gate, WY/UT with forward substitution in fp32, state,
output, and their backward), started from W_0 and read by the layer's own inputs h_t as queries; a
layer bias b_t = decay_t b_(t-1) - lr_t δ_t is a short scan in PyTorch. What stays in PyTorch per
chunk, in order: the memory at W_0 on the keys and one vjp (a_t, δ_t, `_layer_grads`), with the bias
map D = dℓ/dy as Triton kernels (the frozen MLP file's); then the read through memory_forward, whose
layer hook runs each layer's kernels, with what lies between the layers (activation, gate, norm,
residual) in PyTorch. Chunks run in order: a chunk's keys a_t are taken at the weights it starts from.

The other mapped rules (momentum, muon, omega windows, KL, elastic's threshold, FTRL accumulators) run
as elementwise scans (`triton_chunk_mapped_scans`).
"""
from __future__ import annotations

import sympy

import nlc
from nlc import ir
from nlc.derive.printer import to_torch
from nlc.derive.rules import ALGORITHM_TEXT, LevelRules
from nlc.plan import KernelPlan

from . import torch_arch
from . import torch_chunk_mapped_dgd as dgd
from . import triton_chunk_common as common
from . import triton_chunk_mapped_scans as scans
from .emitter import comment, ident, where
from .torch_chunk_common import render_layer_grads, render_product, show
from .torch_reference import self_target
from .triton_chunk_frozen_mlp import MlpKernels


def unsupported(rules: LevelRules, plan: KernelPlan) -> str | None:
    """Why these kernels cannot run this level, or None when they can."""
    lv = rules.level
    if plan.family != "mapped":
        return f"plan family {plan.family!r}, not 'mapped'"
    if not dgd.applies(rules):
        return scans.unsupported(rules, plan)
    coeffs = dgd.coefficients(rules)
    for role, expr in coeffs.items():
        vector = [g for g in ir.gate_names(expr) if lv.gate_axes[g] != "scalar"]
        if vector:
            return f"the {role} reads per-channel gate(s) {', '.join(vector)}: the kernels take one per token"
    vector = [g for g in ir.gate_names(rules.bias.grad) if lv.gate_axes[g] != "scalar"]
    if vector:
        return f"the bias gradient reads per-channel gate(s) {', '.join(vector)}: not in the kernels"
    if not any(ir.gate_names(e) for e in coeffs.values()):
        return "a constant decay and learning rate: the gate kernels compute them from gates"
    try:
        DgdKernels(rules, plan, "", "").text()
    except NotImplementedError as err:  # a function the Triton printer has no form for
        return str(err)
    return None


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_triton_chunk.py` for a level `unsupported` accepts."""
    if not dgd.applies(rules):
        return scans.MappedScans(rules, plan, model, file).text()
    return DgdKernels(rules, plan, model, file).text()


class DgdKernels(common.Kernels):
    """The file for one level: the delta family's kernels over the derived decay and learning rate,
    the frozen MLP file's bias kernels (`bias`, writing to the same emitter), and the PyTorch loop
    over gradient chunks."""

    def __init__(self, rules: LevelRules, plan: KernelPlan, model: str, file: str):
        lv = rules.level
        coeffs = dgd.coefficients(rules)
        decay, lr = sympy.sympify(coeffs["decay"]), sympy.sympify(coeffs["lr"])
        gates = tuple(sorted(set(ir.gate_names(decay)) | set(ir.gate_names(lr))))
        form = common.ChunkForm(True, decay, lr, "gb", "g" if lv.read == "after" else "gb", gates)
        super().__init__(form, rules, model, file, [])
        self.rules, self.grad_chunk = rules, int(plan.chunk)
        self.biased = any(b is not None for _, b in torch_arch.layers(lv))
        self.bias = MlpKernels(rules, plan, model, file)
        self.bias.em = self.em

    def text(self) -> str:
        em, lv = self.em, self.lv
        self.header()
        common.imports(em, lv, "N_PARAMS, _pack, default_state, memory_forward", "from nlc.runtime.vjp import tapped_vjp")
        em.line(f"GRAD_CHUNK = {self.grad_chunk}  # tokens whose gradients are taken at one W_0 (gradient chunk_start)")
        em.line(f"CHUNK = {min(64, max(16, 1 << (self.grad_chunk - 1).bit_length()))}  "
                "# tokens per chunk of the kernels (BT): a power of two, at least 16")
        em.line(f"LAYERS = {tuple(torch_arch.layers(lv))!r}  # per layer: index of its weight, of its bias (or None)")
        em.line("AUTO = False  # checked under Triton's interpreter, not yet on a GPU: mode='auto' keeps the "
                "chunked PyTorch form, mode='triton' runs these kernels")
        common.launch_configuration(em)
        em.gap()
        for part in self.parts():
            part()
            em.gap()
        for part in (self.bias.bias_kernels, self.bias.bias_function):
            part()
            em.gap()
        for render_part in (render_product, render_layer_grads) + ((dgd.render_products,) if self.biased else ()):
            render_part(em)
            em.gap()
        self.layers()
        em.gap()
        self.public()
        return em.text()

    def header(self) -> None:
        em, lv, f = self.em, self.lv, self.f
        em.line(f'"""Level {comment(lv.name)!r} of model {comment(self.model)!r}: chunked Triton kernels and '
                "PyTorch matmuls")
        em.line("(mapped family, delta gradient descent with plain gradient steps; MATH.md §3.3, §3.6).")
        em.line()
        em.line(f"Generated by nlc {nlc.__version__} from {comment(self.file)}; do not edit. It computes "
                f"what level_{comment(lv.name)}.py")
        em.line("(the reference recurrent form) computes, in fp32.")
        for key, value in lv.describe().items():
            em.line(f"  {key:<10} {comment(value)}")
        em.line(f"  step       {ALGORITHM_TEXT[lv.algorithm.kind]}")
        em.line(f"  decay_t    = {show(f.decay)}   (dgd's factor on the old weights)")
        em.line(f"  lr_t       = {show(f.step)}")
        em.line(f"  d = dℓ/dy = {show(self.bias.grad)}   (e = y - v" + (", r = ||e||)" if self.bias.norm else ")"))
        em.line("Per gradient chunk of L <= GRAD_CHUNK tokens, W_0 the weights entering it, one forward and one vjp")
        em.line("at W_0 give each layer's input a_t and output gradient δ_t (LAYERS"
                + (f"; the target is M(W_0; {comment(lv.value)}_t)" if lv.target == "self" else "") + "); then every")
        em.line("weight W [I, O] of a layer moves by")
        em.line("  W_t = (decay_t I - lr_t a_t a_tᵀ) W_(t-1) + a_t (-lr_t δ_t)ᵀ,")
        em.line("the gated delta rule with keys k = a, values v = -δ, step size b = lr and the error at the old")
        em.line(f"state, read with the layer's own inputs h_t as queries (o_t = W_{{t{'' if f.read == 'g' else '-1'}}}ᵀ "
                "h_t). Each layer runs the")
        em.line("kernels below from W_0 (K = I, V = O):")
        self.method()
        if self.biased:
            em.line("A layer bias moves by b_t = decay_t b_(t-1) - lr_t δ_t, a scan in PyTorch (`_products`).")
        em.line("Triton: those kernels and D = dℓ/dy; PyTorch: per chunk in order, the memory at W_0 on the keys")
        em.line("with its vjp, and what lies between the layers. Each kernel has its backward.")
        em.line("Layout: q, k [B, T, H, K]; v [B, T, H, V]; gates [B, T, H]; inside, [B, H, T, ...] fp32. The")
        em.line(f"state is the reference's: {comment(', '.join(n for n, _, _ in torch_arch.param_layout(lv)))}, float32.")
        em.line('"""')

    def layers(self) -> None:
        """`_delta_layers`: memory_forward's layer hook that runs each layer's kernels over one chunk."""
        em = self.em
        biased = ", decay, lr" if self.biased else ""
        with em.indent(f"def _delta_layers(params, inputs, deltas, gates{biased}):"):
            em.line('"""A `layer` hook for memory_forward reading every token of one chunk at its own weights, and')
            em.line("`ends`, the state after the chunk (filled as the layers run). Layer i of LAYERS (h [B, H, L, I],")
            em.line("W_0 [B, H, I, O]) is the gated delta rule with keys inputs[i] [B, H, L, I], values -deltas[i]")
            em.line("[B, H, L, O] and the gates [B, L, H] of the chunk, from W_0, queried by h" +
                    (("; its bias b_0 [B, H, O]\nmoves by b_t = decay_t b_(t-1) - lr_t δ_t (decay, lr "
                      '[B, H, L])."""') if self.biased else '."""'))
            em.line("ends = list(params)")
            em.gap(1)
            with em.indent("def layer(i, h, W, b):"):
                em.line("w_index, b_index = LAYERS[i]" if self.biased else "w_index = LAYERS[i][0]")
                em.line("q_c, k_c, v_c = (x.transpose(1, 2).contiguous() for x in (h, inputs[i], -deltas[i]))  "
                        "# [B, L, H, D]")
                em.line(f"o, ends[w_index] = ChunkFunction.apply(q_c, k_c, v_c, *gates, W.contiguous())  "
                        f"{where(self.lv.retention.span) or '#'} dgd")
                if not self.biased:
                    em.line("return o.transpose(1, 2)  # [B, H, L, O]")
                else:
                    em.line("o = o.transpose(1, 2)  # [B, H, L, O]")
                    with em.indent("if b is None:"):
                        em.line("return o")
                    em.line("run, seg = _products(decay)")
                    if self.f.read == "gb":
                        em.line("reads = _before(run, seg)  # read before the write: b_(t-1)")
                    else:
                        em.line("reads = run, seg  # read after the write: b_t")
                    em.line("w = -lr[..., None] * deltas[i]  # [B, H, L, O]")
                    em.line("ends[b_index] = run[..., -1, None] * b + (seg[..., -1, :, None] * w).sum(-2)")
                    em.line("return o + reads[0][..., None] * b[:, :, None, :] + reads[1] @ w")
            em.line("return layer, ends")

    def public(self) -> None:
        em, lv, f = self.em, self.lv, self.f
        kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
        with em.indent(f"def {ident(lv.name, 'level')}(q, k, v, *, {kw}initial_state=None, "
                       "output_final_state=False):"):
            names = ", ".join(comment(n) for n, _, _ in torch_arch.param_layout(lv))
            common.public_head(em, lv, f"({names}) as the reference's")
            em.line("state = (state,) if torch.is_tensor(state) else tuple(state)")
            em.line("params = tuple(s.to(torch.float32) for s in state[:N_PARAMS])")
            em.line("qh, kh, vh = (x.transpose(1, 2).to(torch.float32) for x in (q, k, v))  # [B, H, T, D]")
            used = set(f.gates) | set(self.bias.bias_gates)
            unused = [g for g in lv.gates if g not in used]
            if unused:
                em.line(f"# gate(s) {comment(', '.join(unused))}: not read by this level's rule")
            for g in self.bias.bias_gates:
                em.line(f"{ident(g, 'go')} = {ident(g, 'g')}.transpose(1, 2).to(torch.float32)[..., None]  "
                        f"# bias gate {comment(g)} [B, H, T, 1]")
            if self.biased:
                heads = {ir.gate_symbol(g): f"{ident(g, 'g')}.transpose(1, 2).to(torch.float32)" for g in f.gates}
                for role, expr in (("decay", f.decay), ("lr", f.step)):
                    text = _torch(expr, heads)
                    em.line(f"{role} = {text}  # {role}_t [B, H, T], for the layer biases")
            em.line("outputs = []")
            with em.indent("for start in range(0, kh.shape[2], GRAD_CHUNK):"):
                em.line(f"{where(lv.span)} level {comment(lv.name)}: one gradient chunk of L <= GRAD_CHUNK tokens")
                em.line("end = min(start + GRAD_CHUNK, kh.shape[2])")
                target = self_target(lv, "vh[:, :, start:end]", "params")
                args = "".join(f", {ident(g, 'go')}[:, :, start:end]" for g in self.bias.bias_gates)
                em.line(f"inputs, deltas = _layer_grads(params, kh[:, :, start:end], {target}{args})  "
                        f"{where((lv.bias.inner or lv.bias).span) or '#'} a_t, δ_t at W_0")
                gates = ", ".join(f"{ident(g, 'g')}[:, start:end].contiguous()" for g in f.gates)
                em.line(f"gates = ({gates}{',' if len(f.gates) == 1 else ''})  # [B, L, H]")
                extra = ", decay[:, :, start:end], lr[:, :, start:end]" if self.biased else ""
                em.line(f"layer, ends = _delta_layers(params, inputs, deltas, gates{extra})")
                em.line(f"outputs.append(memory_forward(params, qh[:, :, start:end], layer=layer))  # read {lv.read} "
                        "the write")
                em.line("params = tuple(ends)  # W_0 of the next chunk")
            em.line("o = torch.cat(outputs, dim=2).transpose(1, 2)  # [B, T, H, V]")
            em.line("return o.to(v.dtype), (_pack(params) if output_final_state else None)")


def _torch(expr, heads: dict) -> str:
    """A per-token coefficient over gates [B, H, T] as PyTorch (a constant broadcast against the keys)."""
    expr = sympy.sympify(expr)
    text = to_torch(expr, heads)
    return text if expr.free_symbols else f"torch.full_like(kh[..., 0], {text})"
