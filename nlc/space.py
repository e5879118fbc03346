"""Design spaces: `space name over level { field in {...}  param p in {...} }`. Each point is the
spec with those choices substituted; the checker decides which points are valid, and why not."""
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
        if alt.is_param:
            if alt.key not in lowering.params:
                lowering._unknown(alt.key, alt.span, lowering.params, "a parameter of this spec")
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


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def _text(source: str, e) -> str:
    """The choice as the user wrote it (single line)."""
    lines = source.splitlines()
    s = e.span
    if s.line == s.end_line and 0 < s.line <= len(lines):
        return lines[s.line - 1][s.column - 1:s.end_column - 1]
    return type(e).__name__
