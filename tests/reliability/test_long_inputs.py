"""Long inputs: the chunked forms of a decay level, a delta level and a frozen-gradient MLP level run
T = 65,536 tokens (B = 1, one head, d = 16, float64) in memory that grows linearly with T. Each run
is a fresh process; its peak resident memory (VmHWM, reset through /proc/self/clear_refs once the
inputs exist) minus its resident memory before the call is the call's own peak."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHORT, LONG = 16_384, 65_536
SPEC = """model long_{family}
param d_model = 16
param heads = 1
param chunk = 64
gate alpha[heads] = sigmoid(linear(x))
gate beta[heads] = sigmoid(linear(x))
let q[heads, 16] = l2norm(linear(x))
let k[heads, 16] = l2norm(linear(x))
let v[heads, 16] = linear(x)
level mem {{
  memory {memory}
  bias {bias}
  retention decay(alpha)
  algorithm gd(lr = beta)
  {extra}
}}
output = linear(mem)
"""
LEVELS = {"decay": dict(memory="matrix", bias="dot", extra=""),
          "delta": dict(memory="matrix", bias="l2", extra=""),
          "frozen": dict(memory="mlp(depth = 2, expand = 1)", bias="l2", extra="gradient chunk_start(64)")}

PROBE = r"""
import json, sys, time
import torch
import nlc
torch.set_num_threads(1)
spec, T = sys.argv[1], int(sys.argv[2])
program = nlc.compile(spec)
op = program.op("mem")
g = torch.Generator().manual_seed(0)

def inputs(T):
    qk = [torch.nn.functional.normalize(torch.randn(1, T, 1, 16, generator=g, dtype=torch.float64),
                                        dim=-1) for _ in range(2)]
    v = torch.randn(1, T, 1, 16, generator=g, dtype=torch.float64)
    return (*qk, v), {name: torch.full((1, T, 1), 0.5, dtype=torch.float64) for name in op.gates}

def kib(field):
    return int(next(line for line in open("/proc/self/status") if line.startswith(field)).split()[1])

with torch.no_grad():
    args, gates = inputs(200)
    op(*args, mode="chunk", **gates)  # warm up
    args, gates = inputs(T)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = kib("VmRSS:")
    start = time.perf_counter()
    o, _ = op(*args, mode="chunk", **gates)
    seconds = time.perf_counter() - start
    peak = kib("VmHWM:")
print(json.dumps(dict(family=program.plans["mem"].family, growth_kib=peak - before,
                      seconds=seconds, finite=bool(torch.isfinite(o).all()))))
"""


def measure(family: str, T: int, cache: Path) -> dict:
    env = {**os.environ, "NLC_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", PROBE, SPEC.format(family=family, **LEVELS[family]),
                           str(T)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("family", sorted(LEVELS))
def test_memory_grows_linearly_to_65536_tokens(family, tmp_path):
    short, long = measure(family, SHORT, tmp_path), measure(family, LONG, tmp_path)
    assert short["family"] == long["family"] == family
    assert long["finite"] and short["finite"]
    ratio = long["growth_kib"] / short["growth_kib"]
    # 4x the tokens: ~4x the memory when linear, 16x when quadratic in T
    assert ratio < 6, f"{family}: {short['growth_kib']} KiB at T={SHORT}, {long['growth_kib']} KiB at T={LONG}"
    assert long["growth_kib"] < 1024 * 1024, f"{family}: {long['growth_kib']} KiB at T={LONG}"
    print(f"\n{family}: T={LONG}: peak +{long['growth_kib'] / 1024:.0f} MiB in {long['seconds']:.2f} s "
          f"(T={SHORT}: +{short['growth_kib'] / 1024:.0f} MiB, ratio {ratio:.2f})")
