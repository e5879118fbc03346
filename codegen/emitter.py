"""A tiny source emitter: lines, an indent context manager, and spec-location comments."""
from __future__ import annotations

import re
from contextlib import contextmanager

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class Emitter:
    def __init__(self):
        self.lines: list[str] = []
        self.depth = 0

    def line(self, text: str = "") -> None:
        self.lines.append(("    " * self.depth + text) if text else "")

    def gap(self, blank: int = 2) -> None:
        """Exactly `blank` empty lines before what comes next (between top-level definitions)."""
        while self.lines and not self.lines[-1]:
            self.lines.pop()
        self.lines.extend([""] * blank)

    def block(self, text: str) -> None:
        """Several lines at the current depth (a dedented literal)."""
        for t in text.strip("\n").splitlines():
            self.line(t)

    @contextmanager
    def indent(self, header: str | None = None):
        if header:
            self.line(header)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines).rstrip() + "\n"


def ident(name: str, prefix: str) -> str:
    """A spec name as a generated identifier: checked to be a plain identifier and prefixed, so it
    can never be a keyword, a builtin, or shadow torch."""
    if not _IDENT.match(name):
        raise ValueError(f"not an identifier: {name!r}")
    return f"{prefix}_{name}"


def comment(text: str) -> str:
    """Spec-derived text (a file name, a description) made safe inside a generated comment or
    docstring: one line, printable, and no quote or backslash that could end the string."""
    return "".join(ch if ch.isprintable() and ch not in '"\\' else "?" for ch in text)


def where(span) -> str:
    """`# spec:line:col` pointer back to the spec (file name sanitised)."""
    return f"# {comment(str(span))}" if span is not None else ""
