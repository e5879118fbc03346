"""`Program.model`: a causal LM around the compiled layer."""
import pytest
import torch

import nlc


@pytest.fixture(scope="module")
def program():
    return nlc.compile("specs/deltanet.nl", d_model=32, heads=2, d_key=16, d_value=16, chunk=8)


def test_logits_shape_and_causality(program):
    torch.manual_seed(0)
    model = program.model(vocab_size=11, layers=2)
    ids = torch.randint(0, 11, (2, 20))
    logits = model(ids)
    assert logits.shape == (2, 20, 11)
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % 11
    later = model(changed)
    assert torch.allclose(logits[:, :12], later[:, :12], atol=1e-6)
    assert not torch.allclose(logits[:, 12:], later[:, 12:])


def test_trains_one_step(program):
    torch.manual_seed(0)
    model = program.model(vocab_size=11, layers=1)
    ids = torch.randint(0, 11, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_ids_are_named(program):
    model = program.model(vocab_size=11)
    with pytest.raises(ValueError, match=r"ids: expected a \[B, T\] long tensor"):
        model(torch.zeros(2, 3, 4))
