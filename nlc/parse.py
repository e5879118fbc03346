"""Spec text -> `ast.Spec`. Lark (LALR) parses; an explicit transformer builds the frozen AST;
syntax errors become diagnostics with file:line:col, a caret and what the parser expected."""
from __future__ import annotations

from functools import lru_cache

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast
from .diagnostics import SpecError, error

# Terminal names as a reader would say them.
_TOKEN_WORDS = {
    "NAME": "a name", "NUMBER": "a number", "LPAR": "'('", "RPAR": "')'", "LBRACE": "'{'",
    "RBRACE": "'}'", "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "EQUAL": "'='", "PLUS": "'+'",
    "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'", "__ANON_0": "'**'", "$END": "end of file",
}
_DECL_WORDS = ("model", "param", "let", "gate", "level", "output", "space", "optimizer")
# Limits that keep every spec diagnosed within a second: lark parses about 100 KB of declarations a
# second, and every pass after it recurses over the syntax tree.
MAX_CODE = 32 * 1024  # characters of declarations; comments and blank space do not count
MAX_DEPTH = 100       # nesting of calls, operators and blocks


@lru_cache(maxsize=1)
def parser() -> Lark:
    return Lark.open_from_package("nlc.grammar", "nlc.lark", parser="lalr",
                                  propagate_positions=True, maybe_placeholders=False,
                                  cache=False, strict=True)


def parse(source: str, file: str = "<spec>") -> ast.Spec:
    """Parse spec text. Raises SpecError (never a lark exception) on bad syntax."""
    _check_size(source, file)
    try:
        tree = parser().parse(source)
    except UnexpectedInput as exc:
        raise SpecError([_syntax_diagnostic(exc, source, file)], source) from None
    _check_depth(tree, source, file)
    return ast.Spec(file, source, tuple(_Builder(file).transform(tree).children))


def _check_size(source: str, file: str) -> None:
    used = 0
    for number, line in enumerate(source.split("\n"), 1):
        used += len("".join(line.split("#", 1)[0].split()))
        if used > MAX_CODE:
            span = ast.Span(file, number, 1, number, 2)
            raise SpecError([error(f"the spec has more than {MAX_CODE} characters of declarations",
                                   span, f"at most {MAX_CODE // 1024} KiB of declarations (comments "
                                   "and blank space do not count)", "split the model into specs")],
                            source)


def _check_depth(tree: Tree, source: str, file: str) -> None:
    """Without recursion: a tree too deep for Python's stack is exactly what this looks for."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            span = ast.Span(file, node.meta.line, node.meta.column, node.meta.line, node.meta.column + 1)
            raise SpecError([error(f"this nests more than {MAX_DEPTH} calls, operators or blocks deep",
                                   span, f"at most {MAX_DEPTH} levels of nesting",
                                   "name a part with `let` (or `param`) and use the name")], source)
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))


def _describe(names) -> str:
    words = sorted({_TOKEN_WORDS.get(n, f"'{n.lower()}'" if n.isupper() else n) for n in names})
    if len(words) > 8:
        words = words[:8] + ["..."]
    return ", ".join(words)


def _syntax_diagnostic(exc: UnexpectedInput, source: str, file: str):
    line, column = max(exc.line, 1), max(exc.column, 1)
    if isinstance(exc, UnexpectedCharacters):
        char = source[exc.pos_in_stream] if exc.pos_in_stream < len(source) else "?"
        message = f"unexpected character {char!r}"
        expected = _describe(exc.allowed) if exc.allowed else None
        width = 1
    elif isinstance(exc, UnexpectedEOF):
        line, column = _end(source)
        message, expected, width = "unexpected end of file", _describe(exc.expected), 1
    else:
        assert isinstance(exc, UnexpectedToken)
        token = exc.token
        if token.type == "$END":
            line, column = _end(source)
            message, width = "unexpected end of file", 1
        else:
            message, width = f"unexpected {token.value!r}", max(len(token.value), 1)
        expected = _describe(exc.expected)
    hint = None
    if expected and "'model'" in expected:
        hint = "a spec is a list of declarations: " + ", ".join(_DECL_WORDS)
    span = ast.Span(file, line, column, line, column + width)
    return error(message, span, expected, hint)


def _end(source: str) -> tuple[int, int]:
    """Line and column just past the last line with text, counting lines as lark does (by \\n)."""
    lines = source.split("\n")
    while len(lines) > 1 and not lines[-1].strip():
        lines.pop()
    return len(lines), len(lines[-1].rstrip("\r")) + 1


def _span(file: str, meta) -> ast.Span:
    return ast.Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _tok_span(file: str, tok: Token) -> ast.Span:
    return ast.Span(file, tok.line, tok.column, tok.end_line, tok.end_column)


@v_args(meta=True)
class _Builder(Transformer):
    """Lark tree -> AST, one explicit method per rule."""

    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _s(self, meta):
        return _span(self.file, meta)

    # expressions
    def number(self, meta, c):
        return ast.Number(float(c[0]), str(c[0]), self._s(meta))

    def name(self, meta, c):
        return ast.Name(str(c[0]), self._s(meta))

    def call(self, meta, c):
        args = c[1] if len(c) > 1 else []
        pos = tuple(a for a in args if not isinstance(a, tuple))
        kw = tuple(a for a in args if isinstance(a, tuple))
        return ast.Call(str(c[0]), pos, kw, self._s(meta))

    def args(self, meta, c):
        return list(c)

    def kwarg(self, meta, c):
        return (str(c[0]), c[1])

    def _bin(op):
        def build(self, meta, c):
            return ast.BinOp(op, c[0], c[1], self._s(meta))
        return build

    add, sub, mul, div, pow = _bin("+"), _bin("-"), _bin("*"), _bin("/"), _bin("**")

    def neg(self, meta, c):
        return ast.Neg(c[0], self._s(meta))

    def every(self, meta, c):
        return ast.Every(c[0], self._s(meta))

    def of(self, meta, c):
        return ast.Of(c[0], c[1], self._s(meta))

    # declarations
    def model_decl(self, meta, c):
        return ast.ModelDecl(str(c[0]), self._s(meta))

    def param_decl(self, meta, c):
        return ast.ParamDecl(str(c[0]), c[1], self._s(meta))

    def shape(self, meta, c):
        return tuple(c)

    def granularity(self, meta, c):
        return ast.Granularity(str(c[0]), c[1] if len(c) > 1 else None, self._s(meta))

    def let_decl(self, meta, c):
        shape = next((x for x in c[1:-1] if isinstance(x, tuple)), None)
        return ast.LetDecl(str(c[0]), shape, c[-1], self._s(meta))

    def gate_decl(self, meta, c):
        shape = next((x for x in c[1:-1] if isinstance(x, tuple)), None)
        gran = next((x for x in c[1:-1] if isinstance(x, ast.Granularity)), None)
        return ast.GateDecl(str(c[0]), shape, gran, c[-1], self._s(meta))

    def field(self, meta, c):
        return ast.Field(str(c[0]), c[1], self._s(meta))

    def level_decl(self, meta, c):
        return ast.LevelDecl(str(c[0]), tuple(c[1:]), self._s(meta))

    def optimizer_decl(self, meta, c):
        return ast.OptimizerDecl(tuple(c), self._s(meta))

    def output_decl(self, meta, c):
        return ast.OutputDecl(c[0], self._s(meta))

    def alternative(self, meta, c):
        return ast.Alternative(str(c[0]), False, tuple(c[1:]), self._s(meta))

    def param_alternative(self, meta, c):
        return ast.Alternative(str(c[0]), True, tuple(c[1:]), self._s(meta))

    def range_alternative(self, meta, c):  # `lr in logrange(1e-4, 1e-2)`: one continuous axis
        span = self._s(meta)
        return ast.Alternative(str(c[0]), True, (ast.Call(str(c[1]), (c[2], c[3]), (), span),), span)

    def space_decl(self, meta, c):
        return ast.SpaceDecl(str(c[0]), str(c[1]), tuple(c[2:]), self._s(meta))

    def start(self, meta, c):
        return Tree("start", c)
