"""A tiny spec, a small byte corpus and tiny training settings shared by the training tests."""
import pytest

from nlc.train import TrainConfig

TINY_SPEC = "specs/deltanet.nl"
TINY = {"d_model": 16, "heads": 2, "d_key": 8, "d_value": 8, "chunk": 8}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """About 6 kB of English-like bytes with some structure to learn."""
    path = tmp_path_factory.mktemp("data") / "text.txt"
    words = "the quick brown fox jumps over a lazy dog while memory layers learn to recall".split()
    path.write_text(" ".join(words[(i * 7) % len(words)] for i in range(1200)))
    return path


@pytest.fixture
def config(corpus, tmp_path):
    """A few-second run: a 1-layer tiny deltanet, batch 2 of 16 bytes."""
    return TrainConfig(spec=TINY_SPEC, data=str(corpus), out=str(tmp_path / "run"), steps=6,
                       overrides=TINY, layers=1, batch=2, seq_len=16, lr=3e-3, checkpoint_every=3,
                       val_tokens=256)
