"""The tasks: MQAR as Zoology generates it, the forgetting variant, MAD's six tasks, byte-level text."""
from pathlib import Path

import numpy as np
import pytest
import torch

from nlc.explore import tasks
from nlc.explore.tasks import IGNORE

ALL = sorted(tasks.GENERATORS)
CORPUS = Path(__file__).resolve().parents[2] / "grammar" / "README.md"  # any local text
SMALL = {"mqar": dict(vocab=512, seq_len=128, kv_pairs=(8, 16)),
         "forgetting_mqar": dict(vocab=512, seq_len=128, kv_pairs=(8, 16)),
         "text": dict(path=str(CORPUS), seq_len=64)}


@pytest.mark.parametrize("name", ALL)
def test_every_task_scores_positions_that_have_targets(name):
    t = tasks.make(name, seed=3, train=12, test=6, **SMALL.get(name, {}))
    for d in (t.train, t.test):
        assert d.inputs.shape == d.targets.shape == d.slices.shape
        assert d.inputs.dtype == torch.long and int(d.inputs.min()) >= 0
        assert int(d.inputs.max()) < t.vocab_size and int(d.targets.max()) < t.vocab_size
        scored = d.slices >= 0
        assert scored.any(dim=1).all(), "every example is scored somewhere"
        assert (d.targets[scored] != IGNORE).all(), "scored positions carry a target"
        assert int(d.slices.max()) < len(d.slice_names)


@pytest.mark.parametrize("name", ALL)
def test_tasks_are_deterministic_per_seed(name):
    a, b, c = (tasks.make(name, seed=s, train=4, test=2, **SMALL.get(name, {})) for s in (1, 1, 2))
    assert torch.equal(a.train.inputs, b.train.inputs) and torch.equal(a.test.targets, b.test.targets)
    assert not torch.equal(a.train.inputs, c.train.inputs)
    assert not torch.equal(a.train.inputs[:2], a.test.inputs), "the test split has its own seed"


def test_mqar_follows_zoology():
    vocab, seq_len, pairs = 512, 128, 16
    t = tasks.make("mqar", seed=0, train=50, test=1, vocab=vocab, seq_len=seq_len, kv_pairs=pairs)
    d = t.train
    gaps = []
    for x, y in zip(d.inputs.tolist(), d.targets.tolist()):
        keys, values = x[0:2 * pairs:2], x[1:2 * pairs:2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        assert all(1 <= k < vocab // 2 for k in keys) and all(vocab // 2 <= v < vocab for v in values)
        answers = [i for i, target in enumerate(y) if target != IGNORE]
        assert len(answers) == pairs, "loss only at the answer after each re-inserted key"
        table = dict(zip(keys, values))
        assert sorted(x[i] for i in answers) == sorted(keys), "each key is queried once"
        assert all(y[i] == table[x[i]] for i in answers)
        assert all(i >= 2 * pairs and (i - 2 * pairs) % 2 == 0 for i in answers)
        gaps += [(i - 2 * pairs) // 2 for i in answers]
    space = (seq_len - 2 * pairs) // 2
    near, far = np.bincount(gaps, minlength=space)[:space // 4].sum(), sum(g >= 3 * space // 4 for g in gaps)
    assert near > far, "power-law gaps: more queries soon after the context than at the end"
    assert d.slice_names == (f"kv={pairs}",)


def test_mqar_slices_split_the_examples_by_kv_pairs():
    t = tasks.make("mqar", seed=0, train=9, test=3, vocab=512, seq_len=128, kv_pairs=(4, 8, 16))
    per_example = [sorted(set(s[s >= 0].tolist())) for s in t.train.slices]
    assert per_example == [[0]] * 3 + [[1]] * 3 + [[2]] * 3
    assert [int((s >= 0).sum()) for s in t.train.slices[::3]] == [4, 8, 16]


def test_forgetting_mqar_asks_for_the_latest_value():
    pairs = 8
    t = tasks.make("forgetting_mqar", seed=0, train=20, test=1, vocab=512, seq_len=128,
                   kv_pairs=pairs, reassigned=0.5)
    assert t.train.slice_names == ("new:kv=8", "kept:kv=8")
    for x, y, s in zip(t.train.inputs.tolist(), t.train.targets.tolist(), t.train.slices.tolist()):
        latest, first = {}, {}
        for i in range(0, 2 * (pairs + pairs // 2), 2):
            first.setdefault(x[i], x[i + 1])
            latest[x[i]] = x[i + 1]
        assert sum(latest[k] != first[k] for k in latest) == pairs // 2
        answers = [i for i, target in enumerate(y) if target != IGNORE]
        assert len(answers) == pairs
        for i in answers:
            assert y[i] == latest[x[i]]
            assert s[i] == (0 if latest[x[i]] != first[x[i]] else 1)


def test_memorization_uses_one_map_for_train_and_test():
    t = tasks.make("memorization", seed=0, train=30, test=30, vocab=64, seq_len=32, keys=8)
    table = {}
    for d in (t.train, t.test):
        for x, y in zip(d.inputs.tolist(), d.targets.tolist()):
            for i in range(1, len(x), 2):
                assert table.setdefault(x[i - 1], y[i]) == y[i]
    assert len(table) == 8


def test_selective_copying_copies_the_scattered_tokens_in_order():
    t = tasks.make("selective_copying", seed=0, train=5, test=1, vocab=32, seq_len=40, tokens=6)
    for x, y in zip(t.train.inputs.tolist(), t.train.targets.tolist()):
        region = 40 - 6
        content = [tok for tok in x[:region] if tok != 0]
        assert x[region] == 1 and [v for v in y if v != IGNORE] == content


def test_unknown_task_or_setting_is_an_error():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make("nope")
    with pytest.raises(ValueError, match="no setting kv"):
        tasks.make("mqar", kv=3)
    with pytest.raises(ValueError, match="4 \\* kv_pairs <= seq_len"):
        tasks.make("mqar", vocab=512, seq_len=64, kv_pairs=32, train=1, test=1)


def test_text_windows_predict_the_next_byte_from_their_own_split(tmp_path):
    """Train windows from the first 90% of the bytes, test windows from the last 10%; every position
    is scored with the next byte as its target."""
    raw = bytes(np.random.default_rng(0).integers(0, 256, size=5000, dtype=np.uint8))
    corpus = tmp_path / "corpus.bin"
    corpus.write_bytes(raw)
    t = tasks.make("text", seed=0, train=20, test=10, path=str(corpus), seq_len=40, val_fraction=0.1)
    assert t.vocab_size == 256 and t.train.slice_names == ("next_byte",)
    assert (t.train.slices == 0).all() and (t.test.slices == 0).all()
    cut = int(len(raw) * 0.9)
    for data, part in ((t.train, raw[:cut]), (t.test, raw[cut:])):
        for ids, targets in zip(data.inputs, data.targets):
            window = bytes(ids.tolist()) + bytes([int(targets[-1])])
            assert window in part, "each window is a run of its split's bytes"
            assert torch.equal(targets[:-1], ids[1:]), "targets are the next bytes"


def test_text_settings_are_checked(tmp_path):
    small = tmp_path / "small.txt"
    small.write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="text needs path=FILE"):
        tasks.make("text", train=1, test=1)
    with pytest.raises(ValueError, match="its vocabulary is 256"):
        tasks.make("text", path=str(small), vocab=512, train=1, test=1)
    with pytest.raises(ValueError, match="too few for windows of 65"):
        tasks.make("text", path=str(small), seq_len=64, train=1, test=1)
    with pytest.raises(FileNotFoundError, match="no data file or folder"):
        tasks.make("text", path=str(tmp_path / "missing.txt"), train=1, test=1)
    assert "split" not in tasks.describe()["text"], "make() sets the split, not the user"
