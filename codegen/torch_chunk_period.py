"""Render one level of the *period* family as a chunk-parallel PyTorch module (MATH.md §4.1-4.2, the
Continuum Memory System): a level that updates every P > 1 tokens (`update every P`) takes a step
every token, but its reads see only the state committed at the last period boundary. With gradients
frozen at the start of gradient chunks of C tokens that nest with the periods (C | P or P | C), or
with gradients that do not depend on the state at all, the level runs in units of min(C, P) tokens
(P when the gradient is state-free): all reads of a unit use one fixed set of weights (one batched
forward), and the unit's steps reach its end state through one gradient of the unit's weighted loss
at the frozen weights (a single vjp, no per-token weights), with closed-form scan coefficients.

The module it renders imports the reference module's memory (`memory_forward`; one vjp per unit),
bias (`output_grad`) and state helpers, and defines `CHUNK` (the unit), `PERIOD`, and the op
`level_<name>` with the reference op's signature, state layout and return convention.
"""
from __future__ import annotations

import nlc
from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.rules import ALGORITHM_TEXT, LevelRules
from nlc.plan import KernelPlan

from . import torch_arch
from .emitter import Emitter, comment, ident, where
from .torch_chunk_common import op_signature, render_op_inputs, render_scan_coefficients, show
from .torch_reference import nesting_keywords, render_restart, render_return, self_target


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """Source of `level_<name>_chunk.py` for a level whose plan is the period family."""
    lv = rules.level
    if plan.family != "period" or plan.chunk < 2 or not lv.period or lv.period < 2:
        raise ValueError(f"level {lv.name!r}: not a period-family plan (family {plan.family}, "
                         f"unit {plan.chunk}, update every {lv.period})")
    if rules.accumulator or rules.retention.form != "elementwise":
        raise ValueError(f"level {lv.name!r}: the period chunked form needs an affine retention")
    if lv.memory.kind not in ("matrix", "mlp") or lv.algorithm.kind not in ("gd", "momentum"):
        raise NotImplementedError(f"level {lv.name!r}: {lv.memory.kind} memory with "
                                  f"{lv.algorithm.kind} is not in the period family")
    unit, period = int(plan.chunk), int(lv.period)
    if state_free(rules):
        frozen_at = None  # the gradient is the same at every state
    elif lv.grad_at == "chunk" and period % unit == 0 and lv.grad_chunk % unit == 0:
        frozen_at = int(lv.grad_chunk)
    else:
        raise ValueError(f"level {lv.name!r}: a unit of {unit} tokens needs gradients frozen at "
                         f"chunk starts that nest with the period {period}")
    momentum = lv.algorithm.kind == "momentum"
    coeffs = {"decay": plan.decay, "scale": plan.scale, "lr": rules.lr}
    if momentum:
        coeffs["beta"] = lv.algorithm.args["beta"]
    for role, expr in coeffs.items():
        vector = [g for g in ir.gate_names(expr) if lv.gate_axes[g] != "scalar"]
        if vector:
            raise NotImplementedError(f"level {lv.name!r}: the period chunked form needs scalar gates "
                                      f"in the {role} coefficient; {', '.join(vector)} is per channel")
    em = Emitter()
    _header(em, rules, plan, coeffs, frozen_at, model, file)
    em.line("import torch")
    em.line()
    em.line("from nlc.runtime.vjp import vjp")
    em.line()
    em.line(f"from .{ident(lv.name, 'level')} import N_PARAMS, _pack, default_state, memory_forward, output_grad")
    em.line()
    em.line(f"CHUNK = {unit}  # tokens per unit: reads of a unit see one committed state")
    em.line(f"PERIOD = {period}  # update every PERIOD tokens: reads see the state at the last boundary")
    if lv.init_from is not None:
        em.line(f"RESTART = {lv.restart}  # restart from level {comment(lv.init_from)}'s state every RESTART tokens")
    if frozen_at is not None and frozen_at > unit:
        em.line(f"GRAD_CHUNK = {frozen_at}  # gradients at the state entering each GRAD_CHUNK tokens")
    em.gap()
    _render_end_products(em)
    em.gap()
    _render_end_coefficients(em, momentum)
    em.gap()
    render_times(em)
    em.gap()
    _render_op(em, rules, plan, coeffs, momentum, frozen_at)
    return em.text()


def render_times(em: Emitter) -> None:
    """`_times`: a per-head scalar times a state tensor."""
    em.block('''
def _times(s, x):
    """A per-head scalar s [B, H] times one state tensor x [B, H, ...]."""
    return s.reshape(s.shape + (1,) * (x.dim() - s.dim())) * x
''')


def state_free(rules: LevelRules) -> bool:
    """u = k ⊗ dℓ/dy with dℓ/dy free of the state: the gradient is the same at every state (not with
    a self-generated target M(v), which reads the state)."""
    return rules.level.memory.kind == "matrix" and rules.level.target != "self" \
        and not (rules.bias.grad.free_symbols & {S.e, S.r, S.y})


def _header(em: Emitter, rules: LevelRules, plan: KernelPlan, coeffs, frozen_at, model: str,
            file: str) -> None:
    lv = rules.level
    momentum = lv.algorithm.kind == "momentum"
    em.line(f'"""Level {comment(lv.name)!r} of model {comment(model)!r}: chunk-parallel form, period family '
            "(MATH.md §4.1-4.2).")
    em.line()
    em.line(f"Generated by nlc {nlc.__version__} from {comment(file)}; do not edit. It computes what the")
    em.line(f"reference op in {ident(lv.name, 'level')}.py computes, up to round-off, a unit of "
            f"{int(plan.chunk)} tokens at a time.")
    for key, value in lv.describe().items():
        em.line(f"  {key:<10} {comment(value)}")
    em.line(f"  step       {ALGORITHM_TEXT[lv.algorithm.kind]}")
    em.line(f"  a_t = {show(coeffs['decay'])}   (retention: factor on the old state)")
    em.line(f"  c_t = {show(coeffs['scale'])}   (retention: factor on the step)")
    em.line(f"  lr_t = {show(coeffs['lr'])}")
    if momentum:
        em.line(f"  beta_t = {show(coeffs['beta'])}")
    em.line()
    em.line("The state takes a step every token; reads see the state committed at the last boundary of")
    em.line(f"a period of {lv.period} tokens (the entering state before the first). Units of CHUNK tokens")
    em.line("never straddle a period boundary, so every read of a unit uses one committed state, one")
    em.line("batched forward (read after write: a unit that ends on a boundary reads its last token")
    em.line("at the new state). Every gradient of a unit is taken at one state W*:")
    if frozen_at is None:
        em.line("the gradient does not depend on the state (u_j = k_j ⊗ dy_j, dy free of W), so W* = W_0.")
    elif frozen_at > plan.chunk:
        em.line("the state entering its gradient chunk of GRAD_CHUNK tokens (a multiple of CHUNK).")
    else:
        em.line("the state W_0 entering the unit (its gradient chunk).")
    em.line("Within a unit (positions j = 0..L-1, W_0 and M_0 the state entering it), the recurrence")
    if momentum:
        em.line("  M_t = beta_t M_{t-1} - lr_t u_t,    W_t = a_t W_{t-1} + c_t M_t")
        em.line("has the end state W_{L-1} = b W_0 + f M_0 - sum_j G_j u_j, M_{L-1} = m M_0 - sum_j H_j u_j,")
        em.line("with A_i = prod_{i<r<L} a_r, w_i = A_i c_i, Pm[i, j] = prod_{j<r<=i} beta_r, and")
        em.line("  b = prod_r a_r,  f = sum_i w_i Pm[i, -1],  G_j = lr_j sum_{i>=j} w_i Pm[i, j],")
        em.line("  m = prod_r beta_r,  H_j = lr_j Pm[L-1, j]   (products from sums of each segment's logs).")
    else:
        em.line("  W_t = a_t W_{t-1} + c_t (-lr_t u_t)")
        em.line("has the end state W_{L-1} = b W_0 - sum_j g_j u_j with b = prod_r a_r and")
        em.line("g_j = (prod_{j<r<L} a_r) c_j lr_j (products from sums of each segment's logs).")
    if lv.target == "self":
        em.line(f"The target is the memory's own read-out M(W*; {comment(lv.value)}_j) at the same W* "
                "(`value self(...)`)" + (", without outer gradient." if lv.stop_target else "."))
    em.line("As u_j = ∂<dy_j, M(W*; k_j)>/∂W* is linear in dy_j, sum_j g_j u_j is one vjp of M at W*")
    em.line("with the cotangents g_j dy_j. A short last unit has L < CHUNK tokens; the final state is the")
    em.line("latest one (a partial period's steps included), as in the reference.")
    if lv.init_from is not None:
        em.line(f"Nested: every RESTART = {lv.restart} tokens (a multiple of CHUNK) the state restarts from")
        em.line(f"level {comment(lv.init_from)}'s (`restart_states`), optimizer buffers from zero.")
    if lv.initialises:
        em.line("Nested: `output_period_states` also returns the state entering every PERIOD boundary, which")
        em.line(f"{comment(', '.join(lv.initialises))} restart(s) from.")
    em.line("Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; scalar gates [B, T, H]; the state is the")
    em.line(f"reference's: {comment(', '.join(_state_names(lv)))}.")
    em.line('"""')


def _state_names(lv: ir.Level) -> list[str]:
    names = [n for n, _, _ in torch_arch.param_layout(lv)]
    return names + ([f"M_{n}" for n in names] if lv.algorithm.kind == "momentum" else [])


def _render_end_products(em: Emitter) -> None:
    em.block('''
def _end_products(a):
    """Products of a per-token factor a [..., L] that reach the end of a unit (MATH.md §3.4, in log
    space): total [...] = prod_r a_r and after [..., L]: after[j] = prod_{j<r<L} a_r. Each sums the
    logs of its own factors, accumulated from the unit's end (no ratio of running products, so
    nothing cancels); log 0 is clamped to log(tiny) and signs are carried apart."""
    log_a = torch.log(a.abs().clamp_min(torch.finfo(a.dtype).tiny))
    negative = (a < 0).to(a.dtype)

    def later(x):  # [..., j] = sum_{r>j} x_r
        return torch.nn.functional.pad(x[..., 1:].flip(-1).cumsum(-1).flip(-1), (0, 1))

    def sign(count):  # (-1) ** count
        return 1 - 2 * torch.remainder(count, 2)
    total = torch.exp(log_a.sum(-1)) * sign(negative.sum(-1))
    return total, torch.exp(later(log_a)) * sign(later(negative))
''')


def _render_end_coefficients(em: Emitter, momentum: bool) -> None:
    if momentum:
        em.block('''
def _end_coefficients(a, c, lr, beta):
    """Coefficients of a unit's end state, W_{L-1} = b W_0 + f M_0 - sum_j G_j u_j and
    M_{L-1} = m M_0 - sum_j H_j u_j: per-token factors [..., L] in; b, f, m [...], G, H [..., L] out.
    Pm[i, j] = prod_{j<r<=i} beta_r [..., L, L] are the end products of row i's factors (beta_r for
    r <= i, 1 after), so every factor stays bounded."""
    L = a.shape[-1]
    b, A = _end_products(a)  # A[i] = prod_{i<r<L} a_r
    later = torch.ones(L, L, dtype=torch.bool, device=a.device).triu(1)  # [i, r]: r > i
    rows = beta[..., None, :].expand(*beta.shape, L).masked_fill(later, 1.0)  # row i: beta_r, r <= i
    m, Pm = _end_products(rows)  # m[i] = prod_{r<=i} beta_r
    Pm = Pm.masked_fill(later, 0.0)
    w = A * c  # the weight of M_i in W_{L-1}
    G = (w[..., None, :] @ Pm)[..., 0, :] * lr
    return b, (w * m).sum(-1), G, m[..., -1], Pm[..., -1, :] * lr
''')
    else:
        em.block('''
def _end_coefficients(a, c, lr):
    """Coefficients of a unit's end state, W_{L-1} = b W_0 - sum_j g_j u_j: per-token factors
    [..., L] in; b [...] and g [..., L] with g_j = (prod_{j<r<L} a_r) c_j lr_j out."""
    b, after = _end_products(a)
    return b, after * c * lr
''')


def _render_op(em: Emitter, rules: LevelRules, plan: KernelPlan, coeffs, momentum: bool,
               frozen_at) -> None:
    lv = rules.level
    heads = {ir.gate_symbol(g): ident(g, "gh") for g in lv.gates}
    bias_gates = ir.gate_names(rules.bias.grad)
    # the reference op's signature, with its nesting keywords (restart / period states) if any
    signature = op_signature(lv).replace("initial_state=None", nesting_keywords(lv) + "initial_state=None", 1)
    with em.indent(signature):
        render_op_inputs(em, rules, coeffs)
        render_scan_coefficients(em, lv, coeffs, heads)
        em.line("committed = params  # what reads see: the state at the last period boundary")
        em.line("outputs = []")
        if lv.initialises:
            em.line("exports = []  # the state entering each period boundary after the first token")
        with em.indent("for start in range(0, T, CHUNK):"):
            render_restart(em, lv, "start", "params")
            _render_unit(em, rules, coeffs, momentum, frozen_at, int(plan.chunk), bias_gates)
        em.line("o = torch.cat(outputs, dim=2).transpose(1, 2)  # [B, T, H, V]")
        render_return(em, lv)


def _render_unit(em: Emitter, rules: LevelRules, coeffs, momentum: bool, frozen_at, unit: int,
                 bias_gates) -> None:
    lv = rules.level
    em.line(f"{where(lv.span)} level {comment(lv.name)}: one unit of L <= CHUNK tokens, within one period")
    em.line("end = min(start + CHUNK, T)")
    em.line("q_c, k_c, v_c = qh[:, :, start:end], kh[:, :, start:end], vh[:, :, start:end]  # [B, H, L, D]")
    at, note = "params", "at the unit's start (its gradient chunk)"
    if frozen_at is None:
        note = "(the same at every state)"
    elif frozen_at > unit:
        at, note = "at", "at the gradient chunk's start"
        with em.indent("if start % GRAD_CHUNK == 0:"):
            em.line("at = params  # the state entering this gradient chunk")
    bias_args = "".join(f", {ident(g, 'go')}[:, :, start:end]" for g in bias_gates)
    own = lv.target == "self" and lv.value == lv.name
    if own:
        em.line("outputs.append(memory_forward(committed, q_c))  # read before write: the committed state")
        em.line("v_c = outputs[-1]  # the stream its target reads: the level's own read-out")
    target = self_target(lv, "v_c", at)
    if target != "v_c":
        em.line(f"target = {target}  # self-generated targets M(v_j) at the gradient state")
    em.line(f"y_k, pullback = vjp(lambda *p: memory_forward(p, k_c), *{at})  # M(k_j) {note}")
    em.line(f"dy = output_grad(y_k, {'target' if target != 'v_c' else 'v_c'}{bias_args})  "
            f"{where((lv.bias.inner or lv.bias).span) or '#'} dℓ/dy, [B, H, L, V]")
    if lv.read == "before" and not own:
        em.line("outputs.append(memory_forward(committed, q_c))  # read before write: the committed state")
    elif lv.read == "after":
        em.line("seen = end - start - 1 if end % PERIOD == 0 else end - start  # tokens before the commit")
        em.line("outputs.append(memory_forward(committed, q_c[:, :, :seen]))  # read after write")
    chunked = ", ".join(f"{role}[:, :, start:end]" for role in coeffs)
    em.line(f"{where(lv.algorithm.span) or '#'} {comment(lv.algorithm.describe())}: the unit's steps in closed form")
    if momentum:
        em.line(f"b, f, G, m, H = _end_coefficients({chunked})")
        em.line("u_G = pullback(G[..., None] * dy)  # sum_j G_j u_j, per state tensor")
        em.line("u_H = pullback(H[..., None] * dy)  # sum_j H_j u_j")
        em.line("params = tuple(_times(b, W) + _times(f, M) - g for W, M, g in zip(params, buffers, u_G))")
        em.line("buffers = tuple(_times(m, M) - h for M, h in zip(buffers, u_H))")
    else:
        em.line(f"b, g = _end_coefficients({chunked})")
        em.line("steps = pullback(g[..., None] * dy)  # sum_j g_j u_j, per state tensor")
        em.line("params = tuple(_times(b, W) - s for W, s in zip(params, steps))")
    with em.indent("if end % PERIOD == 0:"):
        em.line("committed = params  # commit: reads see the update from here on")
        if lv.read == "after":
            em.line("outputs.append(memory_forward(committed, q_c[:, :, seen:]))  # the boundary token")
