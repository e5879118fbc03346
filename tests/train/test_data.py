"""Byte data: the split, deterministic batches by (seed, step, rank), folders, tasks."""
import pytest
import torch

from nlc.train import data


def test_split_and_windows(corpus):
    text = data.load(corpus, val_fraction=0.1, seq_len=16)
    raw = corpus.read_bytes()
    assert bytes(text.train.tolist()) + bytes(text.val.tolist()) == raw
    assert len(text.val) == len(raw) - int(len(raw) * 0.9)
    ids, targets = text.batch(4, 16, seed=0, step=3)
    assert ids.shape == targets.shape == (4, 16) and ids.dtype == torch.long
    assert torch.equal(ids[:, 1:], targets[:, :-1])
    for row in ids:  # every window is a slice of the train split
        assert bytes(row.tolist()) in bytes(text.train.tolist())


def test_batches_are_a_function_of_seed_step_rank(corpus):
    text = data.load(corpus, seq_len=16)
    same = [text.batch(3, 16, seed=1, step=5, rank=0)[0] for _ in range(2)]
    assert torch.equal(*same)
    for other in (dict(seed=2, step=5, rank=0), dict(seed=1, step=6, rank=0), dict(seed=1, step=5, rank=1)):
        assert not torch.equal(same[0], text.batch(3, 16, **other)[0])


def test_validation_windows_do_not_overlap(corpus):
    text = data.load(corpus, seq_len=16)
    rows = torch.cat([ids for ids, _ in text.val_batches(2, 16, max_tokens=80)])
    assert rows.shape == (5, 16)
    assert bytes(rows.flatten().tolist()) == bytes(text.val[:80].tolist())


def test_folder_skips_binary_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.py").write_bytes(b"second")
    (tmp_path / "a.txt").write_bytes(b"first ")
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2")
    assert data.read_bytes(tmp_path) == b"first second"


def test_too_little_data_is_named(tmp_path):
    (tmp_path / "t.txt").write_bytes(b"short")
    with pytest.raises(ValueError, match="too little"):
        data.load(tmp_path / "t.txt", seq_len=16)


def test_synthetic_task_source():
    source = data.open_data("task:mqar:kv_pairs=4:vocab=64", seq_len=32, seed=0)
    ids, targets = source.batch(4, 32, seed=0, step=0)
    assert ids.shape == targets.shape == (4, 32) and source.vocab_size == 64
    assert (targets != data.IGNORE).any() and (targets == data.IGNORE).any()
    assert torch.equal(ids, source.batch(4, 32, seed=0, step=0)[0])
    assert sum(len(i) for i, _ in source.val_batches(8, 32, max_tokens=32 * 10)) == 10
