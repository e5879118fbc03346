"""The rows of the peer benchmark (`benchmarks/peers.py`): each row builds one implementation on
fixed inputs and hands back two callables, `forward` (no autograd) and `train` (forward, then
backward of mean(out^2)), plus a description of exactly what runs.

Rows come in groups that compare like with like:
- titans-d2 / titans-d1: whole layers [B, T, d_model] -> [B, T, d_model]: nlc's `titans` spec
  against titans-pytorch `NeuralMemory` with an MLP memory of the same depth and expansion.
- deltanet / gated-deltanet: the level op alone, on the same q, k, v, beta (, decay) tensors:
  nlc's chunked op and its reference loop against fla's pure-PyTorch chunked references
  (`fla/ops/delta_rule/naive.py`, `fla/ops/gated_delta_rule/naive.py`, loaded by path so that
  `fla/__init__` -- which wants triton -- never runs).
- hope: whole layers: nlc's `hope` spec against nested-learning's `HOPESelfModBlock`
  (self-modifying Titans + CMS) with in-context writes on.
A row whose peer package is not installed raises `PeerMissing` from `build`.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import nlc
from chunked_vs_reference import overrides

SPECS = Path(__file__).resolve().parent.parent / "specs"


class PeerMissing(Exception):
    """The package a row needs is not installed."""


@dataclass(frozen=True)
class Shape:
    batch: int
    length: int
    d_model: int
    heads: int
    head_dim: int
    chunk: int


@dataclass
class Case:
    forward: Callable[[], None]
    train: Callable[[], None]
    config: dict


@dataclass(frozen=True)
class Row:
    name: str
    group: str
    peer: str | None  # the distribution it needs (None: nlc only)
    build: Callable[[Shape], Case]
    label: str
    math: str = ""  # where its math differs from the nlc row it is compared with
    slow: bool = False  # a per-token reference loop over a whole layer: runs only when asked


# ---- callables ---------------------------------------------------------------------------------

def _module_case(run: Callable[[], torch.Tensor], module: torch.nn.Module, config: dict) -> Case:
    """A whole layer: `run()` returns its output [B, T, d_model]."""
    def forward():
        with torch.no_grad():
            run()

    def train():
        module.zero_grad(set_to_none=True)
        run().pow(2).mean().backward()

    return Case(forward, train, config)


def _op_case(run: Callable[..., torch.Tensor], inputs: dict[str, torch.Tensor],
             config: dict) -> Case:
    """A level op: `run(**inputs)` returns o; every input is a leaf that gets a gradient."""
    for t in inputs.values():
        t.requires_grad_(True)

    def forward():
        with torch.no_grad():
            run(**inputs)

    def train():
        for t in inputs.values():
            t.grad = None
        run(**inputs).pow(2).mean().backward()

    return Case(forward, train, config)


# ---- nlc ---------------------------------------------------------------------------------------

def _program(spec: str, shape: Shape, **extra):
    """The spec at the benchmark's shape; an `extra` value "chunk" stands for the shape's chunk."""
    base = nlc.compile(SPECS / f"{spec}.nl")
    extra = {k: shape.chunk if v == "chunk" else v for k, v in extra.items()}
    return nlc.compile(SPECS / f"{spec}.nl", **overrides(base.params, shape), **extra)


def _plans(program) -> dict:
    return {p.level: p.family for p in program.plans.values()}


def _nlc_layer(spec: str, mode: str, **extra) -> Callable[[Shape], Case]:
    def build(shape: Shape) -> Case:
        program = _program(spec, shape, **extra)
        torch.manual_seed(0)
        layer = program.layer(mode=mode)
        x = torch.randn(shape.batch, shape.length, shape.d_model)
        config = {"spec": f"specs/{spec}.nl", "mode": mode, "params": program.params,
                  "plans": _plans(program)}
        return _module_case(lambda: layer(x), layer, config)
    return build


def _delta_inputs(shape: Shape, gated: bool) -> dict[str, torch.Tensor]:
    """q, k, v [B, T, H, D] (k l2-normalized), beta [B, T, H] in (0, 1), and for the gated rule
    g = log alpha [B, T, H] with alpha in about (0.9, 1)."""
    torch.manual_seed(0)
    B, T, H, D = shape.batch, shape.length, shape.heads, shape.head_dim
    out = {"q": F.normalize(torch.randn(B, T, H, D), dim=-1),
           "k": F.normalize(torch.randn(B, T, H, D), dim=-1),
           "v": torch.randn(B, T, H, D),
           "beta": torch.sigmoid(torch.randn(B, T, H))}
    if gated:
        out["g"] = -0.1 * torch.sigmoid(torch.randn(B, T, H))
    return out


def _nlc_delta_op(spec: str, mode: str) -> Callable[[Shape], Case]:
    """nlc's op on the tensors fla gets: q is pre-scaled by D^-1/2 (fla scales inside; the spec
    scales in its `let q`), and the gated rule takes the decay alpha = exp(g) itself."""
    gated = spec == "gated_deltanet"

    def build(shape: Shape) -> Case:
        program = _program(spec, shape)
        op = program.op("memory")
        inputs = _delta_inputs(shape, gated)
        inputs["q"] = inputs["q"] * shape.head_dim ** -0.5
        if gated:
            inputs["alpha"] = inputs.pop("g").exp()

        def run(**t):
            return op(t.pop("q"), t.pop("k"), t.pop("v"), mode=mode, **t)[0]

        config = {"spec": f"specs/{spec}.nl", "op": "memory", "mode": mode,
                  "params": program.params, "plans": _plans(program), "layout": "[B, T, H, D]"}
        return _op_case(run, inputs, config)
    return build


# ---- fla (pure-PyTorch references) -------------------------------------------------------------

def _fla_module(relative: str):
    found = importlib.util.find_spec("fla")
    if found is None or not found.submodule_search_locations:
        raise PeerMissing("fla-core is not installed (pip install fla-core)")
    path = Path(list(found.submodule_search_locations)[0]) / "ops" / relative
    spec = importlib.util.spec_from_file_location(f"fla_naive_{path.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fla_delta(shape: Shape) -> Case:
    naive = _fla_module("delta_rule/naive.py")
    # this reference takes [B, H, T, D]: transposed once here, outside the timed region
    inputs = {name: t.transpose(1, 2).contiguous()
              for name, t in _delta_inputs(shape, gated=False).items()}

    def run(q, k, v, beta):
        return naive.delta_rule_chunkwise(q, k, v, beta, chunk_size=shape.chunk)[0]

    config = {"function": "fla/ops/delta_rule/naive.py:delta_rule_chunkwise",
              "chunk_size": shape.chunk, "layout": "[B, H, T, D]"}
    return _op_case(run, inputs, config)


def _fla_gated_delta(shape: Shape) -> Case:
    naive = _fla_module("gated_delta_rule/naive.py")
    inputs = _delta_inputs(shape, gated=True)

    def run(q, k, v, beta, g):
        return naive.naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=shape.chunk)[0]

    config = {"function": "fla/ops/gated_delta_rule/naive.py:naive_chunk_gated_delta_rule",
              "chunk_size": shape.chunk, "layout": "[B, T, H, D]"}
    return _op_case(run, inputs, config)


# ---- titans-pytorch ----------------------------------------------------------------------------

def _titans_pytorch(depth: int) -> Callable[[Shape], Case]:
    def build(shape: Shape) -> Case:
        try:
            from titans_pytorch import MemoryMLP, NeuralMemory
        except ImportError as error:
            raise PeerMissing(f"titans-pytorch is not importable ({error})") from None
        torch.manual_seed(0)
        # batch_size = chunk: the memory weights are updated after every chunk, so each chunk's
        # gradients are taken at the chunk-start weights, as nlc's `gradient chunk_start(chunk)`
        # (the library default, batch_size=None, takes every chunk's gradient at the initial
        # weights). Depth 1 drops the LayerNorm + residual wrapper: a plain matrix memory, as nlc.
        config = {"dim": shape.d_model, "chunk_size": shape.chunk, "batch_size": shape.chunk,
                  "heads": shape.heads, "dim_head": shape.head_dim, "momentum": True,
                  "default_step_transform_max_lr": 0.01,
                  "mem_model_norm_add_residual": depth > 1,
                  "model": f"MemoryMLP({shape.head_dim}, depth={depth}, expansion_factor=4.0)"}
        memory = NeuralMemory(**{k: v for k, v in config.items() if k != "model"},
                              model=MemoryMLP(shape.head_dim, depth, expansion_factor=4.0))
        x = torch.randn(shape.batch, shape.length, shape.d_model)
        return _module_case(lambda: memory(x)[0], memory, {"NeuralMemory": config})
    return build


# ---- nested-learning ---------------------------------------------------------------------------

def _nested_learning_hope(shape: Shape) -> Case:
    try:
        from nested_learning.fast_state import build_block_fast_state
        from nested_learning.hope.block import HOPESelfModBlock, HOPESelfModBlockConfig
        from nested_learning.levels import LevelSpec
    except ImportError as error:
        raise PeerMissing(f"nested-learning is not importable ({error})") from None
    chunk_slow = int(nlc.compile(SPECS / "hope.nl").params["chunk_slow"])
    periods = {"cms_fast": 1, "cms_mid": shape.chunk, "cms_slow": chunk_slow}
    levels = [LevelSpec(name, period) for name, period in periods.items()]
    # the CMS levels learn by plain GD (beta 0, no preconditioning), as nlc's `algorithm gd`
    optimizers = {"default": {"type": "deep_momentum", "lr": 0.01,
                              "params": {"variant": "none", "beta": 0.0}}}
    settings = {"dim": shape.d_model, "cms_hidden_multiplier": 2, "cms_use_layernorm": False,
                "selfmod_chunk_size": shape.chunk, "selfmod_chunk_size_memory": shape.chunk,
                "eta_scale": 0.01, "self_mod_lr": 0.01, "qk_l2_norm": True,
                "selfmod_local_conv_window": 4, "selfmod_momentum": 0.0,
                "selfmod_use_rank1_precond": True, "selfmod_use_alpha": True}
    torch.manual_seed(0)
    block = HOPESelfModBlock(HOPESelfModBlockConfig(cms_levels=levels,
                                                    optimizer_configs=optimizers, **settings))
    x = torch.randn(shape.batch, shape.length, shape.d_model)
    teach = 1e-3 * torch.randn(shape.batch, shape.length, shape.d_model)

    def fresh_state():
        return build_block_fast_state(titan_module=None, cms_blocks=dict(block.cms.blocks.items()),
                                      selfmod_module=block.selfmod, specs=levels,
                                      optimizer_configs=optimizers, default_lr=0.01)

    def forward():
        """Inference with in-context writes: self-modifying Titans and CMS updated while
        reading (the peer's write pass, under no_grad by its design)."""
        with torch.no_grad():
            block(x, teach_signal=teach, fast_state=fresh_state())

    def train():
        """The peer's training step: a differentiable read pass, its backward, then the write
        pass driven by the teach signal dL/d(block output)."""
        block.zero_grad(set_to_none=True)
        state = fresh_state()
        out = block(x, fast_state=state)
        out.retain_grad()
        out.pow(2).mean().backward()
        with torch.no_grad():
            block(x, teach_signal=out.grad, fast_state=state)

    config = {"HOPESelfModBlockConfig": settings, "cms_periods": periods,
              "optimizer_configs": optimizers}
    return Case(forward, train, config)


# ---- the rows ----------------------------------------------------------------------------------

_TITANS_MATH = (
    "titans-pytorch: momentum and decay gates per chunk (from the chunk mean), the chunk's "
    "lr-weighted gradients summed into one surprise per chunk, momentum and decay scanned over "
    "chunks, reads with the weights of the last completed chunk (token t sees the chunks ending "
    "at or before t); pre-RMSNorm, LayerNorm + residual around the depth-2 MLP, a sigmoid read "
    "gate per head, no conv, no residual connection around the layer. nlc: per-token gates, "
    "per-token gradients with momentum and decay scanned per token, per-token reads after the "
    "write; residual MLP without LayerNorm, conv4 + l2norm on q, k, RMSNorm + swish output gate, "
    "residual connection. Both take every gradient at the chunk-start state.")
_DELTA_MATH = ("none: on the same inputs its outputs agree with nlc's op to float32 round-off "
               "(q pre-scaled by D^-1/2 for nlc, decay alpha = exp(g)).")
_HOPE_MATH = (
    "nested-learning: one full-width memory (hidden = d_model, no heads) of the same parameter "
    "count; k, v, eta, alpha generated by memories of their own (phase 3) trained on a "
    "self-generated target; reads per chunk with the chunk-start state; writes not "
    "differentiated (its train step = differentiable read pass without writes + backward + "
    "write pass); CMS learns from the teach signal dL/dy. nlc: heads x d_head, static k, v, eta, "
    "alpha projections (phase 1), per-token reads before the write, one differentiable pass "
    "with the writes in it, CMS per-level associative loss to a learned projection.")

ROWS = (
    Row("nlc-titans-d2", "titans-d2", None, _nlc_layer("titans", "auto", depth=2),
        "nlc titans layer, MLP memory depth 2 expand 4, momentum + decay, mode auto"),
    Row("nlc-titans-d2-chunk-reads", "titans-d2", None,
        _nlc_layer("titans", "auto", depth=2, reads_every="chunk"),
        "nlc titans layer, depth 2, reads see the last completed chunk (reads_every = chunk), mode auto"),
    Row("nlc-titans-d2-ref", "titans-d2", None, _nlc_layer("titans", "reference", depth=2),
        "nlc titans layer, depth 2, reference per-token loop", slow=True),
    Row("titans-pytorch-d2", "titans-d2", "titans-pytorch", _titans_pytorch(2),
        "titans-pytorch NeuralMemory, MemoryMLP depth 2 expand 4, momentum, batch_size = chunk",
        _TITANS_MATH),
    Row("nlc-titans-d1", "titans-d1", None, _nlc_layer("titans", "auto", depth=1),
        "nlc titans layer, matrix memory (depth 1), momentum + decay, mode auto"),
    Row("nlc-titans-d1-chunk-reads", "titans-d1", None,
        _nlc_layer("titans", "auto", depth=1, reads_every="chunk"),
        "nlc titans layer, matrix memory, reads see the last completed chunk, mode auto"),
    Row("titans-pytorch-d1", "titans-d1", "titans-pytorch", _titans_pytorch(1),
        "titans-pytorch NeuralMemory, MemoryMLP depth 1 (plain matrix), momentum, "
        "batch_size = chunk", _TITANS_MATH),
    Row("nlc-deltanet", "deltanet", None, _nlc_delta_op("deltanet", "chunk"),
        "nlc deltanet memory op, chunk-parallel (mode chunk)"),
    Row("nlc-deltanet-ref", "deltanet", None, _nlc_delta_op("deltanet", "reference"),
        "nlc deltanet memory op, reference per-token loop"),
    Row("fla-deltanet", "deltanet", "fla-core", _fla_delta,
        "fla delta_rule_chunkwise (pure PyTorch)", _DELTA_MATH),
    Row("nlc-gated-deltanet", "gated-deltanet", None, _nlc_delta_op("gated_deltanet", "chunk"),
        "nlc gated_deltanet memory op, chunk-parallel (mode chunk)"),
    Row("nlc-gated-deltanet-ref", "gated-deltanet", None,
        _nlc_delta_op("gated_deltanet", "reference"),
        "nlc gated_deltanet memory op, reference per-token loop"),
    Row("fla-gated-deltanet", "gated-deltanet", "fla-core", _fla_gated_delta,
        "fla naive_chunk_gated_delta_rule (pure PyTorch)", _DELTA_MATH),
    Row("nlc-hope", "hope", None, _nlc_layer("hope", "auto"),
        "nlc hope layer (self-modifying Titans + CMS fast/mid/slow, writes on), mode auto"),
    Row("nlc-hope-ref", "hope", None, _nlc_layer("hope", "reference"),
        "nlc hope layer, reference per-token loops", slow=True),
    Row("nested-learning-hope", "hope", "nested-learning", _nested_learning_hope,
        "nested-learning HOPESelfModBlock (self-modifying Titans + CMS), in-context writes on, "
        "self-modifying chunk = chunk", _HOPE_MATH),
)
