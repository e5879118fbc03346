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


def test_scored_positions_only(program):
    """`scored` gives the full logits at its True positions, and their gradients."""
    torch.manual_seed(0)
    model = program.model(vocab_size=11, layers=2)
    ids = torch.randint(0, 11, (3, 17))
    scored = torch.rand(3, 17) < 0.3
    full = model(ids)
    part = model(ids, scored)
    assert part.shape == (int(scored.sum()), 11)
    torch.testing.assert_close(part, full[scored], rtol=0, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), model.embed.weight)[0] for out in (full[scored], part)]
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_bad_scored_mask_is_named(program):
    model = program.model(vocab_size=11)
    with pytest.raises(ValueError, match=r"scored: expected a bool tensor of shape \(2, 3\)"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
