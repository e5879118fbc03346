"""What a training run reports: one record per step, appended to `log.jsonl` and `log.csv` as it
goes, a loss plot (`loss.png`) at the end, and a live progress bar with loss and tokens/s."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from matplotlib.figure import Figure
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

FIELDS = ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s")


class TrainLog:
    """Per-step records in memory and on disk under `folder`. `restart(records)` rewrites both files
    from `records` (a resumed run drops the steps logged after its checkpoint)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.records: list[dict] = []

    def restart(self, records: list[dict]) -> None:
        self.records = [dict(r) for r in records]
        with open(self.folder / "log.jsonl", "w") as jsonl, open(self.folder / "log.csv", "w") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            for record in self.records:
                jsonl.write(json.dumps(record) + "\n")
                writer.writerow(record)

    def append(self, record: dict) -> None:
        self.records.append(record)
        with open(self.folder / "log.jsonl", "a") as jsonl, open(self.folder / "log.csv", "a") as f:
            jsonl.write(json.dumps(record) + "\n")
            csv.DictWriter(f, FIELDS).writerow(record)

    def plot(self, title: str, val_loss: float | None = None) -> Path:
        """Draw training loss against step (and the final validation loss as a point) to loss.png."""
        steps = [r["step"] for r in self.records]
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        ax.plot(steps, [r["loss"] for r in self.records], lw=1, label="train")
        if val_loss is not None and steps:
            ax.plot([steps[-1]], [val_loss], "o", label=f"validation {val_loss:.3f}")
        ax.set(xlabel="step", ylabel="loss (nats / token)", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.folder / "loss.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return path


def progress_bar(total: int, done: int, enabled: bool):
    """A rich progress bar over the steps, showing the latest loss and tokens/s (fields `loss` and
    `tps` of `update`); disabled it draws nothing."""
    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                   TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled)
    task = bar.add_task("train", total=total, completed=done, loss=float("nan"), tps=0.0)
    return bar, task
