"""Spec syntax tree: one frozen dataclass per grammar rule, each with its source span. No behaviour."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Span:
    """Where a node stands in its spec: 1-based line and column of its first and last characters."""
    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


# ---- expressions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Number:
    value: float
    text: str
    span: Span


@dataclass(frozen=True)
class Name:
    id: str
    span: Span


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple["Expr", ...]
    kwargs: tuple[tuple[str, "Expr"], ...]
    span: Span

    def kwarg(self, key: str) -> "Expr | None":
        return next((v for k, v in self.kwargs if k == key), None)


@dataclass(frozen=True)
class BinOp:
    op: str  # one of + - * / **
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass(frozen=True)
class Neg:
    operand: "Expr"
    span: Span


@dataclass(frozen=True)
class Every:
    """`every C`: an update period."""
    period: "Expr"
    span: Span


@dataclass(frozen=True)
class Of:
    """`omega(window = 4) of l2`: a combinator applied to an inner choice."""
    outer: "Expr"
    inner: "Expr"
    span: Span


Expr = Union[Number, Name, Call, BinOp, Neg, Every, Of]


# ---- declarations --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelDecl:
    name: str
    span: Span


@dataclass(frozen=True)
class ParamDecl:
    name: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class Granularity:
    """`per chunk(16)`; `per token` is the default."""
    unit: str
    size: Expr | None
    span: Span


@dataclass(frozen=True)
class LetDecl:
    name: str
    shape: tuple[Expr, ...] | None
    value: Expr
    span: Span


@dataclass(frozen=True)
class GateDecl:
    name: str
    shape: tuple[Expr, ...] | None
    granularity: Granularity | None
    value: Expr
    span: Span


@dataclass(frozen=True)
class Field:
    key: str
    value: Expr
    span: Span


@dataclass(frozen=True)
class LevelDecl:
    name: str
    fields: tuple[Field, ...]
    span: Span


@dataclass(frozen=True)
class OptimizerDecl:
    """`optimizer { memory matrix  bias dot ... }`: the outer optimizer, a level of the same algebra."""
    fields: tuple[Field, ...]
    span: Span


@dataclass(frozen=True)
class OutputDecl:
    value: Expr
    span: Span


@dataclass(frozen=True)
class Alternative:
    """One axis of a design space: a level field or a parameter, and its choices."""
    key: str
    is_param: bool
    choices: tuple[Expr, ...]
    span: Span


@dataclass(frozen=True)
class SpaceDecl:
    name: str
    level: str
    alternatives: tuple[Alternative, ...]
    span: Span


Decl = Union[ModelDecl, ParamDecl, LetDecl, GateDecl, LevelDecl, OutputDecl, SpaceDecl, OptimizerDecl]


@dataclass(frozen=True)
class Spec:
    file: str
    source: str
    decls: tuple[Decl, ...]
