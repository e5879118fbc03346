"""Render one level of the *sequential* family: the exact per-token form of a level whose every
gradient is taken at the state the previous token left (`gradient current`, or `chunk_start(1)`),
updated every token (MATH.md §2, §4.2's fastest CMS level). No chunk-parallel form computes it
exactly (token t's gradient needs W_{t-1}), so this one runs the tokens in order like the reference
loop, but does per token only what the rule needs:

- one memory forward per token at W_{t-1} serves both the gradient and a read before the write; a
  query stored where the key is (the same tensor, `query = key`) shares the key's rows, any other
  query rides along as a second row of the same products;
- each layer's gradient is an outer product a ⊗ δ of its input and its output's gradient (one
  backward sweep over the layer chain at the token's state), and the update
  W ← decay·W − step·a ⊗ δ is one in-place rank-1 product per weight (baddbmm), no temporaries;
- a hand-written backward (`_Sequential`): the forward keeps each token's layer inputs,
  pre-activations and deltas (O(T·d)) and a copy of the state every CHUNK tokens; the backward
  replays each CHUNK-token segment from its copy to get the states W_{t-1} (O(CHUNK·d²)) and runs the
  exact adjoint of one token at a time in reverse: the products with Ŵ (the cotangent of W_t) and
  W_{t-1}, then Ŵ ← decay·Ŵ + a rank-r product, in place.

The family takes a matrix memory or a plain MLP chain (any depth, expand, activation gelu | silu |
relu | tanh, layer biases, a residual; not gated, no layer norm), any bias but omega (the bias's own
derivative comes from autograd over one token's [V] vectors; l2's is written out), gd or momentum
(Titans' per-token rule: the rank-1 product goes into each weight's momentum M ← beta·M − lr·a ⊗ δ,
then W ← a·W + c·M, and the backward carries M's cotangent beside W's) under an elementwise affine
retention w = a·w0 + c·s with per-head scalar gates (none, decay, l2) or a soft threshold of one
(elastic net: W ← sign(w)·max(|w| − τ, 0); the backward passes W's cotangent where W ≠ 0, which is
where |w| > τ), read before or after the write, and a nested level (`init from`, gd) that restarts from its source's state every RESTART
tokens (the backward's replay segments start at restarts). Everything else stays on the reference
loop (nlc/plan.py says why).
"""
from __future__ import annotations

import math

import sympy

import nlc
from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.printer import to_torch
from nlc.derive.rules import ALGORITHM_TEXT, LevelRules
from nlc.plan import KernelPlan, sequential_unsupported

from . import torch_arch
from .emitter import Emitter, comment, ident, where
from .torch_chunk_common import op_signature, render_op_inputs, show
from .torch_reference import nesting_keywords

# act'(z) and act''(z) of each activation, as generated source over a pre-activation z
_SLOPES = {
    "gelu": ("pdf = torch.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))\n"
             "return 0.5 * (1 + torch.erf(z * (1 / math.sqrt(2)))) + z * pdf, pdf * (2 - z * z)"),
    "silu": ("s = torch.sigmoid(z)\n"
             "return s * (1 + z * (1 - s)), s * (1 - s) * (2 + z * (1 - 2 * s))"),
    "tanh": ("t = torch.tanh(z)\n"
             "return 1 - t * t, -2 * t * (1 - t * t)"),
    "relu": "return (z > 0).to(z.dtype), torch.zeros_like(z)",
}


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """Source of `level_<name>_chunk.py` for a level whose plan is the sequential family."""
    lv = rules.level
    if plan.family != "sequential":
        raise ValueError(f"level {lv.name!r}: not a sequential-family plan ({plan.family})")
    why = sequential_unsupported(rules, (plan.decay, plan.scale))
    if why is None and lv.memory.kind == "mlp" and lv.memory.depth > 1 and lv.memory.act not in _SLOPES:
        why = f"activation {lv.memory.act} has no written derivatives"
    if why is not None:
        raise NotImplementedError(f"level {lv.name!r}: {why}")
    coeffs = coefficients(rules, plan)
    momentum, threshold = lv.algorithm.kind == "momentum", "threshold" in coeffs
    l2 = rules.bias.grad == S.e
    em = Emitter()
    _header(em, rules, plan, coeffs, model, file)
    em.line("import math")
    em.line()
    em.line("import torch")
    em.line()
    em.line("from nlc.runtime.amp import autocast_backward, autocast_forward")
    em.line()
    em.line(f"from .{ident(lv.name, 'level')} import N_PARAMS, _pack, default_state, memory_forward, output_grad")
    em.line()
    em.line(f"CHUNK = {copies_every(rules, plan)}  # tokens between the copies of the state kept for the "
            "backward pass" + ("" if lv.init_from is None else " (divides RESTART)"))
    if lv.init_from is not None:
        em.line(f"RESTART = {lv.restart}  # restart from level {comment(lv.init_from)}'s state every RESTART tokens")
    em.line(f"LAYERS = {tuple(torch_arch.layers(lv))!r}  # per layer: index of its weight, of its bias (or None)")
    em.line(f"RESIDUAL = {bool(lv.memory.kind == 'mlp' and lv.memory.residual)}  # y = x + chain(x)")
    em.line(f"READ_AFTER = {lv.read == 'after'}  # the read sees W_t (else W_{{t-1}}, before the write)")
    em.line(f"COEFFS = {tuple(coeffs)!r}  # the per-token coefficients, in order (numbers or [B, H, T])")
    em.line("N_COEFFS = len(COEFFS)")
    em.gap()
    _render_slopes(em, lv.memory)
    em.gap()
    _render_helpers(em)
    em.gap()
    _render_update(em, tuple(coeffs), momentum)
    em.gap()
    _render_bias_vjp(em, l2)
    em.gap()
    _render_function(em, lv.init_from is not None, momentum, threshold)
    em.gap()
    _render_op(em, rules, coeffs)
    return em.text()


def coefficients(rules: LevelRules, plan: KernelPlan) -> dict:
    """role -> sympy expression of the per-token coefficients: gd's decay a_t and step eta_t = c_t lr_t;
    momentum's decay a_t, lr_t (on the gradient, into M), scale c_t (on M, into W) and beta_t (on M);
    then a soft threshold's tau_t (elastic net)."""
    decay, scale = sympy.sympify(plan.decay), sympy.sympify(plan.scale)
    if rules.level.algorithm.kind == "momentum":
        out = {"decay": decay, "lr": rules.lr, "scale": scale,
               "beta": sympy.sympify(rules.level.algorithm.args["beta"])}
    else:
        out = {"decay": decay, "step": sympy.simplify(scale * rules.lr)}
    if rules.retention.form == "threshold":  # elastic net: W = soft(a·W + c·s, threshold)
        out["threshold"] = sympy.simplify(rules.threshold())
    return out


def copies_every(rules: LevelRules, plan: KernelPlan) -> int:
    """Tokens between the state copies the backward replays from: the plan's chunk, or for a nested
    level a divisor of its restart period, so that every restart starts a replayed segment."""
    lv = rules.level
    return int(plan.chunk) if lv.init_from is None else math.gcd(int(plan.chunk), lv.restart)


def _header(em: Emitter, rules: LevelRules, plan: KernelPlan, coeffs: dict, model: str, file: str) -> None:
    lv, momentum = rules.level, "beta" in coeffs
    em.line(f'"""Level {comment(lv.name)!r} of model {comment(model)!r}: exact per-token form, sequential '
            "family.")
    em.line()
    em.line(f"Generated by nlc {nlc.__version__} from {comment(file)}; do not edit. It computes what the")
    em.line(f"reference op in {ident(lv.name, 'level')}.py computes, up to round-off, one token at a time.")
    for key, value in lv.describe().items():
        em.line(f"  {key:<10} {comment(value)}")
    em.line(f"  step       {ALGORITHM_TEXT[lv.algorithm.kind]}")
    em.line(f"  a_t = {show(coeffs['decay'])}   (retention: factor on the old state)")
    if momentum:
        em.line(f"  lr_t = {show(coeffs['lr'])}   (the step on the gradient, into the momentum)")
        em.line(f"  c_t = {show(coeffs['scale'])}   (retention: factor on the step)")
        em.line(f"  beta_t = {show(coeffs['beta'])}   (the momentum's decay)")
    else:
        em.line(f"  eta_t = c_t lr_t = {show(coeffs['step'])}   (the step on the gradient)")
    if "threshold" in coeffs:
        em.line(f"  tau_t = {show(coeffs['threshold'])}   (retention: the soft threshold W = sign(w) max(|w| - tau_t, 0))")
    em.line()
    em.line("Token t, W = W_{t-1} (every layer of LAYERS: input a_i, pre-activation z_i, product a_i W_i + b_i):")
    em.line("  y = M(W; k_t) (one forward; a read before the write is a row of it),  dy = output_grad(y, v_t)")
    em.line("  δ_i = dℓ/dz_i by one sweep back over the layers at W,   u_i = a_i ⊗ δ_i (bias: δ_i)")
    if momentum:
        em.line("  M_i ← beta_t M_i − lr_t a_i ⊗ δ_i,   W_i ← a_t W_i + c_t M_i   in place (baddbmm)")
    else:
        em.line("  W_i ← a_t W_i − eta_t a_i ⊗ δ_i   in place (baddbmm)")
    em.line("Backward (_Sequential): the exact adjoint of each token in reverse, W_{t-1} replayed from copies")
    em.line(f"of the state every CHUNK = {copies_every(rules, plan)} tokens, O(T·d) saved vectors and O(CHUNK) states.")
    if lv.init_from is not None:
        em.line(f"Nested: at every token j·RESTART (j >= 1) the state restarts from level {comment(lv.init_from)}'s")
        em.line("(`restart_states`, entry j - 1); in the backward pass the cotangent of the state at a restart")
        em.line("goes to that entry, none to the state before it.")
    em.line("Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; scalar gates [B, T, H]; the state is the")
    em.line(f"reference's: {comment(', '.join(n for n, _, _ in torch_arch.param_layout(lv)))}"
            + (", then their momenta." if momentum else "."))
    em.line('"""')


def _render_slopes(em: Emitter, memory: ir.Memory) -> None:
    deep = memory.kind == "mlp" and memory.depth > 1
    with em.indent("def _slopes(z):"):
        if deep:
            em.line(f'"""act\'(z), act\'\'(z) of {memory.act} at pre-activations z [B, H, N, D]."""')
            em.block(_SLOPES[memory.act])
        else:
            em.line('"""A single layer has no activation: never called."""')
            em.line("raise AssertionError('no activation between layers')")


def _render_helpers(em: Emitter) -> None:
    em.block('''
def _aliased(a, b):
    """Whether two tensors are views of the same memory with the same layout (the same values)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _at(coeffs, t):
    """Token t's coefficients: numbers, or [B, H, 1, 1] from [B, H, T] tensors."""
    return tuple(c[:, :, t, None, None] if torch.is_tensor(c) else c for c in coeffs)


def _fit(c, x):
    """A coefficient (a number or [B, H, 1, 1]) shaped to broadcast against a state tensor x [B, H, ...]."""
    return c.reshape(c.shape[:2] + (1,) * (x.dim() - 2)) if torch.is_tensor(c) else c


def _inner(xs, ys):
    """Σ over tensors of <x, y> per (batch, head): [B, H]."""
    return sum((x * y).flatten(2).sum(-1) for x, y in zip(xs, ys))


def _forward(params, x):
    """memory_forward at fixed weights, x [B, H, N, K] -> y [B, H, N, V], with every layer's input
    a_i [B, H, N, I] and, for the layers before the last, act'(z_i) and act''(z_i) [B, H, N, O] at its
    product z_i = a_i W_i + b_i (the pre-activation)."""
    inputs, slopes = [], []

    def layer(i, h, W, b):
        inputs.append(h)
        z = h @ W if b is None else h @ W + b[:, :, None, :]
        if i < len(LAYERS) - 1:
            slopes.append(_slopes(z))
        return z
    return memory_forward(params, x, layer=layer), inputs, slopes


def _deltas(params, slopes, dy):
    """δ_i = ∂<dy, M(x)>/∂z_i of each layer (one sweep back at fixed weights) and back_i = δ_i W_iᵀ,
    the gradient at layer i's input (i >= 1; back_0 is not needed). slopes: act'(z_i) [B, H, 1, O] of
    the layers before the last; dy [B, H, 1, V]."""
    deltas, backs = [None] * len(LAYERS), [None] * len(LAYERS)
    d = dy
    for i in reversed(range(len(LAYERS))):
        deltas[i] = d
        if i > 0:
            backs[i] = d @ params[LAYERS[i][0]].transpose(-1, -2)
            d = backs[i] * slopes[i - 1]
    return deltas, backs


def _add_outer(p, out, left, right, scale, alpha):
    """out ← scale·p + alpha·Σ_n left_nᵀ right_n (a layer's weight, left [B, H, N, I], right
    [B, H, N, O]) or + alpha·Σ_n right_n (its bias, left None); out may be p (in place), else a
    buffer of p's shape, and both ways do the same arithmetic. scale: a number or [B, H, 1, 1]. The
    product is in p's dtype (autocast leaves in-place and out= products alone, and may have made the
    factors bfloat16)."""
    if left is None:
        torch.mul(p, scale[..., 0] if torch.is_tensor(scale) else scale, out=out)
        out.add_(right.sum(2), alpha=alpha)
        return
    if torch.is_tensor(scale):
        torch.mul(p, scale, out=out)
        p, scale = out, 1.0
    factors = left.flatten(0, 1).transpose(1, 2).to(p.dtype), right.flatten(0, 1).to(p.dtype)
    if out is p:
        p.flatten(0, 1).baddbmm_(*factors, beta=scale, alpha=alpha)
    else:
        torch.baddbmm(p.flatten(0, 1), *factors, beta=scale, alpha=alpha, out=out.flatten(0, 1))

''')


_UPDATE = '''
def _update(state, inputs, deltas, coeffs, out):
    """{doc}
    coeffs ({roles}): numbers or [B, H, 1, 1]; inputs, deltas per layer [B, H, 1, I|O]."""
    {roles} = coeffs
    for (w, b), a, d in zip(LAYERS, inputs, deltas):
        if torch.is_tensor({step}):
            d, alpha = d * {step}, -1.0
        else:
            alpha = -{step}
        _add_outer(state[{at}w], out[{at}w], a, d, {keep}, alpha)
        if b is not None:
            _add_outer(state[{at}b], out[{at}b], None, d, {keep}, alpha)
'''
# gd: the rank-1 step into the weights; momentum: into their momenta, then the weights from them
_GD = dict(step="step", at="", keep="decay",
           doc="One token's gd step W_i ← decay·W_i − step·a_i ⊗ δ_i, b_i ← decay·b_i − step·δ_i into `out`\n"
               "    (state itself: in place){then}.")
_MOMENTUM = dict(step="lr", at="N_PARAMS + ", keep="beta",
                 doc="One token's momentum step into `out` (state itself: in place): M_i ← beta·M_i − lr·a_i ⊗ δ_i\n"
                     "    (a bias's momentum: − lr·δ_i), then W_i ← decay·W_i + scale·M_i{then}. The state is the N_PARAMS\n"
                     "    weights, then their momenta.")
_WEIGHTS_FROM_MOMENTA = '''    for w, m, o in zip(state[:N_PARAMS], out[N_PARAMS:], out):
        torch.mul(w, _fit(decay, w), out=o)
        o.add_(m * _fit(scale, m))
'''

_SOFT_THRESHOLD = '''
def _soft_threshold(ws, threshold):
    """Each weight w ← sign(w)·max(|w| − threshold, 0), in place; threshold a number or [B, H, 1, 1]."""
    for w in ws:
        w.copy_(torch.sign(w) * (w.abs() - _fit(threshold, w)).clamp_min(0))
'''


def _render_update(em: Emitter, roles: tuple, momentum: bool) -> None:
    """`_update`: one token's step into a state (gd or momentum), then a soft threshold's (elastic net)."""
    threshold = "threshold" in roles
    if threshold:
        em.block(_SOFT_THRESHOLD)
        em.gap()
    fields = _MOMENTUM if momentum else _GD
    doc = fields["doc"].format(then=", then the soft threshold" if threshold else "")
    text = _UPDATE.format(**{**fields, "doc": doc, "roles": ", ".join(roles)})
    if momentum:
        text += _WEIGHTS_FROM_MOMENTA
    if threshold:
        text += "    _soft_threshold(out[:N_PARAMS], threshold)\n"
    em.block(text)


def _render_bias_vjp(em: Emitter, l2: bool) -> None:
    if l2:
        em.block('''
def _bias_vjp(y, v, gates, ddy):
    """The l2 bias dy = y - v: (∂/∂y, ∂/∂v, ∂/∂gates) of <ddy, dy>."""
    return ddy, -ddy, ()
''')
        return
    em.block('''
def _bias_vjp(y, v, gates, ddy):
    """(∂/∂y, ∂/∂v, ∂/∂gates) of <ddy, output_grad(y, v, *gates)> at one token, by autograd over
    its [B, H, 1, V] vectors (zeros where output_grad does not depend on an argument)."""
    with torch.enable_grad():
        args = [x.detach().requires_grad_() for x in (y, v, *gates)]
        grads = torch.autograd.grad(output_grad(*args), args, ddy, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(args, grads)]
    return grads[0], grads[1], tuple(grads[2:])
''')


def _render_function(em: Emitter, nested: bool, momentum: bool, threshold: bool) -> None:
    """`_Sequential` (_FUNCTION): a line that starts `#@nested ` belongs to a nested level (`init from`:
    its restarts) only, a line that ends `  #@flat` to any other level only; likewise `#@momentum `
    and `  #@gd` for a level with momentum and one without, and `#@threshold ` for a soft threshold."""
    lines = []
    for line in _FUNCTION.splitlines():
        for prefix, suffix, on in (("#@nested ", "  #@flat", nested), ("#@momentum ", "  #@gd", momentum),
                                   ("#@threshold ", "  #@affine", threshold)):
            if line.startswith(prefix):
                line = line[len(prefix):] if on else None
                break
            if line.endswith(suffix):
                line = line[:-len(suffix)] if not on else None
                break
        if line is not None:
            lines.append(line)
    em.block("\n".join(lines))


_FUNCTION = '''
def _row0(x, extra):
    """x [B, H, N, D] with `extra` [B, H, 1, D] added to its first row (the gradient's row)."""
    if extra is None:
        return x
    return x + extra if x.shape[2] == 1 else torch.cat([x[:, :, :1] + extra, x[:, :, 1:]], 2)


def _chain_back(params, slopes, dy, da_extra, dz_extra):
    """Back through y = M(params; x) at fixed weights, rows n of x independent: slopes act'(z_i)
    [B, H, N, O] of the layers before the last; dy [B, H, N, V] the cotangent of y; da_extra[i] /
    dz_extra[i] [B, H, 1, I|O] (or None) more cotangent on layer i's input / pre-activation, first row
    only. Returns dx [B, H, N, K] and dz_i [B, H, N, O] per layer (layer i's weight gets
    Σ_n a_i,nᵀ dz_i,n, its bias Σ_n dz_i,n)."""
    dzs, dz = [None] * len(LAYERS), dy
    for i in reversed(range(len(LAYERS))):
        dz = dzs[i] = _row0(dz, dz_extra[i])
        da = _row0(dz @ params[LAYERS[i][0]].transpose(-1, -2), da_extra[i])
        if i > 0:
            dz = da * slopes[i - 1]
    return (da + dy if RESIDUAL else da), dzs


class _Sequential(torch.autograd.Function):
    """The tokens in order, with an exact hand-written backward (the module docstring).
    forward(shared, n_gates, qh, kh, vh, *coeffs, *gates, *state): shared: q and k are the same
    memory (a read before the write then reuses the gradient's forward); qh, kh [B, H, T, K], vh
    [B, H, T, V]; the N_COEFFS coefficients of COEFFS: numbers or [B, H, T]; the bias's n_gates gates
    [B, H, T, 1|K|V]; the initial state tensors [B, H, ...]. Returns o [B, H, T, V] and the final
    state tensors."""  #@flat
#@nested     initial state tensors [B, H, ...], then the restart states [B, J, H, ...] (none: no restarts).
#@nested     Returns o [B, H, T, V] and the final state tensors."""

    @staticmethod
    @autocast_forward
    def forward(ctx, shared, n_gates, qh, kh, vh, *rest):
        coeffs, gates, rest = rest[:N_COEFFS], rest[N_COEFFS:N_COEFFS + n_gates], rest[N_COEFFS + n_gates:]
        state = tuple(p.clone(memory_format=torch.contiguous_format) for p in rest)  #@flat
#@nested         state = tuple(p.clone(memory_format=torch.contiguous_format) for p in rest[:N_PARAMS])
#@nested         restarts = rest[N_PARAMS:]  # [B, J, H, ...] each, or none
        params = state[:N_PARAMS]  # the weights, stepped in place (with momentum, their momenta follow)
        T = kh.shape[2]
        two = not READ_AFTER and not shared  # the read's query rides as a second row of the forward
        copies, saved, outputs = [], [], []
        for t in range(T):
#@nested             if restarts and t > 0 and t % RESTART == 0:  # W_{t-1} is restart state t // RESTART - 1
#@nested                 for p, r in zip(params, restarts):
#@nested                     p.copy_(r[:, t // RESTART - 1])
            if t % CHUNK == 0:
                copies.append(tuple(p.clone() for p in state))  # W_{t-1}, for the backward's replay
            x = kh[:, :, t:t + 1] if not two else torch.cat([kh[:, :, t:t + 1], qh[:, :, t:t + 1]], 2)
            y, inputs, slopes = _forward(params, x)  # at W_{t-1}, [B, H, 1|2, D]: row 0 the key's
            grad_in, grad_slopes = [a[:, :, :1] for a in inputs], [tuple(x[:, :, :1] for x in s) for s in slopes]
            y0, g_t = y[:, :, :1], tuple(g[:, :, t:t + 1] for g in gates)
            deltas, backs = _deltas(params, [s[0] for s in grad_slopes],
                                    output_grad(y0, vh[:, :, t:t + 1], *g_t))
            if not READ_AFTER:
                outputs.append(y[:, :, -1:])  # read before write: the last row (the key's, if shared)
            _update(state, grad_in, deltas, _at(coeffs, t), state)
            if READ_AFTER:
                o_t, read_in, read_slopes = _forward(params, qh[:, :, t:t + 1])  # at W_t
                outputs.append(o_t)
            else:
                read_in, read_slopes = [a[:, :, -1:] for a in inputs], [tuple(x[:, :, -1:] for x in s) for s in slopes]
            saved.append((grad_in, grad_slopes, deltas, backs, y0, read_in, read_slopes))
        ctx.shared, ctx.n_gates, ctx.copies, ctx.saved = shared, n_gates, copies, saved
#@nested         ctx.restart_shapes = [r.shape for r in restarts]
        ctx.coefficients = tuple(c if not torch.is_tensor(c) else None for c in coeffs)
        ctx.save_for_backward(vh, *gates, *(c for c in coeffs if torch.is_tensor(c)))
        return (torch.cat(outputs, 2),) + state

    @staticmethod
    @autocast_backward
    def backward(ctx, do, *dstate):
        if torch.is_grad_enabled():  # create_graph=True: a silently wrong second derivative otherwise
            raise RuntimeError("the sequential form's hand-written backward is not differentiable twice; "
                               "for second derivatives run the level with mode='reference'")
        vh, *tensors = ctx.saved_tensors
        gates, tensors = tensors[:ctx.n_gates], iter(tensors[ctx.n_gates:])
        coeffs = tuple(c if c is not None else next(tensors) for c in ctx.coefficients)
        dcoeffs = [torch.zeros_like(c) if need else None for c, need in zip(coeffs, ctx.needs_input_grad[5:])]
        dW = [d.clone(memory_format=torch.contiguous_format) for d in dstate]  # the cotangent of the state: Ŵ (then M̂)
        K = ctx.saved[0][0][0].shape[-1]
        dq, dk, dv = vh.new_zeros(vh.shape[:3] + (K,)), vh.new_zeros(vh.shape[:3] + (K,)), torch.zeros_like(vh)
        dgates = [torch.zeros_like(g) for g in gates]
#@nested         drestarts = [vh.new_zeros(shape) for shape in ctx.restart_shapes]
        T = vh.shape[2]
        buffers = [tuple(torch.empty_like(p) for p in dW) for _ in range(min(CHUNK, T))]
        for start in reversed(range(0, T, CHUNK)):
            stop = min(start + CHUNK, T)
            states = [ctx.copies[start // CHUNK]] + buffers[:stop - start]  # W_{t-1}, t = start..stop
            for t in range(start, stop):  # replayed as the forward stepped
                _update(states[t - start], ctx.saved[t][0], ctx.saved[t][2], _at(coeffs, t), states[t - start + 1])
            for t in reversed(range(start, stop)):
                grad_in, grad_slopes, deltas, backs, y0, read_in, read_slopes = ctx.saved[t]
                prev, c = states[t - start], _at(coeffs, t)
                P, a_t, eta = prev[:N_PARAMS], c[0], c[1]
                no_extra = [None] * len(LAYERS)
                if READ_AFTER:  # the read at W_t: its weights' cotangent joins Ŵ first
                    dx, dzs = _chain_back(states[t - start + 1][:N_PARAMS], [s[0] for s in read_slopes],
                                          do[:, :, t:t + 1], no_extra, no_extra)
                    dq[:, :, t:t + 1] = dx
                    for (w, b), a, dz in zip(LAYERS, read_in, dzs):
                        _add_outer(dW[w], dW[w], a, dz, 1.0, 1.0)
                        if b is not None:
                            _add_outer(dW[b], dW[b], None, dz, 1.0, 1.0)
#@threshold                 # W_t = soft(w, tau_t): w's cotangent is Ŵ where W_t ≠ 0 (|w| > tau_t), tau's −Σ Ŵ sign(W_t)
#@threshold                 now = states[t - start + 1][:N_PARAMS]
#@threshold                 if dcoeffs[-1] is not None:
#@threshold                     dcoeffs[-1][:, :, t] = -_inner(dW, [w.sign() for w in now])
#@threshold                 for d, w in zip(dW, now):
#@threshold                     d.mul_(w != 0)
#@momentum                 # W_t = decay·W_(t-1) + scale·M_t: M̂ (the momenta's cotangent) takes scale·Ŵ
#@momentum                 dM, scale, beta = dW[N_PARAMS:], c[2], c[3]
#@momentum                 if dcoeffs[2] is not None:
#@momentum                     dcoeffs[2][:, :, t] = _inner(dW, states[t - start + 1][N_PARAMS:])
#@momentum                 for m, w in zip(dM, dW):
#@momentum                     m.add_(w * _fit(scale, w))
                if dcoeffs[0] is not None:
                    dcoeffs[0][:, :, t] = _inner(dW, P)
                # the step −eta Σ_i a_i ⊗ δ_i: cotangents of a_i, δ_i and eta from Ŵ  #@gd
                G = dW  #@gd
#@momentum                 # the step −lr Σ_i a_i ⊗ δ_i into M: cotangents of a_i, δ_i and lr from M̂
#@momentum                 G = dM
                aW, Wd = [], []
                for (w, b), a, d in zip(LAYERS, grad_in, deltas):
                    aW.append(a @ G[w] if b is None else a @ G[w] + G[b][:, :, None, :])
                    Wd.append(d @ G[w].transpose(-1, -2))
                if dcoeffs[1] is not None:
                    dcoeffs[1][:, :, t] = -sum((x * d).sum((-2, -1)) for x, d in zip(aW, deltas))
#@momentum                 # M_t = beta·M_(t-1) − lr·u_t: beta's cotangent, then M̂_(t-1) = beta·M̂_t
#@momentum                 if dcoeffs[3] is not None:
#@momentum                     dcoeffs[3][:, :, t] = _inner(dM, prev[N_PARAMS:])
#@momentum                 for m in dM:
#@momentum                     m.mul_(_fit(beta, m))
                da_extra = [-eta * x for x in Wd]
                ddelta = [-eta * x for x in aW]
                # back through the sweep δ_i = (δ_{i+1} W_{i+1}ᵀ) * act'(z_i)
                dback, dz_extra = [None] * len(LAYERS), [None] * len(LAYERS)
                for i in range(len(LAYERS) - 1):
                    slope, curve = grad_slopes[i]
                    dback[i + 1] = ddelta[i] * slope
                    dz_extra[i] = ddelta[i] * backs[i + 1] * curve
                    ddelta[i + 1] = ddelta[i + 1] + dback[i + 1] @ P[LAYERS[i + 1][0]]
                dy, dv_t, dg_t = _bias_vjp(y0, vh[:, :, t:t + 1], tuple(g[:, :, t:t + 1] for g in gates),
                                           ddelta[-1])
                dv[:, :, t:t + 1] = dv_t
                for g, d in zip(dgates, dg_t):
                    g[:, :, t:t + 1] = d
                # back through the forward at W_{t-1}: row 0 the gradient's, row 1 the read before
                if READ_AFTER:
                    rows_in, rows_slopes = grad_in, [s[0] for s in grad_slopes]
                else:
                    dy = torch.cat([dy, do[:, :, t:t + 1]], 2)
                    rows_in = [torch.cat(x, 2) for x in zip(grad_in, read_in)]
                    rows_slopes = [torch.cat((g[0], r[0]), 2) for g, r in zip(grad_slopes, read_slopes)]
                dx, dzs = _chain_back(P, rows_slopes, dy, da_extra, dz_extra)
                dk[:, :, t:t + 1] = dx[:, :, :1]
                if not READ_AFTER:
                    dq[:, :, t:t + 1] = dx[:, :, 1:]
                # Ŵ_{t-1} = decay·Ŵ_t + Σ a ⊗ dz (+ dback ⊗ δ), one rank-r product per weight
                for (w, b), a, dz, db, d in zip(LAYERS, rows_in, dzs, dback, deltas):
                    left, right = (a, dz) if db is None else (torch.cat([a, db], 2), torch.cat([dz, d], 2))
                    _add_outer(dW[w], dW[w], left, right, a_t, 1.0)
                    if b is not None:
                        _add_outer(dW[b], dW[b], None, dz, a_t, 1.0)
#@nested             if drestarts and start > 0 and start % RESTART == 0:  # W_{start-1} was a restart state:
#@nested                 for d, w in zip(drestarts, dW):  # its cotangent is that state's, none flows on
#@nested                     d[:, start // RESTART - 1] = w
#@nested                     w.zero_()
            del states
#@nested         return (None, None, dq, dk, dv, *dcoeffs, *dgates, *dW, *drestarts)
        return (None, None, dq, dk, dv, *dcoeffs, *dgates, *dW)  #@flat
'''


COEFFICIENT_TEXT = {"decay": "a_t, on the old state", "step": "eta_t = c_t lr_t, on the gradient",
                     "lr": "lr_t, on the gradient, into the momentum", "scale": "c_t, on the momentum, into W",
                     "beta": "beta_t, on the momentum", "threshold": "tau_t, the soft threshold on W"}


def coefficient_span(lv: ir.Level, role: str):
    """The spec span a per-token coefficient comes from: the retention's or the algorithm's."""
    return lv.retention.span if role in ("decay", "scale", "threshold") else lv.algorithm.span


def _render_op(em: Emitter, rules: LevelRules, coeffs: dict) -> None:
    lv = rules.level
    heads = {ir.gate_symbol(g): ident(g, "gh") for g in lv.gates}
    bias_gates = [ident(g, "go") for g in ir.gate_names(rules.bias.grad)]
    # the reference op's signature, with restart_states for a nested level
    signature = op_signature(lv).replace("initial_state=None", nesting_keywords(lv) + "initial_state=None", 1)
    with em.indent(signature):
        render_op_inputs(em, rules, {role: e for role, e in coeffs.items() if e.free_symbols})
        em.line("# per-token coefficients: numbers, or [B, H, T] tensors")
        for role, expr in coeffs.items():
            text = to_torch(expr, heads) if expr.free_symbols else repr(float(expr))
            em.line(f"{role} = {text}  {where(coefficient_span(lv, role)) or '#'} {COEFFICIENT_TEXT[role]}")
        em.line(f"{where(lv.span)} level {comment(lv.name)}: the tokens in order")
        gates = "".join(f"{g}, " for g in bias_gates)
        restarts = ", *(restart_states or ())" if lv.init_from is not None else ""
        em.line(f"o, *final = _Sequential.apply(_aliased(qh, kh), {len(bias_gates)}, qh, kh, vh, "
                f"{', '.join(coeffs)}, {gates}*{'state' if 'beta' in coeffs else 'params'}{restarts})")
        em.line("return o.transpose(1, 2), (_pack(tuple(final)) if output_final_state else None)")
