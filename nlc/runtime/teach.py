"""Teach levels at run time (`value teach`, MATH.md §4.2: the model's own loss drives a CMS level).

`run` is `Program.model`'s forward for a spec with teach levels. It runs the whole model segment by
segment (a segment is the layer's SEGMENT, the smallest teach period), every layer from the states
its levels had at the segment start (`Layer.segment`), and after each segment:
  1. the segment's loss L = Σ_t ℓ_t, ℓ_t = the next-token cross-entropy of position t (targets: the
     ids shifted by one; the sequence's last position has none);
  2. δ_t = ∂L/∂y_t for every teach level's output y_t (torch.autograd.grad), the states that
     produced y frozen: δ is a constant for the outer loop unless the level says
     `teach(stopgrad = 0)` (then the outer gradient also flows through δ, a second-order term);
  3. at each of a teach level's period boundaries (and at the end of the sequence), its state takes
     the block's steps by its own reference rule, with key = query = its input and value -δ under
     the dot bias: dℓ/dy = δ, so W <- retention(W) - η Σ_t ∂<M_W(q_t), δ_t>/∂W over the block.
The step after a segment uses the segment's tokens and the next segment's first token (the target of
its last position), which every later position reads as input anyway: the model stays causal. The
outer gradient flows through the steps (the states, queries and gates) into the next segments."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def watch(reads: dict | None, name: str, y: torch.Tensor, q: torch.Tensor, gates: dict) -> torch.Tensor:
    """Inside `run` (`reads` a dict): record teach level `name`'s output y [B, T, H, V], its query q
    [B, T, H, K] and its gates (op keyword -> [B, T, H, ...]); return the y the layer goes on with,
    one that the loss can be differentiated by (a leaf where nothing upstream needs a gradient).
    Outside (reads None): y."""
    if reads is None:
        return y
    if not y.requires_grad:
        y = y.detach().requires_grad_()
    reads[name] = (y, q, gates)
    return y


def run(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """ids [B, T] -> (logits [B, T, vocab], each layer's level states at T by level name)."""
    blocks, T = list(model.blocks), ids.shape[1]
    size, outer = blocks[0].SEGMENT, torch.is_grad_enabled()
    x = model.embed(ids)
    carries = [None] * len(blocks)
    waiting = [{name: [] for name in block.TEACH} for block in blocks]  # the open blocks' reads and δ
    logits = []
    with torch.enable_grad():  # δ needs the segment's graph even under no_grad (evaluation)
        for t0 in range(0, T, size):
            t1 = min(t0 + size, T)
            h, reads = x[:, t0:t1], [{} for _ in blocks]
            for i, block in enumerate(blocks):
                h, carries[i] = block.segment(h, carries[i], t0, reads[i])
            out = model.head(model.norm(h))
            logits.append(out if outer else out.detach())
            deltas = _teach_signals(out, ids[:, t0 + 1:t1 + 1], blocks, reads)
            for block, carry, read, delta, open_ in zip(blocks, carries, reads, deltas, waiting):
                for name, (op, period, _) in block.TEACH.items():
                    open_[name].append((read[name][1], delta[name], read[name][2]))
                    if t1 % period == 0 or t1 == T:
                        carry[name] = _step(op, carry[name], open_[name])
                        open_[name] = []
    if not outer:
        carries = [{n: tuple(s.detach() for s in st) for n, st in c.items()} for c in carries]
    return torch.cat(logits, dim=1), carries


def _teach_signals(logits: torch.Tensor, targets: torch.Tensor, blocks, reads) -> list[dict]:
    """δ = ∂L/∂y of every teach level's output over the segment; logits [B, S, vocab], targets
    [B, S'] (S' = S, or S - 1 at the end of the sequence)."""
    outputs = [(i, name, y) for i, read in enumerate(reads) for name, (y, _, _) in read.items()]
    constant = {(i, name): blocks[i].TEACH[name][2] for i, name, _ in outputs}
    n = targets.shape[1]
    grads = [None] * len(outputs)
    if n:
        loss = F.cross_entropy(logits[:, :n].flatten(0, 1), targets.flatten(), reduction="sum")
        grads = torch.autograd.grad(loss, [y for _, _, y in outputs], retain_graph=True,
                                    create_graph=not all(constant.values()), allow_unused=True)
    deltas = [{} for _ in reads]
    for (i, name, y), g in zip(outputs, grads):
        g = torch.zeros_like(y) if g is None else g
        deltas[i][name] = g.detach() if constant[i, name] else g
    return deltas


def _step(op, state: tuple, block: list) -> tuple:
    """A teach level's state after the steps of one block of its reads: its reference op over the
    block with key = query, value = -δ (`block`: (q [B, S, H, K], δ [B, S, H, V], gates) per segment)."""
    q = torch.cat([q for q, _, _ in block], dim=1)
    v = -torch.cat([d for _, d, _ in block], dim=1)
    gates = {k: torch.cat([g[k] for _, _, g in block], dim=1) for k in block[0][2]}
    _, final = op(q, q, v, **gates, initial_state=state, output_final_state=True)
    return (final,) if torch.is_tensor(final) else tuple(final)
