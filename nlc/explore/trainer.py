"""A compact trainer for the synthetic tasks: AdamW, linear warm-up then cosine decay, gradient
clipping, cross-entropy at the task's loss positions, accuracy per difficulty slice."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .tasks import IGNORE, Task, TaskData


class Diverged(RuntimeError):
    """The loss became NaN/inf, or rose far above its starting value."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.1          # fraction of the steps
    clip: float = 1.0
    evals: int = 4               # evaluations during training (pruning checkpoints)
    layers: int | None = None    # None: the spec's `layers` parameter, else 2 (Program.model)
    mode: str = "auto"
    seed: int = 0
    device: str = "cpu"          # where the model trains: "cpu", "cuda", "cuda:1", ...


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


@torch.no_grad()
def evaluate(model, data: TaskData, batch: int = 64, device: str = "cpu") -> tuple[dict[str, float], float]:
    """Accuracy of argmax predictions at the scored positions, per slice name, and the mean
    cross-entropy there in bits per token (for `text`: bits per byte)."""
    model.eval()
    hits = torch.zeros(len(data.slice_names))
    counts = torch.zeros(len(data.slice_names))
    nats = 0.0
    for i in range(0, len(data.inputs), batch):
        ids, targets, slices = (t[i:i + batch] for t in (data.inputs, data.targets, data.slices))
        scored = slices >= 0
        logits = model(ids.to(device), scored.to(device)).float().cpu()
        right = (logits.argmax(-1) == targets[scored]).float()
        nats += float(F.cross_entropy(logits, targets[scored], reduction="sum"))
        hits.index_add_(0, slices[scored], right)
        counts.index_add_(0, slices[scored], torch.ones_like(right))
    model.train()
    per_slice = {name: float(h / c) if c else float("nan")
                 for name, h, c in zip(data.slice_names, hits, counts)}
    return per_slice, nats / max(1.0, float(counts.sum())) / math.log(2)


def train(program, task: Task, cfg: TrainConfig,
          checkpoint: Callable[[int, float], None] | None = None) -> dict:
    """Train `program.model(...)` on `task` and evaluate on its test split.

    checkpoint(i, accuracy) is called at evaluation i of `cfg.evals` (it may raise, e.g. to
    prune). Returns accuracy (mean over slices), per-slice accuracy, the test cross-entropy at the
    scored positions in bits per token, final training loss, training tokens/s and the parameter
    count. Raises Diverged on a non-finite or exploding loss."""
    torch.manual_seed(cfg.seed)
    model = program.model(task.vocab_size, cfg.layers, cfg.mode).to(cfg.device)
    cuda = torch.device(cfg.device).type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    data = task.train
    order = torch.Generator().manual_seed(cfg.seed)
    perm, cursor = torch.randperm(len(data.inputs), generator=order), 0
    eval_at = {round(cfg.steps * (i + 1) / cfg.evals) - 1: i for i in range(cfg.evals)}
    first = loss_value = None
    tokens, busy = 0, 0.0
    per_slice, bits = {}, float("nan")
    for step in range(cfg.steps):
        if cursor + cfg.batch > len(perm):
            perm, cursor = torch.randperm(len(data.inputs), generator=order), 0
        idx = perm[cursor:cursor + min(cfg.batch, len(perm))]
        cursor += len(idx)
        start = time.perf_counter()
        targets = data.targets[idx].to(cfg.device)
        scored = targets != IGNORE  # logits only where the loss looks
        loss = F.cross_entropy(model(data.inputs[idx].to(cfg.device), scored), targets[scored])
        loss_value = loss.detach().item()
        first = loss_value if first is None else first
        if not math.isfinite(loss_value) or loss_value > 10 * first + 10:
            raise Diverged(f"loss {loss_value:g} at step {step} (started at {first:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        if cuda:
            torch.cuda.synchronize(cfg.device)
        busy += time.perf_counter() - start
        tokens += data.inputs[idx].numel()
        if step in eval_at:
            per_slice, bits = evaluate(model, task.test, device=cfg.device)
            if checkpoint is not None:
                checkpoint(eval_at[step], _mean(per_slice))
    return {"accuracy": _mean(per_slice), "slices": per_slice, "test_bits": bits, "loss": loss_value,
            "tokens_per_s": tokens / busy if busy else float("nan"),
            "params": sum(p.numel() for p in model.parameters())}


def _mean(per_slice: dict[str, float]) -> float:
    values = [v for v in per_slice.values() if v == v]
    return sum(values) / len(values) if values else float("nan")
