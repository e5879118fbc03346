"""Training in recomputed segments (`recompute=S`, nlc.runtime.recompute): the same outputs, final
states and gradients as the whole sequence at once, for every shipped level that can take segments,
less memory kept for the backward pass, and clear refusals for levels and lengths that cannot."""
from pathlib import Path

import pytest
import torch

import nlc

from .design_space import op_inputs
from .test_chunked import SHIPPED, TOL, _stable_inputs

SPECS = Path(__file__).resolve().parents[2] / "specs"


def _program(spec):
    return nlc.compile(SPECS / f"{spec}.nl", **({"chunk": 5} if "chunk" in nlc.compile(SPECS / f"{spec}.nl").params
                                              else {}))


def _results(op, inputs, mode, recompute):
    """Outputs, final state and the gradients of every input."""
    q, k, v, gates, state = inputs
    leaves = [x.detach().requires_grad_() for x in (q, k, v, *gates.values(), *state)]
    n = len(gates)
    o, final = op(*leaves[:3], **dict(zip(gates, leaves[3:3 + n])), initial_state=tuple(leaves[3 + n:]),
                  output_final_state=True, mode=mode, recompute=recompute)
    final = (final,) if torch.is_tensor(final) else final
    loss = o.pow(2).sum() + sum(f.pow(2).sum() for f in final)
    return [o, *final, *torch.autograd.grad(loss, leaves, allow_unused=True)]


SEGMENTED = [(s, lv) for s, lv in SHIPPED if _program(s).checked.level(lv).segment_alignment()[1] is None]


@pytest.mark.parametrize("spec,level", SEGMENTED, ids=[f"{s}-{l}" for s, l in SEGMENTED])
def test_segments_equal_the_whole_sequence(spec, level):
    op = _program(spec).op(level)
    align, _ = op.level.segment_alignment()
    segment = align * -(-11 // align)          # at least 11 tokens, on the level's boundaries
    inputs, _ = _stable_inputs(op, 2 * segment + 7, seed=3)  # a short last segment
    whole, pieces = (_results(op, inputs, "chunk", r) for r in (None, segment))
    for a, b in zip(pieces, whole, strict=True):
        if b is None:
            assert a is None
        else:
            torch.testing.assert_close(a, b, **TOL, equal_nan=True)


def test_reference_loop_in_segments():
    op = _program("titans").op("memory")
    inputs, _ = _stable_inputs(op, 23, seed=1)
    whole, pieces = (_results(op, inputs, "reference", r) for r in (None, 10))
    for a, b in zip(pieces, whole, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def _saved_mib(op, inputs, recompute) -> float:
    """MiB of distinct storages autograd keeps for the backward pass of one forward."""
    q, k, v, gates, state = inputs
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o, _ = op(*leaves, **gates, initial_state=state, mode="chunk", recompute=recompute)
    o.sum().backward()
    return sum(kept.values()) / 2 ** 20


def test_segments_keep_less_for_the_backward_pass():
    """Titans' MLP memory at T = 320, chunk 5: whole, autograd keeps every chunk's weights and
    the vjp's intermediates; in segments of 80 tokens, the inputs and four states."""
    op = _program("titans").op("memory")
    inputs = op_inputs(op, 320, 0, 0.1)
    whole, segmented = _saved_mib(op, inputs, None), _saved_mib(op, inputs, 80)
    print(f"kept for the backward pass: {whole:.2f} MiB whole, {segmented:.2f} MiB in segments")
    assert segmented < whole / 5, (whole, segmented)


@pytest.mark.parametrize("spec,level,recompute,message", [
    ("omeganet", "memory", 16, "level 'memory' cannot run in segments: its omega window restarts"),
    ("cms_nested", "cms_mid", 64, "level 'cms_mid' cannot run in segments: it is a nested level"),
    ("titans", "memory", 7, "level 'memory' needs segments of a multiple of 5 tokens"),
    ("titans", "memory", 0, "recompute=0: expected a positive number of tokens"),
    ("titans", "memory", 2.5, "recompute=2.5: expected a positive number of tokens"),
])
def test_refusals_name_the_level_and_the_reason(spec, level, recompute, message):
    op = _program(spec).op(level)
    inputs, _ = _stable_inputs(op, 3, seed=0)
    with pytest.raises(ValueError, match=message):
        _results(op, inputs, "reference", recompute)


def test_layer_trains_in_segments():
    """A whole layer (Program.layer(recompute=...)): the same loss gradients for every parameter."""
    program = nlc.compile(SPECS / "titans.nl", chunk=4)
    torch.manual_seed(0)
    whole = program.layer().double()
    pieces = program.layer(recompute=8).double()
    pieces.load_state_dict(whole.state_dict())
    x = torch.randn(2, 30, program.d_model, dtype=torch.float64)
    grads = [torch.autograd.grad(layer(x).square().sum(), list(layer.parameters())) for layer in (whole, pieces)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ValueError, match=r"recompute=6: level 'memory' needs segments of a multiple of 4"):
        program.layer(recompute=6)
