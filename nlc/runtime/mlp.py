"""The SwiGLU feed-forward block of Transformer++ (and of every hybrid block's MLP sub-layer)."""
from __future__ import annotations

import torch
from torch import nn


class SwiGLU(nn.Module):
    """W_down (silu(W_gate x) * W_up x): [..., dim] -> [..., dim], hidden width `hidden`."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))
