"""The cache of generated sources ($NLC_CACHE_DIR) and the boundary checks of `Program.op`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import nlc

SPEC = """\
model cached
# a comment to edit
param d_model = 8
param heads = 2
param d_key = 4
param d_value = 6
gate alpha[heads] = sigmoid(linear(x))
gate beta[heads] = sigmoid(linear(x))
let q[heads, d_key] = l2norm(linear(x))
let k[heads, d_key] = l2norm(linear(x))
let v[heads, d_value] = linear(x)
level memory {
  memory matrix
  bias l2
  retention decay(alpha)
  algorithm gd(lr = beta)
}
output = x + linear(memory)
"""
OLD = 1_000_000_000  # an mtime (2001) no write made by this test run can have


def cache_root() -> Path:
    return Path(os.environ["NLC_CACHE_DIR"]).resolve()


def files_in(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def program():
    return nlc.compile(SPEC)


# ---- the cache folder -------------------------------------------------------------------------
def test_cache_dir_lies_under_nlc_cache_dir(program):
    assert program.cache_dir.resolve().is_relative_to(cache_root())
    assert program.cache_dir.resolve() != cache_root()


def test_cache_files_equal_sources(program):
    assert files_in(program.cache_dir) == program.sources  # no stray temporaries either


def test_recompiling_reuses_the_folder_and_does_not_rewrite(program):
    folder = program.cache_dir
    for name in program.sources:
        os.utime(folder / name, ns=(OLD, OLD))
    inodes = {name: (folder / name).stat().st_ino for name in program.sources}
    again = nlc.compile(SPEC)
    assert again.cache_dir == folder
    for name in program.sources:
        st = (folder / name).stat()
        assert st.st_mtime_ns == OLD, f"{name} was rewritten"
        assert st.st_ino == inodes[name], f"{name} was replaced"
    assert files_in(folder) == again.sources


def test_a_damaged_cache_file_is_restored(program):
    target = program.cache_dir / "layer.py"
    target.write_text("raise RuntimeError('damaged')\n")
    again = nlc.compile(SPEC)
    assert target.read_text() == again.sources["layer.py"] == program.sources["layer.py"]


def test_one_character_changes_the_key(program):
    edited = SPEC.replace("# a comment to edit", "# a comment to edjt")
    assert len(edited) == len(SPEC) and sum(a != b for a, b in zip(edited, SPEC)) == 1
    assert nlc.compile(edited).cache_dir != program.cache_dir
    semantic = SPEC.replace("d_value = 6", "d_value = 5")
    other = nlc.compile(semantic)
    assert other.cache_dir != program.cache_dir and other.sources != program.sources


def test_the_cache_root_is_read_at_call_time(tmp_path, monkeypatch):
    monkeypatch.setenv("NLC_CACHE_DIR", str(tmp_path / "elsewhere"))
    p = nlc.compile(SPEC)
    assert p.cache_dir.resolve().is_relative_to((tmp_path / "elsewhere").resolve())
    assert files_in(p.cache_dir) == p.sources


def test_one_folder_never_holds_two_different_outputs(tmp_path):
    """The generated text names the spec file, so the same spec text compiled from two places
    must not share a folder (or must generate the same text): otherwise the second compile
    rewrites the first one's files under it."""
    text = SPEC.replace("model cached", "model cached_twice")  # a folder of its own
    path = tmp_path / "cached_twice.nl"
    path.write_text(text)
    from_text = nlc.compile(text)
    from_file = nlc.compile(path)
    shared = from_text.cache_dir == from_file.cache_dir
    assert not shared or from_text.sources == from_file.sources, (
        f"{from_text.cache_dir.name} holds the output of both compiles, which differ "
        "(the cache key does not cover the spec's file name, which the sources quote)")
    assert files_in(from_text.cache_dir) == from_text.sources
    assert files_in(from_file.cache_dir) == from_file.sources


# ---- Program.op boundary errors ---------------------------------------------------------------
B, T, H, K, V = 2, 5, 2, 4, 6


def inputs(**changes):
    g = torch.Generator().manual_seed(0)
    args = dict(q=torch.randn(B, T, H, K, generator=g), k=torch.randn(B, T, H, K, generator=g),
                v=torch.randn(B, T, H, V, generator=g), alpha=torch.rand(B, T, H, generator=g),
                beta=torch.rand(B, T, H, generator=g))
    args.update(changes)
    return {name: value for name, value in args.items() if value is not None}


def call(op, **changes):
    args = inputs(**changes)
    return op(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.fixture(scope="module")
def op(program):
    return program.op("memory")


def test_well_formed_call_runs(op):
    o, state = call(op, output_final_state=True)
    assert o.shape == (B, T, H, V) and state.shape == (B, H, K, V)
    o2, none = call(op, alpha=0.9)  # a plain number broadcasts to [B, T, H]
    assert o2.shape == (B, T, H, V) and none is None


# (case, changes, exception types, substrings the message must hold: the argument, the shape)
BAD_CALLS = [
    ("q_rank", dict(q=torch.randn(B, T, H * K)), ValueError, ["q", f"[B, T, {H}, {K}]"]),
    ("q_heads", dict(q=torch.randn(B, T, H + 1, K)), ValueError, ["q", f"{H}, {K}]"]),
    ("q_dim", dict(q=torch.randn(B, T, H, K + 1)), ValueError, ["q", f"{H}, {K}]"]),
    ("k_rank", dict(k=torch.randn(B, T, H, K, 1)), ValueError, ["k", f"[{B}, {T}, {H}, {K}]"]),
    ("k_heads", dict(k=torch.randn(B, T, 1, K)), ValueError, ["k", f"[{B}, {T}, {H}, {K}]"]),
    ("k_dim", dict(k=torch.randn(B, T, H, V)), ValueError, ["k", f"[{B}, {T}, {H}, {K}]"]),
    ("k_batch", dict(k=torch.randn(B + 1, T, H, K)), ValueError, ["k", f"[{B}, {T}, {H}, {K}]"]),
    ("v_rank", dict(v=torch.randn(B, T, H * V)), ValueError, ["v", f"[{B}, {T}, {H}, {V}]"]),
    ("v_heads", dict(v=torch.randn(B, T, H + 1, V)), ValueError, ["v", f"[{B}, {T}, {H}, {V}]"]),
    ("v_dim", dict(v=torch.randn(B, T, H, K)), ValueError, ["v", f"[{B}, {T}, {H}, {V}]"]),
    ("v_time", dict(v=torch.randn(B, T + 1, H, V)), ValueError, ["v", f"[{B}, {T}, {H}, {V}]"]),
    ("q_not_a_tensor", dict(q=[[0.0]]), TypeError, ["q", "tensor"]),
    ("missing_gate", dict(beta=None), (TypeError, ValueError), ["beta", f"[{B}, {T}, {H}]"]),
    ("unknown_gate", dict(gamma=torch.rand(B, T, H)), (TypeError, ValueError),
     ["gamma", "alpha", "beta"]),
    ("gate_rank", dict(alpha=torch.rand(B, T, H, 1)), ValueError, ["alpha", f"[{B}, {T}, {H}]"]),
    ("gate_heads", dict(alpha=torch.rand(B, T, H + 1)), ValueError, ["alpha", f"[{B}, {T}, {H}]"]),
    ("gate_time", dict(beta=torch.rand(B, T - 1, H)), ValueError, ["beta", f"[{B}, {T}, {H}]"]),
    ("gate_list_wrong_length", dict(alpha=[0.5] * (H + 1)), (TypeError, ValueError),
     ["alpha", f"[{B}, {T}, {H}]"]),
    ("dtypes", dict(v=torch.randn(B, T, H, V, dtype=torch.float64)), (TypeError, ValueError),
     ["v", "float32", "float64"]),
    ("initial_state_shape", dict(initial_state=torch.zeros(B, H, K, V + 1)), (TypeError, ValueError),
     ["initial_state", f"{H}, {K}, {V}]"]),
]


@pytest.mark.parametrize("case,changes,errors,needles", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_op_boundary_errors(op, case, changes, errors, needles):
    with pytest.raises(Exception) as info:
        call(op, **changes)
    assert isinstance(info.value, errors), \
        f"{case}: raised {type(info.value).__name__}: {info.value}"
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{case}: {needle!r} not in {message!r}"


def test_unknown_mode_lists_the_modes(op, program):
    with pytest.raises(ValueError, match=r"mode='fast'.*modes: auto, reference, chunk"):
        call(op, mode="fast")
    with pytest.raises(ValueError, match=r"modes: auto, reference, chunk"):
        program.layer(mode="fast")


def test_chunk_mode_says_why_a_level_has_no_chunked_form():
    text = SPEC.replace("  bias l2\n", "  bias lp(p = 3)\n").replace("gd(lr = beta)", "muon(lr = beta, beta = 0.9)")
    program = nlc.compile(text)
    assert program.plans["memory"].family == "reference"
    op = program.op("memory")
    with pytest.raises(ValueError, match=r"level 'memory' has no chunk-parallel form"):
        call(op, mode="chunk")
    call(op, mode="auto")  # falls back to the reference loop


def test_unknown_level_lists_the_levels(program):
    with pytest.raises(KeyError) as info:
        program.op("nope")
    assert "nope" in str(info.value) and "memory" in str(info.value)
