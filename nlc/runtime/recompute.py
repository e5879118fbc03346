"""Training on long sequences in recomputed segments: a level's op runs S tokens at a time under
activation checkpointing, carrying its state, so the backward pass keeps only the state entering
each segment and rebuilds one segment's intermediates at a time.

A chunked op keeps, for its backward, every chunk's entering state (an MLP memory: [B, H, T / C,
I, O] per weight); at B = 8, T = 4096, 16 heads of 128 and chunk 16 that is 17 GB per tensor of
Titans' memory. In segments of S tokens it keeps T / S states and one segment's S / C, at the cost
of a second forward pass of each segment in the backward.

Segments are exact where pieces of a sequence equal the whole, which streaming guarantees when
each cut falls on the level's gradient-chunk and update-period boundaries (`align`, a multiple of
both: `nlc.ir.Level.segment_alignment`). A level whose rule restarts something at each call (an
omega window) or that hands period states to another level (nested levels) is refused with its
reason (`why_not`).
"""
from __future__ import annotations

import torch
import torch.utils.checkpoint


def check(tokens: int | None, level: str, align: int, why_not: str | None) -> None:
    """Raise ValueError unless `tokens` (None: no segments) suits the level `level`."""
    if tokens is None:
        return
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"recompute={tokens!r}: expected a positive number of tokens per segment, or None")
    if why_not is not None:
        raise ValueError(f"recompute={tokens}: level {level!r} cannot run in segments: {why_not}")
    if tokens % align:
        raise ValueError(f"recompute={tokens}: level {level!r} needs segments of a multiple of {align} "
                         "tokens (its gradient chunk and update period), so that a segment's pieces "
                         "equal the whole sequence")


def segmented(function, tokens: int | None, level: str, align: int = 1, why_not: str | None = None):
    """`function` (a level op: q, k, v [B, T, H, D], gates [B, T, H(, D)] by keyword, initial_state,
    output_final_state -> (o [B, T, H, V], state or None)) run `tokens` tokens at a time when autograd
    records and the sequence is longer; `function` itself otherwise (tokens None, no_grad, short)."""
    check(tokens, level, align, why_not)
    if tokens is None:
        return function

    def run(q, k, v, *, initial_state=None, output_final_state=False, **gates):
        T = q.shape[1]
        if T <= tokens or not torch.is_grad_enabled():
            return function(q, k, v, initial_state=initial_state, output_final_state=output_final_state,
                            **gates)
        names = tuple(gates)

        def piece(state, q, k, v, *gate_values):
            return function(q, k, v, initial_state=state, output_final_state=True,
                            **dict(zip(names, gate_values)))

        outputs, state = [], initial_state
        for lo in range(0, T, tokens):
            cut = [x[:, lo:lo + tokens] for x in (q, k, v, *gates.values())]
            o, state = torch.utils.checkpoint.checkpoint(piece, state, *cut, use_reentrant=False)
            outputs.append(o)
        return torch.cat(outputs, dim=1), (state if output_final_state else None)

    return run
