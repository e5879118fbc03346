"""The points of a checked design space (`ir.Space`): how a sampler picks one, whether the checker
accepts it, and the ordinary spec text it stands for (what a trial compiles and `nlc report` writes)."""
from __future__ import annotations

from .. import ast, options
from ..ir import Space
from ..parse import parse
from ..space import parse_range

GRID_AXIS = "point"  # the one categorical axis of a grid search: the labels of the valid points


def label(point: dict[str, str]) -> str:
    """`key=value, ...`, as the checker labels invalid points."""
    return ", ".join(f"{k}={v}" for k, v in point.items())


def grid(space: Space) -> list[str]:
    """The labels of the valid points (a grid search runs each once); continuous axes are not allowed."""
    ranged = [key for key, choices in space.axes if any(parse_range(c) for c in choices)]
    if ranged:
        raise ValueError(f"a grid search needs finite axes; {', '.join(ranged)} range(s) over an "
                         "interval: use --sampler tpe or nsga2")
    return [label(p) for p in space.valid]


def suggest(trial, space: Space, by_point: bool) -> dict[str, str]:
    """Ask an Optuna trial for a point: one categorical over the valid points (grid), or one parameter
    per axis (categorical, or log-uniform for `logrange`), which may land on an invalid point."""
    if by_point:
        chosen = trial.suggest_categorical(GRID_AXIS, grid(space))
        return next(p for p in space.valid if label(p) == chosen)
    point = {}
    for key, choices in space.axes:
        bounds = parse_range(choices[0]) if len(choices) == 1 else None
        if bounds:
            point[key] = f"{trial.suggest_float(key, *bounds, log=True):.4g}"
        else:
            point[key] = trial.suggest_categorical(key, list(choices))
    return point


def invalid_reason(space: Space, point: dict[str, str]) -> str | None:
    """The checker's reason a point is invalid (None when it is valid)."""
    pattern = {k: (v if not parse_range(c[0]) else c[0]) for (k, c), v in zip(space.axes, point.values())}
    text = label(pattern)
    if any(label(p) == text for p in space.valid):
        return None
    return next((why for lab, why in space.invalid if lab == text),
                "not among the checked points of the space (beyond its first 4096)")


def source(spec_source: str, file: str, space: Space, point: dict[str, str]) -> str:
    """The spec with the point's choices written in and the space declarations removed: an ordinary
    spec that `nlc compile` accepts."""
    spec = parse(spec_source, file)
    level = next(d for d in spec.decls if isinstance(d, ast.LevelDecl) and d.name == space.level)
    fields = {f.key: f for f in level.fields}
    params = {d.name: d for d in spec.decls if isinstance(d, ast.ParamDecl)}
    edits = []  # (start offset, end offset, text)
    for key, value in point.items():
        if key in options.LEVEL_FIELDS:
            if key in fields:
                edits.append((*_offsets(spec_source, fields[key].span), f"{key} {value}"))
            else:
                end = _offsets(spec_source, level.span)[1] - 1  # before the level's closing brace
                edits.append((end, end, f"  {key} {value}\n"))
        else:
            edits.append((*_offsets(spec_source, params[key].span), f"param {key} = {value}"))
    for d in spec.decls:
        if isinstance(d, ast.SpaceDecl):
            start, end = _offsets(spec_source, d.span)
            edits.append((start, end + (spec_source[end:end + 1] == "\n"), ""))
    text = spec_source
    for start, end, new in sorted(edits, reverse=True):
        text = text[:start] + new + text[end:]
    return f"# A point of space '{space.name}' in {file}: {label(point)}\n{text}"


def _offsets(text: str, span) -> tuple[int, int]:
    starts = [0]
    for line in text.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    return starts[span.line - 1] + span.column - 1, starts[span.end_line - 1] + span.end_column - 1
