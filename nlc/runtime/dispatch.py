"""Which form of a level runs: the reference loop, its chunk-parallel module, or its Triton kernels."""
from __future__ import annotations

import functools
import importlib
import importlib.util

from . import triton_support

MODES = ("auto", "reference", "chunk", "triton")
# a level's generated Triton files, by role: level_<name><suffix>.py beside its reference module
TRITON_SUFFIXES = {"recurrent": "_triton", "chunked": "_triton_chunk"}


class TritonForms:
    """A level's generated Triton kernels, imported on first use: `recurrent` (fused recurrent) and
    `chunked` load their modules (zero-argument callables) or are None; `why_not` says why the level
    has neither."""

    def __init__(self, recurrent=None, chunked=None, why_not: str | None = None):
        self.recurrent, self.chunked, self.why_not = recurrent, chunked, why_not

    def function(self, name: str, T: int, auto: bool = False):
        """The op `name` (level_<x>): the chunked kernels' for sequences of at least their CHUNK tokens
        (or where there are no recurrent ones), the fused recurrent kernels' otherwise; None if neither.
        auto: only kernels whose module does not set `AUTO = False` (kernels not yet run on a GPU); where
        the chunked ones say so, the fused recurrent ones at every length."""
        recurrent = self.recurrent() if self.recurrent is not None else None
        if recurrent is not None and auto and not getattr(recurrent, "AUTO", True):
            recurrent = None
        if self.chunked is not None:
            module = self.chunked()
            if auto and not getattr(module, "AUTO", True):
                return getattr(recurrent, name) if recurrent is not None else None
            if T >= module.CHUNK or recurrent is None:
                return getattr(module, name)
        return getattr(recurrent, name) if recurrent is not None else None


def triton_forms(module) -> TritonForms:
    """The Triton kernels generated beside a level's reference module `module` (level_<name>), found
    by file name: `<module>_triton` (fused recurrent) and `<module>_triton_chunk` (chunked)."""
    return _triton_forms(module.__name__)


@functools.lru_cache(maxsize=None)
def _triton_forms(module: str) -> TritonForms:
    found = {}
    for role, suffix in TRITON_SUFFIXES.items():
        name = f"{module}{suffix}"
        if importlib.util.find_spec(name) is not None:
            found[role] = lambda name=name: importlib.import_module(name)
    return TritonForms(**found, why_not=None if found else "no Triton kernels were generated for it "
                                                           "(see `nlc check`)")


def pick(reference, chunked, mode: str, T: int, triton: TritonForms | None = None, device=None):
    """The op function to call: `reference` is a level's reference op `level_<name>`, `chunked` its
    generated chunk module or None, `triton` its Triton kernels or None, `device` the inputs' device.
    auto: the Triton kernels on CUDA tensors where triton imports and the level has them (and they
    have run on a GPU: modules with `AUTO = False` are left to mode='triton', and the level's fused
    recurrent kernels run instead where it has them), else the chunked form for sequences of at least
    one chunk (training, prefill) and the reference loop for shorter ones (decoding); chunk: the
    chunked form or an error saying why not; triton: the chunked Triton kernels from their CHUNK
    tokens on, the fused recurrent ones below, or an error saying why not."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a mode; modes: {', '.join(MODES)}")
    name = reference.__name__
    if mode == "triton":
        why = triton_support.unavailable(device) if device is not None else None
        function = triton.function(name, T) if triton is not None and why is None else None
        if function is None:
            why = why or (f"it has no Triton form: {triton.why_not}" if triton is not None and triton.why_not
                          else "it has no Triton form")
            raise ValueError(f"mode='triton' for level {name[len('level_'):]!r}: {why}")
        return function
    if mode == "auto" and triton is not None and device is not None and device.type == "cuda" \
            and triton_support.unavailable(device) is None:
        function = triton.function(name, T, auto=True)
        if function is not None:
            return function
    if mode == "reference" or (mode == "auto" and (chunked is None or T < chunked.CHUNK)):
        return reference
    if chunked is None:
        raise ValueError(f"level {name[len('level_'):]!r} has no chunk-parallel form (see `nlc check` for "
                         "its plan); use mode='reference' or 'auto'")
    return getattr(chunked, name)
