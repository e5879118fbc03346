"""Render a decay-family level (MATH.md §3.1) as a chunk-parallel PyTorch module.

The family: a matrix memory S [K, V] (row convention, o_t = S_t^T q_t) trained by gd on a bias whose
gradient does not read the state (`dot`), under an affine retention:

    S_t = Diag(a_t) S_{t-1} + (c_t lr_t) k_t v_t^T

a_t (plan.decay) is a scalar or per-key-channel factor; c_t (plan.scale) times the learning rate
lr_t is the step's coefficient, which may be scalar, per key channel (it scales k_t) or per value
channel (it scales v_t). Inside a chunk everything is matmuls; chunks run in sequence carrying S
(one multiply-add per chunk). Decay products are plain products (cumprod), never ratios or logs, so
a decay of exactly 0, 1 or a negative one is exact, gradients included. A per-channel decay is
sub-chunked (fla's secondary chunks): matmuls between sub-chunks, keys carried within them.

The generated module imports `default_state` and `_pack` from the level's reference module
(`level_<name>.py`, same package) and otherwise only torch and math. The shared pieces (header, gate
views, step split, runtime helpers, prologue) are used by `torch_chunk_delta` too.
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

SUB_MAX = 8


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_chunk.py` for a decay-family plan."""
    lv = rules.level
    if plan.family != "decay":
        raise ValueError(f"plan family {plan.family!r} is not 'decay'")
    key_step, value_step = step_factors(rules, plan, value_target=True)
    vector = decay_axis(rules, plan) == "key"
    decayed = plan.decay != 1
    after = lv.read == "after"
    shift = 0 if after else 1
    em = Emitter()
    upto = "i" if after else "i - 1"
    math_lines = [
        f"  recurrence  S_t = {'Diag(a_t)' if vector else 'a_t'} S_(t-1) + k~_t v~_t^T",
        f"  decay       a_t = {show(plan.decay)}" + ("   (per key channel)" if vector else ""),
        f"  step        k~_t = {_times('k_t', key_step)},  v~_t = {_times('v_t', value_step)}",
        f"  read        o_t = {'S_t' if after else 'S_(t-1)'}^T q_t ({lv.read} write)",
        "Per chunk of C = CHUNK tokens (i, j = 1..C), S_0 the state entering it, and products of the",
        f"decays (per channel{'' if vector else ', one here'}) over a span of tokens:",
        f"  O   = (Q * prod_(r<={upto}) a_r) S_0 + P V~,   P_ij = sum_c Q_ic K~_jc prod_(j<r<={upto}) a_rc"
        f" for j <= {upto}, else 0",
        "  S_C = Diag(prod_(r<=C) a_r) S_0 + (K~ * prod_(j<r<=C) a_r)^T V~",
    ]
    if vector:
        math_lines.append("P by sub-chunks of SUB tokens, keys carried forward and decayed as they go: "
                          "token by token within a")
        math_lines.append("sub-chunk, sub-chunk by sub-chunk across them (matmuls).")
    math_lines.append("A short last chunk is padded (a = 1, k~ = v~ = 0), which changes nothing.")
    helpers = ["_cumulative", "_remaining", "_by_channel" if vector else "_segments"] if decayed else []
    helpers.append("_scan_chunks")
    constants = [f"SUB = {_sub_chunk(plan.chunk)}  # sub-chunk of the per-channel decay (MATH.md §3.1: "
                 "secondary chunks)"] if vector and decayed else []
    preamble(em, rules, plan, model, file, "decay family, MATH.md §3.1", math_lines, helpers, constants)
    with op_signature(em, rules):
        prologue(em, rules)
        exprs = [plan.decay, key_step, value_step]
        gate_views(em, rules, exprs)
        names = gate_names(rules, exprs)
        steps = []
        for x, factor, side in (("k", key_step, "key"), ("v", value_step, "value")):
            if factor != 1:
                em.line(f"{x}_step = {_scaled(x, factor, names)}  {where(lv.algorithm.span) or '#'} "
                        f"[B, T, H, {x.upper()}]: {side} side of the step")
            steps.append(x if factor == 1 else f"{x}_step")
        em.line(f"q_c, k_c, v_c = (_chunks(x, CHUNK) for x in (q, {', '.join(steps)}))  # [B, H, N, C, D]")
        if not decayed:
            em.line(f"P = (q_c @ k_c.transpose(-1, -2)).tril({-shift or ''})  # [B, H, N, C, C]: no decay")
            em.line("q_in, k_out, a_chunk = q_c, k_c, None")
        else:
            decay_chunks(em, rules, plan, vector)
            if vector:
                em.line(f"P, q_in, k_out, a_chunk = _by_channel(q_c, k_c, a_c, {shift})  # P [B, H, N, C, C]")
            else:
                em.line(f"P = ((q_c @ k_c.transpose(-1, -2)) * _segments(a_c, {shift})[..., 0])"
                        f".tril({-shift or ''})  # [B, H, N, C, C]")
                em.line(f"q_in = q_c * _cumulative(a_c, {shift})  # queries, decayed from the chunk start")
                em.line("k_out = k_c * _remaining(a_c)  # keys, decayed to the chunk end")
                em.line("a_chunk = a_c.prod(-2)  # [B, H, N, 1]: each chunk's whole decay")
        em.line("S_in, S = _scan_chunks(S, a_chunk, k_out.transpose(-1, -2) @ v_c)  # [B, H, N, K, V]")
        em.line("o = P @ v_c + q_in @ S_in  # [B, H, N, C, V]: the chunk's own tokens, then S_0")
        epilogue(em)
    return em.text()


def _sub_chunk(chunk: int) -> int:
    """The longest divisor of the chunk up to SUB_MAX tokens."""
    return max(d for d in range(1, min(chunk, SUB_MAX) + 1) if chunk % d == 0)


# ------------------------------------------------------------------------------ shared helpers

def show(expr) -> str:
    """A derived expression for a docstring: gate names without their symbol prefix."""
    return comment(str(expr).replace("gate_", "").replace(str(S.n), "||k||^2"))


def decay_axis(rules: LevelRules, plan: KernelPlan) -> str:
    """scalar | key: the axis the decay acts on (the planner rejects value-channel decays)."""
    axes = {rules.level.gate_axes[g] for g in ir.gate_names(plan.decay)}
    if "value" in axes:
        raise NotImplementedError("a decay over value channels has no diagonal chunked form")
    return "key" if "key" in axes else "scalar"


def step_factors(rules: LevelRules, plan: KernelPlan, value_target: bool):
    """The step's coefficient c_t·lr_t (times, for the decay family, the value target -dℓ/dy / v),
    split into a factor on the key side (scalar and key-channel gates, ||k||^2) and one on the value
    side (anything with a value-channel gate)."""
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


def gate_names(rules: LevelRules, exprs=()) -> dict:
    """sympy symbol -> its name in the generated op: gates by their channel view (see `gate_views`),
    and ||k_t||^2 (the implicit step's n) as `k_norm2` where one of `exprs` reads it."""
    names = {ir.gate_symbol(g): ident(g, "gc") for g in rules.level.gates}
    if any(sympy.sympify(e).has(S.n) for e in exprs):
        names[S.n] = "k_norm2"
    return names


def gate_views(em: Emitter, rules: LevelRules, exprs) -> None:
    """Views of the gates the derived expressions read: [B, T, H, 1] for scalar gates, the gate
    itself ([B, T, H, K|V]) for vector gates, so any expression over them broadcasts elementwise;
    and ||k_t||^2 [B, T, H, 1] where an expression reads it."""
    used = sorted(set().union(*(ir.gate_names(e) for e in exprs)))
    if used:
        em.line("# gates as [B, T, H, 1] (scalar) or [B, T, H, K|V] (vector): derived expressions broadcast")
    for g in used:
        axis = rules.level.gate_axes[g]
        view = f"{ident(g, 'g')}[..., None]" if axis == "scalar" else ident(g, "g")
        em.line(f"{ident(g, 'gc')} = {view}  # gate {comment(g)}: {axis}")
    if S.n in gate_names(rules, exprs):
        em.line("k_norm2 = (k * k).sum(-1, keepdim=True)  # [B, T, H, 1]: ||k_t||^2")


def decay_chunks(em: Emitter, rules: LevelRules, plan: KernelPlan, vector: bool, step: str = "CHUNK") -> None:
    """a_c [B, H, N, C, 1|K]: the decay a_t by chunks of `step` tokens, padded with 1."""
    lv, decay = rules.level, plan.decay
    span = where(lv.retention.span) or "#"
    if not decay.free_symbols:
        em.line(f"a = q.new_full((B, T, H, 1), {float(decay)!r})  {span} a_t = {show(decay)}")
    else:
        text = to_torch(decay, gate_names(rules))
        em.line(f"a = {paren(text)}.expand(B, T, H, -1)  {span} [B, T, H, {'K' if vector else '1'}]: "
                f"a_t = {show(decay)}")
    em.line(f"a_c = _chunks(a, {step}, fill=1.0)  # [B, H, N, C, 1|K]")


def _times(x: str, factor) -> str:
    return x if factor == 1 else f"{x} * ({show(factor)})"


def _scaled(x: str, factor, names) -> str:
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
             math_lines, helpers, constants=()) -> None:
    """Docstring, imports, CHUNK (and `constants`, lines of source) and the runtime helpers the op
    uses (names in HELPERS)."""
    header(em, rules, model, file, family, math_lines)
    em.line("import torch")
    em.line()
    em.line(f"from .level_{plan.level} import _pack, default_state")
    em.line()
    em.line(f"CHUNK = {int(plan.chunk)}")
    for text in constants:
        em.line(text)
    for name in ("_chunks", *helpers):
        em.gap()
        em.block(HELPERS[name])
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


# runtime helpers of the generated modules, emitted where the op uses them
HELPERS = {
    "_chunks": '''
def _chunks(x, C, fill=0.0):
    """[B, T, H, D] -> [B, H, N, C, D] with N = ceil(T / C); the last chunk is padded with `fill`.
    Contiguous: padding by nothing returns a strided view, which every batched matmul would copy."""
    x = torch.nn.functional.pad(x.transpose(1, 2), (0, 0, 0, (-x.shape[1]) % C), value=fill)
    return x.contiguous().unflatten(2, (-1, C))
''',
    "_cumulative": '''
def _cumulative(a, shift):
    """a [..., L, D] -> [..., L, D]: prod_{r <= i - shift} a_r, the decay from the chunk start up to
    token i (shift 0) or i - 1 (shift 1)."""
    run = a.cumprod(-2)
    if shift:
        run = torch.cat([torch.ones_like(run[..., :1, :]), run[..., :-1, :]], dim=-2)
    return run
''',
    "_remaining": '''
def _remaining(a):
    """a [..., L, D] -> [..., L, D]: prod_{i < r <= L} a_r, the decay from token i to the chunk end."""
    rest = a.flip(-2).cumprod(-2).flip(-2)  # prod_{r >= i}
    return torch.cat([rest[..., 1:, :], torch.ones_like(rest[..., :1, :])], dim=-2)
''',
    "_segments": '''
def _segments(a, shift):
    """a [..., L, D] -> [..., L, L, D]: [i, j] = prod_{j < r <= i - shift} a_r where j <= i - shift;
    the entries above hold 1 (the caller masks them where it is cheapest). A cumprod down i of a
    matrix holding a_(r - shift) below the band and 1 elsewhere: plain products, so a decay of
    exactly 0 or a negative one is exact, gradients included."""
    L = a.shape[-2]
    if shift:
        a = torch.cat([torch.ones_like(a[..., :shift, :]), a[..., :-shift, :]], dim=-2)
    i = torch.arange(L, device=a.device)
    steps = torch.where((i[:, None] > i[None, :] + shift)[:, :, None], a[..., :, None, :], 1.0)
    return steps.cumprod(-3)
''',
    "_scan_chunks": '''
def _scan_chunks(S, a, X):
    """S_n = Diag(a_n) S_(n-1) + X_n over the chunks (a None: no decay): S [B, H, K, V],
    a [B, H, N, 1|K], X [B, H, N, K, V] -> (the states entering each chunk [B, H, N, K, V], the last)."""
    starts = []
    decays = [None] * X.shape[2] if a is None else a[..., None].unbind(2)  # lists: no per-chunk indexing
    for a_n, X_n in zip(decays, X.unbind(2)):
        starts.append(S)
        S = (S if a_n is None else a_n * S) + X_n
    return torch.stack(starts, dim=2), S
''',
    "_by_channel": '''
def _by_channel(q, k, a, shift):
    """A chunk's terms for per-channel decays a [..., C, K], by sub-chunks of SUB tokens: P [..., C, C]
    with P[i, j] = sum_c q_ic k_jc prod_{j < r <= i - shift} a_rc for j <= i - shift (else 0); q_in =
    q * prod_{r <= i - shift} a_r and k_out = k * prod_{j < r <= C} a_r [..., C, K]; the chunk's decay
    [..., K]. Keys are carried forward, decayed as they go: token by token inside each sub-chunk (the
    diagonal blocks of P), sub-chunk by sub-chunk across them (a block of P between sub-chunks m < n
    is a matmul of Q * (decay since n starts) with those keys). Products only, no ratios: exact for
    decays of 0, and nothing overflows."""
    *batch, C, K = q.shape
    M = C // SUB
    q, k, a = (x.unflatten(-2, (M, SUB)) for x in (q, k, a))  # [..., M, SUB, K]
    carried = []  # carried[t] [..., M, t + 1, K]: k_j prod_{j < r <= t} a_r for the sub-chunk's j <= t
    for k_t, a_t in zip(k.unbind(-2), a.unbind(-2)):
        new = k_t[..., None, :]
        carried.append(torch.cat([carried[-1] * a_t[..., None, :], new], dim=-2) if carried else new)
    rows = [q.new_zeros(q.shape[:-2] + (SUB,))] * shift  # row i reads the keys carried to i - shift
    for i, q_i in list(enumerate(q.unbind(-2)))[shift:]:
        row = (q_i[..., None, :] * carried[i - shift]).sum(-1)  # [..., M, i + 1 - shift]
        rows.append(torch.nn.functional.pad(row, (0, SUB - row.shape[-1])))
    diagonal = torch.stack(rows, dim=-2).unbind(-3)  # M blocks [..., SUB, SUB]
    q_in, k_out, total = q * _cumulative(a, shift), k * _remaining(a), a.prod(-2)  # total: [..., M, K]
    blocks, earlier = [], None  # earlier [..., n SUB, K]: the keys of sub-chunks m < n, decayed to n's start
    for n, (q_n, k_n, total_n, block) in enumerate(
            zip(q_in.unbind(-3), k_out.unbind(-3), total.unbind(-2), diagonal)):
        row = block if earlier is None else torch.cat([q_n @ earlier.transpose(-1, -2), block], dim=-1)
        blocks.append(torch.nn.functional.pad(row, (0, C - (n + 1) * SUB)))
        earlier = k_n if earlier is None else torch.cat([earlier * total_n[..., None, :], k_n], dim=-2)
    q_in = q_in * _cumulative(total, 1)[..., None, :]  # times the decay over the sub-chunks before n
    k_out = k_out * _remaining(total)[..., None, :]  # times the decay over the sub-chunks after m
    return torch.cat(blocks, dim=-2), q_in.flatten(-3, -2), k_out.flatten(-3, -2), total.prod(-2)
''',
}


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
    em.line("state = initial_state if initial_state is not None else default_state(B, k.dtype, k.device)")
    em.line("(S,) = (state,) if torch.is_tensor(state) else tuple(state)  # [B, H, K, V]")


def epilogue(em: Emitter) -> None:
    em.line("o = o.flatten(2, 3)[:, :, :T].transpose(1, 2)  # [B, T, H, V]")
    em.line("return o, (_pack((S,)) if output_final_state else None)")
