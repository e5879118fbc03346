"""Validation bits per byte and passkey recall: prompt layout and scoring alignment."""
import math

import pytest
import torch
from torch import nn

from nlc.train import data, needle_recall, needle_table, validation
from nlc.train.evaluate import NEEDLE, passkey_prompt


class Oracle(nn.Module):
    """Reads the pass key from the needle and predicts its digits right where the prompt ends."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, 256)
        for b in range(B):
            text = bytes(ids[b].tolist())
            at = text.index(b"The pass key is ") + len(b"The pass key is ")
            for j, digit in enumerate(text[at:at + 5]):
                logits[b, T - 5 + j, digit] = 1.0  # position T-5+j predicts byte T-4+j
        return logits


class Uniform(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        return torch.zeros(*ids.shape, 256)


@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_layout(depth):
    prompt, at = passkey_prompt(700, depth, 31415)
    assert len(prompt) == 700 and prompt[at:] == b"31415" and prompt.endswith(b"The pass key is 31415")
    where = prompt.index(NEEDLE % (31415, 31415))
    body = prompt.index(b"there.\n") + len(b"there.\n"), prompt.index(b"\nWhat is the pass key?")
    assert abs((where - body[0]) / (body[1] - body[0] - len(NEEDLE % (31415, 31415))) - depth) < 0.1
    assert prompt[where - 2:where] == b". " or where == body[0]  # at a sentence boundary


def test_prompt_too_short_is_named():
    with pytest.raises(ValueError, match="shorter than a passkey prompt"):
        passkey_prompt(100, 0.5, 12345)


def test_recall_scores_the_key_digits():
    rows = needle_recall(Oracle(), [300, 512], depths=(0.0, 0.5, 1.0), trials=3, batch=2)
    assert len(rows) == 6 and all(r["exact"] == 1.0 and r["digits"] == 1.0 for r in rows)
    rows = needle_recall(Uniform(), [300], trials=2)
    assert all(r["exact"] == 0.0 for r in rows)  # argmax of flat logits is byte 0, never a digit
    table = needle_table(needle_recall(Oracle(), [300], trials=1))
    assert "depth 100%" in table and "300 | 1.00 / 1.00" in table


def test_uniform_model_is_eight_bits_per_byte(corpus):
    text = data.load(corpus, seq_len=16)
    result = validation(Uniform(), text, batch=4, seq_len=16, max_tokens=100)
    assert result["val_bpb"] == pytest.approx(8.0) and result["val_loss"] == pytest.approx(math.log(256))
    assert result["val_tokens"] == 96
