"""The checked spec: parameters resolved, names bound, shapes known. Levels are the nodes of the
level graph; streams and gates are what flows into them."""
from __future__ import annotations

import math

import operator
from dataclasses import dataclass, field, replace
from typing import Mapping

import sympy
from sympy.printing.str import StrPrinter

from . import ast

# The spec's binary operators, looked up and then applied: a table of results
# ({"*": a * b, "**": a ** b, ...}) would compute every one, 1e308 ** 1e308 included, to use one.
ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
              "**": operator.pow}


# What the functional op of a level (`Program.op`, nlc/runtime/op.py) takes by keyword besides its
# gates, which it takes by their spec names: no gate may have one of these names.
OP_KEYWORDS = ("q", "k", "v", "mode", "initial_state", "output_final_state", "restart_states",
               "output_period_states")


@dataclass(frozen=True)
class Choice:
    """One resolved option of a level: `huber(delta = d, form = norm)` -> kind 'huber', args.
    Scalar arguments are sympy expressions over numbers and gate symbols."""
    kind: str
    args: Mapping[str, object]
    span: ast.Span | None
    inner: "Choice | None" = None  # `omega(...) of l2`

    def arg(self, name: str):
        return self.args[name]

    def describe(self) -> str:
        parts = [f"{k}={_show(v)}" for k, v in self.args.items() if v is not None]
        text = f"{self.kind}({', '.join(parts)})" if parts else self.kind
        return f"{text} of {self.inner.describe()}" if self.inner else text


class _ShortFloats(StrPrinter):
    def _print_Float(self, expr):
        return f"{float(expr):g}"


def _show(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, sympy.Basic):
        return _ShortFloats().doprint(v).replace("gate_", "")
    return str(v)


@dataclass(frozen=True)
class Memory:
    """Memory architecture. matrix: S [K, V], o = S^T q. vector: m [V] (K == V), o = m * q.
    mlp: residual MLP of `depth` layers (depth 1 = a plain matrix W unless residual/norm are asked)."""
    kind: str  # matrix | vector | mlp
    depth: int = 1
    expand: float = 4.0
    act: str = "gelu"
    residual: bool = False
    gated: bool = False
    norm: str = "none"  # none | layernorm
    bias: bool = False
    span: ast.Span | None = None

    def describe(self) -> str:
        if self.kind != "mlp":
            return self.kind
        flags = [f"depth={self.depth}", f"expand={_show(self.expand)}", f"act={self.act}"]
        flags += [n for n, on in (("residual", self.residual), ("gated", self.gated),
                                  ("bias", self.bias)) if on]
        if self.norm != "none":
            flags.append(f"norm={self.norm}")
        return f"mlp({', '.join(flags)})"


@dataclass(frozen=True)
class Stream:
    """A per-token tensor computed from the input: shape excludes [B, T]."""
    name: str
    shape: tuple[int, ...]
    expr: ast.Expr | None  # None for the input x and for level outputs
    span: ast.Span | None
    source: str = "let"  # let | input | level


@dataclass(frozen=True)
class Gate:
    """A named scalar/vector gate. shape: (H,) scalar per head or (H, D) vector per channel.
    granularity: token | chunk (held over chunks of `chunk` tokens) | constant (no input dependence)."""
    name: str
    shape: tuple[int, ...]
    granularity: str
    chunk: int | None
    expr: ast.Expr
    span: ast.Span


@dataclass(frozen=True)
class Level:
    """A stateful memory and how it learns: the node of the level graph."""
    name: str
    memory: Memory
    bias: Choice
    retention: Choice
    algorithm: Choice
    period: int | None           # None: 'outer' (updated only by the outer training loop)
    grad_at: str                 # current | retained | chunk
    grad_chunk: int | None       # chunk size when grad_at == 'chunk'
    read: str                    # after | before
    init: str                    # zero | learned
    key: str
    value: str
    query: str
    heads: int
    d_key: int
    d_value: int
    gates: tuple[str, ...]       # gate names this level's rule uses, in signature order
    gate_axes: Mapping[str, str] = field(default_factory=dict)  # gate -> scalar | key | value
    span: ast.Span | None = None
    target: str = "value"        # value: the value stream | self: M(value) at the gradient point
                                 # | teach: the model's loss gradient δ (value = query, bias dot, v = -δ)
    stop_target: bool = False    # `stopgrad`: no outer gradient through M(value), or through δ
    init_from: str | None = None  # `init from(level)`: restarts from that level's state...
    restart: int | None = None    # ...every `restart` tokens (that level's period)
    initialises: tuple[str, ...] = ()  # the levels that restart from this level's state

    @property
    def accumulates(self) -> bool:
        """The state is an FTRL accumulator A, read through weights W = psi(A) (lq or ftrl)."""
        return self.retention.kind == "lq" or self.algorithm.kind == "ftrl"

    @property
    def maps_at_chunks(self) -> bool:
        """`lq(apply = chunk)`: the map W = psi(A) runs at the chunk boundaries of `gradient
        chunk_start(C)`; within a chunk the weights are its linearisation at the chunk start."""
        return self.retention.kind == "lq" and self.retention.args.get("apply") == "chunk"

    @property
    def lag_token(self) -> bool:
        """`kl(apply = chunk)`, MATH.md §3.7's lag token: the exact softmax step at the first token of
        each chunk of `gradient chunk_start(C)`, and the same coefficients on W itself (a decay scan,
        gradients at the state after that token) at the chunk's other tokens."""
        return self.retention.kind == "kl" and self.retention.args.get("apply") == "chunk"

    def replace(self, **kw) -> "Level":
        return replace(self, **kw)

    def segment_alignment(self) -> tuple[int, str | None]:
        """(align, why_not) for training in recomputed segments (nlc.runtime.recompute): pieces of a
        sequence equal the whole when each cut falls on the gradient-chunk and update-period
        boundaries, so segment lengths are multiples of `align`; `why_not` says why the level cannot
        run in segments at all (its rule restarts something at each call, or it is nested), or is None."""
        if self.bias.kind == "omega":
            return 1, "its omega window restarts at each call (the window is not part of the state)"
        if self.init_from is not None or self.initialises:
            return 1, "it is a nested level (it restarts from, or hands period states to, another level)"
        return math.lcm(self.grad_chunk or 1, self.period or 1), None

    def describe(self) -> dict[str, str]:
        period = "outer" if self.period is None else f"every {self.period}"
        grad = {"current": "current state", "retained": "retained state",
                "chunk": f"chunk start ({self.grad_chunk})"}[self.grad_at]
        init = self.init if self.init_from is None else f"from {self.init_from} (every {self.restart})"
        out = {"memory": self.memory.describe(), "bias": self.bias.describe(),
               "retention": self.retention.describe(), "algorithm": self.algorithm.describe(),
               "update": period, "gradient": grad, "read": f"{self.read} write", "init": init}
        if self.target == "self":
            out["target"] = f"self({self.value})" + (", stopgrad" if self.stop_target else "")
        if self.target == "teach":
            out["bias"] = "teach signal: <y_t, δ_t>, δ_t = dL/dy_t"
            out["target"] = "teach" + (" (δ constant)" if self.stop_target else " (outer gradient through δ)")
        return out


@dataclass(frozen=True)
class Optimizer:
    """The outer optimizer (MATH.md §4.6): a memory of the parameters' gradients, trained by its own
    bias, retention and algorithm, whose read-out (through `readout`) is the parameter step.
    algorithm: gd(lr) or m3(beta1, beta2, beta3, alpha, every, eps); readout: identity or
    newton_schulz(steps); lr: the peak outer learning rate, or None (the trainer's)."""
    memory: Memory
    bias: Choice
    retention: Choice
    algorithm: Choice
    readout: Choice
    lr: float | None
    span: ast.Span

    def describe(self) -> dict[str, str]:
        out = {"memory": self.memory.describe(), "bias": self.bias.describe(),
               "retention": self.retention.describe(), "algorithm": self.algorithm.describe(),
               "readout": self.readout.describe(), "update": "every outer step"}
        if self.lr is not None:
            out["lr"] = f"{self.lr:g}"
        return out


@dataclass(frozen=True)
class Space:
    """A design space over one level: the valid points and the invalid ones with their reasons."""
    name: str
    level: str
    axes: tuple[tuple[str, tuple[str, ...]], ...]
    size: int
    valid: tuple[dict, ...]
    invalid: tuple[tuple[str, str], ...]
    span: ast.Span


@dataclass(frozen=True)
class CheckedSpec:
    name: str
    file: str
    source: str
    params: Mapping[str, float]
    streams: Mapping[str, Stream]
    gates: Mapping[str, Gate]
    levels: tuple[Level, ...]
    output: ast.Expr
    spaces: tuple[Space, ...]
    spans: Mapping[str, ast.Span]
    shapes: Mapping[ast.Span, tuple[int, ...]]  # per-token shape of every stream expression
    optimizer: Optimizer | None = None  # the spec's outer optimizer, if it declares one

    @property
    def d_model(self) -> int:
        return int(self.params["d_model"])

    def level(self, name: str) -> Level:
        return next(l for l in self.levels if l.name == name)


def constant(e: ast.Expr, params: Mapping[str, float]) -> float:
    """The value of a constant expression the checker already evaluated once (numbers, parameters,
    arithmetic)."""
    match e:
        case ast.Number(value=v):
            return float(v)
        case ast.Name(id=n):
            return float(params[n])
        case ast.Neg(operand=o):
            return -constant(o, params)
        case ast.BinOp(op=op, left=l, right=r):
            return ARITHMETIC[op](constant(l, params), constant(r, params))
    raise AssertionError("constant expected")


def gate_symbol(name: str) -> sympy.Symbol:
    """The sympy symbol standing for a gate inside derived expressions."""
    return sympy.Symbol(f"gate_{name}", real=True)


def gate_names(value) -> list[str]:
    """The gates a scalar argument (a sympy expression, or a plain value) reads, sorted."""
    if not isinstance(value, sympy.Basic):
        return []
    prefix = "gate_"
    return sorted(str(s)[len(prefix):] for s in value.free_symbols if str(s).startswith(prefix))
