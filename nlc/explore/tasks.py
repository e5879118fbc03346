"""Sequence tasks, generated locally from a seed (MATH.md §6): MQAR (Zoology), a forgetting variant,
MAD's six tasks, and byte-level language modelling on a local text file (`text`). Every task is a
causal-LM problem on token ids:

    inputs  [N, T] long    the sequence the model reads
    targets [N, T] long    the next-token targets the training loss uses (-100: no loss there)
    slices  [N, T] long    the index (into slice_names) of each position whose prediction is scored,
                           -1 elsewhere; accuracy is reported per slice (a difficulty setting)

`make(name, seed=..., **difficulty)` builds the train and test splits (test from seed + 1;
memorization's key -> value map comes from its own `table_seed` and is shared by both; `text` draws
its test windows from the file's held-out end). Difficulty arguments and defaults are each
generator's keyword arguments; `describe()` lists them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch

IGNORE = -100


@dataclass(frozen=True)
class TaskData:
    inputs: torch.Tensor
    targets: torch.Tensor
    slices: torch.Tensor
    slice_names: tuple[str, ...]


@dataclass(frozen=True)
class Task:
    name: str
    vocab_size: int
    train: TaskData
    test: TaskData
    settings: dict = field(default_factory=dict)


def _data(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], names) -> TaskData:
    """Stack per-example (inputs [T], targets [T] with IGNORE, scored slice ids [T])."""
    inputs, targets, scored = (torch.as_tensor(np.stack(c), dtype=torch.long) for c in zip(*rows))
    return TaskData(inputs, targets, scored, tuple(names))


def _shifted(seq: np.ndarray, loss_at) -> tuple[np.ndarray, np.ndarray]:
    """A sequence of T+1 tokens -> inputs seq[:-1] and next-token targets where `loss_at` (a mask or
    positions) holds, IGNORE elsewhere."""
    targets = np.full(len(seq) - 1, IGNORE, dtype=np.int64)
    targets[loss_at] = seq[1:][loss_at]
    return seq[:-1], targets


def _scored(length: int, positions, slice_id: int = 0) -> np.ndarray:
    out = np.full(length, -1, dtype=np.int64)
    out[np.asarray(positions, dtype=np.int64)] = slice_id
    return out


def _share(n: int, parts: int, i: int) -> int:
    """Example count of part i when n examples are split evenly over `parts`."""
    return n // parts + (i < n % parts)


def _ints(value) -> tuple[int, ...]:
    return tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))


# ---- MQAR (Zoology `multiquery_ar`) ----------------------------------------------------------------
def _power_gaps(rng, space: int, count: int, power_a: float) -> np.ndarray:
    """`count` distinct gaps in [0, space), p(g) ~ a g^(a-1): most queries come soon after the context."""
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)
    return rng.choice(space, size=count, replace=False, p=p / p.sum())


def mqar(rng, n, *, vocab=8192, seq_len=256, kv_pairs=(16, 32, 64), power_a=0.01):
    """Multi-query associative recall. Per example: N distinct keys from the lower half of the vocabulary
    and N distinct values from the upper half, written as pairs at the start; then each key once more
    at an even offset (power-law gaps), and its value is the target right after it. Other positions
    are random tokens with no loss. One slice per N in `kv_pairs` (the examples are split evenly)."""
    kv_pairs = _ints(kv_pairs)
    rows = []
    for s, pairs in enumerate(kv_pairs):
        if 4 * pairs > seq_len or seq_len % 2 or vocab <= seq_len:
            raise ValueError(f"mqar needs 4 * kv_pairs <= seq_len (even) < vocab, got "
                             f"kv_pairs={pairs}, seq_len={seq_len}, vocab={vocab}")
        for _ in range(_share(n, len(kv_pairs), s)):
            keys = rng.choice(np.arange(1, vocab // 2), size=pairs, replace=False)
            values = rng.choice(np.arange(vocab // 2, vocab), size=pairs, replace=False)
            context = 2 * pairs
            seq = rng.integers(0, vocab, size=seq_len + 1)
            seq[0:context:2], seq[1:context:2] = keys, values
            where = context + 2 * _power_gaps(rng, (seq_len - context) // 2, pairs, power_a)
            seq[where], seq[where + 1] = keys, values
            rows.append((*_shifted(seq, where), _scored(seq_len, where, s)))
    return rows, [f"kv={p}" for p in kv_pairs]


def forgetting_mqar(rng, n, *, vocab=8192, seq_len=256, kv_pairs=(16, 32), reassigned=0.5,
                    power_a=0.01):
    """MQAR where keys are re-assigned: after the N pairs, a fraction `reassigned` of the keys is written
    again with new values; then every key is queried and the target is its latest value. Slices:
    `new:kv=N` (queries of re-assigned keys, which need the old value forgotten) and `kept:kv=N`."""
    kv_pairs = _ints(kv_pairs)
    rows, names = [], []
    for s, pairs in enumerate(kv_pairs):
        changed = max(1, int(round(reassigned * pairs)))
        context = 2 * (pairs + changed)
        if context + 2 * pairs > seq_len or seq_len % 2 or vocab <= seq_len:
            raise ValueError(f"forgetting_mqar needs 2 * (2 * kv_pairs + re-assigned) <= seq_len "
                             f"(even) < vocab, got kv_pairs={pairs}, re-assigned={changed}, "
                             f"seq_len={seq_len}, vocab={vocab}")
        names += [f"new:kv={pairs}", f"kept:kv={pairs}"]
        for _ in range(_share(n, len(kv_pairs), s)):
            keys = rng.choice(np.arange(1, vocab // 2), size=pairs, replace=False)
            values = rng.choice(np.arange(vocab // 2, vocab), size=pairs + changed, replace=False)
            first, again = values[:pairs], values[pairs:]
            which = rng.choice(pairs, size=changed, replace=False)
            latest = first.copy()
            latest[which] = again
            seq = rng.integers(0, vocab, size=seq_len + 1)
            seq[0:2 * pairs:2], seq[1:2 * pairs:2] = keys, first
            seq[2 * pairs:context:2], seq[2 * pairs + 1:context:2] = keys[which], again
            order = rng.permutation(pairs)
            where = context + 2 * _power_gaps(rng, (seq_len - context) // 2, pairs, power_a)
            seq[where], seq[where + 1] = keys[order], latest[order]
            new = np.isin(order, which)
            scored = _scored(seq_len, where[~new], 2 * s + 1)
            scored[where[new]] = 2 * s
            rows.append((*_shifted(seq, where), scored))
    return rows, names


# ---- MAD (Poli et al. 2024, `instances.py`) --------------------------------------------------------
# Special tokens come first in the vocabulary: 0 blank/pad, 1 copy/probe prefix, 2 insert/compress.
SPECIAL = 3


def _halves(vocab: int, noise: int = 0):
    """Disjoint key and value vocabularies after the special and noise tokens."""
    start = SPECIAL + noise
    if vocab - start < 4:
        raise ValueError(f"vocab={vocab} leaves fewer than 4 key/value tokens")
    mid = start + (vocab - start) // 2
    return np.arange(start, mid), np.arange(mid, vocab)


def _recall(rng, seq_len, vocab, keys, frac_noise, noise):
    """Key-value pairs from a per-sequence map (keys repeat, values fixed), some pairs replaced by
    noise tokens; ends with the copy prefix, a probe key that occurred and its value."""
    key_vocab, value_vocab = _halves(vocab, noise)
    ks = rng.choice(key_vocab, size=min(keys, len(key_vocab)), replace=False)
    table = dict(zip(ks.tolist(), rng.choice(value_vocab, size=len(ks)).tolist()))
    body = seq_len + 1 - 3
    seq = np.zeros(seq_len + 1, dtype=np.int64)
    loss = np.ones(seq_len, dtype=bool)
    seen = []
    for i in range(0, body - 1, 2):
        if noise and rng.random() < frac_noise:
            seq[i:i + 2] = rng.integers(SPECIAL, SPECIAL + noise, size=2)
            loss[max(i - 1, 0):i + 1] = False  # no loss on predicting noise
            continue
        k = int(rng.choice(ks))
        seq[i], seq[i + 1] = k, table[k]
        seen.append(k)
    probe = int(rng.choice(seen)) if seen else int(ks[0])
    seq[-3], seq[-2], seq[-1] = 1, probe, table[probe]
    return (*_shifted(seq, loss), _scored(seq_len, [seq_len - 1]))


def in_context_recall(rng, n, *, vocab=64, seq_len=128, keys=16):
    """MAD in-context recall: full next-token loss in training, scored on the probe's value."""
    return [_recall(rng, seq_len, vocab, keys, 0.0, 0) for _ in range(n)], ["probe"]


def noisy_recall(rng, n, *, vocab=64, seq_len=128, keys=16, noise_vocab=16, frac_noise=0.2):
    """MAD noisy recall: in-context recall with a fraction of pairs replaced by noise tokens."""
    return ([_recall(rng, seq_len, vocab, keys, frac_noise, noise_vocab) for _ in range(n)],
            ["probe"])


def fuzzy_recall(rng, n, *, vocab=64, seq_len=128, keys=8, motif=3):
    """MAD fuzzy recall: keys and values are motifs of 1..`motif` tokens; after the copy prefix a key
    motif is repeated and its whole value motif is scored."""
    key_vocab, value_vocab = _halves(vocab)
    rows = []
    for _ in range(n):
        table = {}
        while len(table) < keys:
            k = tuple(rng.choice(key_vocab, size=rng.integers(1, motif + 1)).tolist())
            table.setdefault(k, tuple(rng.choice(value_vocab, size=rng.integers(1, motif + 1)).tolist()))
        items = list(table.items())
        probe_k, probe_v = items[rng.integers(len(items))]
        tail = [1, *probe_k, *probe_v]
        body = []
        while True:
            k, v = items[rng.integers(len(items))]
            if len(body) + len(k) + len(v) + len(tail) > seq_len + 1:
                break
            body += [*k, *v]
        seq = np.array([0] * (seq_len + 1 - len(body) - len(tail)) + body + tail, dtype=np.int64)
        first = seq_len + 1 - len(probe_v)  # index in seq of the first scored value token
        rows.append((*_shifted(seq, seq[1:] != 0), _scored(seq_len, np.arange(first - 1, seq_len))))
    return rows, ["probe"]


def selective_copying(rng, n, *, vocab=64, seq_len=128, tokens=16):
    """MAD selective copying: `tokens` content tokens scattered among blanks, then the copy token; the
    model writes the content tokens in order (scored, and the only loss)."""
    rows = []
    region = seq_len - tokens
    for _ in range(n):
        content = rng.integers(SPECIAL, vocab, size=tokens)
        seq = np.zeros(seq_len + 1, dtype=np.int64)
        seq[np.sort(rng.choice(region, size=tokens, replace=False))] = content
        seq[region] = 1
        seq[region + 1:] = content
        out = np.arange(region, seq_len)
        rows.append((*_shifted(seq, out), _scored(seq_len, out)))
    return rows, ["copy"]


def compression(rng, n, *, vocab=64, seq_len=64):
    """MAD compression in causal-LM form: seq_len/2 random tokens, the compression token, then blanks;
    from the compression token on, position j must output content token j (the state carries the
    sequence; MAD decodes it from the compression token's embedding with an MLP instead)."""
    half = seq_len // 2
    out = np.arange(half, seq_len)
    rows = []
    for _ in range(n):
        content = rng.integers(SPECIAL, vocab, size=half)
        inputs = np.concatenate([content, [2], np.zeros(seq_len - half - 1, dtype=np.int64)])
        targets = np.full(seq_len, IGNORE, dtype=np.int64)
        targets[out] = content
        rows.append((inputs, targets, _scored(seq_len, out)))
    return rows, ["reconstruct"]


def memorization(rng, n, *, vocab=256, seq_len=64, keys=64, table_seed=0):
    """MAD memorization: a fixed key -> value map (from `table_seed`, shared by train and test) learned
    across training; sequences of `key, insert` pairs, the insert token is answered with the value."""
    key_vocab, value_vocab = _halves(vocab)
    table_rng = np.random.default_rng(table_seed)
    ks = table_rng.choice(key_vocab, size=min(keys, len(key_vocab)), replace=False)
    vs = table_rng.choice(value_vocab, size=len(ks))
    answers = np.arange(1, seq_len, 2)  # the insert tokens
    rows = []
    for _ in range(n):
        pick = rng.integers(len(ks), size=(seq_len + 1) // 2)
        inputs = np.stack([ks[pick], np.full(len(pick), 2)], axis=1).reshape(-1)[:seq_len]
        targets = np.full(seq_len, IGNORE, dtype=np.int64)
        targets[answers] = vs[pick[:len(answers)]]
        rows.append((inputs, targets, _scored(seq_len, answers)))
    return rows, ["recall"]


# ---- language modelling on a local text file ------------------------------------------------------
def text(rng, n, *, path="", seq_len=256, val_fraction=0.05, vocab=256, split="train"):
    """Next-byte prediction on a local file or folder (`nlc.train.data.read_bytes`): n windows of
    seq_len + 1 bytes at random offsets of the first 1 - val_fraction of the bytes (split "train") or
    of the rest ("test"); the loss and the score (slice `next_byte`) at every position."""
    from nlc.train.data import read_bytes

    if vocab != 256:
        raise ValueError(f"text is byte-level: its vocabulary is 256, got vocab={vocab}")
    if not path:
        raise ValueError("text needs path=FILE (a local text file or folder)")
    if not 0 < val_fraction < 1:
        raise ValueError(f"text needs 0 < val_fraction < 1, got {val_fraction}")
    raw = np.frombuffer(read_bytes(path), dtype=np.uint8).astype(np.int64)
    cut = int(len(raw) * (1 - val_fraction))
    part = raw[:cut] if split == "train" else raw[cut:]
    if len(part) < seq_len + 1:
        raise ValueError(f"text: the {split} part of {path} holds {len(part)} bytes, too few for "
                         f"windows of {seq_len + 1} (val_fraction={val_fraction})")
    everywhere = _scored(seq_len, np.arange(seq_len))
    starts = rng.integers(0, len(part) - seq_len, size=n)
    rows = [(*_shifted(part[s:s + seq_len + 1], slice(None)), everywhere) for s in starts]
    return rows, ["next_byte"]


GENERATORS = {f.__name__: f for f in (mqar, forgetting_mqar, in_context_recall, noisy_recall,
                                      fuzzy_recall, selective_copying, compression, memorization,
                                      text)}
SPLIT = "split"  # a generator keyword that make() sets ("train" or "test"), not a difficulty


def describe() -> dict[str, dict]:
    """Each task's difficulty arguments and their defaults."""
    return {name: {k: p.default for k, p in inspect.signature(f).parameters.items()
                   if p.kind is p.KEYWORD_ONLY and k != SPLIT} for name, f in GENERATORS.items()}


def check(name: str, difficulty: dict) -> dict:
    """The task's full settings (defaults filled in); ValueError for an unknown task or setting."""
    if name not in GENERATORS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(GENERATORS)}")
    known = describe()[name]
    unknown = set(difficulty) - set(known)
    if unknown:
        raise ValueError(f"task {name} has no setting {', '.join(sorted(unknown))}; "
                         f"settings: {', '.join(known)}")
    return {**known, **difficulty}


def make(name: str, *, seed: int = 0, train: int = 2000, test: int = 500, **difficulty) -> Task:
    """The train and test splits of one task (test drawn from seed + 1)."""
    settings = check(name, difficulty)
    generator, splits = GENERATORS[name], []
    for split, split_seed, count in (("train", seed, train), ("test", seed + 1, test)):
        split_arg = {SPLIT: split} if SPLIT in inspect.signature(generator).parameters else {}
        rows, names = generator(np.random.default_rng(split_seed), count, **difficulty, **split_arg)
        splits.append(_data(rows, names))
    return Task(name, int(settings["vocab"]), splits[0], splits[1],
                {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()})
