"""The functional form of a level, `Program.op(level)`: checks its arguments at the boundary,
maps gate names from the spec to the generated function, and picks the form to run."""
from __future__ import annotations

import torch

from .. import ir
from .dispatch import TritonForms, pick
from .recompute import segmented


class LevelOp:
    """op(q, k, v, *, <gates by spec name>, initial_state=None, output_final_state=False,
    mode='reference') -> (o [B, T, H, V], final_state or None).
    q, k: [B, T, H, K]; v: [B, T, H, V]; scalar gates [B, T, H]; vector gates [B, T, H, K or V].
    Nested levels (MATH.md §4.2) take what the reference op takes: a level with `init from(L)`
    restart_states (L's period states, a tuple of [B, J, H, ...]); a level others restart from
    output_period_states=True, which returns its period states third.
    mode: reference (the per-token loop), chunk (the chunk-parallel form), auto (the Triton
    kernels on CUDA tensors where the level has them, else chunk-parallel for sequences of at least
    one chunk where the level has one), triton (the level's generated Triton kernels, `triton`:
    chunked for long sequences, fused recurrent for short ones; see `nlc.runtime.dispatch.pick`).
    recompute: with autograd on, run `recompute` tokens at a time under activation checkpointing,
    keeping only the states between segments (`nlc.runtime.recompute`)."""

    def __init__(self, level: ir.Level, module, chunked=None, triton: TritonForms | None = None):
        self.level = level
        self.module = module
        self.chunked = chunked
        self.triton = triton if triton is not None else TritonForms()
        self.function = getattr(module, f"level_{level.name}")
        self.gates = level.gates
        self.initial_state = module.initial_state
        self.state_names = module.STATE

    def __call__(self, q, k, v, *, initial_state=None, output_final_state=False,
                 mode="reference", restart_states=None, output_period_states=False, recompute=None,
                 **gates):
        lv = self.level
        nesting = {}
        if restart_states is not None:
            if lv.init_from is None:
                raise TypeError(f"level {lv.name!r} restarts from no other level's state (no `init from`): "
                                "restart_states is not one of its arguments")
            nesting["restart_states"] = tuple(restart_states)
        if output_period_states:
            if not lv.initialises:
                raise TypeError(f"no level restarts from level {lv.name!r}'s state: it has no period "
                                "states to output")
            nesting["output_period_states"] = True
        B, T = _check("q", q, 4, None, None, (lv.heads, lv.d_key))
        _check("k", k, 4, B, T, (lv.heads, lv.d_key))
        _check("v", v, 4, B, T, (lv.heads, lv.d_value))
        if q.dtype != k.dtype or k.dtype != v.dtype:
            raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
        if B == 0 or T == 0:
            raise ValueError(f"q has shape {list(q.shape)}; expected B, T >= 1")
        if not q.is_floating_point():
            raise TypeError(f"q, k, v have dtype {q.dtype}; expected a floating point dtype")
        _same_device(q.device, k=k, v=v)
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
        _same_device(q.device, **{f"gate {name!r}": kwargs[f"g_{name}"] for name in self.gates})
        if initial_state is not None:
            self._check_state(initial_state, B, q.dtype)
            state = (initial_state,) if torch.is_tensor(initial_state) else tuple(initial_state)
            _same_device(q.device, **{f"initial_state {n}": x for n, x in zip(self.state_names, state)})
        function = segmented(self.pick(mode, T, q.device), recompute, lv.name, *lv.segment_alignment())
        return function(q, k, v, **kwargs, initial_state=initial_state,
                        output_final_state=output_final_state, **nesting)

    def pick(self, mode: str, T: int, device):
        """The function `mode` runs for T tokens on `device` (see `nlc.runtime.dispatch.pick`)."""
        return pick(self.function, self.chunked, mode, T, self.triton, device)

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


def _same_device(device, **tensors) -> None:
    for name, x in tensors.items():
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but q is on {device}; move them to one device")


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
