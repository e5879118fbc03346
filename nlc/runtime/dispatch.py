"""Which form of a level runs: the reference loop or its chunk-parallel module."""
from __future__ import annotations

MODES = ("auto", "reference", "chunk")


def pick(reference, chunked, mode: str, T: int):
    """The op function to call: `reference` is a level's reference op `level_<name>`, `chunked` its
    generated chunk module or None.
    auto: the chunked form for sequences of at least one chunk (training, prefill), the reference
    loop for shorter ones (decoding); chunk: the chunked form or an error saying why not."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a mode; modes: {', '.join(MODES)}")
    if mode == "reference" or (mode == "auto" and (chunked is None or T < chunked.CHUNK)):
        return reference
    if chunked is None:
        name = reference.__name__[len("level_"):]
        raise ValueError(f"level {name!r} has no chunk-parallel form (see `nlc check` for its plan); "
                         "use mode='reference' or 'auto'")
    return getattr(chunked, reference.__name__)
