"""Training data for `nlc train`, two kinds behind one interface (`vocab_size`, `batch`, `val_batches`):

- ByteText: a local file (or every text file below a folder) read as bytes, vocabulary 256, no
  tokenizer and no download; the last `val_fraction` of the bytes is the validation split.
- TaskSet (`task:NAME`): a synthetic task of `nlc.explore.tasks` (MQAR, MAD...); its train split for
  training, its test split for validation, loss only where the task puts targets.

A training batch is a pure function of (seed, step, rank), so a run resumed at step k draws exactly
the batches the uninterrupted run draws: the step is the whole data position."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

IGNORE = -100  # target id that cross_entropy skips (`ignore_index`)


@dataclass(frozen=True)
class ByteText:
    """A byte corpus split in two: train [N_train] and val [N_val], uint8."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int = 256

    def batch(self, batch: int, seq_len: int, seed: int, step: int, rank: int = 0):
        """ids [batch, seq_len] and targets [batch, seq_len] (long, targets = ids shifted by one),
        from windows of the train split at offsets drawn by a generator seeded with (seed, step, rank)."""
        g = torch.Generator().manual_seed(_mix(seed, step, rank))
        starts = torch.randint(0, len(self.train) - seq_len, (batch,), generator=g)
        windows = torch.stack([self.train[s:s + seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]

    def val_batches(self, batch: int, seq_len: int, max_tokens: int) -> Iterator[tuple]:
        """(ids, targets) [n <= batch, seq_len] over consecutive non-overlapping windows of the val
        split, together at most `max_tokens` predicted bytes."""
        n = min((len(self.val) - 1) // seq_len, max(1, max_tokens // seq_len))
        windows = self.val[:n * seq_len + 1]
        for first in range(0, n, batch):
            rows = [windows[i * seq_len:(i + 1) * seq_len + 1] for i in range(first, min(n, first + batch))]
            w = torch.stack(rows).long()
            yield w[:, :-1], w[:, 1:]


@dataclass(frozen=True)
class TaskSet:
    """A synthetic task: train rows drawn by (seed, step, rank), test rows for validation."""

    task: object  # nlc.explore.tasks.Task

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    def batch(self, batch: int, seq_len: int, seed: int, step: int, rank: int = 0):
        """ids [batch, T] and targets [batch, T] (long; IGNORE where the task has no loss); T is the
        task's sequence length, set when the task was made."""
        g = torch.Generator().manual_seed(_mix(seed, step, rank))
        rows = torch.randint(0, len(self.task.train.inputs), (batch,), generator=g)
        return self.task.train.inputs[rows], self.task.train.targets[rows]

    def val_batches(self, batch: int, seq_len: int, max_tokens: int) -> Iterator[tuple]:
        """(ids, targets) over the first test rows, together at most `max_tokens` positions."""
        test = self.task.test
        n = min(len(test.inputs), max(1, max_tokens // test.inputs.shape[1]))
        for first in range(0, n, batch):
            yield test.inputs[first:min(n, first + batch)], test.targets[first:min(n, first + batch)]


def open_data(spec: str, seq_len: int, val_fraction: float = 0.05, seed: int = 0):
    """`task:NAME[:KEY=VALUE...]` -> TaskSet (the task made with this seed and sequence length, and
    the given difficulty settings, e.g. `task:mqar:kv_pairs=4,8:vocab=64`), else the ByteText of the
    file or folder at `spec`."""
    if not spec.startswith("task:"):
        return load(spec, val_fraction, seq_len)
    from nlc.explore import tasks

    name, *settings = spec.removeprefix("task:").split(":")
    difficulty = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise ValueError(f"task setting {setting!r}: expected KEY=VALUE")
        numbers = tuple(float(v) if "." in v or "e" in v else int(v) for v in value.split(","))
        difficulty[key] = numbers[0] if len(numbers) == 1 else numbers
    return TaskSet(tasks.make(name, seed=seed, **{"seq_len": seq_len, **difficulty}))


def read_bytes(path: str | Path) -> bytes:
    """A file's bytes, or the bytes of every file below a folder (sorted by path; files with a NUL
    byte are binary and skipped), joined."""
    path = Path(path)
    if path.is_file():
        return path.read_bytes()
    if not path.is_dir():
        raise FileNotFoundError(f"no data file or folder at {path}")
    parts = [f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file() and not f.is_symlink()]
    return b"".join(p for p in parts if b"\0" not in p)


def load(path: str | Path, val_fraction: float = 0.05, seq_len: int = 1) -> ByteText:
    """The bytes at `path`, split: the first (1 - val_fraction) train, the rest val. Both splits must
    hold more than `seq_len` bytes."""
    raw = read_bytes(path)
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(raw) * (1 - val_fraction))
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    train, val = tokens[:cut], tokens[cut:]
    if min(len(train), len(val)) <= seq_len:
        raise ValueError(f"{path}: {len(raw)} bytes is too little for windows of {seq_len} bytes "
                         f"with {val_fraction:.0%} held out for validation")
    return ByteText(train, val)


def _mix(*numbers: int) -> int:
    """A 63-bit generator seed from a tuple of ints (distinct tuples, unrelated streams)."""
    digest = hashlib.blake2b(repr(numbers).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
