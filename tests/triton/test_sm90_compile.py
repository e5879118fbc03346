"""Every generated Triton kernel compiles for an H100 (sm_90) at head dim 128 with its untuned launch
configuration, within the chip's shared memory per block, without a GPU: the launches of one forward
and backward under the interpreter are recorded, then each kernel is compiled ahead of time by
Triton's NVIDIA backend (ptxas ships in the triton wheel) in a process without the interpreter
(sm90_compile_child.py). The interpreter alone misses both failures seen on a real H100: a kernel
reading a module global (the interpreter allows it, the compiler refuses it) and a pipelined kernel
needing more shared memory than a block may have."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .test_fused_recurrent import DIM_PARAMS, GPU, SPECS, _compile, _run, _stable_inputs

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'nlc[triton]')")
if GPU:
    pytest.skip("on a GPU the other Triton tests compile and run every kernel", allow_module_level=True)

from triton.runtime import interpreter  # noqa: E402

SHARED_LIMIT = 232448  # bytes of shared memory one block may use on an H100 (227 KiB)
D = 128
CHILD = Path(__file__).with_name("sm90_compile_child.py")
# (spec, level, params, T): a level of every Triton family; T of at least one chunk runs the chunked
# kernels, T = 1 the fused recurrent ones; omeganet: the frozen kernels with an omega window (chunk 16,
# window 4: BW = 32 window rows; its 73 polynomial key features take BK = 128 as at head dim 128), and
# with momentum and window 64 (BW = 128: its gradient kernel needed 248,832 bytes with 64 value
# channels per block, 150,528 with 32); memora: the MLP kernels with KL's lag token in the coefficients;
# retnet_kl, retnet_dgd: the fused recurrent kernels with KL's softmax over each column's key channels,
# and with DGD's k (kᵀ S); retnet_muon: with Newton-Schulz on the whole state (tl.dot; [64, 64], the
# largest its launcher takes: at [128, 128] the forward kernel needed 393,216 bytes);
# retnet_lq: with lq's mirror map (its norm over the whole state); retnet_omega: with an omega window
# (atomic adds of each window token's gradients); retnet_ftrl: an accumulator read through elastic
# net's threshold, whose gate lr makes W = psi(A) read gates; retnet_period: reads of the state committed
# every 4 tokens (T = 3: the fused recurrent kernels; T = 20: the period family's chunked ones);
# cms: the period family's kernels on an MLP memory (d_model 128, units of 16 tokens); retnet_chunk: an lq accumulator's l2 gradients at the weights entering every 8 tokens,
# its map run at those chunk starts only; retnet_lag: KL's lag token every 8 tokens; deltanet_vector: a
# vector memory (the state tile one row [1, BV]) with a Huber bias; hope: the mapped family's dgd kernels
# (the delta family's per layer) on an MLP of expand 4, so the second layer's keys are 512 wide;
# cms_fast: the sequential family's per-(batch, head) token loop (d_model 128: 256 hidden channels),
# and with momentum and elastic net (cms_elastic_momentum: each weight's momentum after the weights in
# the state, then the soft threshold);
# longhorn: the delta family's per-value-channel systems; atlas: the mapped family's scans (momentum,
# an elastic-free decay map) over 64 x 64 tiles
CASES = [("deltanet", "memory", {}, 70), ("gated_deltanet", "memory", {}, 70),
         ("gated_deltanet", "memory", {}, 1), ("retnet", "memory", {}, 70), ("gla", "memory", {}, 70),
         ("titans", "memory", {"depth": 1, "chunk": 16}, 20), ("titans", "memory", {"depth": 2, "chunk": 16}, 20),
         ("omeganet", "memory", {"depth": 1}, 20), ("omeganet", "memory", {"depth": 2}, 20),
         ("omeganet_momentum", "memory", {"depth": 1, "window": 64}, 20), ("memora", "memory", {"chunk": 16}, 20),
         ("retnet_kl", "memory", {}, 20), ("retnet_dgd", "memory", {}, 20),
         ("retnet_muon", "memory", {"d_key": 64, "d_value": 64}, 20), ("retnet_lq", "memory", {}, 20),
         ("retnet_omega", "memory", {}, 20), ("retnet_ftrl", "memory", {}, 20), ("retnet_period", "memory", {}, 3),
         ("retnet_period", "memory", {}, 20), ("cms", "cms_mid", {"d_model": 128}, 20),
         ("retnet_chunk", "memory", {}, 20), ("retnet_lag", "memory", {}, 20),
         ("deltanet_vector", "memory", {}, 20), ("hope", "memory", {"chunk": 16}, 20),
         ("cms", "cms_fast", {"d_model": 128}, 5), ("cms_elastic_momentum", "cms_fast", {"d_model": 128}, 5),
         ("longhorn", "memory", {}, 20),
         ("atlas", "memory", {"chunk": 16}, 20)]
# spec variants: (shipped spec, text replaced, replacement)
VARIANTS = {"omeganet_momentum": ("omeganet", "algorithm gd(lr = eta)", "algorithm momentum(lr = eta, beta = 0.9)"),
            "retnet_kl": ("retnet", "retention decay(gamma)", "retention kl(decay = gamma)\n  init learned"),
            "retnet_dgd": ("retnet", "retention decay(gamma)", "retention dgd(decay = gamma)"),
            "retnet_muon": ("retnet", "algorithm gd(lr = 1)", "algorithm muon(lr = 0.1, beta = 0.9, steps = 3)"),
            "retnet_lq": ("retnet", "retention decay(gamma)", "retention lq(q = 4, decay = gamma)"),
            "retnet_omega": ("retnet", "bias dot", "bias omega(window = 4, gamma = gamma) of l2"),
            "retnet_ftrl": ("retnet", "retention decay(gamma)\n  algorithm gd(lr = 1)",
                            "retention elastic(l1 = 20, l2 = 2)\n  algorithm ftrl(lr = gamma)"),
            "retnet_period": ("retnet", "read after", "update every 4\n  read after"),
            "retnet_chunk": ("retnet", "bias dot\n  retention decay(gamma)\n  algorithm gd(lr = 1)",
                             "bias l2\n  retention lq(q = 4, map = miras, apply = chunk)\n  algorithm gd(lr = 0.1)\n  init learned\n"
                             "  gradient chunk_start(8)"),
            "retnet_lag": ("retnet", "bias dot\n  retention decay(gamma)\n  algorithm gd(lr = 1)",
                           "bias l2\n  retention kl(decay = gamma, apply = chunk)\n  algorithm gd(lr = 0.1)\n"
                           "  gradient chunk_start(8)\n  init learned"),
            "deltanet_vector": ("deltanet", "memory matrix\n  bias l2", "memory vector\n  bias huber(delta = 0.5)"),
            "cms_elastic_momentum": ("cms", "retention none\n  algorithm gd(lr = lr_fast)",
                                     "retention elastic(l1 = 20, l2 = 2)\n  algorithm momentum(lr = lr_fast, beta = 0.9)")}


def _launches(op, T):
    """[(python function, positional args, keyword args)]: the first launch of each kernel with each
    set of keyword arguments (its sizes: one kernel may run on several, as the layers of an MLP) in one
    forward + backward of `op` with bf16 inputs under the interpreter."""
    seen = {}
    original = interpreter.InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        seen.setdefault((self.fn.__name__, repr(sorted(kwargs.items()))), (self.fn, args, kwargs))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = recording
    try:
        _run(op, "triton", _stable_inputs(op, T, 0), torch.bfloat16, "cpu")
    finally:
        interpreter.InterpretedFunction.run = original
    return list(seen.values())


def _job(fn, args, kwargs):
    """One kernel as launched on a GPU: tensors as pointers of their dtype, integers as i32,
    constexprs (by keyword, or positional where the parameter says tl.constexpr) as given, fp32 matmuls
    as the GPU runs them on bf16 inputs (tf32, bf16 operands)."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    signature, constants, options = {}, {}, {}
    for name, value in zip(names, args):
        if "constexpr" in str(fn.__annotations__.get(name, "")):
            signature[name], constants[name] = "constexpr", value
            continue
        assert torch.is_tensor(value) or (isinstance(value, int) and not isinstance(value, bool)), (name, value)
        signature[name] = ("*bf16" if value.dtype == torch.bfloat16 else "*fp32") if torch.is_tensor(value) else "i32"
    for name, value in kwargs.items():
        if name in ("num_warps", "num_stages"):
            options[name] = value
        elif name in names:
            if value == "ieee":
                value = "tf32"
            elif isinstance(value, triton.language.dtype):
                value = {"dtype": "bf16" if value == triton.language.float32 else value.name}
            signature[name], constants[name] = "constexpr", value
    return {"module": fn.__module__, "name": fn.__name__, "signature": signature,
            "constants": constants, "options": options}


@pytest.mark.parametrize("spec,level,params,T", CASES,
                         ids=[f"{s}-{'-'.join(f'{k}{v}' for k, v in p.items()) or 'default'}-T{t}"
                              for s, _, p, t in CASES])
def test_kernels_compile_for_an_h100(spec, level, params, T, tmp_path):
    path = SPECS / f"{spec}.nl"
    if spec in VARIANTS:
        shipped, old, new = VARIANTS[spec]
        text = (SPECS / f"{shipped}.nl").read_text()
        assert old in text, f"{shipped}.nl no longer has {old!r}"
        path = tmp_path / f"{spec}.nl"
        path.write_text(text.replace(old, new))
    sizes = {"heads": 2, **{p: D for p in DIM_PARAMS if p in _compile(path).params}, **params}
    launches = _launches(_compile(path, **sizes).op(level), T)
    assert launches, "no Triton kernel was launched"
    job = {"spec": str(path), "params": sizes, "kernels": [_job(*launch) for launch in launches]}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(CHILD)], input=json.dumps(job), capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    shared = json.loads(done.stdout.strip().splitlines()[-1])
    assert [name for name, _ in shared] == [k["name"] for k in job["kernels"]]
    for name, used in shared:
        assert isinstance(used, int), f"{name} does not compile for sm_90: {used}"
        assert used <= SHARED_LIMIT, \
            f"{name} needs {used} bytes of shared memory (an H100 block has at most {SHARED_LIMIT})"
