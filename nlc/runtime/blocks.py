"""Building blocks the generated layers use: the input check at their boundary, causal depthwise
convolution, RMSNorm, polynomial feature maps. Tensors are [B, T, ...channels]."""
from __future__ import annotations

import math

import torch
from torch import nn


def check_input(layer: nn.Module, x) -> None:
    """A generated layer's boundary: x is a floating point tensor [B, T, d_model] on the layer's
    device. Names the argument and the expected shape instead of failing deep inside a level."""
    expected = f"[B, T, {layer.d_model}]"
    if not torch.is_tensor(x):
        raise TypeError(f"x must be a tensor {expected}, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != layer.d_model:
        raise ValueError(f"x has shape {list(x.shape)}; expected {expected}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x has shape {list(x.shape)}; expected {expected} with B, T >= 1")
    if not x.is_floating_point():
        raise TypeError(f"x has dtype {x.dtype}; expected a floating point dtype")
    weight = next(layer.parameters(), None)
    if weight is not None and weight.device != x.device:
        raise ValueError(f"x is on {x.device} but the layer's parameters are on {weight.device}; "
                         "move one with .to(...)")


class CausalConv(nn.Module):
    """Depthwise causal 1-D convolution over time: [B, T, C] -> [B, T, C]."""

    def __init__(self, channels: int, kernel: int = 4):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.randn(channels, 1, kernel) / math.sqrt(kernel))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y_t = Σ_i w_i x_{t-kernel+1+i}: a sum of `kernel` shifted products, whose backward on CPU
        is several times faster than depthwise conv1d's for the short kernels used here."""
        T = x.shape[1]
        padded = nn.functional.pad(x, (0, 0, self.kernel - 1, 0))  # [B, T + kernel - 1, C]
        weight = self.weight[:, 0].to(x.dtype)  # [C, kernel]
        return sum(padded[:, i:i + T] * weight[:, i] for i in range(self.kernel))


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)


class PolyFeatures(nn.Module):
    """phi(x) = [a_0, a_1 x, a_2 x⊗x, ..., a_p x^{⊗p}] over the last dim (MATH.md §2.14), so that
    phi(x)·phi(y) = Σ_i a_i² (x·y)^i; a_i learnable, initialised to sqrt(1/i!)."""

    def __init__(self, degree: int):
        super().__init__()
        self.degree = degree
        self.coeff = nn.Parameter(torch.tensor([math.sqrt(1 / math.factorial(i))
                                                for i in range(degree + 1)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coeff = self.coeff.to(x.dtype)
        parts, power = [coeff[0] * torch.ones_like(x[..., :1])], torch.ones_like(x[..., :1])
        for i in range(1, self.degree + 1):
            power = (power[..., :, None] * x[..., None, :]).flatten(-2)
            parts.append(coeff[i] * power)
        return torch.cat(parts, dim=-1)


def hold_per_chunk(g: torch.Tensor, chunk: int) -> torch.Tensor:
    """Hold each chunk's first value over the chunk (causal per-chunk gates): g [B, T, ...]."""
    T = g.shape[1]
    return g[:, ::chunk].repeat_interleave(chunk, dim=1)[:, :T]
