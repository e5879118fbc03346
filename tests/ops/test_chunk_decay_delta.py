"""The chunk-parallel renderers of the decay family (MATH.md §3.1) and the delta family (§3.2-3.3,
§3.6: gated, Miras' order, per-channel step sizes, the implicit step) against the generated
reference recurrent op, in float64: outputs, final state and the gradients of every input (q, k, v,
gates, initial state), for ragged, single-token and longer sequences, two chunk sizes (the spec's
`chunk` parameter), and decays of exactly 0, 1 and negative."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import nlc
from nlc.plan import plan

SPECS = Path(__file__).resolve().parents[2] / "specs"
DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)
B = 2
LENGTHS = (1, 7, 63, 100)
CHUNKS = (4, 16)

TEMPLATE = """model chunk_test
param d_model = 8
param heads = 2
param d_key = 4
param d_value = {V}
param chunk = 16
gate a[heads] = sigmoid(linear(x))
gate b[heads] = sigmoid(linear(x))
gate ak[heads, d_key] = sigmoid(linear(x))
gate bk[heads, d_key] = sigmoid(linear(x))
gate bv[heads, d_value] = sigmoid(linear(x))
let q[heads, d_key] = linear(x)
let k[heads, d_key] = linear(x)
let v[heads, d_value] = linear(x)
level memory {{
  memory matrix
  {body}
}}
output = x + linear(memory)
"""

# (name, d_value, level body, expected family)
INLINE = [
    ("linear_attention", 3, "bias dot  retention none  algorithm gd(lr = 1)", "decay"),
    ("linear_attention_before", 5, "bias dot  retention none  algorithm gd(lr = 1)  read before", "decay"),
    ("scalar_decay_scalar_lr", 3, "bias dot  retention decay(a)  algorithm gd(lr = b)", "decay"),
    ("scalar_decay_before", 5, "bias dot  retention decay(a)  algorithm gd(lr = b)  read before", "decay"),
    ("key_decay", 3, "bias dot  retention decay(ak)  algorithm gd(lr = 1)", "decay"),
    ("key_decay_before", 5, "bias dot  retention decay(ak)  algorithm gd(lr = bk)  read before", "decay"),
    ("key_decay_key_lr", 3, "bias dot  retention decay(ak)  algorithm gd(lr = bk)", "decay"),
    ("scalar_decay_value_lr", 3, "bias dot  retention decay(a)  algorithm gd(lr = bv)", "decay"),
    ("mixed_decay_mixed_lr", 5, "bias dot  retention decay(ak * a)  algorithm gd(lr = bv * b)", "decay"),
    ("key_and_value_lr", 3, "bias dot  retention decay(ak)  algorithm gd(lr = bk * bv)  read before",
     "decay"),
    ("constant_decay", 3, "bias dot  retention decay(0.9)  algorithm gd(lr = 0.5)", "decay"),
    ("l2_retention_scale", 3, "bias dot  retention l2(global = a)  algorithm gd(lr = b)", "decay"),
    ("forget_rate", 5, "bias dot  retention decay(1 - a)  algorithm gd(lr = b * 2)", "decay"),
    ("deltanet", 3, "bias l2  retention none  algorithm gd(lr = b)  gradient current", "delta"),
    ("deltanet_before", 5, "bias l2  retention none  algorithm gd(lr = b)  read before", "delta"),
    ("deltanet_retained", 3, "bias l2  retention none  algorithm gd(lr = b)  gradient retained", "delta"),
    ("gated_delta", 3, "bias l2  retention decay(a)  algorithm gd(lr = b)  gradient retained", "delta"),
    ("gated_delta_before", 5,
     "bias l2  retention decay(a)  algorithm gd(lr = b * 0.5)  gradient retained  read before", "delta"),
    ("gated_delta_forget", 3,
     "bias l2  retention decay(1 - a)  algorithm gd(lr = 1)  gradient retained", "delta"),
    ("miras_order", 3, "bias l2  retention decay(a)  algorithm gd(lr = b)", "delta"),
    ("miras_order_before", 5, "bias l2  retention decay(a)  algorithm gd(lr = b)  read before", "delta"),
    ("miras_l2_retention", 3, "bias l2  retention l2(global = a)  algorithm gd(lr = b)", "delta"),
    ("delta_value_lr", 3, "bias l2  retention decay(a)  algorithm gd(lr = bv)  gradient retained", "delta"),
    ("delta_key_lr", 5,
     "bias l2  retention decay(a)  algorithm gd(lr = bk * b)  gradient retained  read before", "delta"),
    ("miras_key_value_lr", 5, "bias l2  retention decay(a)  algorithm gd(lr = bk * bv)", "delta"),
    ("deltanet_value_lr", 3, "bias l2  retention none  algorithm gd(lr = bv * 0.5)", "delta"),
    ("constant_negative_decay", 3, "bias dot  retention decay(-0.5)  algorithm gd(lr = b)", "decay"),
    ("delta_zero_decay", 3, "bias l2  retention decay(0)  algorithm gd(lr = b)", "delta"),
    ("gated_delta_negative_decay", 5,
     "bias l2  retention decay(-0.5)  algorithm gd(lr = b)  gradient retained  read before", "delta"),
    ("implicit", 3, "bias l2  retention implicit  algorithm gd(lr = b)", "delta"),
    ("implicit_value_lr", 5, "bias l2  retention implicit  algorithm gd(lr = bv)  read before", "delta"),
]
SHIPPED = {"linear_attention": "decay", "retnet": "decay", "gla": "decay", "mamba2": "decay",
           "deltanet": "delta", "gated_deltanet": "delta", "longhorn": "delta"}

_PROGRAMS: dict[tuple[str, int], nlc.Program] = {}


def _program(name: str, chunk: int = 16):
    if (name, chunk) not in _PROGRAMS:
        if name in SHIPPED:
            _PROGRAMS[name, chunk] = nlc.compile(SPECS / f"{name}.nl", chunk=chunk)
        else:
            _, V, body, _ = next(c for c in INLINE if c[0] == name)
            _PROGRAMS[name, chunk] = nlc.compile(TEMPLATE.format(V=V, body=body), chunk=chunk)
    return _PROGRAMS[name, chunk]


def _chunk_op(p):
    """The generated chunk-parallel op of the program's `memory` level."""
    module = p.module("level_memory_chunk")
    assert module.CHUNK == p.plans["memory"].chunk
    return module.level_memory


def _inputs(p, T: int, seed: int, family: str, with_state: bool):
    lv = p.rules["memory"].level
    H, K, V = lv.heads, lv.d_key, lv.d_value
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=DT)

    q, k, v = randn(B, T, H, K), randn(B, T, H, K), randn(B, T, H, V)
    # unit keys keep the delta rule contractive, as in DeltaNet; the implicit step (Longhorn) is
    # contractive for any key
    if family == "delta" and lv.retention.kind != "implicit":
        k = torch.nn.functional.normalize(k, dim=-1)
        q = q / K ** 0.5
    gates = {}
    for name in lv.gates:
        tail = {"scalar": (H,), "key": (H, K), "value": (H, V)}[lv.gate_axes[name]]
        gates[f"g_{name}"] = 0.05 + 0.9 * torch.rand(B, T, *tail, generator=g, dtype=DT)
    state = randn(B, H, K, V) if with_state else None
    leaves = {"q": q, "k": k, "v": v, **gates}
    if with_state:
        leaves["initial_state"] = state
    for x in leaves.values():
        x.requires_grad_(True)
    return leaves


def _run(op, leaves, seed: int):
    kwargs = {n: x for n, x in leaves.items() if n not in ("q", "k", "v")}
    o, S = op(leaves["q"], leaves["k"], leaves["v"], **kwargs, output_final_state=True)
    g = torch.Generator().manual_seed(seed + 1)
    wo = torch.randn(o.shape, generator=g, dtype=DT)
    ws = torch.randn(S.shape, generator=g, dtype=DT)
    loss = (o * wo).sum() + (S * ws).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return o.detach(), S.detach(), dict(zip(leaves, grads))


def _compare(name: str, family: str | None = None, lengths=LENGTHS, chunks=CHUNKS):
    for chunk in chunks:
        p = _program(name, chunk)
        reference = p.module("level_memory").level_memory
        kp = p.plans["memory"]
        if family is not None:
            assert kp.family == family, kp.reason
        op = _chunk_op(p)
        for i, T in enumerate(lengths):
            seed = 1000 * chunk + T
            leaves = _inputs(p, T, seed, kp.family, with_state=(i % 2 == 0))
            o_ref, s_ref, g_ref = _run(reference, leaves, seed)
            o, s, grads = _run(op, leaves, seed)
            where = f"{name}: chunk {chunk}, T {T}"
            torch.testing.assert_close(o, o_ref, **TOL, msg=lambda m: f"{where}: output\n{m}")
            torch.testing.assert_close(s, s_ref, **TOL, msg=lambda m: f"{where}: state\n{m}")
            for leaf, want in g_ref.items():
                assert want is not None and grads[leaf] is not None, (where, leaf)
                torch.testing.assert_close(grads[leaf], want, **TOL,
                                           msg=lambda m: f"{where}: d/d{leaf}\n{m}")


@pytest.mark.parametrize("name, family", [(c[0], c[3]) for c in INLINE], ids=[c[0] for c in INLINE])
def test_inline_specs(name, family):
    _compare(name, family)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_specs(name):
    _compare(name, SHIPPED[name])


@pytest.mark.parametrize("name", ["gla", "key_decay_before", "scalar_decay_value_lr", "gated_deltanet",
                                  "miras_key_value_lr", "longhorn"])
def test_long_sequences(name):
    """T = 257: many chunks and a one-token last chunk."""
    _compare(name, lengths=(257,), chunks=(16,))


def test_default_state_and_no_final_state():
    """initial_state=None is the reference's zero state; output_final_state=False gives None."""
    p = _program("gated_delta", 4)
    op = _chunk_op(p)
    leaves = _inputs(p, 10, 7, "delta", with_state=False)
    gates = {n: x for n, x in leaves.items() if n.startswith("g_")}
    o, S = op(leaves["q"], leaves["k"], leaves["v"], **gates)
    o_ref, _ = p.module("level_memory").level_memory(leaves["q"], leaves["k"], leaves["v"], **gates)
    assert S is None
    torch.testing.assert_close(o, o_ref, **TOL)


@pytest.mark.parametrize("name", ["key_decay", "key_decay_before", "scalar_decay_before", "gated_delta",
                                  "miras_order_before", "delta_value_lr"])
def test_zero_unit_tiny_and_negative_decays(name):
    """Decays of exactly 0, exactly 1, tiny (1e-30) and negative in one sequence: the chunk forms take
    plain products of decays (no logs, no ratios), so outputs, state and every gradient, the
    decay gate's at its zeros included, match the reference."""
    for chunk in CHUNKS:
        p = _program(name, chunk)
        op = _chunk_op(p)
        leaves = _inputs(p, 40, 3, p.plans["memory"].family, with_state=True)
        with torch.no_grad():
            for gname, x in leaves.items():
                if gname in ("g_a", "g_ak"):
                    x[:, 0::5] = 0.0
                    x[:, 1::5] = 1.0
                    x[:, 2::5] = 1e-30
                    x[:, 3::5] = -0.7
        o_ref, s_ref, g_ref = _run(p.module("level_memory").level_memory, leaves, 3)
        o, s, grads = _run(op, leaves, 3)
        torch.testing.assert_close(o, o_ref, **TOL)
        torch.testing.assert_close(s, s_ref, **TOL)
        for leaf, want in g_ref.items():
            assert torch.isfinite(grads[leaf]).all(), leaf
            torch.testing.assert_close(grads[leaf], want, **TOL, msg=lambda m: f"{name}: d/d{leaf}\n{m}")


def test_generated_source_is_self_contained():
    """Only torch and the reference module are imported; the spec location is cited."""
    for name in ("gla", "gated_deltanet"):
        src = _program(name).sources["level_memory_chunk.py"]
        imports = [node for node in ast.parse(src).body if isinstance(node, (ast.Import, ast.ImportFrom))]
        assert [ast.unparse(node) for node in imports] == [
            "import torch", "from .level_memory import _pack, default_state"]
        assert "CHUNK = 16" in src and f"# {_program(name).checked.file}:" in src
    assert plan(_program("gated_delta_before").rules["memory"], 16).family == "delta"
