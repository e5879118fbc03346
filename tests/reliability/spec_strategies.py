"""Hypothesis strategies for spec text, from the language's own vocabulary: the grammar's keywords and
token patterns (grammar/nlc.lark), the option table (nlc.options), the stream functions of the
checker, and the names and numbers of the shipped specs. `declarations` builds specs that are
syntactically plausible; `field_edits` changes one level field, parameter or stream of a shipped
spec; `mutated` then deletes, duplicates, swaps, replaces and inserts tokens (random unicode, raw
bytes, huge numbers, deep nesting, very long names)."""
from __future__ import annotations

import re
from pathlib import Path

from hypothesis import strategies as st

from nlc import options
from nlc.lower import STREAM_FUNCS

ROOT = Path(__file__).resolve().parents[2]
GRAMMAR = (ROOT / "grammar" / "nlc.lark").read_text()
SHIPPED = {path.name: path.read_text() for path in sorted((ROOT / "specs").glob("*.nl"))}

KEYWORDS = sorted(set(re.findall(r'"([^"]+)"', GRAMMAR)))  # model, param, {, **, every, ...
_TERMINAL = {name: pattern for name, pattern in re.findall(r"^(\w+): /(.+)/$", GRAMMAR, re.M)}
TOKEN = re.compile("|".join([_TERMINAL["COMMENT"], r"\*\*", _TERMINAL["NAME"], _TERMINAL["NUMBER"],
                             r"\s+", r"."]), re.S)
OPTION_WORDS = sorted({word for table in options.FAMILIES.values() for kind, sig in table.items()
                       for word in (kind, *(a.name for a in sig), *(c for a in sig for c in a.choices))}
                      | set(options.LEVEL_FIELDS) | set(options.READ_POINTS) | set(options.INITS)
                      | set(options.GRADIENT_POINTS) | set(STREAM_FUNCS) | {"true", "false", "outer"})
_CODE = {name: re.sub(_TERMINAL["COMMENT"], "", text) for name, text in SHIPPED.items()}
SPEC_NAMES = sorted({t for text in _CODE.values() for t in re.findall(_TERMINAL["NAME"], text)})
SPEC_NUMBERS = sorted({m.group(0) for text in _CODE.values()
                       for m in re.finditer(_TERMINAL["NUMBER"], text)})
EDGE_NUMBERS = ["0", "0.0", "-0", "1e308", "1e309", "1e-320", "9" * 400, ".5", "007", "1e-5",
                "2147483648", "18446744073709551617", "0.999999999999", "1e18", "-1"]
VOCABULARY = KEYWORDS + OPTION_WORDS + SPEC_NAMES + SPEC_NUMBERS + EDGE_NUMBERS

# The names a generated spec declares and reads (small, so that references often resolve).
GATES = ("alpha", "beta", "eta")
STREAMS = ("q", "k", "v", "o")
LEVELS = ("memory", "slow")
PARAMS = ("d_model", "heads", "chunk", "d_head", "lr")

numbers = st.sampled_from(["1", "2", "4", "8", "16", "0.5", "0.9", "1e-3", "64"] * 3 + EDGE_NUMBERS)
ints = st.sampled_from(["1", "2", "3", "4", "8", "16", "chunk", "d_head"] * 3 + ["0", "-1", "1.5", "1e9"])


def expressions(names):
    """Arithmetic and calls over `names` and numbers (the grammar's expr rule)."""
    leaves = st.one_of(numbers, st.sampled_from(names))

    def extend(inner):
        return st.one_of(
            st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "**"]), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"),
            inner.map(lambda e: f"-{e}"),
            st.tuples(st.sampled_from(sorted(STREAM_FUNCS)), st.lists(inner, max_size=2),
                      st.none() | st.tuples(st.sampled_from(["bias", "kernel", "degree", "hidden"]),
                                            inner)).map(_call))
    return st.recursive(leaves, extend, max_leaves=6)


def _call(t) -> str:
    func, args, kwarg = t
    return f"{func}({', '.join(args + ([f'{kwarg[0]} = {kwarg[1]}'] if kwarg else []))})"


stream_exprs = st.one_of(st.sampled_from(["l2norm(linear(x))", "linear(x)", "sigmoid(linear(x))",
                                          "silu(conv(linear(x), 4))", "linear(x, 8)"]),
                         expressions(("x", *STREAMS, *GATES, *LEVELS, *PARAMS)))
scalar_exprs = st.one_of(st.sampled_from(GATES), numbers,
                         expressions((*GATES, *PARAMS)).filter(lambda e: len(e) < 80))
shapes = st.sampled_from(["", "[heads]", "[heads, 8]", "[heads, d_head]", "[8]", "[d_model]",
                          "[heads, 8, 2]", "[0]"])


@st.composite
def options_of(draw, family: str) -> str:
    """One option of a level field family, with drawn arguments (positional or by name)."""
    kind = draw(st.sampled_from(sorted(options.FAMILIES[family])))
    args = []
    for i, arg in enumerate(options.FAMILIES[family][kind]):
        if not ((arg.required and draw(st.integers(0, 9)) != 9) or draw(st.booleans())):
            continue
        value = draw({"scalar": scalar_exprs, "int": ints, "number": numbers,
                      "bool": st.sampled_from(["true", "false", "maybe"]),
                      "enum": st.sampled_from([*arg.choices, "nope"])}[arg.type])
        args.append(value if len(args) == i and draw(st.booleans()) else f"{arg.name} = {value}")
    text = f"{kind}({', '.join(args)})" if args or draw(st.booleans()) else kind
    if family == "bias" and kind == "omega":
        text += " of " + draw(st.sampled_from(["l2", "dot", "huber(delta = 1)", "omega(window = 2)"]))
    return text


FIELD_VALUES = {
    **{family: options_of(family) for family in options.FAMILIES},
    "update": st.one_of(ints.map(lambda n: f"every {n}"), st.just("outer")),
    "gradient": st.one_of(st.sampled_from(options.GRADIENT_POINTS[:2]),
                          ints.map(lambda n: f"chunk_start({n})")),
    "read": st.sampled_from([*options.READ_POINTS, "sometimes"]),
    "init": st.sampled_from([*options.INITS, "random"]),
    **{role: st.sampled_from(["q", "k", "v", "o", "x", *LEVELS]) for role in ("key", "value", "query")},
}


def mostly(draw, usual: str, other) -> str:
    """`usual` three times in four, else a draw from `other` (the usual value shrinks first)."""
    return draw(other) if draw(st.integers(0, 3)) == 3 else usual


USUAL_FIELDS = {"memory": "matrix", "bias": "l2", "retention": "decay(alpha)",
                "algorithm": "gd(lr = beta)"}


@st.composite
def levels(draw, name: str) -> str:
    """A level: its four main fields usually present and usual, plus a few others."""
    fields = [(f, mostly(draw, usual, FIELD_VALUES[f])) for f, usual in USUAL_FIELDS.items()
              if draw(st.integers(0, 9)) != 9]
    others = draw(st.lists(st.sampled_from(options.LEVEL_FIELDS), unique=True, max_size=3))
    fields += [(f, draw(FIELD_VALUES[f])) for f in others]
    body = "\n".join(f"  {f} {value}" for f, value in draw(st.permutations(fields)))
    return f"level {name} {{\n{body}\n}}"


@st.composite
def declarations(draw) -> str:
    """A spec of declarations drawn from the grammar: parameters, gates, streams and levels, usually
    of consistent shapes, with every piece sometimes drawn at random; at times shuffled."""
    lines = [f"model {draw(st.sampled_from(['m', 'titans', 'model_2']))}",
             f"param d_model = {mostly(draw, '16', numbers)}",
             f"param heads = {mostly(draw, '2', ints)}"]
    for p in draw(st.lists(st.sampled_from(PARAMS[2:]), unique=True)):
        lines.append(f"param {p} = {draw(numbers)}")
    for g in GATES:
        if draw(st.integers(0, 3)) != 3:
            per = mostly(draw, "", st.sampled_from([" per token", " per chunk(4)", " per chunk",
                                                    " per tok"]))
            lines.append(f"gate {g}{mostly(draw, '[heads]', shapes)}{per} = "
                         f"{mostly(draw, 'sigmoid(linear(x))', stream_exprs)}")
    for s in STREAMS:
        if draw(st.integers(0, 3)) != 3:
            usual = "l2norm(linear(x))" if s in "qk" else "linear(x)"
            lines.append(f"let {s}{mostly(draw, '[heads, 8]', shapes)} = {mostly(draw, usual, stream_exprs)}")
    for name in LEVELS:
        if draw(st.integers(0, 2)) != 2 or name == LEVELS[0]:
            lines.append(draw(levels(name)))
    if draw(st.integers(0, 4)) == 4:
        field = draw(st.sampled_from(["bias", "retention", "memory", "algorithm"]))
        choices = draw(st.lists(FIELD_VALUES[field], min_size=1, max_size=3))
        lines.append(f"space s over {draw(st.sampled_from(LEVELS))} {{ {field} in "
                     f"{{{', '.join(choices)}}}  param heads in {{1, 2}} }}")
    lines.append(f"output = {mostly(draw, 'x + linear(memory)', stream_exprs)}")
    if draw(st.integers(0, 9)) == 9:
        lines = draw(st.permutations(lines))
    return "\n".join(lines) + "\n"


FIELD_LINE = re.compile(r"(\s+)(\w+)\s")


@st.composite
def field_edits(draw) -> str:
    """A shipped spec with 1-3 declarations changed: a level field's value (or a field added), a
    parameter's value, or a stream's expression or shape."""
    lines = SHIPPED[draw(st.sampled_from(sorted(SHIPPED)))].split("\n")
    for _ in range(draw(st.integers(1, 3))):
        editable = [i for i, line in enumerate(lines) if line.startswith(("param ", "gate ", "let "))
                    or (FIELD_LINE.match(line) and FIELD_LINE.match(line).group(2) in FIELD_VALUES)]
        i = draw(st.sampled_from(editable))
        line, field = lines[i], FIELD_LINE.match(lines[i])
        if field and draw(st.integers(0, 3)) != 3:
            lines[i] = f"{field.group(1)}{field.group(2)} {draw(FIELD_VALUES[field.group(2)])}"
        elif field:
            added = draw(st.sampled_from(sorted(FIELD_VALUES)))
            lines.insert(i + 1, f"{field.group(1)}{added} {draw(FIELD_VALUES[added])}")
        elif line.startswith("param "):
            lines[i] = re.sub(r"=.*", f"= {draw(numbers)}", line)
        elif draw(st.booleans()):
            lines[i] = re.sub(r"=.*", f"= {draw(stream_exprs)}", line, count=1)
        else:
            lines[i] = re.sub(r"\[[^]]*\]", draw(shapes), line, count=1)
    return "\n".join(lines)


# ---- token mutations ---------------------------------------------------------------------------
def tokens(text: str) -> list[str]:
    return [m.group(0) for m in TOKEN.finditer(text)]


odd_text = st.one_of(
    st.text(max_size=20),                                        # any unicode, control characters too
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")),   # raw bytes
    st.sampled_from(EDGE_NUMBERS),
    st.integers(1, 400).map(lambda n: "(" * n + "x" + ")" * n),  # deep nesting
    st.integers(1, 300).map(lambda n: "-" * n + "1"),
    st.integers(1, 200).map(lambda n: "silu(" * n + "x" + ")" * n),
    st.integers(100, 40_000).map(lambda n: "n" * n),             # very long identifiers
    st.sampled_from(["{", "}", "(", ")", "[", "]", "\n", "\r", "\t", "\x00", "\ufeff", "#", "=",
                     "\u2028", "é", "ｍ", "\\", '"', "'", "$", "@"]),
)


@st.composite
def mutated(draw, seeds) -> str:
    """A seed spec with 1-4 token edits: delete, duplicate, swap, replace by a vocabulary word,
    insert odd text, or repeat a token many times."""
    toks = tokens(draw(seeds)) or [""]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(toks) - 1))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "insert", "repeat"]))
        if op == "delete" and len(toks) > 1:
            del toks[i]
        elif op == "duplicate":
            toks.insert(i, toks[i])
        elif op == "swap":
            j = draw(st.integers(0, len(toks) - 1))
            toks[i], toks[j] = toks[j], toks[i]
        elif op == "replace":
            toks[i] = draw(st.sampled_from(VOCABULARY))
        elif op == "insert":
            toks.insert(i, draw(odd_text))
        else:
            toks[i] = toks[i] * draw(st.integers(2, 60))
    return "".join(toks)


shipped_specs = st.sampled_from(sorted(SHIPPED)).map(lambda name: SHIPPED[name])
