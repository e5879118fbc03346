"""Render one level of the *mapped* family as a chunk-parallel PyTorch module (MATH.md §3.6 family 4,
§3.7, §3.8): every gradient of a chunk is taken at the chunk-start weights (`gradient chunk_start(C)`),
but what turns the gradients into weights is not one affine scan of W:

- accumulators (lq, ftrl): A_t = a_t A_{t-1} + s_t, read through W_t = psi(A_t) (Moneta);
- KL (softmax) retention: W_t = mass softmax(a_t log W_{t-1} + c_t s_t) (Memora);
- muon: s_t = -lr_t NS(M_t), Newton-Schulz on every momentum M_t (ATLAS);
- omega windows: g_t = sum of gamma_i u_i over the last WINDOW tokens (ATLAS);
- elastic's soft threshold and dgd's rank-1 map through each layer's input (Hope).

What the chunk form batches is what needs the memory: one forward and one vjp at the chunk-start
weights give every token's gradient as per-layer factors u_j = a_j ⊗ δ_j (and dgd's layer inputs
a_j); windows that reach into the previous chunk re-evaluate its tokens there, as the reference
loop does. The maps above are then applied token by token with the reference module's own
functions (`accumulate`, `psi`, `retain`, `newton_schulz`), on per-token tensors, and each token is
read at its weights. Those maps touch every weight of every token whatever the form (a q-norm, a
softmax, Newton-Schulz, a threshold), so batching them over tokens only streams [B, H, L, ...]
copies through memory: on a CPU that measured slower than the reference loop, while per-token
tensors stay in cache. Running them token by token also repeats the reference's rounding, which
these rules amplify (muon's normalisation, the q-norm's inverse scale).

Training would keep every token's weights for the backward pass (O(T) states); each chunk's token
loop runs under activation checkpointing instead, so its tokens are mapped again in the backward
pass (one more forward of the loop) and what is kept is the state entering each chunk and the
chunk's gradient factors.

dgd with plain gradient steps is the exception: each layer's weights follow a gated delta rule with
keys and values known at W_0, solved in closed form per chunk (`torch_chunk_mapped_dgd`), which
never forms a per-token weight copy.
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
from .emitter import Emitter, comment, ident, where
from .torch_chunk_common import op_signature, render_layer_grads, render_op_inputs, render_product, show
from .torch_reference import self_target


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """Source of `level_<name>_chunk.py` for a level whose plan is the mapped family."""
    lv = rules.level
    if plan.family != "mapped" or plan.chunk < 1:
        raise ValueError(f"level {lv.name!r}: not a mapped-family plan with a chunk size "
                         f"({plan.family}, chunk {plan.chunk})")
    if lv.period != 1 or lv.grad_at != "chunk" or lv.memory.kind not in ("matrix", "mlp"):
        raise ValueError(f"level {lv.name!r}: the mapped chunked form needs period 1, gradients at "
                         "the chunk start and a matrix or MLP memory")
    em = Emitter()
    _header(em, rules, plan, model, file)
    em.line("import torch")
    if not dgd.applies(rules):
        em.line("import torch.utils.checkpoint")
    em.line()
    em.line("from nlc.runtime.vjp import tapped_vjp")
    em.line()
    imports = ["N_PARAMS", "_pack", "default_state", "memory_forward", "output_grad"]
    if not dgd.applies(rules):
        imports += ["accumulate", "psi"] if rules.accumulator else ["retain"]
    if lv.algorithm.kind == "muon":
        imports.append("newton_schulz")
    em.line(f"from .{ident(lv.name, 'level')} import ({', '.join(imports[:5])}{',' if imports[5:] else ')'}")
    if imports[5:]:
        em.line(f"    {', '.join(imports[5:])})")
    em.line()
    em.line(f"CHUNK = {int(plan.chunk)}")
    em.line(f"LAYERS = {tuple(torch_arch.layers(lv))!r}  # per layer: index of its weight, of its bias (or None)")
    if lv.bias.kind == "omega":
        em.line(f"WINDOW = {int(lv.bias.args['window'])}")
    em.gap()
    if dgd.applies(rules):
        dgd.render_helpers(em)
    else:
        _render_helpers(em)
    em.gap()
    render_product(em)
    em.gap()
    render_layer_grads(em)
    em.gap()
    _render_op(em, rules)
    return em.text()


def _map_gates(rules: LevelRules) -> list[str]:
    """The gate arguments of the reference's `retain`, or of `accumulate` and `psi`, in its order."""
    ret = rules.retention
    if rules.accumulator:
        decay = ret.decay if ret.decay is not None else rules.level.retention.args.get("rate", 1)
        return ir.gate_names(decay)
    gates = set(ir.gate_names(rules.retention_new()))
    if ret.form == "threshold":
        gates |= set(ir.gate_names(rules.threshold()))
    if ret.form == "dgd":
        gates |= set(ir.gate_names(rules.lr))
    return sorted(gates)


def _header(em: Emitter, rules: LevelRules, plan: KernelPlan, model: str, file: str) -> None:
    lv = rules.level
    alg = lv.algorithm.kind
    em.line(f'"""Level {comment(lv.name)!r} of model {comment(model)!r}: chunk-parallel form, mapped '
            "family (MATH.md §3.6-3.8).")
    em.line()
    em.line(f"Generated by nlc {nlc.__version__} from {comment(file)}; do not edit. It computes what the")
    em.line(f"reference op in {ident(lv.name, 'level')}.py computes, up to round-off, a chunk of "
            f"{int(plan.chunk)} tokens at a time.")
    for key, value in lv.describe().items():
        em.line(f"  {key:<10} {comment(value)}")
    em.line(f"  step       {ALGORITHM_TEXT[alg]}")
    em.line(f"  map        {comment(rules.retention.objective)}")
    em.line()
    em.line("Per chunk (tokens t = 0..L-1, W_0 the weights entering it), one forward and one vjp at W_0")
    em.line("give every token's gradient, factored per layer (LAYERS): u_j = a_j ⊗ δ_j for a weight, δ_j")
    em.line("for a bias, with a_j the layer's input and δ_j ∂ℓ_j/∂(its output).")
    if lv.target == "self":
        em.line(f"The target is the memory's own read-out M(W_0; {comment(lv.value)}_j) (`value self(...)`)"
                + (", without outer gradient." if lv.stop_target else "."))
    if lv.bias.kind == "omega":
        em.line(f"The omega window sums g_t = sum_{{t - WINDOW < i <= t}} gamma_i u_i, gamma_i = "
                f"{show(lv.bias.args['gamma'])}, reach into the")
        em.line("previous chunk (its tokens re-evaluated at W_0), never before the call's first token.")
    if dgd.applies(rules):
        em.line("Then per layer, with decay_t = " + show(dgd.coefficients(rules)["decay"])
                + f", lr_t = {show(rules.lr)}, w_t = -lr_t δ_t (MATH.md §3.3, §3.6):")
        em.line("  W_t = (decay_t I - lr_t a_t a_tᵀ) W_{t-1} + a_t w_tᵀ = decay_t W_{t-1} + a_t r_tᵀ,")
        em.line("  the pseudo-values r of the whole chunk from one unit lower-triangular solve, and the")
        em.line(f"  read o_t = M(.; q_t) at W_{{t{'' if lv.read == 'after' else '-1'}}} as matmuls (no per-token weight copy).")
        em.line("Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; scalar gates [B, T, H]; the state is the")
        em.line(f"reference's: {comment(', '.join(_state_names(rules)))}.")
        em.line('"""')
        return
    em.line("Then token by token, with the reference's own functions on per-token tensors:")
    em.line({"gd": f"  s_t = -lr_t g_t,   lr_t = {show(rules.lr)}",
             "ftrl": f"  s_t = -lr_t g_t,   lr_t = {show(rules.lr)}",
             "momentum": "  M_t = beta_t M_{t-1} - lr_t g_t,   s_t = M_t",
             "muon": "  M_t = beta_t M_{t-1} + g_t,   s_t = -lr_t NS(M_t)"}[alg])
    if rules.accumulator:
        em.line("  A_t = accumulate(A_{t-1}, s_t),   W_t = psi(A_t)")
    elif lv.retention.kind == "dgd":
        em.line("  W_t = retain(W_{t-1}, s_t, a_t): the dgd map through each layer's input a_t at W_0")
    else:
        em.line("  W_t = retain(W_{t-1}, s_t)")
    read = "W_t (read after write)" if lv.read == "after" else "W_{t-1} (read before write)"
    em.line(f"  o_t = M(.; q_t) at {read}")
    em.line("With autograd on, each chunk's token loop is checkpointed (`_recomputed`): it runs again in")
    em.line("the backward pass, and only the state entering each chunk is kept.")
    em.line("Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; scalar gates [B, T, H]; the state is the")
    em.line(f"reference's: {comment(', '.join(_state_names(rules)))}.")
    em.line('"""')


def _state_names(rules: LevelRules) -> list[str]:
    lv = rules.level
    names = [n for n, _, _ in torch_arch.param_layout(lv)]
    buffers = [f"M_{n}" for n in names] if torch_arch.has_buffers(lv) else []
    return [f"A_{n}" for n in names] + buffers if rules.accumulator else names + buffers


def _render_helpers(em: Emitter) -> None:
    em.block('''
def _shaped(g, like):
    """A per-head coefficient [B, H] shaped to broadcast against one state tensor [B, H, ...]."""
    return g.reshape(g.shape + (1,) * (like.dim() - g.dim()))


def _by_token(x):
    """[B, H, N, ...] -> N tensors [B, H, ...], split once (indexing x[:, :, t] for every token
    instead would fill a zero tensor of the whole chunk per token in the backward)."""
    return x.unbind(2)


def _recomputed(tokens, *state):
    """tokens(*state) -> (o [B, H, L, V], *next state): a chunk's token loop. With autograd on,
    under activation checkpointing: its per-token weights are made again in the backward pass
    instead of kept, so training keeps the state entering each chunk and one chunk's tokens at a
    time, not every token's weights (O(T / CHUNK) states, not O(T))."""
    if not torch.is_grad_enabled():
        return tokens(*state)
    return torch.utils.checkpoint.checkpoint(tokens, *state, use_reentrant=False)


def _grads(inputs, deltas):
    """The gradient at the chunk-start weights summed over a few tokens (one, or an omega window),
    formed as the reference's vjp forms it. inputs, deltas: per layer, lists over those tokens of
    a [B, H, I] and δ [B, H, O] -> per state tensor a^T δ [B, H, I, O] (a weight) or sum δ [B, H, O]
    (a bias)."""
    grads = [None] * N_PARAMS
    for (w, c), a, d in zip(LAYERS, inputs, deltas):
        a, d = torch.stack(a, dim=2), torch.stack(d, dim=2)  # [B, H, N, I], [B, H, N, O]
        grads[w] = a.transpose(-1, -2) @ d
        if c is not None:
            grads[c] = d.sum(-2)
    return tuple(grads)
''')


def _coefficient(expr, heads) -> str:
    expr = sympy.sympify(expr)
    text = to_torch(expr, heads)
    return text if expr.free_symbols else f"torch.full_like(ones, {text})"


def _render_op(em: Emitter, rules: LevelRules) -> None:
    lv = rules.level
    alg = lv.algorithm.kind
    omega = lv.bias.kind == "omega"
    heads = {ir.gate_symbol(g): ident(g, "gh") for g in lv.gates}
    bias_gates = ir.gate_names(rules.bias.grad)
    coeffs = dgd.coefficients(rules) if dgd.applies(rules) else {"lr": rules.lr}
    if alg in ("momentum", "muon"):
        coeffs["beta"] = lv.algorithm.args["beta"]
    if omega:
        coeffs["gamma"] = lv.bias.args["gamma"]
    map_gates, psi_gates = _map_gates(rules), rules.psi_gates()
    with em.indent(op_signature(lv)):
        render_op_inputs(em, rules, coeffs, (*map_gates, *psi_gates))
        em.line("# per-token coefficients of the whole sequence, [B, H, T]")
        spans = {"lr": lv.algorithm.span, "beta": lv.algorithm.span, "gamma": lv.bias.span,
                 "decay": lv.retention.span}
        what = {"lr": "lr_t", "beta": "beta_t, on the momentum", "gamma": "gamma_i, the window's weight of token i",
                "decay": "decay_t, on the old weights"}
        for role, expr in coeffs.items():
            em.line(f"{role} = {_coefficient(expr, heads)}  {where(spans[role]) or '#'} {what[role]}")
        if rules.accumulator and not psi_gates:
            em.line("weights = tuple(psi(a) for a in params)  # W = psi(A)")
        elif rules.accumulator:
            em.line("weights = params  # as the reference: psi needs a token's gates, the first read uses A")
        else:
            em.line("weights = params")
        em.line("outputs = []")
        with em.indent("for start in range(0, T, CHUNK):"):
            em.line(f"{where(lv.span)} level {comment(lv.name)}, one chunk of L <= CHUNK tokens")
            em.line("end = min(start + CHUNK, T)")
            if dgd.applies(rules):
                dgd.render_chunk(em, rules, "".join(f", {ident(g, 'go')}[:, :, start:end]" for g in bias_gates))
            else:
                _render_chunk(em, rules, coeffs, map_gates, psi_gates)
        em.line("o = torch.cat(outputs, dim=2).transpose(1, 2)  # [B, T, H, V]")
        em.line("return o, (_pack(params + buffers) if output_final_state else None)")


def _render_chunk(em: Emitter, rules: LevelRules, coeffs, map_gates, psi_gates) -> None:
    """One chunk: every token's gradient pieces at W_0 (and its window's), then the token loop."""
    lv = rules.level
    omega = lv.bias.kind == "omega"
    if omega:
        em.line("lo = max(start - (WINDOW - 1), 0)  # windows reach back into the previous chunk")
    else:
        em.line("lo = start")
    args = "".join(f", {ident(g, 'go')}[:, :, lo:end]" for g in ir.gate_names(rules.bias.grad))
    em.line(f"inputs, deltas = _layer_grads(weights, kh[:, :, lo:end], {self_target(lv, 'vh[:, :, lo:end]', 'weights')}{args})  "
            f"{where((lv.bias.inner or lv.bias).span) or '#'} at W_0")
    if omega:
        em.line("deltas = [gamma[:, :, lo:end, None] * d for d in deltas]  # gamma_i δ_i, as the reference scales dy")
    em.line("inputs, deltas = [_by_token(a) for a in inputs], [_by_token(d) for d in deltas]  # per layer, per token")
    with em.indent("def tokens(params, buffers, weights, start=start, end=end, lo=lo, inputs=inputs, deltas=deltas):"):
        em.line("outputs = []")
        _render_token_loop(em, rules, coeffs, map_gates, psi_gates)
        em.line("return torch.cat(outputs, dim=2), params, buffers, weights")
    em.line("o_chunk, params, buffers, weights = _recomputed(tokens, params, buffers, weights)")
    em.line("outputs.append(o_chunk)  # [B, H, L, V]")


def _render_token_loop(em: Emitter, rules: LevelRules, coeffs, map_gates, psi_gates) -> None:
    """The chunk's tokens one by one: the optimizer step, the retention map and the read."""
    lv = rules.level
    alg = lv.algorithm.kind
    pairs = [("q_t", "qh[:, :, start:end]")]
    pairs += [(f"{role}_t", f"{role}[:, :, start:end]") for role in coeffs if role != "gamma"]
    pairs += [(ident(g, "gt"), f"{ident(g, 'gh')}[:, :, start:end]")
              for g in sorted(set(map_gates) | set(psi_gates))]
    names = ", ".join(n for n, _ in pairs)
    sources = [f"_by_token({s})" for _, s in pairs]
    head = f"for t, ({names}) in enumerate(zip("
    for i, source in enumerate(sources):
        end = "," if i < len(sources) - 1 else ")):  # token by token"
        em.line((head if i == 0 else " " * len(head)) + source + end)
    with em.indent():
        em.line("i = start - lo + t  # the token's place in inputs and deltas")
        if lv.bias.kind == "omega":
            em.line("window = slice(max(i - (WINDOW - 1), 0), i + 1)  # the last WINDOW tokens up to t")
            em.line(f"g = _grads([a[window] for a in inputs], [d[window] for d in deltas])  "
                    f"{where(lv.bias.span) or '#'} g_t")
        else:
            em.line("g = _grads([a[i:i + 1] for a in inputs], [d[i:i + 1] for d in deltas])  # u_t at W_0")
        if lv.read == "before":
            em.line("outputs.append(memory_forward(weights, q_t[:, :, None]))  # read before write")
        span = where(lv.algorithm.span) or "#"
        if alg in ("gd", "ftrl"):
            em.line(f"steps = tuple(-_shaped(lr_t, x) * x for x in g)  {span}")
        elif alg == "momentum":
            em.line("buffers = tuple(_shaped(beta_t, m) * m - _shaped(lr_t, x) * x for m, x in zip(buffers, g))"
                    f"  {span}")
            em.line("steps = buffers")
        else:
            em.line(f"buffers = tuple(_shaped(beta_t, m) * m + x for m, x in zip(buffers, g))  {span}")
            em.line(f"steps = tuple(-_shaped(lr_t, m) * (newton_schulz(m, {int(lv.algorithm.args['steps'])}) "
                    "if m.dim() == 4 else m) for m in buffers)")
        gates = "".join(f", _shaped({ident(g, 'gt')}, w)" for g in map_gates)
        span = where(lv.retention.span) or "#"
        if rules.accumulator:
            em.line(f"params = tuple(accumulate(w, s{gates}) for w, s in zip(params, steps))  {span}")
            psi_args = "".join(f", _shaped({ident(g, 'gt')}, a)" for g in psi_gates)
            em.line(f"weights = tuple(psi(a{psi_args}) for a in params)")
        elif lv.retention.kind == "dgd":
            em.line("x_in = [None] * N_PARAMS  # each weight's layer input a_t at W_0 (dgd)")
            with em.indent("for (w, _), a in zip(LAYERS, inputs):"):
                em.line("x_in[w] = a[i]")
            em.line(f"params = weights = tuple(retain(w, s, x{gates}) for w, s, x in zip(params, steps, x_in))"
                    f"  {span}")
        else:
            em.line(f"params = weights = tuple(retain(w, s{gates}) for w, s in zip(params, steps))  {span}")
        if lv.read == "after":
            em.line("outputs.append(memory_forward(weights, q_t[:, :, None]))  # read after write")
