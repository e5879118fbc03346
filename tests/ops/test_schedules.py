"""Update period, gradient point and read point are separate knobs; each is checked here against an
independent loop for a matrix memory with the l2 bias and GD (MATH.md §4.1-4.2, §1.4)."""
import itertools

import pytest
import torch

import nlc

SPEC = """
model schedule
param d_model = 8
param heads = 1
let q[heads, 4] = linear(x)
let k[heads, 4] = l2norm(linear(x))
let v[heads, 4] = linear(x)
gate eta[heads] = sigmoid(linear(x))
level memory {{
  memory matrix
  bias l2
  algorithm gd(lr = eta)
  update {update}
  gradient {gradient}
  read {read}
}}
output = linear(memory)
"""


def independent(q, k, v, eta, period, chunk, read):
    """State after t tokens: S[t]. Token t takes its gradient at S[t - t % chunk] (chunk = 1: S[t]),
    writes S[t + 1]; an update is visible to reads once its period closes."""
    B, T, H, K = k.shape
    S = [torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype)]
    out = []
    for t in range(T):
        at = S[t - t % chunk]
        err = torch.einsum("bhk,bhkv->bhv", k[:, t], at) - v[:, t]
        S.append(S[t] - eta[:, t, :, None, None] * k[:, t, :, :, None] * err[:, :, None, :])
        seen = t + 1 if read == "after" else t              # tokens whose writes the read may see
        committed = S[seen - seen % period]                 # ... rounded down to a period boundary
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t], committed))
    return torch.stack(out, 1), S[-1]


CASES = list(itertools.product([1, 4], [1, 3], ["after", "before"]))


@pytest.mark.parametrize("period,chunk,read", CASES)
def test_schedule_matches_the_independent_loop(period, chunk, read):
    gradient = "current" if chunk == 1 else f"chunk_start({chunk})"
    op = nlc.compile(SPEC.format(update=f"every {period}", gradient=gradient, read=read)).op("memory")
    g = torch.Generator().manual_seed(period * 10 + chunk)
    B, T = 2, 11
    q = torch.randn(B, T, 1, 4, generator=g, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T, 1, 4, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, 1, 4, generator=g, dtype=torch.float64)
    eta = torch.rand(B, T, 1, generator=g, dtype=torch.float64)
    o, state = op(q, k, v, eta=eta, output_final_state=True)
    o_ref, state_ref = independent(q, k, v, eta, period, chunk, read)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, state_ref, rtol=1e-12, atol=1e-12)  # partial period flushed


def test_outer_level_never_changes():
    op = nlc.compile(SPEC.format(update="outer", gradient="current", read="after")).op("memory")
    B, T = 1, 5
    S0 = torch.randn(B, 1, 4, 4, dtype=torch.float64)
    q = torch.randn(B, T, 1, 4, dtype=torch.float64)
    o, state = op(q, q, q, eta=torch.ones(B, T, 1, dtype=torch.float64), initial_state=S0,
                  output_final_state=True)
    torch.testing.assert_close(o, torch.einsum("btk,bkv->btv", q[:, :, 0], S0[:, 0])[:, :, None])
    torch.testing.assert_close(state, S0)
