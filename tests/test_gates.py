"""Gates read the input, other gates, streams and earlier levels' outputs, in dependency order."""
import pytest
import torch

import nlc
from nlc import graph

SPEC = """
model gated_chain
param d_model = 8
param heads = 1
let h = rmsnorm(x)
let k[heads, 4] = l2norm(conv(linear(h), 4))
let q[heads, 4] = l2norm(linear(h))
let v[heads, 4] = linear(h)
gate beta[heads] = sigmoid(linear(k))            # reads a stream
level fast { memory matrix  bias l2  algorithm gd(lr = beta) }
gate eta[heads] per chunk(4) = 0.1 * sigmoid(linear(fast))   # reads a level's output
level slow { memory matrix  bias l2  algorithm gd(lr = eta)  key fast  query fast  update every 4 }
output = x + linear(slow)
"""


def test_gates_read_streams_and_earlier_levels():
    program = nlc.compile(SPEC)
    g = program.graph
    assert g.has_edge("k", "beta") and g.has_edge("fast", "eta") and g.has_edge("eta", "slow")
    source = program.sources["layer.py"]
    order = [source.index(f"        {name}") for name in ("s_k", "g_beta", "s_fast", "g_eta", "s_slow")]
    assert order == sorted(order)
    layer = program.layer()
    x = torch.randn(2, 9, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    assert layer.gate_eta_linear_6.weight.grad.abs().sum() > 0


def test_a_gate_that_reads_its_own_level_is_a_cycle():
    bad = SPEC.replace("sigmoid(linear(k))", "sigmoid(linear(fast))")
    with pytest.raises(nlc.SpecError) as exc:
        nlc.compile(bad)
    message = str(exc.value)
    assert "cycle in the level graph: beta -> fast -> beta" in message
    assert "unknown name" not in message, "no follow-on errors after the cycle"


def test_option_words_never_count_as_references():
    """A level named like an option word (`outer`) is no dependency of `update outer`."""
    text = SPEC.replace("level slow", "level outer").replace("linear(slow)", "linear(outer)")
    text = text.replace("update every 4", "update outer")
    assert [lv.name for lv in nlc.compile(text).levels] == ["fast", "outer"]
    assert graph.OUTER in nlc.compile(text).graph
