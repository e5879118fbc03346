"""`nlc train`: train a spec's language model (`Program.model`) on local bytes or a synthetic task.

AdamW (weight decay on matrices only), or the spec's own `optimizer { ... }` (`nlc.optim`, no weight
decay), linear warm-up then cosine decay to `min_lr_ratio`, gradient clipping, bf16 autocast on GPU.
Every `checkpoint_every` steps the run folder's `checkpoint.pt` is replaced atomically (written to a
temp file, then `os.replace`) with the model, optimizer, schedule, RNG states, the data position (the
step: batches are a function of it) and the log so far, so a run resumed from step k equals the
uninterrupted run bit for bit on CPU. Under `torch.distributed` (e.g. `torchrun`) the model is
wrapped in DistributedDataParallel, each rank draws its own batches and rank 0 writes the folder.

Run folder: config.json, checkpoint.pt, log.jsonl, log.csv, loss.png, summary.json.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import data as data_module
from .evaluate import validation
from .log import TrainLog, progress_bar

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
OPTIMIZERS = ("auto", "adamw", "spec")
DEFAULT_LR = 1e-3


class RunError(Exception):
    """A run that cannot go on as asked: missing inputs, a resume that does not match its folder, or
    a diverged (non-finite) loss."""


@dataclass(frozen=True)
class TrainConfig:
    spec: str                      # path to the .nl spec
    data: str                      # a text file or folder (bytes), or task:NAME (nlc.explore.tasks)
    out: str                       # the run folder
    steps: int
    overrides: dict = field(default_factory=dict)   # spec parameters (`--set k=v`)
    layers: int | None = None      # None: the spec's `layers` parameter, else 2
    batch: int = 16
    seq_len: int = 256
    lr: float | None = None        # peak learning rate; None: the spec optimizer's `lr`, else 1e-3
    min_lr_ratio: float = 0.1      # the cosine ends at lr * min_lr_ratio
    warmup: int | None = None      # warm-up steps; None: 5% of the steps (at least 1)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    val_fraction: float = 0.05     # tail of the bytes held out for validation
    val_tokens: int = 65536        # validation bytes scored at the end of the run
    seed: int = 0
    mode: str = "auto"             # level execution: auto | reference | chunk (Program.layer)
    recompute: int | None = None   # tokens per recomputed segment (Program.layer), None: whole sequence
    device: str = "auto"           # auto: cuda when available, else cpu
    precision: str = "auto"        # auto: bf16 autocast on cuda, fp32 on cpu; or bf16 | fp32
    optimizer: str = "auto"        # auto: the spec's `optimizer { }` if it declares one, else AdamW;
                                   # adamw | spec


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """The learning-rate multiplier for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(config: TrainConfig, *, resume: bool = False, stop_at: int | None = None,
          progress: bool = False) -> tuple[torch.nn.Module, dict]:
    """Train (or, with `resume`, continue from the folder's checkpoint) up to `config.steps`; returns
    the model and the summary also written to summary.json. `stop_at` ends the process after that
    step without a checkpoint, exactly as if it had been killed there (the test of exact resume)."""
    folder = Path(config.out)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(config.device if config.device != "auto"
                          else "cuda" if torch.cuda.is_available() else "cpu")
    amp = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    program, spec_source = _program(config, folder, resume)
    data = _open_data(config)
    torch.manual_seed(config.seed)
    try:
        model = program.model(data.vocab_size, config.layers, config.mode, config.recompute).to(device)
    except ValueError as err:  # a recompute length the spec's levels cannot take
        raise RunError(str(err)) from None
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = _optimizer(config, program, model)
    warmup = config.warmup if config.warmup is not None else max(1, config.steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, steps=config.steps, warmup=warmup, min_ratio=config.min_lr_ratio))
    log = TrainLog(folder)
    step = _restore(folder, model, optimizer, scheduler, log, rank) if resume else 0
    parameters = sum(p.numel() for p in model.parameters())
    if not resume and rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"config": dataclasses.asdict(config), "spec_source": spec_source,
                "vocab_size": data.vocab_size, "parameters": parameters}
        (folder / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        log.restart([])
    elapsed, tokens = 0.0, 0
    if log.records:
        elapsed, tokens = log.records[-1]["elapsed_s"], log.records[-1]["tokens"]
    last = config.steps if stop_at is None else min(stop_at, config.steps)
    bar, task = progress_bar(config.steps, step, progress and rank == 0)
    with bar:
        while step < last:
            start = time.perf_counter()
            ids, targets = (t.to(device) for t in data.batch(config.batch, config.seq_len, config.seed,
                                                             step, rank))
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                logits = net(ids)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   ignore_index=data_module.IGNORE)
            if not torch.isfinite(loss):  # stop before the step; the last checkpoint stays good
                raise RunError(f"the loss is {loss.item()} at step {step + 1}: the run diverged "
                               f"(a lower --lr may help)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step += 1
            loss_value = _rank_mean(loss.detach(), world)
            seconds = time.perf_counter() - start
            elapsed, tokens = elapsed + seconds, tokens + ids.numel() * world
            record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens": tokens, "tokens_per_s": ids.numel() * world / seconds, "elapsed_s": elapsed}
            if rank == 0:
                log.append(record)
            bar.update(task, completed=step, loss=loss_value, tps=record["tokens_per_s"])
            if step % config.checkpoint_every == 0 or step == config.steps:
                if rank == 0:
                    _save(folder, step, model, optimizer, scheduler, log)
                if world > 1:
                    dist.barrier()
    summary = {"step": step, "steps": config.steps, "parameters": parameters,
               "train_loss": log.records[-1]["loss"] if log.records else float("nan"),
               "tokens": tokens, "elapsed_s": elapsed}
    if step == config.steps and rank == 0:
        summary.update(validation(model, data, config.batch, config.seq_len, config.val_tokens, amp))
        (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.plot(f"{program.name} ({parameters:,} parameters)", summary["val_loss"])
    return model, summary


def load_run(folder: str | Path, device: str = "cpu"):
    """The trained model of a run folder (from its checkpoint, in eval mode), its TrainConfig and the
    data source it was trained on."""
    import nlc

    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / CHECKPOINT).is_file():
        raise RunError(f"{folder} is not a run folder (needs {CONFIG} and {CHECKPOINT})")
    meta = json.loads((folder / CONFIG).read_text())
    config = TrainConfig(**meta["config"])
    program = nlc.compile(meta["spec_source"], **config.overrides)
    model = program.model(meta["vocab_size"], config.layers, config.mode)
    state = torch.load(folder / CHECKPOINT, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, _open_data(config)


def _program(config: TrainConfig, folder: Path, resume: bool):
    """The compiled spec: from the spec file on a fresh run; from the source saved in config.json on a
    resume (which must ask for the same settings as the saved run)."""
    import nlc

    if not resume:
        if not Path(config.spec).is_file():
            raise RunError(f"no such spec file: {config.spec}")
        if (folder / CHECKPOINT).exists():
            raise RunError(f"{folder} already holds a run: pass --resume to continue it, or another --out")
        return nlc.compile(config.spec, **config.overrides), Path(config.spec).read_text()
    if not (folder / CHECKPOINT).is_file():
        raise RunError(f"nothing to resume: no {CHECKPOINT} in {folder}")
    meta = json.loads((folder / CONFIG).read_text())
    saved = TrainConfig(**meta["config"])
    changed = [f"{f.name} ({getattr(saved, f.name)!r} saved, {getattr(config, f.name)!r} now)"
               for f in dataclasses.fields(TrainConfig) if getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        raise RunError(f"--resume needs the settings of the saved run; changed: {', '.join(changed)}")
    return nlc.compile(meta["spec_source"], **config.overrides), meta["spec_source"]


def _optimizer(config: TrainConfig, program, model) -> torch.optim.Optimizer:
    """The spec's optimizer when it declares one (and `optimizer` is auto or spec), else AdamW. The
    peak learning rate: `lr`, else the spec optimizer's own `lr`, else 1e-3."""
    declared = program.checked.optimizer
    if config.optimizer not in OPTIMIZERS:
        raise RunError(f"unknown optimizer {config.optimizer!r}: one of {', '.join(OPTIMIZERS)}")
    if config.optimizer == "spec" and declared is None:
        raise RunError(f"{config.spec} declares no `optimizer {{ ... }}` to train with")
    if declared is not None and config.optimizer != "adamw":
        lr = config.lr if config.lr is not None else declared.lr or DEFAULT_LR
        return program.optimizer(model.parameters(), lr, seed=config.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=config.lr if config.lr is not None else DEFAULT_LR, betas=(0.9, 0.95))


def _open_data(config: TrainConfig):
    try:
        return data_module.open_data(config.data, config.seq_len, config.val_fraction, config.seed)
    except (FileNotFoundError, ValueError) as err:
        raise RunError(str(err)) from None


def _save(folder: Path, step: int, model, optimizer, scheduler, log: TrainLog) -> None:
    """Write checkpoint.pt atomically: a crash leaves the previous checkpoint or the new one whole."""
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "data_step": step, "log": log.records,
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    temp = folder / f"{CHECKPOINT}.tmp"
    with open(temp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, folder / CHECKPOINT)


def _restore(folder: Path, model, optimizer, scheduler, log: TrainLog, rank: int) -> int:
    """Load checkpoint.pt into the live objects; the log files are cut back to its step."""
    state = torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    if rank == 0:
        log.restart(state["log"])
    else:
        log.records = list(state["log"])
    return state["data_step"]


def _rank_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return value.item()
