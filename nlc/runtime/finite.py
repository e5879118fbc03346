"""Opt-in checks for NaN and Inf. Inside `with nlc.check_finite():` (or for a layer made with
`program.layer(check_finite=True)`) every level call checks its inputs, its output and its final
state, and the first non-finite value raises NonFiniteError naming the level, the tensor and the
time step. Off, it costs nothing: the context swaps the dispatcher's `pick` (used by generated layers
and `Program.op`) for a checking one, and swaps it back on exit."""
from __future__ import annotations

import functools
import sys
from contextlib import contextmanager

import torch

from . import dispatch

_unchecked = dispatch.pick
_depth = 0


class NonFiniteError(FloatingPointError):
    """A NaN or Inf in `tensor` (e.g. 'input k', 'gate alpha', 'output') of `level` at time step
    `step` (None for a tensor without a time axis, such as a state)."""

    def __init__(self, level: str, tensor: str, step: int | None):
        self.level, self.tensor, self.step = level, tensor, step
        where = f"at time step {step}" if step is not None else "(no time axis)"
        super().__init__(f"non-finite value (NaN or Inf) in {tensor} of level {level!r} {where}")


@contextmanager
def check_finite():
    """Check every level call made inside the block (nested blocks are fine)."""
    global _depth
    if _depth == 0:
        for module in _pickers():
            module.pick = _checked_pick
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            for module in _pickers():
                module.pick = _unchecked


def _pickers() -> list:
    """The modules whose `pick` level calls go through: the dispatcher (generated layers) and, once
    imported, `nlc.runtime.op` (Program.op; not imported here, it loads the compiler's IR)."""
    return [dispatch] + [sys.modules[name] for name in ("nlc.runtime.op",) if name in sys.modules]


def watch(layer: torch.nn.Module) -> torch.nn.Module:
    """Make every forward of `layer` run inside `check_finite()` and check its output too."""
    contexts = []

    def enter(module, args):
        contexts.append(check_finite())
        contexts[-1].__enter__()

    def leave(module, args, output):  # also runs when forward raised (output is None then)
        contexts.pop().__exit__(None, None, None)
        if torch.is_tensor(output):
            _check("layer", "output", output)

    layer.register_forward_pre_hook(enter)
    layer.register_forward_hook(leave, always_call=True)
    return layer


def _checked_pick(reference, *args, **kwargs):
    function = _unchecked(reference, *args, **kwargs)
    level = reference.__name__[len("level_"):]

    @functools.wraps(function)
    def checked(q, k, v, *, initial_state=None, **rest):
        for name, x in (("input q", q), ("input k", k), ("input v", v)):
            _check(level, name, x)
        for name, x in rest.items():
            if torch.is_tensor(x):
                _check(level, f"gate {name[2:]}" if name.startswith("g_") else name, x)
        for i, x in enumerate(_tensors(initial_state)):
            _check(level, f"initial state {i}", x, timed=False)
        result = function(q, k, v, initial_state=initial_state, **rest)
        out, state = result[:2]  # a level others restart from also returns its period states
        _check(level, "output", out)
        for i, x in enumerate(_tensors(state)):
            _check(level, f"final state {i}", x, timed=False)
        return result
    return checked


def _tensors(state) -> tuple:
    if state is None:
        return ()
    return (state,) if torch.is_tensor(state) else tuple(state)


def _check(level: str, tensor: str, x: torch.Tensor, timed: bool = True) -> None:
    """Raise NonFiniteError at the first time step (axis 1 of [B, T, ...]) holding a NaN or Inf."""
    if not x.is_floating_point() or bool(torch.isfinite(x).all()):
        return
    if not timed or x.dim() < 2:
        raise NonFiniteError(level, tensor, None)
    bad = ~torch.isfinite(x.detach()).reshape(x.shape[0], x.shape[1], -1)
    raise NonFiniteError(level, tensor, int(bad.any(-1).any(0).nonzero()[0]))
