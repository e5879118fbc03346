"""The level graph: nodes and edges from checked specs, each verifier check failing on a graph made
to break it, and DOT/text output that no spec name can break."""
import re
import shutil
import subprocess
from dataclasses import replace

import networkx as nx
import pytest

from nlc import ast, graph
from nlc.diagnostics import SpecError
from nlc.lower import check

GDN = """\
# Gated DeltaNet
model gated_deltanet
param d_model = 128
param heads = 2
param d_key = 32
param d_value = 32

let q[heads, d_key] = l2norm(silu(conv(linear(x), 4)))
let k[heads, d_key] = l2norm(silu(conv(linear(x), 4)))
let v[heads, d_value] = silu(conv(linear(x), 4))
gate alpha[heads] = exp(-softplus(linear(x)) * exp(learned(0.0)))
gate beta[heads] per chunk(16) = sigmoid(linear(x))

level memory {
  memory matrix
  bias l2
  retention decay(alpha)
  algorithm gd(lr = beta)
  gradient retained
  read after
}
output = linear(rmsnorm(memory) * silu(linear(x)))
"""

# Two levels: `slow` is keyed on `fast`'s output; `frozen` is trained by the outer loop only.
CHAIN = """\
model chain
param d_model = 16
param heads = 2
let q[heads, 8] = l2norm(linear(x))
let k[heads, 8] = l2norm(linear(x))
let v[heads, 8] = linear(x)
gate eta[heads] = sigmoid(linear(x))
level fast {
  memory mlp(depth = 2)
  bias l2
  algorithm gd(lr = eta)
  update every 4
  read before
}
level slow { memory matrix  bias l2  algorithm gd(lr = 0.1)  update every 16  key fast }
level frozen { memory matrix  bias dot  algorithm gd(lr = 0.1)  update outer }
output = linear(slow + frozen)
"""


def built(source, file="t.nl"):
    checked, _ = check(source, file)
    return graph.build(checked)


def kinds(g):
    return {n: d["kind"] for n, d in g.nodes(data=True)}


def errors(exc):
    return [d for d in exc.value.diagnostics if d.severity == "error"]


def test_nodes_have_kinds_spans_and_labels():
    g = built(GDN)
    assert kinds(g) == {"x": "input", "q": "stream", "k": "stream", "v": "stream", "alpha": "gate",
                        "beta": "gate", "memory": "level", graph.OUTER: "level",
                        graph.OUTPUT: "output"}
    mem = g.nodes["memory"]
    assert mem["period"] == 1 and mem["level"].name == "memory"
    assert set(mem["label"]) == set(graph.LEVEL_FIELDS)
    assert mem["label"]["retention"] == "decay(rate=alpha)"
    assert (mem["span"].line, mem["span"].column) == (14, 1)
    assert g.nodes["beta"]["granularity"] == "chunk" and g.nodes["beta"]["chunk"] == 16
    assert g.nodes["q"]["span"].line == 8
    assert g.nodes[graph.OUTER]["period"] is None and g.nodes[graph.OUTER]["frequency"] == 0
    assert g.nodes[graph.OUTPUT]["span"].line == 22
    graph.verify(g)


def test_flow_edges_carry_roles():
    g = built(GDN)
    assert {d["kind"] for *_, d in g.edges(data=True)} == {"flow"}  # init zero, period 1: no nesting
    assert g.edges["k", "memory"]["roles"] == ("key",)
    assert g.edges["q", "memory"]["roles"] == ("query",)
    assert g.edges["alpha", "memory"]["roles"] == ("gate",)
    assert g.has_edge("x", "q") and g.has_edge("memory", graph.OUTPUT) and g.has_edge("x", graph.OUTPUT)
    assert not any(n in g for n in ("d_key", "head"))  # parameters are not nodes


def test_chain_and_nesting():
    g = built(CHAIN)
    assert g.edges["fast", "slow"] == {"kind": "flow", "roles": ("key",)}
    nests = {(u, v) for u, v, d in g.edges(data=True) if d["kind"] == "nests"}
    assert nests == {(graph.OUTER, "fast"), (graph.OUTER, "frozen")}  # init learned; update outer
    assert graph.by_frequency(g) == ["fast", "slow", "frozen", graph.OUTER]
    graph.verify(g)


def test_text_lists_levels_fastest_first():
    text = graph.to_text(built(CHAIN))
    assert text.index("  fast") < text.index("  slow") < text.index("  frozen") < text.index("  outer")
    assert "update: every 4" in text and "read: before write" in text
    assert "fast -> slow  (key)" in text and "outer nests fast" in text


def test_write_inputs_reading_own_output_is_a_cycle():
    g = built(GDN)
    g.add_edge("memory", "k", kind="flow", roles=("expr",))
    with pytest.raises(SpecError) as exc:
        graph.verify(g)
    first = errors(exc)[0]
    assert "level 'memory' reads its own output through its key: memory -> k -> memory" in first.message
    assert "read before" in first.hint and first.span.line == 14
    text = exc.value.render()
    assert "t.nl:14:1" in text and "t.nl:9:1" in text  # every node on the path, with file:line
    # Reading before writing makes it causal: the key only affects the next token's read.
    g.nodes["memory"]["level"] = g.nodes["memory"]["level"].replace(read="before")
    graph.verify(g)


def test_query_reading_own_output_is_a_cycle_even_when_reading_before():
    g = built(CHAIN)
    g.add_edge("fast", "q", kind="flow", roles=("expr",))
    with pytest.raises(SpecError) as exc:
        graph.verify(g)
    assert "cycle in the level graph: fast -> q -> fast" in errors(exc)[0].message


def test_stream_cycle_path_has_every_location():
    g = built(GDN)
    g.add_edge("v", "q", kind="flow", roles=("expr",))
    g.add_edge("q", "v", kind="flow", roles=("expr",))
    with pytest.raises(SpecError) as exc:
        graph.verify(g)
    first = errors(exc)[0]
    assert first.message == "cycle in the level graph: q -> v -> q"
    assert "q (t.nl:8:1) -> v (t.nl:10:1) -> q (t.nl:8:1)" in first.hint


def test_frequency_order():
    g = built(CHAIN)
    g.add_edge("slow", "fast", kind="nests")  # faster inside slower: fine
    graph.verify(g)
    g.add_edge("fast", "slow", kind="nests")  # every 16 nested in every 4: too slow
    with pytest.raises(SpecError) as exc:
        graph.verify(g)
    first = errors(exc)[0]
    assert "level 'slow' (every 16) is nested in 'fast' (every 4)" in first.message
    assert first.span.line == 15


def test_unresolved_name():
    checked, _ = check(GDN, "t.nl")
    span = checked.output.span
    broken = replace(checked, output=ast.BinOp("+", checked.output, ast.Name("memroy", span), span))
    g = graph.build(broken)
    assert "kind" not in g.nodes["memroy"]
    with pytest.raises(SpecError) as exc:
        graph.verify(g)
    first = errors(exc)[0]
    assert "unresolved name 'memroy'" in first.message and first.hint == "did you mean 'memory'?"
    assert first.span.line == 22


def test_spec_names_that_clash_with_fixed_nodes():
    g = built(CHAIN.replace("frozen", "outer").replace("slow", "output"))
    assert g.nodes["outer"]["kind"] == "level" and g.nodes[graph.OUTER]["name"] == "outer"
    assert g.nodes["output"]["kind"] == "level" and g.nodes[graph.OUTPUT]["kind"] == "output"
    assert {u for u, v, d in g.edges(data=True) if d["kind"] == "nests"} == {graph.OUTER}


def test_dot_escapes_every_label():
    assert graph.dot_escape('a"b\\c\nd<e>{f}|g\r') == 'a\\"b\\\\c\\nd\\<e\\>\\{f\\}\\|g\\n'
    g = nx.DiGraph(name='say "hi"')
    g.add_node("n", kind="stream", name='q"; n9 [label="pwned"]; //')
    g.add_node("m", kind="level", name="a\\", label={"bias": "x}\n{y"}, period=1)
    g.add_edge("n", "m", kind="flow", roles=('"',))
    dot = graph.to_dot(g)
    assert 'label="q\\"; n9 [label=\\"pwned\\"]; //"' in dot
    assert 'label="a\\\\\\nbias: x\\}\\n\\{y\\l"' in dot
    statements = [l for l in dot.splitlines() if re.match(r"  n\d+ ", l)]
    assert len(statements) == 3 and statements[2].startswith("  n0 -> n1 [")
    _check_dot(dot, 'q&quot;; n9 [label=&quot;pwned&quot;]; //')


def test_dot_shapes_and_edges():
    dot = graph.to_dot(built(CHAIN))
    lines = dot.splitlines()
    assert lines[0] == "digraph nlc {" and lines[-1] == "}"
    ids = {n: f"n{i}" for i, n in enumerate(built(CHAIN).nodes)}
    assert any(l.startswith(f"  {ids['fast']} [shape=box") and "update: every 4" in l for l in lines)
    assert any(l.startswith(f"  {ids['eta']} [shape=ellipse, fontsize=10") for l in lines)
    assert f'  {ids[graph.OUTER]} -> {ids["fast"]} [style=dashed, label="nests"];' in lines
    assert f'  {ids["fast"]} -> {ids["slow"]} [style=solid, label="key"];' in lines
    _check_dot(dot, "every 16")


def _check_dot(dot, expect):
    """Quotes balance on every line; with Graphviz installed, the text renders to an SVG."""
    for line in dot.splitlines():
        assert line.replace('\\\\', "").replace('\\"', "").count('"') % 2 == 0, line
    if shutil.which("dot") is None:
        return
    svg = subprocess.run(["dot", "-Tsvg"], input=dot, capture_output=True, text=True, timeout=30)
    assert svg.returncode == 0, svg.stderr
    assert "<svg" in svg.stdout and expect in svg.stdout
