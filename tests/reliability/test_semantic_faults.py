"""Semantic faults get specific errors with a location: cycles in the level graph (with their path),
a faster level nested in a slower one, KL retention on a memory that can leave the simplex, lp with
p <= 0, unknown gates, shape mismatches between levels. tests/test_bad_specs.py pins the simplest
form of several; these are the multi-level and less direct ones."""
from __future__ import annotations

import networkx as nx
import pytest

from nlc import graph
from nlc.diagnostics import SpecError
from nlc.lower import check
from tests.test_bad_specs import BASE, sub

from .test_fuzz_frontend import front_end

A = "level a { memory matrix  bias l2  algorithm gd(lr = 0.5)  key %s }"
THREE_LEVELS = sub(l9=A % "c", l10=A.replace("level a", "level b") % "a",
                   l11=A.replace("level a", "level c") % "b", l12="", l13="", l14="",
                   l15="output = linear(a + b + c)")
OWN_GATE = sub(l8="gate beta[heads] = sigmoid(linear(mem))")  # `mem` steps with a gate of its output
CROSS_LEVEL = BASE.replace("output = linear(mem)", """let o[heads, 8] = linear(mem)
let wide[heads, 4] = linear(x)
level b {
  memory matrix
  bias l2
  algorithm gd(lr = 0.5)
  key o
  value v
  query %s
}
output = linear(b)""")

FAULTS = [  # (case, spec, substrings of the first error, line, column, substring of hint or None)
    ("cycle_of_three_levels", THREE_LEVELS, ["cycle in the level graph: a -> c -> b -> a"], 9, 1,
     "path: a (t.nl:9:1) -> c (t.nl:11:1) -> b (t.nl:10:1) -> a (t.nl:9:1)"),
    ("gate_reads_the_level_it_drives", OWN_GATE, ["cycle in the level graph: beta -> mem -> beta"],
     8, 1, "path: beta (t.nl:8:1) -> mem (t.nl:9:1) -> beta (t.nl:8:1)"),
    ("kl_on_a_zero_state", sub(l12="  retention kl(decay = alpha)"),
     ["KL retention keeps the memory on the simplex", "init learned"], 12, 13, None),
    ("kl_strength_zero", sub(l12="  retention kl(global = 0)  init learned"),
     ["kl(global) is a strength", "> 0"], 12, 13, None),
    ("lp_p_negative", sub(l11="  bias lp(p = -1)"), ["lp needs p > 0, got -1"], 11, 8, None),
    ("lp_p_cancels_to_zero", sub(l11="  bias lp(p = 2 - 2)"), ["lp needs p > 0, got 0"], 11, 8, None),
    ("lp_p_of_parameters", sub(l3="param heads = 2\nparam p = 0", l11="  bias lp(p = p)"),
     ["lp needs p > 0, got 0"], 12, 8, None),
    ("unknown_gate_in_retention", sub(l12="  retention decay(alhpa)"), ["unknown name 'alhpa'"],
     12, 19, "did you mean 'alpha'?"),
    ("unknown_gate_in_a_rate", sub(l13="  algorithm momentum(lr = beta, beta = gamma)"),
     ["unknown name 'gamma'", "a gate or parameter"], 13, 40, None),
    ("query_of_another_level_shape", CROSS_LEVEL % "wide",
     ["key [2, 8] and query [2, 4] of level 'b' differ"], 17, 1, None),
    ("value_heads_differ", (CROSS_LEVEL % "o").replace("value v", "value wide")
     .replace("let wide[heads, 4] = linear(x)", "let wide[1, 8] = linear(x)"),
     ["key has 2 heads but value has 1"], 17, 1, None),
]


@pytest.mark.parametrize("case,text,needles,line,column,hint", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault(case, text, needles, line, column, hint):
    with pytest.raises(SpecError) as exc:
        front_end(text, "t.nl")
    first = next(d for d in exc.value.diagnostics if d.severity == "error")
    rendered = first.render(text)
    for needle in needles:
        assert needle in rendered, rendered
    assert (first.span.line, first.span.column) == (line, column), rendered
    if hint is not None:
        assert first.hint and hint in first.hint, rendered


def test_kl_on_an_mlp_memory_warns():
    _, diagnostics = check(sub(l10="  memory mlp", l12="  retention kl(decay = alpha)  init learned"),
                           "t.nl")
    warning = next(d for d in diagnostics if d.severity == "warning")
    assert "KL retention keeps every MLP weight positive" in warning.message
    assert (warning.span.line, warning.span.column) == (12, 13)


def test_faster_level_nested_in_a_slower_one():
    """Only the outer loop nests levels in today's language (`init learned`, `update outer`), so the
    frequency check is exercised on a level graph with a nesting edge between two levels."""
    checked, _ = check(THREE_LEVELS.replace("key c }", "key k  update every 4 }"), "t.nl")
    g = graph.build(checked)
    g.add_edge("b", "a", kind="nests")  # b (every 1) would learn the initial state of a (every 4)
    with pytest.raises(SpecError) as exc:
        graph.verify(g)
    first = exc.value.diagnostics[0]
    assert "level 'a' (every 4) is nested in 'b' (every 1) but updates more slowly" in first.message
    assert (first.span.line, first.span.column) == (9, 1) and "nester at b (t.nl:10:1)" in first.hint
    assert nx.is_directed_acyclic_graph(graph._instant(g))
