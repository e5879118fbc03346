"""A level's learned initial state from a pretrained MLP: Nested Learning's ad-hoc stacking
(MATH.md §4.2), MLP^(l)_0 = MLP_pretrained_l, so that a CMS block with a learning rate near 0 keeps
the pretrained block's behaviour."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def linear_layers(mlp: nn.Module | Sequence[nn.Linear]) -> list[nn.Linear]:
    """The nn.Linear layers of `mlp` in the order they are registered (input side first)."""
    if isinstance(mlp, nn.Linear):
        return [mlp]
    if isinstance(mlp, nn.Module):
        return [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    return list(mlp)


@torch.no_grad()
def init_level_from_mlp(layer: nn.Module, level_module, level: str, mlp) -> None:
    """Copy the pretrained `mlp` (an nn.Module, or its nn.Linear layers, input side first) into
    `layer`'s learned initial state of `level`, the same for every head. A Linear's weight [out, in]
    becomes the memory layer's W [in, out] (memory layers compute h @ W + b); a memory bias without a
    Linear bias is set to 0. `level_module` is the level's generated module (its `STATE` names the
    tensors W1, b1, W2, ...). Raises ValueError, naming what was expected, on any mismatch."""
    init = getattr(layer, f"init_{level}", None)
    if init is None:
        raise ValueError(f"level {level!r} has no learned initial state: write `init learned` in its "
                         "level to initialise it from a pretrained MLP")
    names = list(level_module.STATE[:level_module.N_PARAMS])
    weights = [n for n in names if n.startswith("W")]
    if weights != [f"W{i + 1}" for i in range(len(weights))]:
        raise ValueError(f"level {level!r} holds {', '.join(names)}: a plain chain of layers W1, W2, ... "
                         "is expected (gated memories have no pretrained counterpart here)")
    linears = linear_layers(mlp)
    if len(linears) != len(weights):
        raise ValueError(f"level {level!r} has {len(weights)} layers, the pretrained MLP {len(linears)} "
                         "nn.Linear layers")
    for i, linear in enumerate(linears, start=1):
        W = init[names.index(f"W{i}")]
        if tuple(linear.weight.shape[::-1]) != tuple(W.shape[1:]):
            raise ValueError(f"level {level!r} layer {i}: expected an nn.Linear({W.shape[1]}, {W.shape[2]}), "
                             f"got weight {tuple(linear.weight.shape)}")
        W.copy_(linear.weight.t().expand_as(W))
        if f"b{i}" in names:
            b = init[names.index(f"b{i}")]
            b.copy_(linear.bias.expand_as(b) if linear.bias is not None else torch.zeros_like(b))
        elif linear.bias is not None:
            raise ValueError(f"level {level!r} layer {i} has no bias, the pretrained nn.Linear has one: "
                             "write `mlp(..., bias = true)` in the level's memory")
