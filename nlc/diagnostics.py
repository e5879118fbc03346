"""Diagnostics: every problem with a spec is reported with file:line:col, the source line, a caret,
what was expected and, where it helps, a hint. `SpecError` is the one exception type for bad specs."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable

from .ast import Span


@dataclass(frozen=True)
class Diagnostic:
    severity: str  # "error" | "warning" | "note"
    message: str
    span: Span | None
    expected: str | None = None
    hint: str | None = None

    def render(self, source: str | None) -> str:
        lines = [f"{self.severity}: {self.message}"]
        if self.span is not None:
            lines.append(f"  --> {self.span}")
            text = source.split("\n") if source else []  # lines as the parser counts them
            if 0 < self.span.line <= len(text):
                src = _visible(text[self.span.line - 1].rstrip("\r")).expandtabs(1)
                width = (self.span.end_column - self.span.column
                         if self.span.end_line == self.span.line and self.span.end_column > self.span.column
                         else 1)
                gutter = str(self.span.line)
                pad = " " * len(gutter)
                lines += [f"{pad} |", f"{gutter} | {src}",
                          f"{pad} | {' ' * (self.span.column - 1)}{'^' * max(width, 1)}"]
        if self.expected:
            lines.append(f"  = expected: {self.expected}")
        if self.hint:
            lines.append(f"  = hint: {self.hint}")
        return "\n".join(lines)


def _visible(line: str) -> str:
    """A source line safe to print: other control characters (a form feed, a lone carriage return,
    an escape sequence) become spaces, so the caret below stays in its column."""
    return "".join(c if c.isprintable() or c == "\t" else " " for c in line)


class Abort(Exception):
    """Stop checking one declaration; its diagnostic is already recorded."""


class SpecError(Exception):
    """Anything wrong with a spec. `.diagnostics` holds every problem found; str() renders them all."""

    def __init__(self, diagnostics: Iterable[Diagnostic], source: str | None = None):
        self.diagnostics = tuple(diagnostics)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        return "\n\n".join(d.render(self.source) for d in self.diagnostics)


def error(message: str, span: Span | None, expected: str | None = None,
          hint: str | None = None) -> Diagnostic:
    return Diagnostic("error", message, span, expected, hint)


def nearest(name: str, known: Iterable[str]) -> str | None:
    """A 'did you mean' hint for an unknown name, or None."""
    match = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None


class Collector:
    """Gathers diagnostics during a pass; `raise_if_errors` turns them into one SpecError."""

    def __init__(self, source: str):
        self.source = source
        self.items: list[Diagnostic] = []

    def add(self, diagnostic: Diagnostic) -> None:
        self.items.append(diagnostic)

    def error(self, message: str, span: Span | None, expected: str | None = None,
              hint: str | None = None) -> None:
        self.add(error(message, span, expected, hint))

    def warn(self, message: str, span: Span | None, hint: str | None = None) -> None:
        self.add(Diagnostic("warning", message, span, None, hint))

    def note(self, message: str, span: Span | None) -> None:
        self.add(Diagnostic("note", message, span))

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.items if d.severity == "error"]

    def raise_if_errors(self) -> None:
        if self.errors:
            raise SpecError(self.items, self.source)
