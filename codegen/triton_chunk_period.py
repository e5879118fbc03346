"""Render a level of the period family (`update every P`, MATH.md §4.1-4.2, the Continuum Memory
System's slower levels) as chunked Triton kernels beside PyTorch matmuls: `level_<name>_triton_chunk.py`,
a real file in the cache (Triton reads kernel source from disk).

The period family (torch_chunk_period.py) runs units of CHUNK = min(C, P) tokens: every gradient of a
unit is taken at one state W* (the unit's start, its gradient chunk's start, or any state when the
gradient is free of it), and reads see the state committed at the last period boundary. So a unit's
end state is W_0's image under one closed-form scan, W_(L-1) = b W_0 (+ f M_0) - sum_j G_j u_j, with
sum_j G_j u_j one vjp of the memory at W* with the cotangents G_j D_j. What is a matmul stays in
PyTorch: per unit, in order, the memory at W* on the keys and that vjp; after the loop, every read at
once, one batched product per period against the committed weights [B, H, NP, ...]. The Triton kernels,
each with its backward:
  coefficients  the end-state coefficients of every unit at once (the carried row of the frozen
                family's log-space scans, triton_chunk_frozen.py, without the reads' rows);
  bias          D = dℓ/dy, elementwise in e = y - v, printed from sympy (as triton_chunk_frozen_mlp.py).
A matrix memory is the depth-1 case of the same file (its fused recurrent kernels run below CHUNK).
Nested levels (cms_nested) take their restarts from another level's period states, and export their
own committed states, in the same loop over units.
"""
from __future__ import annotations

from nlc import ir
from nlc.derive.rules import LevelRules
from nlc.plan import KernelPlan

from . import triton_chunk_common as common
from .emitter import comment, ident, where
from .torch_chunk_period import render_times, state_free
from .torch_reference import nesting_keywords, render_return
from .triton_chunk_frozen_mlp import MlpKernels


def unsupported(rules: LevelRules, plan: KernelPlan) -> str | None:
    """Why these kernels cannot run this level, or None when they can."""
    lv = rules.level
    if plan.family != "period":
        return f"plan family {plan.family!r}, not 'period'"
    if lv.target != "value":
        return "a self-generated target (value self(...)) is not in the period Triton kernels"
    vector = [g for g in ir.gate_names(rules.bias.grad) if lv.gate_axes[g] != "scalar"]
    if vector:
        return f"the bias gradient reads per-channel gate(s) {', '.join(vector)}: not in the kernels"
    try:
        PeriodKernels(rules, plan, "", "").text()
    except NotImplementedError as err:  # a function the Triton printer has no form for
        return str(err)
    return None


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_triton_chunk.py` for a level `unsupported` accepts."""
    return PeriodKernels(rules, plan, model, file).text()


class PeriodKernels(MlpKernels):
    """The file for one level: the frozen MLP file's coefficient kernels (carried row only) and bias
    kernels, a PyTorch loop over units and batched reads of the committed states."""
    READS = False  # reads see committed states, never a unit's own steps: no read coefficients

    def __init__(self, rules: LevelRules, plan: KernelPlan, model: str, file: str):
        super().__init__(rules, plan, model, file)
        lv = rules.level
        self.unit, self.period = int(plan.chunk), int(lv.period)
        self.anywhere = state_free(rules)  # the gradient is the same at every state: W* may be any
        self.grad_chunk = None if self.anywhere or lv.grad_chunk <= self.unit else int(lv.grad_chunk)

    def text(self) -> str:
        em, lv = self.em, self.lv
        self.header()
        common.imports(em, lv, "N_PARAMS, _pack, default_state, memory_forward", "from nlc.runtime.vjp import vjp")
        em.line(f"CHUNK = {self.unit}  # tokens per unit: every gradient of a unit at one state, its reads at one")
        em.line(f"PERIOD = {self.period}  # update every PERIOD tokens: reads see the state at the last boundary")
        if lv.init_from is not None:
            em.line(f"RESTART = {lv.restart}  # restart from level {comment(lv.init_from)}'s state every RESTART "
                    "tokens (a multiple of PERIOD)")
        if self.grad_chunk:
            em.line(f"GRAD_CHUNK = {self.grad_chunk}  # gradients at the state entering each GRAD_CHUNK tokens")
        em.line("AUTO = False  # checked under Triton's interpreter, not yet on a GPU: mode='auto' keeps the "
                "chunked PyTorch form, mode='triton' runs these kernels")
        common.launch_configuration(em)
        em.gap()
        self.helpers()
        for part in (self.coefficient_kernels, self.bias_kernels, self.coefficient_function, self.bias_function):
            em.gap()
            part()
        em.gap()
        render_times(em)
        em.gap()
        _render_grouped(em)
        em.gap()
        self.reads()
        em.gap()
        self.public()
        return em.text()

    def header(self) -> None:
        em, lv = self.em, self.lv
        self.title("period family, MATH.md §4.1-4.2")
        em.line("The state takes a step every token; reads see the state committed at the last boundary of a")
        em.line(f"period of {self.period} tokens (the entering state before the first). Per unit of L <= CHUNK "
                "tokens (j = 0..L-1),")
        em.line("W_0 (and M_0) the state entering it, every gradient u_j = ∂<D_j, M(W*; k_j)>/∂W* at one state W*:")
        if self.grad_chunk:
            em.line("  W* = the state entering the unit's gradient chunk of GRAD_CHUNK tokens")
        elif self.anywhere:
            em.line("  W* = W_0 (D does not depend on the state)")
        else:
            em.line("  W* = W_0 (the unit is its gradient chunk)")
        em.line("  P[L-1, j] = prod_(j<r<L) a_r, b = prod_r a_r (log space, signs apart)")
        if self.momentum:
            em.line("  Pm, m: the same of beta;  N[i, j] = c_i Pm[i, j] lr_j,  G = P N,  f = P (c m)")
            em.line("  W_(L-1) = b W_0 + f M_0 - sum_j G[L-1, j] u_j,  M_(L-1) = m M_0 - sum_j Pm[L-1, j] lr_j u_j")
        else:
            em.line("  G[L-1, j] = P[L-1, j] c_j lr_j;  W_(L-1) = b W_0 - sum_j G[L-1, j] u_j")
        em.line("  sum_j G[L-1, j] u_j: one vjp of M at W* with the cotangents G[L-1, j] D_j")
        em.line("  " + ("reads after the write: a token that ends a period reads the state it commits"
                        if self.after else "reads before the write: a token that ends a period reads the "
                        "state before its commit"))
        if lv.init_from is not None:
            em.line(f"Nested: every RESTART tokens (a period boundary) the state restarts from level "
                    f"{comment(lv.init_from)}'s")
            em.line("(`restart_states`), optimizer buffers from zero, and the period's reads see the restarted state.")
        if lv.initialises:
            em.line("Nested: `output_period_states` also returns the committed states (the state entering every")
            em.line(f"PERIOD boundary), which {comment(', '.join(lv.initialises))} restart(s) from.")
        em.line("Triton: the units' coefficients (all at once) and D = dℓ/dy; PyTorch: per unit in order, the")
        em.line("memory at W* on the keys and the vjps; then every read, a batched product per period against")
        em.line("the committed weights. Each kernel has its backward.")
        self.layout_doc()

    def reads(self) -> None:
        """`_reads`: every token's read of the committed states, batched per period."""
        em = self.em
        with em.indent("def _reads(committed, x):"):
            em.line('"""Every token\'s read [B, H, T, V] of x [B, H, T, K]: period p reads committed[p] (per state')
            em.line("tensor [B, H, ...]), the entering state for p = 0, then the state each period commits" +
                    ("; a token" if self.after else '."""'))
            if self.after:
                em.line('that ends period p reads committed[p + 1], the state it commits (read after the write)."""')
            em.line("NP = triton.cdiv(x.shape[2], PERIOD)")
            em.line("weights = [torch.stack(w, 2) for w in zip(*committed[:NP])]  # [B, H, NP, ...]")
            if not self.after:
                em.line("return memory_forward(weights, x, layer=_grouped(PERIOD))")
                return
            em.line("o = memory_forward(weights, x, layer=_grouped(PERIOD))")
            em.line("# the tokens that commit")
            em.line("ends = torch.arange(x.shape[2] // PERIOD, device=x.device) * PERIOD + PERIOD - 1")
            with em.indent("if len(ends):"):
                em.line("weights = [torch.stack(w, 2) for w in zip(*committed[1:len(ends) + 1])]")
                em.line("o = o.index_copy(2, ends, memory_forward(weights, x[:, :, ends], layer=_grouped(1)))")
            em.line("return o")

    def public(self) -> None:
        em, lv, mom = self.em, self.lv, self.momentum
        kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
        with em.indent(f"def {ident(lv.name, 'level')}(q, k, v, *, {kw}{nesting_keywords(lv)}initial_state=None, "
                       "output_final_state=False):"):
            common.public_head(em, lv, f"({', '.join(comment(n) for n in self.state_names())}) as the reference's")
            em.line("state = (state,) if torch.is_tensor(state) else tuple(state)")
            em.line("state = tuple(s.to(torch.float32) for s in state)")
            em.line("params, buffers = state[:N_PARAMS], state[N_PARAMS:]")
            em.line("qh, kh, vh = (x.transpose(1, 2).to(torch.float32).contiguous() for x in (q, k, v))  "
                    "# [B, H, T, D]")
            unused = [g for g in lv.gates if g not in self.gates]
            if unused:
                em.line(f"# gate(s) {comment(', '.join(unused))}: not read by this level's rule")
            for g in self.gates:
                em.line(f"{ident(g, 'gh')} = {ident(g, 'g')}.transpose(1, 2).to(torch.float32).contiguous()  "
                        f"# gate {comment(g)} [B, H, T]")
            names = [n for n, _ in self.outputs()]
            em.line(f"{where(lv.algorithm.span) or '#'} {comment(lv.algorithm.describe())}: every unit's end "
                    "coefficients")
            em.line(f"{', '.join(names)} = _Coefficients.apply(kh{''.join(', ' + ident(g, 'gh') for g in self.gates)})")
            em.line("committed = [params]  # per period, the state its reads see")
            with em.indent("for n, start in enumerate(range(0, kh.shape[2], CHUNK)):"):
                em.line(f"{where(lv.span)} level {comment(lv.name)}: one unit of L <= CHUNK tokens, within one period")
                if lv.init_from is not None:
                    with em.indent("if restart_states is not None and start > 0 and start % RESTART == 0:  "
                                   f"# restart from level {comment(lv.init_from)}'s state"):
                        em.line("params = tuple(s[:, start // RESTART - 1].to(torch.float32) for s in restart_states)")
                        if mom:
                            em.line("buffers = tuple(torch.zeros_like(b) for b in buffers)")
                        em.line("committed[-1] = params  # a period boundary: this period's reads see the restart")
                em.line("end = min(start + CHUNK, kh.shape[2])")
                em.line("k_c, v_c = kh[:, :, start:end], vh[:, :, start:end]  # [B, H, L, D]")
                if self.grad_chunk:
                    with em.indent("if start % GRAD_CHUNK == 0:"):
                        em.line("at = params  # W*: the state entering this gradient chunk")
                else:
                    em.line("at = params  # W*: the state entering the unit")
                em.line("y_k, pullback = vjp(lambda *p: memory_forward(p, k_c), *at)  # M(W*; k_j), [B, H, L, V]")
                gates = "".join(f", {ident(g, 'gh')}[:, :, start:end, None]" for g in self.bias_gates)
                span = where((lv.bias.inner or lv.bias).span) or "#"
                em.line(f"dy = output_grad(y_k, v_c{gates})  {span} D = dℓ/dy (bias kernels)")
                em.line(f"{where(lv.algorithm.span) or '#'} the unit's steps in closed form")
                if mom:
                    em.line("u_G = pullback(gc[:, :, start:end, None] * dy)  # sum_j G[L-1, j] u_j, per state tensor")
                    em.line("u_H = pullback(hc[:, :, start:end, None] * dy)  # sum_j Pm[L-1, j] lr_j u_j")
                    em.line("b, f, m = bl[:, :, n], fl[:, :, n], ml[:, :, n]  # [B, H]")
                    em.line("params, buffers = (")
                    em.line("    tuple(_times(b, W) + _times(f, M) - g for W, M, g in zip(params, buffers, u_G)),")
                    em.line("    tuple(_times(m, M) - h for M, h in zip(buffers, u_H)))")
                else:
                    em.line("steps = pullback(gc[:, :, start:end, None] * dy)  # sum_j G[L-1, j] u_j, per state tensor")
                    em.line("params = tuple(_times(bl[:, :, n], W) - s for W, s in zip(params, steps))")
                with em.indent("if end % PERIOD == 0:"):
                    em.line("committed.append(params)  # commit: later periods read it")
            em.line("o = _reads(committed, qh).transpose(1, 2).to(v.dtype)  # [B, T, H, V]")
            if lv.initialises:
                em.line("exports = committed[1:(kh.shape[2] - 1) // PERIOD + 1]  # the states entering tokens j PERIOD < T")
            render_return(em, lv)


def _render_grouped(em) -> None:
    em.block('''
def _grouped(size):
    """The `layer` hook of memory_forward for weights that hold one set per group of `size` tokens:
    h [B, H, N, I], W [B, H, NG, I, O], b [B, H, NG, O] or None -> [B, H, N, O] (group g reads rows
    [g size, (g + 1) size) of h, the last group padded)."""
    def layer(i, h, W, b):
        B, H, N, I = h.shape
        NG = W.shape[2]
        h = torch.nn.functional.pad(h, (0, 0, 0, NG * size - N)).reshape(B, H, NG, size, I)
        out = h @ W if b is None else h @ W + b[:, :, :, None, :]
        return out.reshape(B, H, NG * size, -1)[:, :, :N]
    return layer
''')
