"""Training and evaluation of a spec's language model (`nlc train`, `nlc eval`).

    data.py      byte-level local text and synthetic tasks: deterministic batches, validation split
    loop.py      the training loop: AdamW, cosine schedule, clipping, autocast, atomic checkpoints,
                 exact resume, DistributedDataParallel under torch.distributed
    log.py       JSON/CSV step log, loss plot, progress bar
    evaluate.py  validation loss / bits per byte, passkey (single-needle) recall per length
"""
from . import data
from .evaluate import needle_recall, needle_table, validation
from .loop import RunError, TrainConfig, load_run, train

__all__ = ["RunError", "TrainConfig", "data", "load_run", "needle_recall", "needle_table", "train",
           "validation"]
