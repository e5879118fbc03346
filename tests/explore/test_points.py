"""Numeric space axes (`chunk in {16, 64}`, `lr in logrange(a, b)`) and the spec text of a point."""
from pathlib import Path

import pytest

import nlc
from nlc.explore import points

SPECS = Path(__file__).resolve().parents[2] / "specs"

SPEC = """model tiny
param d_model = 16
param heads = 2
param d_key = 8
param chunk = 16
param lr = 0.1
let q[heads, d_key] = l2norm(linear(x))
let k[heads, d_key] = l2norm(linear(x))
let v[heads, d_key] = linear(x)
level memory {
  memory matrix
  bias l2
  retention none
  algorithm gd(lr = lr)
}
space s over memory {
  bias in {dot, l2}
  chunk in {16, 64}
  read in {after, before}
  lr in logrange(1e-4, 1e-2)
}
output = x + linear(memory)
"""


def test_numeric_axes_parse_and_check():
    space = nlc.compile(SPEC).spaces[0]
    assert space.axes == (("bias", ("dot", "l2")), ("chunk", ("16", "64")),
                          ("read", ("after", "before")), ("lr", ("logrange(0.0001, 0.01)",)))
    assert space.size == 8 and len(space.valid) == 8
    assert space.valid[0]["lr"] == "logrange(0.0001, 0.01)"


def test_a_range_is_checked_at_both_ends():
    bad = SPEC.replace("lr in logrange(1e-4, 1e-2)", "param heads in logrange(1, 2.5)")
    with pytest.raises(nlc.SpecError, match="'heads' must be an integer >= 1, got 2.5"):
        nlc.compile(bad)  # valid at 1, not at 2.5: no valid point
    with pytest.raises(nlc.SpecError, match="empty or not positive"):
        nlc.compile(SPEC.replace("logrange(1e-4, 1e-2)", "logrange(1e-2, 1e-4)"))
    with pytest.raises(nlc.SpecError, match="ranges over linrange"):
        nlc.compile(SPEC.replace("logrange(1e-4, 1e-2)", "linrange(1e-4, 1e-2)"))


def test_grid_refuses_continuous_axes():
    space = nlc.compile(SPEC).spaces[0]
    with pytest.raises(ValueError, match="tpe or nsga2"):
        points.grid(space)


def test_point_source_is_an_ordinary_spec():
    program = nlc.compile(SPEC)
    point = {"bias": "dot", "chunk": "64", "read": "before", "lr": "0.003"}
    text = points.source(SPEC, "<spec>", program.spaces[0], point)
    assert "space" not in text.split("\n", 1)[1]
    assert "param chunk = 64" in text and "param lr = 0.003" in text
    compiled = nlc.compile(text)
    level = compiled.levels[0]
    assert (level.bias.kind, level.read, compiled.params["chunk"]) == ("dot", "before", 64)
    assert points.invalid_reason(program.spaces[0], point) is None


def test_shipped_spaces_write_compilable_points():
    for name in ("delta_space.nl", "miras_space.nl"):
        program = nlc.compile(SPECS / name)
        space = program.spaces[0]
        for point in (space.valid[0], space.valid[-1]):
            nlc.compile(points.source(program.source, name, space, point))
