"""The level graph (networkx): the input, streams, gates, levels, the output and the outer training
loop as nodes; context flows (who reads whom) and nesting (who learns whose initial state: the outer
loop `nests` a meta-learned level; a level `initialises` one that restarts from its state) as edges.
`build` makes it from a checked spec, `verify` checks it, `to_dot` and `to_text` show it."""
from __future__ import annotations

import math

import networkx as nx

from . import ast, ir
from .diagnostics import Collector, nearest
from .lower import expression_names, recalls

# Node ids of the fixed nodes. '@' cannot start a spec name, so these never clash with one.
INPUT, OUTPUT, OUTER, OPTIMIZER = "x", "@output", "@outer", "@optimizer"
# What a level's write reads. With `read before` its output needs only the query and the old state,
# so a path from its output back into one of these is causal (it takes effect at the next token).
WRITE_ROLES = frozenset({"key", "value", "gate"})
LEVEL_FIELDS = ("memory", "bias", "retention", "algorithm", "update", "gradient", "read", "init")
OPTIMIZER_FIELDS = ("readout", "lr")  # shown after the level fields on the optimizer's node


def build(checked: ir.CheckedSpec) -> nx.DiGraph:
    """The level graph of a checked spec. Node ids are spec names (plus INPUT, OUTPUT, OUTER and, when
    the spec declares one, OPTIMIZER, nested in OUTER); every node has `kind` (input | stream | gate |
    level | output), `name` and `span`."""
    g = nx.DiGraph(name=checked.name, file=checked.file, source=checked.source)
    g.add_node(INPUT, kind="input", name="x", shape=checked.streams["x"].shape, span=None)
    for s in checked.streams.values():
        if s.source == "let":
            g.add_node(s.name, kind="stream", name=s.name, shape=s.shape, span=s.span,
                       attention=_attends(s.expr))
    for gate in checked.gates.values():
        g.add_node(gate.name, kind="gate", name=gate.name, shape=gate.shape,
                   granularity=gate.granularity, chunk=gate.chunk, span=gate.span)
    for lv in checked.levels:
        g.add_node(lv.name, kind="level", name=lv.name, level=lv, period=lv.period,
                   frequency=0 if lv.period is None else 1 / lv.period, label=lv.describe(),
                   span=lv.span)
    g.add_node(OUTER, kind="level", name="outer", level=None, period=None, frequency=0,
               label={"update": "outer training loop (frequency 0)"}, span=None)
    g.add_node(OUTPUT, kind="output", name="output", span=checked.output.span)
    if checked.optimizer is not None:  # the outer loop's optimizer is a level of its own (MATH §4.6)
        g.add_node(OPTIMIZER, kind="level", name="optimizer", level=None, period=None, frequency=0,
                   label=checked.optimizer.describe(), span=checked.optimizer.span)
        g.add_edge(OUTER, OPTIMIZER, kind="nests")

    skip = set(checked.params) | {"head"}  # names in expressions that are not nodes
    for s in checked.streams.values():
        if s.source == "let":
            _expr_flows(g, s.expr, s.name, skip)
    for gate in checked.gates.values():
        _expr_flows(g, gate.expr, gate.name, skip)
    for lv in checked.levels:
        for role in ("key", "value", "query"):
            _flow(g, getattr(lv, role), lv.name, role)
        for gate in lv.gates:
            _flow(g, gate, lv.name, "gate")
        if lv.init == "learned" or lv.period is None:
            g.add_edge(OUTER, lv.name, kind="nests")
        if lv.init_from is not None:  # beside a flow between the two levels, an attribute of its edge
            if g.has_edge(lv.init_from, lv.name):
                g.edges[lv.init_from, lv.name]["initialises"] = True
            else:
                g.add_edge(lv.init_from, lv.name, kind="initialises", initialises=True)
    _expr_flows(g, checked.output, OUTPUT, skip)
    return g


def _attends(e) -> bool:
    """Whether a stream's expression calls softmax attention (drawn as a non-parametric block)."""
    match e:
        case ast.Call(func=f, args=args, kwargs=kwargs):
            return f == "attention" or any(_attends(a) for a in [*args, *(v for _, v in kwargs)])
        case ast.BinOp(left=l, right=r):
            return _attends(l) or _attends(r)
        case ast.Neg(operand=o):
            return _attends(o)
    return False


def _expr_flows(g: nx.DiGraph, e: ast.Expr, dst: str, skip: set[str]) -> None:
    for name in expression_names(e):
        if name in g or name not in skip:  # a name that is no node and no parameter: unresolved
            _flow(g, name, dst, "expr")
    for call in recalls(e):  # the level's state at the segment start: takes effect a segment later
        _flow(g, call.args[0].id, dst, "recall")


def _flow(g: nx.DiGraph, src: str, dst: str, role: str) -> None:
    roles = g.edges[src, dst]["roles"] if g.has_edge(src, dst) else ()
    g.add_edge(src, dst, kind="flow", roles=tuple(sorted({*roles, role})))


# ---- verification ------------------------------------------------------------------------------
def verify(graph: nx.DiGraph) -> None:
    """Raise SpecError if a name is unresolved, the flows have a cycle (including a level whose key or
    value reads its own output while it reads after writing), or a nested level is slower than the
    level nesting it."""
    diag = Collector(graph.graph.get("source"))
    _check_defined(graph, diag)
    _check_cycles(graph, diag)
    _check_frequency(graph, diag)
    diag.raise_if_errors()


def _check_defined(graph, diag) -> None:
    defined = [n for n, d in graph.nodes(data=True) if "kind" in d]
    for n, data in graph.nodes(data=True):
        if "kind" in data:
            continue
        users = [v for v in graph.successors(n)] + [u for u in graph.predecessors(n)]
        span = next((graph.nodes[u].get("span") for u in users if graph.nodes[u].get("span")), None)
        where = ", ".join(_where(graph, u) for u in users)
        diag.error(f"unresolved name '{n}' used by {where}", span,
                   "a stream, gate or level declared in the spec", nearest(str(n), defined))


def _instant(graph) -> nx.DiGraph:
    """Flows that take effect within one token: all but write inputs of a `read before` level."""
    out = nx.DiGraph()
    for u, v, d in graph.edges(data=True):
        if d.get("kind") != "flow":
            continue
        lv = graph.nodes[v].get("level")
        if lv is not None and lv.read == "before" and set(d.get("roles", ())) <= WRITE_ROLES:
            continue
        if d.get("roles") == ("recall",):
            continue
        out.add_edge(u, v)
    return out


def _check_cycles(graph, diag) -> None:
    instant = _instant(graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    comps = [c for c in nx.strongly_connected_components(instant)
             if len(c) > 1 or any(instant.has_edge(n, n) for n in c)]
    for comp in sorted(comps, key=lambda c: min(order[n] for n in c)):
        path = [u for u, _ in nx.find_cycle(instant.subgraph(comp), source=min(comp, key=order.get))]
        _report_cycle(graph, _rotate(graph, path), diag)


def _rotate(graph, path: list) -> list:
    """Start a cycle at the level it wrongly feeds (through a write input), else at a level."""
    def score(i):
        n, roles = path[i], set(graph.edges[path[i - 1], path[i]].get("roles", ()))
        is_level = graph.nodes[n].get("kind") == "level"
        return (not (is_level and roles & WRITE_ROLES), not is_level, i)
    i = min(range(len(path)), key=score)
    return path[i:] + path[:i]


def _report_cycle(graph, path: list, diag) -> None:
    loop = path + path[:1]
    text = " -> ".join(graph.nodes[n].get("name", str(n)) for n in loop)
    last_roles = set(graph.edges[path[-1], path[0]].get("roles", ()))
    head = graph.nodes[path[0]]
    if head.get("kind") == "level" and last_roles & WRITE_ROLES and "query" not in last_roles:
        role = sorted(last_roles & WRITE_ROLES)[0]
        message = f"level '{head['name']}' reads its own output through its {role}: {text}"
        hint = ("a level may feed its own key, value or gates only if it reads before writing: "
                "add `read before`")
    else:
        message, hint = f"cycle in the level graph: {text}", None
    span = next((graph.nodes[n].get("span") for n in path if graph.nodes[n].get("span")), None)
    diag.error(message, span, "flows that read only earlier streams",
               hint or "path: " + " -> ".join(_where(graph, n) for n in loop))
    for u, v in zip(loop, loop[1:]):
        roles = ", ".join(r for r in graph.edges[u, v].get("roles", ()) if r != "expr")
        diag.note(f"'{graph.nodes[u].get('name', u)}' feeds '{graph.nodes[v].get('name', v)}'"
                  + (f" as {roles}" if roles else ""), graph.nodes[u].get("span"))


def _slowness(graph, n) -> float:
    """Frequency order: period 1 is fastest; levels updated only by the outer loop are slowest."""
    period = graph.nodes[n].get("period")
    return math.inf if n == OUTER or period is None else period


def _check_frequency(graph, diag) -> None:
    for u, v, d in graph.edges(data=True):
        if d.get("kind") != "nests" or u == OUTER:
            continue
        if _slowness(graph, v) > _slowness(graph, u):
            diag.error(f"level '{graph.nodes[v].get('name', v)}' ({_period(graph, v)}) is nested in "
                       f"'{graph.nodes[u].get('name', u)}' ({_period(graph, u)}) but updates more "
                       "slowly", graph.nodes[v].get("span"),
                       "a nested level at least as fast as the level nesting it",
                       f"nester at {_where(graph, u)}")


def _period(graph, n) -> str:
    p = graph.nodes[n].get("period")
    return "outer" if n == OUTER or p is None else f"every {p}"


def _where(graph, n) -> str:
    span = graph.nodes[n].get("span")
    name = graph.nodes[n].get("name", str(n))
    return f"{name} ({span})" if span else name


# ---- drawing -----------------------------------------------------------------------------------
def by_frequency(graph) -> list:
    """Level nodes, fastest first; the outer loop last."""
    levels = [n for n, d in graph.nodes(data=True) if d.get("kind") == "level"]
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(levels, key=lambda n: (_slowness(graph, n), n == OUTER, order[n]))


_DOT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "<": "\\<", ">": "\\>", "{": "\\{",
                "}": "\\}", "|": "\\|"}


def dot_escape(text: str) -> str:
    """Escape text for a quoted DOT label: nothing in it can end the string or start a record."""
    text = str(text).replace("\r\n", "\n").replace("\r", "\n")
    return "".join(_DOT_ESCAPES.get(c, " " if ord(c) < 32 else c) for c in text)


def _level_lines(data) -> list[str]:
    label = data.get("label", {})
    return [f"{k}: {label[k]}" for k in (*LEVEL_FIELDS, "target", *OPTIMIZER_FIELDS) if k in label]


def _granularity(data) -> str:
    gran = data.get("granularity", "token")
    return {"token": "per token", "chunk": f"per chunk({data.get('chunk')})"}.get(gran, gran)


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text. Node ids are n0, n1, ...; every label is escaped."""
    ids = {n: f"n{i}" for i, n in enumerate(graph.nodes)}
    out = ["digraph nlc {", f'  label="{dot_escape(graph.graph.get("name", ""))}";',
           "  rankdir=LR;", '  node [fontname="Helvetica"];']
    for n, d in graph.nodes(data=True):
        name = dot_escape(d.get("name", n))
        kind = d.get("kind")
        if kind == "level":
            body = "".join(dot_escape(line) + "\\l" for line in _level_lines(d))
            style = ", style=dashed" if n == OUTER else ""
            attrs = f'shape=box{style}, label="{name}\\n{body}"'
        elif kind == "gate":
            gran = dot_escape(_granularity(d))
            attrs = f'shape=ellipse, fontsize=10, height=0.3, label="{name}\\n{gran}"'
        elif kind == "stream" and d.get("attention"):
            attrs = f'shape=box, style=rounded, label="{name}\\nsoftmax attention\\n(non-parametric, every token)"'
        elif kind in ("stream", "input", "output"):
            extra = ", peripheries=2" if kind != "stream" else ""
            attrs = f'shape=ellipse{extra}, label="{name}"'
        else:
            attrs = f'shape=ellipse, style=dashed, color=red, label="{name} (undefined)"'
        out.append(f"  {ids[n]} [{attrs}];")
    for u, v, d in graph.edges(data=True):
        if d.get("kind") == "flow":
            roles = ", ".join(r for r in d.get("roles", ()) if r != "expr")
            attrs = f'style=solid, label="{dot_escape(roles)}"' if roles else "style=solid"
            out.append(f"  {ids[u]} -> {ids[v]} [{attrs}];")
        elif d.get("kind") == "nests":
            out.append(f'  {ids[u]} -> {ids[v]} [style=dashed, label="nests"];')
        if d.get("initialises"):
            out.append(f'  {ids[u]} -> {ids[v]} [style=dashed, color=blue, label="initialises"];')
    return "\n".join(out + ["}"]) + "\n"


def to_text(graph: nx.DiGraph) -> str:
    """A readable listing: levels fastest first with their fields, then gates, streams and edges."""
    nodes = graph.nodes
    out = [f"model {graph.graph.get('name', '?')}", "levels (fastest first):"]
    for n in by_frequency(graph):
        span = nodes[n].get("span")
        out.append(f"  {nodes[n]['name']}" + (f"  [{span}]" if span else ""))
        out += [f"    {line}" for line in _level_lines(nodes[n])]
    for kind, title in (("gate", "gates"), ("stream", "streams")):
        rows = [n for n, d in graph.nodes(data=True) if d.get("kind") == kind]
        if rows:
            out.append(f"{title}:")
        for n in rows:
            d = nodes[n]
            gran = f"  {_granularity(d)}" if kind == "gate" else ""
            out.append(f"  {d['name']} {list(d.get('shape', ()))}{gran}  [{d.get('span')}]")
    out.append("flows:")
    for u, v, d in graph.edges(data=True):
        if d.get("kind") == "flow":
            roles = ", ".join(r for r in d.get("roles", ()) if r != "expr")
            out.append(f"  {nodes[u].get('name', u)} -> {nodes[v].get('name', v)}"
                       + (f"  ({roles})" if roles else ""))
    nests = [f"  {nodes[u].get('name', u)} {'nests' if d.get('kind') == 'nests' else 'initialises'} "
             f"{nodes[v].get('name', v)}" for u, v, d in graph.edges(data=True)
             if d.get("kind") == "nests" or d.get("initialises")]
    out += ["nesting:", *(nests or ["  (none)"])]
    return "\n".join(out) + "\n"
