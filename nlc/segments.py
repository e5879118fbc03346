"""The segment loop a `recall(level, q, segment = S)` implies (Titans MAC, MATH.md §2.9).

A recall reads the level's state at the start of the current segment of S tokens; the level's keys
and values may depend on the recall (retrieve -> attend -> write), so such a layer runs segment by
segment: everything that reads a recall or a recalled level, transitively, is computed per segment
(with the recalled levels' states carried from one segment to the next); the rest runs once over the
whole sequence before the loop. `plan` says which is which; `check` rejects what a segment would
change the meaning of (a convolution, which would restart at each segment; attention not confined to
the segment; chunk sizes that do not divide the segment)."""
from __future__ import annotations

from dataclasses import dataclass

from . import ast, ir
from .diagnostics import Collector
from .lower import expression_names, recalls


@dataclass(frozen=True)
class SegmentPlan:
    size: int | None            # S, or None: no recall, the layer runs over the whole sequence
    inside: frozenset[str]      # streams, gates and levels computed segment by segment
    recalled: tuple[str, ...]   # levels whose state a recall reads (carried across segments)


def _exprs(checked: ir.CheckedSpec):
    """(name, expression) of every gate and let."""
    yield from ((n, g.expr) for n, g in checked.gates.items())
    yield from ((n, s.expr) for n, s in checked.streams.items() if s.source == "let")


def plan(checked: ir.CheckedSpec) -> SegmentPlan:
    calls = {n: recalls(e) for n, e in _exprs(checked)}
    calls["@output"] = recalls(checked.output)
    found = [c for cs in calls.values() for c in cs]
    if not found:
        return SegmentPlan(None, frozenset(), ())
    size = int(ir.constant(found[0].kwarg("segment"), checked.params))
    recalled = tuple(dict.fromkeys(c.args[0].id for c in found))
    readers: dict[str, set[str]] = {}
    for n, e in _exprs(checked):
        for used in expression_names(e):
            readers.setdefault(used, set()).add(n)
    for lv in checked.levels:
        for used in {lv.key, lv.value, lv.query, *lv.gates}:
            readers.setdefault(used, set()).add(lv.name)
    inside = {n for n, cs in calls.items() if cs and n != "@output"} | set(recalled)
    todo = list(inside)
    while todo:
        for r in readers.get(todo.pop(), ()):
            if r not in inside:
                inside.add(r)
                todo.append(r)
    return SegmentPlan(size, frozenset(inside), recalled)


def check(checked: ir.CheckedSpec, diag: Collector) -> None:
    """Errors for what the segment loop cannot compute with the whole-sequence meaning."""
    p = plan(checked)
    if p.size is None:
        return
    for n, e in [*_exprs(checked), ("@output", checked.output)]:
        for c in recalls(e):
            if int(ir.constant(c.kwarg("segment"), checked.params)) != p.size:
                diag.error("recall() segments differ", c.span, f"segment = {p.size}, as the first recall")
        if n not in p.inside and n != "@output":
            continue
        for c in _calls(e):
            if c.func == "conv":
                diag.error("conv() computed segment by segment would restart at each segment",
                           c.span, "a stream that does not read recall(...), or no conv")
            block = c.kwarg("block") if c.func == "attention" else None
            if c.func == "attention" and (block is None or ir.constant(block, checked.params) != p.size):
                diag.error("attention computed segment by segment must stay inside its segment",
                           c.span, f"attention(..., block = {p.size})")
    for n in p.inside:
        if n in checked.gates and checked.gates[n].chunk and p.size % checked.gates[n].chunk:
            diag.error(f"gate '{n}' is held per chunk of {checked.gates[n].chunk}, which does not "
                       f"divide the segment ({p.size})", checked.gates[n].span, "a divisor of the segment")
    for lv in checked.levels:
        if lv.name in p.inside:
            for what, c in (("update period", lv.period), ("gradient chunk", lv.grad_chunk)):
                if c and p.size % c:
                    diag.error(f"level '{lv.name}' runs segment by segment but its {what} ({c}) "
                               f"does not divide the segment ({p.size})", lv.span,
                               "a divisor of the segment length")


def _calls(e):
    match e:
        case ast.Call(args=args, kwargs=kwargs):
            yield e
            for a in [*args, *(v for _, v in kwargs)]:
                yield from _calls(a)
        case ast.BinOp(left=l, right=r):
            yield from _calls(l)
            yield from _calls(r)
        case ast.Neg(operand=o):
            yield from _calls(o)
