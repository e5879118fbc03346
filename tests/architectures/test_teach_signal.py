"""Teach levels (`value teach`, MATH.md §4.2): a CMS level stepped by the model's own loss gradient.
The in-context step against a hand-written float64 computation, steps exactly at the period,
causality, outer training with exact resume, the stopgrad flag, and located errors."""
import dataclasses
import math
from pathlib import Path

import pytest
import torch

import nlc
from nlc.diagnostics import SpecError
from nlc.runtime import teach
from nlc.train import TrainConfig, train
from nlc.train.loop import CHECKPOINT

SPECS = Path(__file__).resolve().parents[2] / "specs"
F = torch.nn.functional

TINY = """\
model t
param d_model = 4
param heads = 1
gate eta[heads] = sigmoid(linear(x))
level mem {
  memory mlp(depth = 2, expand = 2, act = gelu)
  algorithm gd(lr = eta)
  update every 4
  read before
  query x
  value teach
}
output = x + linear(mem)
"""

TWO = """\
model two
param d_model = 4
param heads = 1
level fast { memory mlp(depth = 2, expand = 2)  algorithm gd(lr = 0.5)  update every 4  read before
             query x  value teach }
level slow { memory mlp(depth = 2, expand = 2)  algorithm gd(lr = 0.5)  update every 8  read before
             query fast  value teach(stopgrad = STOP) }
output = x + linear(slow)
"""


def _gelu_grad(z):
    return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def test_step_equals_a_hand_computation():
    """Segments of 4, 4, 2 tokens: read M_W(x) = x + gelu(x W1) W2 at the carried W, the segment's
    summed next-token loss, δ = dL/dy by autograd, then W1, W2 -= Σ_t η_t ∂<M(x_t), δ_t>/∂W written
    out by hand; the model's logits and final state match to round-off."""
    program = nlc.compile(TINY)
    torch.manual_seed(0)
    model = program.model(7, layers=1).double()
    layer = model.blocks[0]
    ids = torch.randint(0, 7, (2, 10))
    logits, states = teach.run(model, ids)

    gate, out = layer.gate_eta_linear_0, layer.out_linear_1
    W1, W2 = (p.detach().expand(2, *p.shape[1:]) for p in layer.init_mem)  # [B, 4, 8], [B, 8, 4]
    expected = []
    with torch.no_grad():
        for t0 in (0, 4, 8):
            x = model.embed(ids[:, t0:t0 + 4])                   # [B, S, 4]
            z = x @ W1
            y = (x + F.gelu(z) @ W2).requires_grad_()           # the level's read, before its step
            with torch.enable_grad():
                seg_logits = model.head(model.norm(x + out(y)))
                targets = ids[:, t0 + 1:t0 + 5]
                n = targets.shape[1]
                loss = F.cross_entropy(seg_logits[:, :n].flatten(0, 1), targets.flatten(), reduction="sum")
                (delta,) = torch.autograd.grad(loss, y)
            expected.append(seg_logits.detach())
            eta = torch.sigmoid(gate(x))                        # [B, S, 1]
            d = eta * delta
            g2 = F.gelu(z).transpose(1, 2) @ d                  # Σ_t η_t gelu(z_t)^T δ_t
            g1 = x.transpose(1, 2) @ ((d @ W2.transpose(1, 2)) * _gelu_grad(z))
            W1, W2 = W1 - g1, W2 - g2
    torch.testing.assert_close(logits, torch.cat(expected, 1), rtol=1e-10, atol=1e-12)
    final = states[0]["mem"]
    torch.testing.assert_close(final[0][:, 0], W1, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(final[1][:, 0], W2, rtol=1e-10, atol=1e-12)


def test_steps_come_exactly_at_the_period():
    """A level of period 4 and one of period 8 (segments of 4) over 18 tokens: their reference ops
    run over blocks of 4, 4, 4, 4, 2 and 8, 8, 2 tokens; before the first step the model reads the
    initial states (the layer's own forward)."""
    program = nlc.compile(TWO.replace("STOP", "1"))
    torch.manual_seed(0)
    model = program.model(11, layers=1).double()
    layer = model.blocks[0]
    calls = {name: [] for name in layer.TEACH}

    def recording(name, op):
        def step(q, k, v, **kw):
            calls[name].append(q.shape[1])
            return op(q, k, v, **kw)
        return step

    layer.TEACH = {n: (recording(n, op), period, c) for n, (op, period, c) in type(layer).TEACH.items()}
    ids = torch.randint(0, 11, (2, 18))
    logits = model(ids)
    assert calls == {"fast": [4, 4, 4, 4, 2], "slow": [8, 8, 2]}
    plain = model.head(model.norm(layer(model.embed(ids))))
    torch.testing.assert_close(logits[:, :4], plain[:, :4], rtol=0, atol=0)
    assert not torch.allclose(logits[:, 4:], plain[:, 4:])


@pytest.mark.parametrize("position", [3, 4, 8, 13])
def test_causal(position):
    """Changing token p leaves every logit before p unchanged, though the step after the segment
    ending at p - 1 reads token p as its last target."""
    program = nlc.compile(TWO.replace("STOP", "0"))
    torch.manual_seed(0)
    model = program.model(11, layers=2).double()
    ids = torch.randint(0, 11, (1, 16))
    moved = ids.clone()
    moved[:, position] = (moved[:, position] + 1) % 11
    a, b = model(ids), model(moved)
    torch.testing.assert_close(a[:, :position], b[:, :position], rtol=0, atol=0)
    assert not torch.allclose(a[:, position:], b[:, position:])


def test_stopgrad_flag_adds_the_second_order_term():
    """teach(stopgrad = 0) differentiates through δ: the same forward, other outer gradients."""
    grads = []
    for stop in ("1", "0"):
        torch.manual_seed(0)
        model = nlc.compile(TWO.replace("STOP", stop)).model(11, layers=1).double()
        ids = torch.randint(0, 11, (2, 16))
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten()).backward()
        grads.append((logits.detach(), model.blocks[0].init_slow[0].grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    assert torch.isfinite(grads[1][1]).all() and not torch.allclose(grads[0][1], grads[1][1])


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path):
    corpus = tmp_path / "text.txt"
    words = "the quick brown fox jumps over a lazy dog while memory layers learn to recall".split()
    corpus.write_text(" ".join(words[(i * 7) % len(words)] for i in range(600)))
    config = TrainConfig(spec=str(SPECS / "cms_teach.nl"), data=str(corpus), out=str(tmp_path / "a"),
                         steps=6, overrides={"d_model": 16, "chunk": 8, "chunk_slow": 16}, layers=1,
                         batch=2, seq_len=16, lr=1e-2, checkpoint_every=3, val_tokens=64)
    _, whole = train(config)
    split = dataclasses.replace(config, out=str(tmp_path / "b"))
    train(split, stop_at=5)
    _, resumed = train(split, resume=True)
    a, b = (torch.load(tmp_path / d / CHECKPOINT, weights_only=True)["model"] for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["val_loss"] == whole["val_loss"]
    losses = [float(line.split('"loss": ')[1].split(",")[0])
              for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_shipped_spec_checks():
    program = nlc.compile(SPECS / "cms_teach.nl")
    assert [lv.target for lv in program.levels] == ["teach"] * 3
    assert all(p.family == "reference" for p in program.plans.values())
    assert program.module("layer").Layer.SEGMENT == 4


LEVEL = """model m
param d_model = 4
param heads = 1
let u[4] = linear(x)
let w[4] = linear(x)
level mem {{ memory mlp(depth = 2)  {fields} }}
level other {{ memory matrix  bias l2  algorithm gd(lr = 0.1)  {other}  key u  value u  query u }}
output = x + linear(mem) + linear(other){extra}
"""
FIELDS = "algorithm gd(lr = 0.1)  update every 4  read before  query u  value teach"


@pytest.mark.parametrize("old, new, other, extra, message, where", [
    ("value teach", "value teach  bias l2", "", "", "learns from the teach signal", "l2 }"),
    ("query u", "query u  key w", "", "", "the key of teach level 'mem' is 'w'", "w "),
    ("read before", "read after", "", "", "reads after writing", "after "),
    ("every 4", "every 4  gradient chunk_start(2)", "", "", "takes gradients at chunk_start(2)",
     "chunk_start(2)"),
    ("update every 4", "update outer", "", "", "updates only in the outer loop", "outer"),
    ("value teach", "value teach(u)", "", "", "teach takes no stream", "u) }"),
    ("value teach", "value teach(stop = 1)", "", "", "teach() has no argument 'stop'", "1)"),
    ("gd(lr", "ftrl(lr", "", "", "keeps an FTRL accumulator", "level mem"),
    ("", "", "update every 3", "", "does not divide the segment (4)", "level other"),
    ("", "", "", " + linear(conv(u, 4))", "conv() beside teach levels", "conv(u, 4)"),
])
def test_bad_specs_give_located_errors(old, new, other, extra, message, where):
    source = LEVEL.format(fields=FIELDS.replace(old, new) if old else FIELDS, other=other, extra=extra)
    with pytest.raises(SpecError) as err:
        nlc.compile(source)
    assert message in str(err.value)
    span = next(d.span for d in err.value.diagnostics if d.severity == "error")
    assert source.splitlines()[span.line - 1][span.column - 1:].startswith(where)


def test_a_stream_named_teach_is_refused():
    source = LEVEL.format(fields=FIELDS, other="", extra="").replace("let w", "let teach")
    with pytest.raises(SpecError, match="'teach' names a stream here"):
        nlc.compile(source)
