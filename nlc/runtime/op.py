"""The functional form of a level, `Program.op(level)`: checks its arguments at the boundary,
maps gate names from the spec to the generated function, and picks the form to run."""
from __future__ import annotations

import torch

from .. import ir
from . import triton_support
from .dispatch import pick


class LevelOp:
    """op(q, k, v, *, <gates by spec name>, initial_state=None, output_final_state=False,
    mode='reference') -> (o [B, T, H, V], final_state or None).
    q, k: [B, T, H, K]; v: [B, T, H, V]; scalar gates [B, T, H]; vector gates [B, T, H, K or V].
    mode: reference (the per-token loop), chunk (the chunk-parallel form), auto (chunk-parallel
    for sequences of at least one chunk where the level has one), triton (the fused recurrent
    Triton kernels of a matrix memory with a per-token rule: `triton` loads their module, or is
    None and `why_not_triton` says why the level has none)."""

    def __init__(self, level: ir.Level, module, chunked=None, triton=None, why_not_triton=None):
        self.level = level
        self.module = module
        self.chunked = chunked
        self.triton, self.why_not_triton = triton, why_not_triton
        self.function = getattr(module, f"level_{level.name}")
        self.gates = level.gates
        self.initial_state = module.initial_state
        self.state_names = module.STATE

    def __call__(self, q, k, v, *, initial_state=None, output_final_state=False,
                 mode="reference", **gates):
        lv = self.level
        B, T = _check("q", q, 4, None, None, (lv.heads, lv.d_key))
        _check("k", k, 4, B, T, (lv.heads, lv.d_key))
        _check("v", v, 4, B, T, (lv.heads, lv.d_value))
        if q.dtype != k.dtype or k.dtype != v.dtype:
            raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
        unknown = set(gates) - set(self.gates)
        if unknown:
            raise TypeError(f"level {lv.name!r} has no gate(s) {sorted(unknown)}; "
                            f"its gates: {list(self.gates) or 'none'}")
        missing = [g for g in self.gates if g not in gates]
        if missing:
            shapes = ", ".join(f"{g} {_expected(B, T, self._gate_tail(g))}" for g in missing)
            raise TypeError(f"level {lv.name!r} needs gate(s) {shapes}")
        kwargs = {}
        for name in self.gates:
            tail = self._gate_tail(name)
            value = gates[name]
            if not torch.is_tensor(value):
                value = torch.as_tensor(value, dtype=q.dtype, device=q.device)
                if value.dim() == 0:
                    value = value.expand(B, T, *tail)
            _check(f"gate {name!r}", value, len(tail) + 2, B, T, tail)
            kwargs[f"g_{name}"] = value.to(q.dtype)
        if initial_state is not None:
            self._check_state(initial_state, B, q.dtype)
        if mode == "triton":
            function = self._triton(q.device)
        else:
            function = pick(self.function, self.chunked, mode, T)
        return function(q, k, v, **kwargs, initial_state=initial_state,
                        output_final_state=output_final_state)

    def _triton(self, device):
        if self.triton is None:
            why = f"it has no Triton form: {self.why_not_triton}" if self.why_not_triton else \
                "it has no Triton form"
        else:
            why = triton_support.unavailable(device)
        if why:
            raise ValueError(f"mode='triton' for level {self.level.name!r}: {why}")
        return getattr(self.triton(), self.function.__name__)

    def _gate_tail(self, name: str) -> tuple[int, ...]:
        lv, axis = self.level, self.level.gate_axes[name]
        return (lv.heads,) + {"scalar": (), "key": (lv.d_key,), "value": (lv.d_value,)}[axis]

    def _check_state(self, state, B: int, dtype) -> None:
        """initial_state must have the layout of `initial_state(B)`: one tensor or a tuple."""
        expected = self.initial_state(B, dtype)
        got = (state,) if torch.is_tensor(state) else tuple(state)
        if len(got) != len(expected):
            raise ValueError(f"initial_state has {len(got)} tensor(s); level {self.level.name!r} "
                             f"expects {len(expected)}: {', '.join(self.state_names)}")
        for name, x, want in zip(self.state_names, got, expected):
            if not torch.is_tensor(x) or tuple(x.shape) != tuple(want.shape):
                shape = list(x.shape) if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f"initial_state {name} has shape {shape}; expected {list(want.shape)}")


def _expected(B, T, tail) -> str:
    return f"[{'B' if B is None else B}, {'T' if T is None else T}, {', '.join(map(str, tail))}]"


def _check(name, x, rank, B, T, tail):
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    expected = _expected(B, T, tail)
    if x.dim() != rank or tuple(x.shape[2:]) != tuple(tail) or (B is not None and x.shape[0] != B) \
            or (T is not None and x.shape[1] != T):
        raise ValueError(f"{name} has shape {list(x.shape)}; expected {expected}")
    return x.shape[0], x.shape[1]
