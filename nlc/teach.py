"""The segment loop that teach levels (`value teach`, MATH.md §4.2) imply, seen from the checker.

A teach level changes only at its period boundaries, by a step that needs the model's loss on the
block that just finished; so `Program.model` runs the whole model segment by segment (a segment is
the smallest teach period), carrying every level's state across segments (`nlc.runtime.teach`).
`check` rejects what computing segment by segment would change the meaning of: periods that do not
line up with the segment, convolutions (they would restart at each segment), attention that looks
past its segment, nested levels and recalls (both need the whole sequence at once)."""
from __future__ import annotations

from . import ir
from .diagnostics import Collector
from .lower import recalls
from .segments import _calls, _exprs


def teach_levels(checked: ir.CheckedSpec) -> list[ir.Level]:
    return [lv for lv in checked.levels if lv.target == "teach"]


def segment(checked: ir.CheckedSpec) -> int | None:
    """The segment length: the smallest teach period (None: the spec has no teach level)."""
    periods = [lv.period for lv in teach_levels(checked) if lv.period is not None]
    return min(periods) if periods else None


def check(checked: ir.CheckedSpec, diag: Collector) -> None:
    size = segment(checked)
    if size is None:
        return
    why = f"teach levels run the model segment by segment ({size} tokens, the smallest teach period)"
    for lv in checked.levels:
        if lv.target == "teach" and lv.period % size:
            diag.error(f"teach level '{lv.name}' updates every {lv.period} tokens, not a multiple of "
                       f"the segment ({size})", lv.span, f"a multiple of {size}", why)
        elif lv.target != "teach":
            for what, c in (("update period", lv.period), ("gradient chunk", lv.grad_chunk)):
                if c and size % c:
                    diag.error(f"level '{lv.name}' has an {what} ({c}) that does not divide the "
                               f"segment ({size})", lv.span, f"a divisor of {size}", why)
        if lv.init_from is not None:
            diag.error(f"level '{lv.name}' restarts from the state of '{lv.init_from}' in a model with "
                       "teach levels", lv.span, "no `init from(...)` beside teach levels", why)
    for n, g in checked.gates.items():
        if g.chunk and size % g.chunk:
            diag.error(f"gate '{n}' is held per chunk of {g.chunk}, which does not divide the segment "
                       f"({size})", g.span, f"a divisor of {size}", why)
    for _, e in [*_exprs(checked), ("@output", checked.output)]:
        for c in recalls(e):
            diag.error("recall() beside teach levels", c.span, "one segment loop: no recall", why)
        for c in _calls(e):
            if c.func == "conv":
                diag.error("conv() beside teach levels would restart at each segment", c.span,
                           "no conv in a model with teach levels", why)
            block = c.kwarg("block") if c.func == "attention" else None
            block = int(ir.constant(block, checked.params)) if block is not None else 0
            if c.func == "attention" and (block < 1 or size % block):
                diag.error("attention beside teach levels must stay inside the segment", c.span,
                           f"attention(..., block = B) with B dividing {size}", why)
