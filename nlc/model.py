"""`Program.model`: a causal language model around a compiled layer.

token ids [B, T] -> embedding -> `layers` copies of the spec's layer (each [B, T, d_model] ->
[B, T, d_model], residual as the spec's `output` writes it) -> RMSNorm -> tied head -> logits
[B, T, vocab_size]. A spec states a whole block (mixer and MLP sub-layers, pre-norm residuals) in its
`output` expression, and its depth as `param layers` (`Program.model`'s default). A spec with teach
levels (`value teach`) runs segment by segment, its teach levels stepped by the model's own loss
gradient between segments (`nlc.runtime.teach`)."""
from __future__ import annotations

import torch
from torch import nn


class LanguageModel(nn.Module):
    """Embedding, a stack of generated layers and a tied output head."""

    def __init__(self, program, vocab_size: int, layers: int = 2, mode: str = "auto",
                 recompute: int | None = None):
        super().__init__()
        if vocab_size < 1 or layers < 1:
            raise ValueError(f"need vocab_size >= 1 and layers >= 1, got {vocab_size}, {layers}")
        from .teach import segment
        d_model = int(program.d_model)
        self.teach = segment(program.checked) is not None  # run by nlc.runtime.teach
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(program.layer(mode, recompute=recompute) for _ in range(layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=d_model ** -0.5)

    def forward(self, ids: torch.Tensor, scored: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] (long) -> logits [B, T, vocab_size]; with `scored` (bool [B, T]), only the
        logits at its True positions, [N, vocab_size] in row-major order: a task that scores a few
        positions (MQAR's answers) skips the head's cost everywhere else."""
        if ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError(f"ids: expected a [B, T] long tensor, got {tuple(ids.shape)} {ids.dtype}")
        if scored is not None and (scored.shape != ids.shape or scored.dtype != torch.bool):
            raise ValueError(f"scored: expected a bool tensor of shape {tuple(ids.shape)}, got "
                             f"{tuple(scored.shape)} {scored.dtype}")
        if self.teach:  # the teach signal needs every position's logits
            from .runtime import teach
            logits = teach.run(self, ids)[0]
            return logits if scored is None else logits[scored]
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x if scored is None else x[scored]))
