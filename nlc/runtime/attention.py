"""Softmax attention for generated layers (Transformer++, Titans MAG/MAL/MAC): causal, rotary
positions, sliding windows, attention confined to blocks (segments), persistent learned key/value
tokens, and one extra key/value pair per position (Titans MAC's retrieved memory tokens).
Streams are [B, T, H, D]."""
from __future__ import annotations

import torch
from torch import nn


def rope(x: torch.Tensor, offset: int = 0, base: float = 10000.0) -> torch.Tensor:
    """Rotary positions: x [B, T, ..., D] (D even), channel pairs (i, i + D/2) rotated by the angle
    (offset + t) * base^(-2i/D) at time t; `offset` is the position of the first token."""
    T, half = x.shape[1], x.shape[-1] // 2
    freq = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) / half)
    angle = torch.arange(offset, offset + T, dtype=torch.float64, device=x.device)[:, None] * freq
    angle = angle.reshape(T, *(1,) * (x.dim() - 3), half)  # [T, (1 per head axis), D/2]
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """softmax(q k^T / sqrt(d_key) + mask) v per head. Query t sees key s when s <= t, and
    s > t - window (window > 0: sliding window), and s // block == t // block (block > 0: attention
    inside aligned blocks of `block` tokens), counting positions from `offset`. `persistent` learned
    key/value tokens are seen by every query; an extra pair (extra_k_s, extra_v_s) per position s is
    seen exactly when key s is."""

    def __init__(self, heads: int, d_key: int, d_value: int, window: int = 0, block: int = 0,
                 persistent: int = 0):
        super().__init__()
        self.window, self.block, self.persistent = window, block, persistent
        if persistent:
            self.persistent_k = nn.Parameter(torch.randn(heads, persistent, d_key) * d_key ** -0.5)
            self.persistent_v = nn.Parameter(torch.randn(heads, persistent, d_value) * d_value ** -0.5)

    def forward(self, q, k, v, extra_k=None, extra_v=None, offset: int = 0) -> torch.Tensor:
        """q, k [B, T, H, K]; v [B, T, H, V]; extra_k, extra_v like k, v -> [B, T, H, V]."""
        B, T = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if not (self.window or self.block or self.persistent or extra_k is not None):
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        if bool(self.block) != bool(self.window) and T > (self.block or self.window):
            return self._local(q, k, v, extra_k, extra_v, offset).transpose(1, 2)
        return self._masked(q, k, v, extra_k, extra_v, offset).transpose(1, 2)

    def _masked(self, q, k, v, extra_k, extra_v, offset: int) -> torch.Tensor:
        """Every query against every key under one [T, T] mask (plus the extra and persistent keys).
        q, k [B, H, T, K]; v [B, H, T, V]; extra_k, extra_v [B, T, H, *] or None -> [B, H, T, V]."""
        B, _, T, _ = q.shape
        pos = torch.arange(offset, offset + T, device=q.device)
        mask = pos[None, :] <= pos[:, None]  # [T query, T key]
        if self.window:
            mask = mask & (pos[None, :] > pos[:, None] - self.window)
        if self.block:
            mask = mask & (pos[None, :] // self.block == pos[:, None] // self.block)
        if extra_k is not None:  # keys (extra_0, k_0, extra_1, k_1, ...): pair s shares key s's mask
            k = torch.stack([extra_k.transpose(1, 2), k], dim=3).flatten(2, 3)
            v = torch.stack([extra_v.transpose(1, 2), v], dim=3).flatten(2, 3)
            mask = mask.repeat_interleave(2, dim=1)
        if self.persistent:
            k = torch.cat([self.persistent_k.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)
            v = torch.cat([self.persistent_v.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
            mask = torch.cat([mask.new_ones(T, self.persistent), mask], dim=1)
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _local(self, q, k, v, extra_k, extra_v, offset: int) -> torch.Tensor:
        """Attention in blocks of L = block (or window) queries, each against its own keys (block) or
        its own and the previous block's (window): O(T · L) memory instead of a [T, T] mask.
        q, k [B, H, T, K]; v [B, H, T, V]; extra_k, extra_v [B, T, H, *] or None -> [B, H, T, V].
        Padding fills the first block before `offset` (so blocks align with positions // block) and
        the last one after T; a pad query sees only its own (zero) key, so no row is empty."""
        B, H, T, _ = q.shape
        L = self.block or self.window
        head = offset % L
        n = -(-(head + T) // L)  # blocks
        tail = n * L - head - T
        back = 1 if self.window else 0  # earlier blocks whose keys a block sees

        def blocks(x, keys=False):  # [B, H, T, D] -> [B, H, n, L, D], or [B, H, n, (1 + back) L, D]
            x = torch.nn.functional.pad(x, (0, 0, head + back * L * keys, tail))
            x = x.reshape(B, H, n + back * keys, L, x.shape[-1])
            return torch.cat([x[:, :, j:j + n] for j in range(back + 1)], dim=3) if keys else x

        u = torch.arange(n * L, device=q.device).reshape(n, L)  # a query's index in the padded run
        w = torch.cat([u - (back - j) * L for j in range(back + 1)], dim=1)  # its block's keys
        real = (w >= head) & (w < head + T)
        mask = real[:, None, :] & (w[:, None, :] <= u[:, :, None])  # [n, L query, keys]
        if self.window:
            mask = mask & (w[:, None, :] > u[:, :, None] - self.window)
        pad = (u < head) | (u >= head + T)
        mask = mask | (pad[:, :, None] & (w[:, None, :] == u[:, :, None]))  # a pad query sees itself
        q, k, v = blocks(q), blocks(k, keys=True), blocks(v, keys=True)
        if extra_k is not None:  # keys (extra_0, k_0, extra_1, k_1, ...): pair s shares key s's mask
            k = torch.stack([blocks(extra_k.transpose(1, 2), keys=True), k], dim=4).flatten(3, 4)
            v = torch.stack([blocks(extra_v.transpose(1, 2), keys=True), v], dim=4).flatten(3, 4)
            mask = mask.repeat_interleave(2, dim=2)
        if self.persistent:
            k = torch.cat([self.persistent_k.to(k.dtype)[:, None].expand(B, -1, n, -1, -1), k], dim=3)
            v = torch.cat([self.persistent_v.to(v.dtype)[:, None].expand(B, -1, n, -1, -1), v], dim=3)
            mask = torch.cat([mask.new_ones(n, L, self.persistent), mask], dim=2)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, n, L, V]
        return out.reshape(B, H, n * L, -1)[:, :, head:head + T]
