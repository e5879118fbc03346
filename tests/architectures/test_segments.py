"""`recall(level, q, segment = S)` and the segment loop it implies (Titans MAC): the retrieval reads
the state the level had at the segment start, carried across segments; attention's extra pairs are
causal; the checker rejects what computing segment by segment would change."""
import pytest
import torch

import nlc
from nlc.runtime.attention import Attention

RECALL = """model recall
param d_model = 8
param heads = 2
param chunk = 4
gate eta[heads] = 0.5 * sigmoid(linear(x))
let q[heads, 4] = l2norm(linear(x))
let k[heads, 4] = l2norm(linear(x))
let v[heads, 4] = linear(x)
let r[heads, 4] = recall(memory, q, segment = {segment})
level memory {{ memory {memory}  bias l2  algorithm gd(lr = eta)  update every chunk
                gradient chunk_start(chunk)  read before {init} }}
output = x + linear(r - memory)
"""


@pytest.mark.parametrize("memory, init", [("matrix", ""), ("mlp(depth = 2, expand = 2)", "init learned")])
def test_recall_is_the_state_at_the_segment_start(memory, init):
    """A level read before its write, updated once per segment, reads exactly what recall reads:
    out = x + W (recall - read) is x, over segments 4, 4, 2 with the state carried."""
    program = nlc.compile(RECALL.format(segment=4, memory=memory, init=init))
    torch.manual_seed(0)
    layer = program.layer("reference").double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x, rtol=0, atol=1e-12)


def test_recall_of_a_later_segment_differs():
    """recall with a segment of 8 over a level that moves every 4 tokens reads an older state."""
    program = nlc.compile(RECALL.format(segment=8, memory="matrix", init=""))
    torch.manual_seed(0)
    layer = program.layer("reference").double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    y = layer(x)
    torch.testing.assert_close(y[:, :4], x[:, :4], rtol=0, atol=1e-12)
    assert not torch.allclose(y[:, 4:8], x[:, 4:8])


def test_attention_extra_pairs_are_causal():
    torch.manual_seed(0)
    att = Attention(1, 4, 4, block=4, persistent=2).double()
    q, k, v, ek, ev = (torch.randn(1, 8, 1, 4, dtype=torch.float64) for _ in range(5))
    base = att(q, k, v, ek, ev)
    ev2 = ev.clone()
    ev2[:, 5] += 1
    moved = att(q, k, v, ek, ev2)
    torch.testing.assert_close(moved[:, :5], base[:, :5], rtol=0, atol=0)
    assert not torch.allclose(moved[:, 5:8], base[:, 5:8])
    k2 = k.clone()
    k2[:, 2] += 1  # another block: no effect on block 1
    torch.testing.assert_close(att(q, k2, v, ek, ev)[:, 4:], base[:, 4:], rtol=0, atol=0)


@pytest.mark.parametrize("change, message", [
    ("let v[heads, 4] = linear(x)", None),
    ("let v[heads, 4] = conv(linear(r), 4)", "restart at each segment"),
    ("let v[heads, 4] = attention(r, r, r)", "must stay inside its segment"),
    ("let v[heads, 4] = attention(r, r, r, block = 8)", "must stay inside its segment"),
])
def test_segment_checks(change, message):
    text = RECALL.format(segment=4, memory="matrix", init="").replace(
        "let v[heads, 4] = linear(x)", change)
    if message is None:
        nlc.compile(text)
        return
    with pytest.raises(nlc.SpecError, match=message):
        nlc.compile(text)


@pytest.mark.parametrize("text, message", [
    (RECALL.format(segment=6, memory="matrix", init=""), r"update period \(4\) does not divide"),
    (RECALL.format(segment=4, memory="matrix", init="").replace("recall(memory", "recall(memry"),
     "which is no level"),
    (RECALL.format(segment=4, memory="matrix", init="").replace("r[heads, 4]", "r[heads, 2]"),
     r"has shape \[2, 4\], declared \[2, 2\]"),
])
def test_recall_errors(text, message):
    with pytest.raises(nlc.SpecError, match=message):
        nlc.compile(text)



@pytest.mark.parametrize("kind", ["block", "window"])
@pytest.mark.parametrize("offset, T, persistent, extra", [
    (0, 13, 0, False), (0, 16, 2, True), (3, 13, 0, True), (5, 20, 3, False), (8, 9, 1, True)])
def test_local_attention_equals_the_masked_form(kind, offset, T, persistent, extra):
    """Block and sliding-window attention run in blocks of queries for T > block or window (no
    [T, T] mask); they equal the one-mask form in outputs and in the gradients of every input and
    parameter, whatever the offset."""
    torch.manual_seed(0)
    att = Attention(2, 4, 3, **{kind: 4}, persistent=persistent).double()
    inputs = [torch.randn(2, T, 2, d, dtype=torch.float64, requires_grad=True) for d in (4, 4, 3, 4, 3)]
    q, k, v, ek, ev = inputs
    extra_k, extra_v = (ek, ev) if extra else (None, None)
    leaves = [q, k, v, *((ek, ev) if extra else ()), *att.parameters()]
    t = lambda x: x.transpose(1, 2)  # noqa: E731 - [B, T, H, D] <-> [B, H, T, D]
    got = att(q, k, v, extra_k, extra_v, offset=offset)
    want = t(att._masked(t(q), t(k), t(v), extra_k, extra_v, offset))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, leaves, dy), torch.autograd.grad(want, leaves, dy)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
