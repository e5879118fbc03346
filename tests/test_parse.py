"""The grammar and AST builder: every construct parses to the right node with the right span
(1-based line and column; end column one past the last character)."""
import pytest

from nlc import ast
from nlc.diagnostics import SpecError
from nlc.parse import parse

EVERYTHING = """\
# a comment line
model demo   # a trailing comment
param d_model = 2 * (32 + 32)
param lr = 1e-3
let q[heads, d_model / heads] = l2norm(silu(conv(linear(x), kernel = 4)))
gate g[heads] per chunk(16) = sigmoid(linear(x))
gate t per token = 1 - g
level mem {
  memory mlp(depth = 2, act = silu, residual = true)
  bias omega(window = 4, gamma = 0.9) of huber(delta = 1, form = norm)
  retention lq(q = 4, decay = g)
  algorithm momentum(lr = lr, beta = 0.9,)
  update every 2 * C
  gradient chunk_start(8)
  read before
  init learned
  key k  value v  query q
}
output = linear(mem)
space s over mem {
  bias in {l2, lp(p = 3),}
  param lr in {0.1, -2}
}
"""


def span(node):
    s = node.span
    return (s.line, s.column, s.end_line, s.end_column)


@pytest.fixture(scope="module")
def decls():
    spec = parse(EVERYTHING, "all.nl")
    assert spec.file == "all.nl" and spec.source == EVERYTHING
    return spec.decls


def test_declaration_kinds(decls):
    assert [type(d).__name__ for d in decls] == [
        "ModelDecl", "ParamDecl", "ParamDecl", "LetDecl", "GateDecl", "GateDecl", "LevelDecl",
        "OutputDecl", "SpaceDecl"]
    assert all(d.span.file == "all.nl" for d in decls)


def test_model_and_params(decls):
    model, d_model, lr = decls[:3]
    assert model == ast.ModelDecl("demo", model.span) and span(model) == (2, 1, 2, 11)
    assert d_model.name == "d_model" and span(d_model) == (3, 1, 3, 30)
    prod = d_model.value
    assert isinstance(prod, ast.BinOp) and prod.op == "*" and span(prod) == (3, 17, 3, 30)
    assert prod.left.value == 2.0 and prod.left.text == "2"
    assert prod.right.op == "+" and span(prod.right) == (3, 22, 3, 29)  # parentheses are not kept
    assert lr.value.value == 1e-3 and lr.value.text == "1e-3"


def test_let_with_shape_and_kwargs(decls):
    let = decls[3]
    assert let.name == "q" and span(let) == (5, 1, 5, 74)
    heads, width = let.shape
    assert heads == ast.Name("heads", heads.span) and span(heads) == (5, 7, 5, 12)
    assert width.op == "/" and span(width) == (5, 14, 5, 29)
    conv = let.value.args[0].args[0]
    assert conv.func == "conv" and conv.args[0].func == "linear"
    assert conv.kwargs[0][0] == "kernel" and conv.kwarg("kernel").value == 4.0
    assert span(conv) == (5, 45, 5, 72)


def test_gates_and_granularity(decls):
    g, t = decls[4], decls[5]
    assert g.shape[0].id == "heads"
    assert g.granularity.unit == "chunk" and g.granularity.size.value == 16
    assert span(g.granularity) == (6, 15, 6, 28)
    assert t.shape is None and t.granularity.unit == "token" and t.granularity.size is None
    assert isinstance(t.value, ast.BinOp) and t.value.op == "-"


def test_level_fields(decls):
    level = decls[6]
    assert level.name == "mem" and span(level) == (8, 1, 18, 2)
    keys = [f.key for f in level.fields]
    assert keys == ["memory", "bias", "retention", "algorithm", "update", "gradient", "read",
                    "init", "key", "value", "query"]
    f = {f.key: f for f in level.fields}
    assert span(f["memory"]) == (9, 3, 9, 53)
    assert f["memory"].value.kwarg("residual") == ast.Name("true", f["memory"].value.kwarg("residual").span)
    of = f["bias"].value
    assert isinstance(of, ast.Of) and span(of) == (10, 8, 10, 71)
    assert of.outer.func == "omega" and [k for k, _ in of.outer.kwargs] == ["window", "gamma"]
    assert of.inner.func == "huber" and span(of.inner) == (10, 42, 10, 71)
    assert f["algorithm"].value.kwarg("beta").value == 0.9  # trailing comma accepted
    every = f["update"].value
    assert isinstance(every, ast.Every) and every.period.op == "*" and span(every) == (13, 10, 13, 21)
    assert f["gradient"].value.func == "chunk_start" and f["gradient"].value.args[0].value == 8
    assert f["read"].value.id == "before" and f["init"].value.id == "learned"
    assert [span(f[k]) for k in ("key", "value", "query")] == [
        (17, 3, 17, 8), (17, 10, 17, 17), (17, 19, 17, 26)]


def test_output_and_space(decls):
    out, space = decls[7], decls[8]
    assert out.value.func == "linear" and span(out) == (19, 1, 19, 21)
    assert space.name == "s" and space.level == "mem" and span(space) == (20, 1, 23, 2)
    bias, lr = space.alternatives
    assert bias.key == "bias" and not bias.is_param and span(bias) == (21, 3, 21, 27)
    assert [type(c).__name__ for c in bias.choices] == ["Name", "Call"]
    assert lr.key == "lr" and lr.is_param and span(lr) == (22, 3, 22, 24)
    assert lr.choices[0].value == 0.1 and isinstance(lr.choices[1], ast.Neg)


@pytest.mark.parametrize("text, shape", [
    ("1 + 2 * 3", ("+", 1, ("*", 2, 3))),
    ("a - b - c", ("-", ("-", "a", "b"), "c")),
    ("a / b * c", ("*", ("/", "a", "b"), "c")),
    ("2 ** 3 ** 2", ("**", 2, ("**", 3, 2))),
    ("-a ** 2", ("neg", ("**", "a", 2))),
    ("2 ** -1", ("**", 2, ("neg", 1))),
    ("(a + b) * c", ("*", ("+", "a", "b"), "c")),
    ("f()", ("f",)),
    ("f(a, b = 2,)", ("f", "a", ("b", 2))),
    (".5e1", 5),
])
def test_expression_structure(text, shape):
    assert _tree(parse(f"param p = {text}").decls[0].value) == shape


def _tree(e):
    match e:
        case ast.Number(value=v):
            return int(v) if v.is_integer() else v
        case ast.Name(id=n):
            return n
        case ast.Neg(operand=o):
            return ("neg", _tree(o))
        case ast.BinOp(op=op, left=l, right=r):
            return (op, _tree(l), _tree(r))
        case ast.Call(func=f, args=args, kwargs=kw):
            return (f, *map(_tree, args), *((k, _tree(v)) for k, v in kw))
    raise AssertionError(e)


def test_empty_and_comment_only_specs():
    assert parse("").decls == ()
    assert parse("# nothing\n\n   # here\n").decls == ()


def test_keywords_are_contextual():
    """Declaration words are reserved only where a declaration may start."""
    decls = parse("let output = x\nlet every = output\noutput = every").decls
    assert [d.name for d in decls[:2]] == ["output", "every"]
    assert decls[2].value.id == "every"


@pytest.mark.parametrize("name", ["class", "import", "__import__", "lambda", "None"])
def test_python_words_are_plain_identifiers(name):
    """The grammar allows them; generated code must sanitise (recorded, not rejected here)."""
    assert parse(f"let {name} = x").decls[0].name == name


@pytest.mark.parametrize("text, column", [
    ('let "q" = x', 5), ("let q' = x", 6), ("let q\\ = x", 6), ("let é = x", 5), ("let q-1 = x", 6),
])
def test_names_with_quotes_or_odd_characters_are_rejected(text, column):
    with pytest.raises(SpecError) as exc:
        parse(text, "n.nl")
    assert exc.value.diagnostics[0].span.column == column
