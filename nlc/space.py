"""Design spaces: `space name over level { field in {...}  param p in {...}  lr in logrange(a, b) }`.
Each point is the spec with those choices substituted; the checker decides which points are valid,
and why not. A bare name that is a parameter and not a level field (`chunk in {16, 64}`) is a
parameter axis; `logrange(lo, hi)` is a continuous log-uniform parameter axis, checked at both ends
and recorded in the points as its text (`parse_range` reads it back)."""
from __future__ import annotations

import itertools

from . import ast, ir, options
from .diagnostics import SpecError

MAX_CHECKED_POINTS = 4096


def expand_space(lowering, d: ast.SpaceDecl) -> ir.Space:
    """Validate the axes of one space and check every point (up to MAX_CHECKED_POINTS)."""
    levels = {x.name: x for x in lowering.spec.decls if isinstance(x, ast.LevelDecl)}
    if d.level not in levels:
        lowering._unknown(d.level, d.span, levels, "a level of this spec")
    axes = []
    for alt in d.alternatives:
        is_param = alt.is_param or (alt.key in lowering.params and alt.key not in options.LEVEL_FIELDS)
        if is_param:
            if alt.key not in lowering.params:
                lowering._unknown(alt.key, alt.span, lowering.params, "a parameter of this spec")
            if len(alt.choices) == 1 and isinstance(alt.choices[0], ast.Call):
                axes.append((alt, [_range(lowering, alt.key, alt.choices[0])]))
                continue
            values = [lowering._number(c) for c in alt.choices]
            axes.append((alt, [("param", alt.key, v, _fmt(v)) for v in values]))
        else:
            if alt.key not in options.LEVEL_FIELDS:
                lowering._unknown(alt.key, alt.span, options.LEVEL_FIELDS, "a level field")
            axes.append((alt, [("field", alt.key, c, _text(lowering.spec.source, c))
                               for c in alt.choices]))
    size = 1
    for _, choices in axes:
        size *= len(choices)
    valid, invalid = [], []
    for point in itertools.islice(itertools.product(*[c for _, c in axes]), MAX_CHECKED_POINTS):
        label = ", ".join(f"{key}={text}" for _, key, _, text in point)
        reason = _check_point(lowering, levels[d.level], point)
        if reason is None:
            valid.append({key: text for _, key, _, text in point})
        else:
            invalid.append((label, reason))
    if size > MAX_CHECKED_POINTS:
        lowering.diag.note(f"space '{d.name}' has {size} points; the first {MAX_CHECKED_POINTS} "
                           "were checked", d.span)
    if not valid:
        lowering.diag.error(f"space '{d.name}' has no valid point", d.span,
                            "at least one combination the checker accepts",
                            invalid[0][1] if invalid else None)
    return ir.Space(d.name, d.level, tuple((a.key, tuple(t for *_, t in c)) for a, c in axes),
                    size, tuple(valid), tuple(invalid), d.span)


def _check_point(lowering, level: ast.LevelDecl, point) -> str | None:
    from .lower import _Lowering
    fields = {f.key: f for f in level.fields}
    overrides = dict(lowering.overrides)
    ends = [(key, value) for kind, key, value, _ in point if kind == "range"]
    if ends:  # a continuous axis: the point is valid when it is at both ends of every range
        for which in (0, 1):
            fixed = [("param", k, v[which], _fmt(v[which])) if kind == "range" else (kind, k, v, t)
                     for kind, k, v, t in point]
            reason = _check_point(lowering, level, fixed)
            if reason is not None:
                return reason
        return None
    for kind, key, value, _ in point:
        if kind == "param":
            overrides[key] = value
        else:
            fields[key] = ast.Field(key, value, value.span)
    new_level = ast.LevelDecl(level.name, tuple(fields.values()), level.span)
    decls = tuple(new_level if x is level else x for x in lowering.spec.decls
                  if not isinstance(x, ast.SpaceDecl))
    spec = ast.Spec(lowering.spec.file, lowering.spec.source, decls)
    try:
        _Lowering(spec, overrides, with_spaces=False).run()
    except SpecError as exc:
        first = next(d for d in exc.diagnostics if d.severity == "error")
        return first.message
    return None


def _range(lowering, key: str, call: ast.Call):
    """`logrange(lo, hi)` with 0 < lo < hi: a ("range", key, (lo, hi), text) axis choice."""
    if call.func != "logrange" or len(call.args) != 2 or call.kwargs:
        lowering._fail(f"'{key}' ranges over {call.func}(...)", call.span,
                       "{a, b, ...} or logrange(lo, hi)")
    lo, hi = (lowering._number(a) for a in call.args)
    if not 0 < lo < hi:
        lowering._fail(f"logrange({_fmt(lo)}, {_fmt(hi)}) is empty or not positive", call.span,
                       "0 < lo < hi")
    return ("range", key, (lo, hi), f"logrange({_fmt(lo)}, {_fmt(hi)})")


def parse_range(text: str) -> tuple[float, float] | None:
    """The (lo, hi) of a point's `logrange(lo, hi)` value, None for any other value."""
    if not (text.startswith("logrange(") and text.endswith(")")):
        return None
    lo, hi = text[len("logrange("):-1].split(",")
    return float(lo), float(hi)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _text(source: str, e) -> str:
    """The choice as the user wrote it (single line)."""
    lines = source.splitlines()
    s = e.span
    if s.line == s.end_line and 0 < s.line <= len(lines):
        return lines[s.line - 1][s.column - 1:s.end_column - 1]
    return type(e).__name__
