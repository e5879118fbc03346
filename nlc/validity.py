"""Validity rules for one level (MATH.md §5.7): combinations with no defined meaning are errors;
combinations that are legal but fragile get warnings or notes."""
from __future__ import annotations

import sympy

from . import ast, ir
from .derive import symbols as S
from .derive.retention import derive_retention
from .diagnostics import Collector

# Retention arguments that appear as 1/arg in the derived objective (options.RETENTION docs).
STRENGTHS = {"l2": ("global",), "elastic": ("l1", "l2"), "kl": ("global",)}
# The generated code lists an MLP memory's layers one by one.
MAX_MLP_DEPTH = 64


def check_level(level: ir.Level, streams: dict[str, ir.Stream], diag: Collector) -> None:
    mem, bias, ret, alg = level.memory, level.bias, level.retention, level.algorithm
    base_bias = bias.inner or bias

    def err(message, choice, expected, hint=None):
        diag.error(f"level '{level.name}': {message}", choice.span if choice else level.span,
                   expected, hint)

    if mem.kind == "vector" and level.d_key != level.d_value:
        err(f"a vector memory needs keys and values of one size, got {level.d_key} and "
            f"{level.d_value}", None, "d_key == d_value")
    if mem.kind == "mlp" and mem.depth > 1 and level.d_key != level.d_value and mem.residual:
        err("a residual MLP memory maps keys to values of the same size", mem,
            f"d_key == d_value (got {level.d_key} and {level.d_value})", "set residual = false")
    if mem.kind == "mlp" and mem.depth > MAX_MLP_DEPTH:
        err(f"an MLP memory of depth {mem.depth} is deeper than nlc unrolls", mem,
            f"depth <= {MAX_MLP_DEPTH}")
    if mem.kind == "mlp" and mem.gated and mem.depth != 2:
        err("a gated MLP memory has depth 2", mem, "mlp(depth = 2, gated = true)")
    if ret.kind == "implicit" and not (base_bias.kind == "l2" and bias.kind != "omega"
                                       and mem.kind == "matrix" and alg.kind == "gd"):
        err("the implicit (proximal) step has a closed form only for l2 bias, matrix memory and gd",
            ret, "bias l2, memory matrix, algorithm gd", "use decay or l2 retention instead")
    if ret.kind == "dgd" and not (mem.kind in ("matrix", "mlp") and alg.kind == "gd"):
        err("delta gradient descent needs a matrix or MLP memory and gd", ret,
            "memory matrix|mlp, algorithm gd")
    if level.grad_at == "retained" and (ret.kind not in ("none", "decay") or alg.kind == "ftrl"):
        err("`gradient retained` takes the gradient after a decay; it is defined for decay only",
            ret, "retention none or decay, with gd, momentum or muon")
    if ret.kind == "kl":
        if level.init == "zero":
            err("KL retention keeps the memory on the simplex, and a zero state is not on it", ret,
                "init learned (starts uniform on the simplex)")
        if alg.kind == "ftrl":
            err("KL retention is a mirror step of its own; it has no FTRL accumulator", alg,
                "algorithm gd or momentum")
        if mem.kind == "mlp":
            diag.warn(f"level '{level.name}': KL retention keeps every MLP weight positive, which "
                      "limits what the memory can represent (MATH.md §5.7.3)", ret.span)
    bad_q = ret.kind == "lq" and _const(ret.args["q"]) is not None and _const(ret.args["q"]) <= 1
    if bad_q:
        err("lq retention needs q > 1", ret, "q > 1 (Moneta uses q = 4)")
    if level.lag_token and (level.grad_at != "chunk" or level.period != 1):
        err("kl(apply = chunk) takes its softmax step at the first token of each gradient chunk, "
            "updated every token", ret, "gradient chunk_start(C) and no `update every`/`outer`")
    if level.maps_at_chunks:
        if level.grad_at != "chunk" or level.period != 1:
            err("lq(apply = chunk) applies its map at the chunk boundaries of the gradient chunks, "
                "updated every token", ret, "gradient chunk_start(C) and no `update every`/`outer`")
        if not bad_q:  # q <= 1 has no map to take the slope of (refused above)
            _check_chunk_slope(level, ret, err)
    for arg in STRENGTHS.get(ret.kind, ()):
        value = _const(ret.args[arg])
        if value is not None and value <= 0:
            err(f"{ret.kind}({arg}) is a strength that divides the objective; it must be > 0, "
                f"got {value:g}", ret, f"{arg} > 0")
    if alg.kind == "ftrl" and ret.kind in ("implicit", "dgd", "l2"):
        err(f"FTRL has no accumulator form for {ret.kind} retention", alg,
            "retention none, decay, lq or elastic")
    if level.period is None and level.accumulates:
        err("an `update outer` level does not learn in context, so it has no FTRL accumulator", alg,
            "algorithm gd (the outer loop trains its state)")
    if alg.kind == "muon" and mem.kind == "vector":
        err("Newton-Schulz (muon) acts on 2-D weights; a vector memory has none", alg,
            "memory matrix or mlp")
    if base_bias.kind == "lp":
        p = _const(base_bias.args["p"])
        if p is not None and p <= 0:
            err(f"lp needs p > 0, got {p:g}", base_bias, "p > 0")
        elif p is not None and p < 2 and base_bias.args["eps"] == 0:
            diag.note(f"level '{level.name}': lp with p < 2 has a non-smooth gradient at 0; "
                      "lp(p, eps = 1e-6) smooths |x| as sqrt(x^2 + eps) (MATH.md §5.7.2)",
                      base_bias.span)
    if base_bias.kind == "dot" and ret.kind == "none" and alg.kind == "gd" and level.target != "teach":
        diag.note(f"level '{level.name}': dot-product bias without retention grows without bound "
                  "(MATH.md §5.7.9)", bias.span)
    if mem.kind == "mlp":
        for name, axis in level.gate_axes.items():
            if axis != "scalar" and _gate_in(name, ret, alg):
                err(f"gate '{name}' is a vector gate; an MLP memory's retention and learning rate "
                    "take scalar gates per head", ret, f"gate {name}[heads]")
    if level.period is not None and level.period > 1 and level.grad_at == "current":
        diag.note(f"level '{level.name}': updates are committed every {level.period} tokens while "
                  "gradients are taken at the running (uncommitted) state", level.span)
    delta_type = (base_bias.kind == "l2" and mem.kind == "matrix" and ret.kind in
                  ("none", "decay", "dgd"))
    if delta_type and not _normalized(streams[level.key]):
        diag.warn(f"level '{level.name}': delta-type updates are stable only for unit-norm keys "
                  f"(MATH.md §5.7.6); key stream '{level.key}' is not l2norm(...)", level.span)


def _check_chunk_slope(level: ir.Level, ret: ir.Choice, err) -> None:
    """lq(apply = chunk) reads slope(A_0)·A_t in a chunk: the derived slope must be free of A, and
    bounded at A = 0 when the state starts there."""
    slope = sympy.nsimplify(derive_retention(ret).slope)
    if slope.has(S.A):
        err(f"lq(apply = chunk) reads A_t times the map's slope at the chunk start, one factor "
            f"per tensor, and this map's slope {slope} depends on A itself", ret,
            "map = miras (W = A / ||A||_q^(q-2): a slope of the norm alone)")
    elif level.init == "zero" and sympy.limit(slope, S.N, 0, "+") == sympy.oo:
        err(f"lq(apply = chunk) scales each chunk's reads by the map's slope at its start, "
            f"{slope}, which is unbounded at the zero initial state", ret,
            "init learned (or q <= 2)")


def _const(v) -> float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)  # `number` arguments arrive as floats, `scalar` ones as sympy
    return float(v) if isinstance(v, sympy.Expr) and v.is_number else None


def _gate_in(name: str, *choices: ir.Choice) -> bool:
    sym = ir.gate_symbol(name)
    return any(isinstance(v, sympy.Expr) and sym in v.free_symbols
               for c in choices for v in c.args.values())


def _normalized(stream: ir.Stream) -> bool:
    """Whether a stream is l2-normalised at the top of its defining expression."""
    return isinstance(stream.expr, ast.Call) and stream.expr.func == "l2norm"
