"""Render a decay-family level (MATH.md §3.1) as a chunk-parallel PyTorch module.

The family: a matrix memory S [K, V] (row convention, o_t = S_t^T q_t) trained by gd on a bias whose
gradient does not read the state (`dot`), under an affine retention:

    S_t = Diag(a_t) S_{t-1} + (c_t lr_t) k_t v_t^T

a_t (plan.decay) is a scalar or per-key-channel factor; c_t (plan.scale) times the learning rate
lr_t is the step's coefficient, which may be scalar, per key channel (it scales k_t) or per value
channel (it scales v_t). Inside a chunk everything is matmuls in log space; chunks run in sequence
carrying S. The generated module imports `initial_state` and `_pack` from the level's reference
module (`level_<name>.py`, same package) and otherwise only torch and math.

The shared pieces (header, gate views, step split, chunking helper, prologue) are used by
`torch_chunk_delta` too.
"""
from __future__ import annotations

import sympy

import nlc
from nlc import ir
from nlc.derive import symbols as S
from nlc.derive.printer import to_torch
from nlc.derive.rules import LevelRules
from nlc.plan import KernelPlan

from .emitter import Emitter, comment, ident, where


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_chunk.py` for a decay-family plan."""
    lv = rules.level
    if plan.family != "decay":
        raise ValueError(f"plan family {plan.family!r} is not 'decay'")
    key_step, value_step = step_factors(rules, plan, value_target=True)
    vector = decay_axis(rules, plan) == "key"
    em = Emitter()
    after = lv.read == "after"
    math_lines = [
        f"  recurrence  S_t = {'Diag(a_t)' if vector else 'a_t'} S_(t-1) + k~_t v~_t^T",
        f"  decay       a_t = {show(plan.decay)}" + ("   (per key channel)" if vector else ""),
        f"  step        k~_t = {_times('k_t', key_step)},  v~_t = {_times('v_t', value_step)}",
        f"  read        o_t = {'S_t' if after else 'S_(t-1)'}^T q_t ({lv.read} write)",
        "Per chunk of C = CHUNK tokens (i, j = 1..C), S_0 the state entering it, g = cumsum(log a)",
        f"from the chunk start ({'[C, K]' if vector else '[C]'}), g~_i = "
        + ("g_i (read after)" if after else "g_(i-1) = g_i - log a_i (read before)") + ":",
        "  O   = (Q * e^g~) S_0 + P V~,   P_ij = sum_k Q_ik K~_jk exp(g~_ik - g_jk) for j "
        + ("<= i" if after else "< i") + ", else 0",
        "  S_C = Diag(e^(g_C)) S_0 + (K~ * e^(g_C - g))^T V~",
    ]
    if vector:
        math_lines.append("P is formed per channel ([C, C, K]); every exponent is <= 0, so nothing "
                          "overflows (no K / B division).")
    else:
        math_lines.append("P = (Q K~^T) * Gamma with Gamma_ij = exp(g~_i - g_j) masked; every "
                          "exponent is <= 0.")
    math_lines.append("A short last chunk is zero-padded (a = 1, k~ = v~ = 0), which changes nothing.")
    math_lines.append("Decays must be > 0 (log space); a_t = 1 (no decay) is exact.")
    preamble(em, rules, plan, model, file, "decay family, MATH.md §3.1", math_lines)
    with op_signature(em, rules):
        prologue(em, rules)
        gate_views(em, rules, [plan.decay, key_step, value_step])
        log_decay(em, rules, plan, vector)
        names = gate_names(rules)
        em.line(f"k_step = {_scaled('k', key_step, names)}  {where(lv.algorithm.span) or '#'} "
                "[B, T, H, K]: key side of the step")
        em.line(f"v_step = {_scaled('v', value_step, names)}  # [B, T, H, V]: value side of the step")
        em.line("C = CHUNK")
        em.line("q_c, k_c, v_c, la_c = (_chunks(x, C) for x in (q, k_step, v_step, log_a))  "
                "# [B, H, N, C, D]")
        em.line("N = q_c.shape[2]")
        em.line("g = la_c.cumsum(-2)  # log decay from the chunk start, inclusive")
        em.line("g_q = g  # the query side reads S_i" if after else
                "g_q = g - la_c  # the query side reads S_(i-1): exclusive cumsum")
        em.line(f"causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril({0 if after else -1})"
                f"  # j {'<=' if after else '<'} i")
        if vector:
            em.line("# per-channel decay between positions: [B, H, N, C, C, K], masked before exp")
            em.line("gamma = (g_q[..., :, None, :] - g[..., None, :, :]).masked_fill("
                    "~causal[:, :, None], float('-inf')).exp()")
            em.line("P = torch.einsum('bhnik,bhnjk,bhnijk->bhnij', q_c, k_c, gamma)  "
                    "# [B, H, N, C, C]")
        else:
            em.line("gamma = (g_q[..., :, None, 0] - g[..., None, :, 0]).masked_fill("
                    "~causal, float('-inf')).exp()  # [B, H, N, C, C]")
            em.line("P = (q_c @ k_c.transpose(-1, -2)) * gamma  # [B, H, N, C, C]")
        em.line("o_intra = P @ v_c  # [B, H, N, C, V]: the chunk's own tokens")
        em.line("q_decay = q_c * g_q.exp()  # queries, decayed from the chunk start")
        em.line("k_decay = k_c * (g[..., -1:, :] - g).exp()  # keys, decayed to the chunk end")
        em.line(f"a_chunk = g[..., -1, :].exp()  # [B, H, N, {'K' if vector else '1'}]: "
                "the whole chunk's decay")
        em.line("outputs = []")
        with em.indent("for n in range(N):"):
            em.line("outputs.append(o_intra[:, :, n] + q_decay[:, :, n] @ S)")
            em.line("S = a_chunk[:, :, n, :, None] * S + k_decay[:, :, n].transpose(-1, -2) @ v_c[:, :, n]")
        epilogue(em)
    return em.text()


# ------------------------------------------------------------------------------ shared helpers

def show(expr) -> str:
    """A derived expression for a docstring: gate names without their symbol prefix."""
    return comment(str(expr).replace("gate_", ""))


def decay_axis(rules: LevelRules, plan: KernelPlan) -> str:
    """scalar | key: the axis the decay acts on (the planner rejects value-channel decays)."""
    axes = {rules.level.gate_axes[g] for g in ir.gate_names(plan.decay)}
    if "value" in axes:
        raise NotImplementedError("a decay over value channels has no diagonal chunked form")
    return "key" if "key" in axes else "scalar"


def step_factors(rules: LevelRules, plan: KernelPlan, value_target: bool):
    """The step's coefficient c_t·lr_t (times, for the decay family, the value target -dℓ/dy / v),
    split into a factor on the key side (scalar and key-channel gates) and one on the value side
    (value-channel gates)."""
    coef = plan.scale * rules.lr
    if value_target:
        target = sympy.simplify(-rules.bias.grad / S.v)
        if target.free_symbols & {S.v, S.e, S.r, S.y}:
            raise NotImplementedError(f"bias gradient {rules.bias.grad} is not linear in v")
        coef = coef * target
    for form in (coef, sympy.factor(coef)):
        key, value, ok = [], [], True
        for f in sympy.Mul.make_args(form):
            axes = {rules.level.gate_axes[g] for g in ir.gate_names(f)}
            if {"key", "value"} <= axes:
                ok = False
                break
            (value if "value" in axes else key).append(f)
        if ok:
            return sympy.Mul(*key), sympy.Mul(*value)
    raise NotImplementedError(f"step coefficient {coef} mixes key and value channels")


def gate_names(rules: LevelRules) -> dict:
    """sympy gate symbol -> its channel view in the generated op (see `gate_views`)."""
    return {ir.gate_symbol(g): ident(g, "gc") for g in rules.level.gates}


def gate_views(em: Emitter, rules: LevelRules, exprs) -> None:
    """Views of the gates the derived expressions read: [B, T, H, 1] for scalar gates, the gate
    itself ([B, T, H, K|V]) for vector gates, so any expression over them broadcasts elementwise."""
    used = sorted(set().union(*(ir.gate_names(e) for e in exprs)))
    if used:
        em.line("# gates as [B, T, H, 1] (scalar) or [B, T, H, K|V] (vector): derived expressions broadcast")
    for g in used:
        axis = rules.level.gate_axes[g]
        view = f"{ident(g, 'g')}[..., None]" if axis == "scalar" else ident(g, "g")
        em.line(f"{ident(g, 'gc')} = {view}  # gate {comment(g)}: {axis}")


def log_decay(em: Emitter, rules: LevelRules, plan: KernelPlan, vector: bool) -> None:
    """log_a [B, T, H, 1|K]: the log of the decay a_t (0 where a_t = 1)."""
    lv, decay = rules.level, plan.decay
    span = where(lv.retention.span) or "#"
    shape = "[B, T, H, K]" if vector else "[B, T, H, 1]"
    if not decay.free_symbols:
        value = float(decay)
        if not value > 0:
            raise ValueError(f"level {lv.name!r}: the log-space chunk form needs a decay a_t > 0, "
                             f"got the constant {value!r}")
        if value == 1.0:
            em.line(f"log_a = q.new_zeros(B, T, H, 1)  {span} a_t = 1: no decay")
        else:
            em.line(f"log_a = q.new_full((B, T, H, 1), math.log({value!r}))  {span} a_t = {value!r}")
        return
    text = to_torch(decay, gate_names(rules))
    em.line(f"log_a = torch.log({text}).expand(B, T, H, -1)  {span} {shape}: a_t = {show(decay)} > 0")


def _times(x: str, factor) -> str:
    return x if factor == 1 else f"{x} * ({show(factor)})"


def _scaled(x: str, factor, names) -> str:
    if factor == 1:
        return x
    return f"{x} * {paren(to_torch(factor, names))}"


def paren(text: str) -> str:
    """`text` as one operand: parenthesised unless it is a name, a number or already wrapped."""
    depth, wrapped = 0, text.startswith("(") and text.endswith(")")
    for i, ch in enumerate(text):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and i < len(text) - 1:
            wrapped = False
    simple = text.replace("_", "").replace(".", "").isalnum()
    return text if wrapped or simple else f"({text})"


def preamble(em: Emitter, rules: LevelRules, plan: KernelPlan, model: str, file: str, family: str,
             math_lines) -> None:
    """Docstring, imports, CHUNK and the chunking helper: what every chunk module opens with."""
    header(em, rules, model, file, family, math_lines)
    imports(em, plan)
    em.gap()
    render_chunks_helper(em)
    em.gap()


def header(em: Emitter, rules: LevelRules, model: str, file: str, family: str, math_lines) -> None:
    lv = rules.level
    em.line(f'"""Level {comment(lv.name)!r} of model {comment(model)!r}: chunk-parallel form '
            f"({family}).")
    em.line()
    em.line(f"Generated by nlc {nlc.__version__} from {comment(file)}; do not edit. It equals "
            f"level_{comment(lv.name)}.py")
    em.line("(the reference recurrent form) to round-off.")
    for key, value in lv.describe().items():
        em.line(f"  {key:<10} {comment(value)}")
    for text in math_lines:
        em.line(text)
    em.line("Layout (fla): q, k [B, T, H, K]; v [B, T, H, V]; scalar gates [B, T, H]; vector gates")
    em.line("[B, T, H, K or V]. State: S [B, H, K, V], row convention: o_t = S_t^T q_t.")
    em.line('"""')


def imports(em: Emitter, plan: KernelPlan) -> None:
    em.line("import math")
    em.line()
    em.line("import torch")
    em.line()
    em.line(f"from .level_{plan.level} import _pack, initial_state")
    em.line()
    em.line(f"CHUNK = {int(plan.chunk)}")


def render_chunks_helper(em: Emitter) -> None:
    with em.indent("def _chunks(x, C):"):
        em.line('"""[B, T, H, D] -> [B, H, N, C, D] with N = ceil(T / C); the last chunk is zero-padded."""')
        em.line("B, T, H, D = x.shape")
        em.line("N = -(-T // C)")
        em.line("x = x.transpose(1, 2)")
        with em.indent("if N * C != T:"):
            em.line("x = torch.cat([x, x.new_zeros(B, H, N * C - T, D)], dim=2)")
        em.line("return x.reshape(B, H, N, C, D)")


class _Signature:
    def __init__(self, em: Emitter, rules: LevelRules):
        self.em, self.rules = em, rules

    def __enter__(self):
        lv, em = self.rules.level, self.em
        kw = "".join(f"{ident(g, 'g')}, " for g in lv.gates)
        em.line(f"def {ident(lv.name, 'level')}(q, k, v, *, {kw}initial_state=None, "
                "output_final_state=False):")
        em.depth += 1
        em.line(f'"""Level {comment(lv.name)!r}, CHUNK tokens at a time. q, k: [B, T, H, K]; '
                "v: [B, T, H, V];")
        em.line(f"gates {', '.join(lv.gates) or '(none)'}: [B, T, H] or [B, T, H, K|V].")
        em.line('Returns (o [B, T, H, V], final state S [B, H, K, V] or None)."""')
        return self

    def __exit__(self, *exc):
        self.em.depth -= 1
        return False


def op_signature(em: Emitter, rules: LevelRules) -> _Signature:
    """`def level_<name>(...)`: the reference op's signature and docstring; a context manager
    for its body."""
    return _Signature(em, rules)


def prologue(em: Emitter, rules: LevelRules) -> None:
    lv = rules.level
    em.line(f"{where(lv.span)} level {comment(lv.name)}".strip())
    em.line("B, T, H = k.shape[:3]")
    em.line("state = initial_state if initial_state is not None else globals()['initial_state'](B, k.dtype, k.device)")
    em.line("(S,) = (state,) if torch.is_tensor(state) else tuple(state)  # [B, H, K, V]")


def epilogue(em: Emitter) -> None:
    em.line("o = torch.cat(outputs, dim=2)[:, :, :T].transpose(1, 2)  # [B, T, H, V]")
    em.line("return o, (_pack((S,)) if output_final_state else None)")
