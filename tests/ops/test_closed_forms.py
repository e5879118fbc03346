"""The generated ops of the shipped matrix-memory specs against closed-form recurrences written out
independently here (MATH.md §2.1-2.9, §3.4), in float64, row convention:
state S [B, H, K, V], read-out o_t = S_t^T q_t after the write.

Each reference below is a plain token loop over [B, H]-batched tensors; none of them imports
anything from nlc except the op under test."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

import nlc

SPECS = Path(__file__).resolve().parents[2] / "specs"
B, T = 2, 37
DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)




@functools.lru_cache(maxsize=None)
def _program(name, **overrides):
    return nlc.compile(SPECS / f"{name}.nl", **overrides)


def _op(name, **overrides):
    return _program(name, **overrides).op("memory")


def _level(name, **overrides):
    return _program(name, **overrides).levels[0]


# ----------------------------------------------------------------------------------- inputs

def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g, dtype=DT)


def _uniform(g, low, high, *shape):
    return low + (high - low) * torch.rand(*shape, generator=g, dtype=DT)


def _unit(g, *shape):
    return torch.nn.functional.normalize(_randn(g, *shape), dim=-1)


def _qkv(name, seed, unit_keys, T=T):
    lv = _level(name)
    H, K, V = lv.heads, lv.d_key, lv.d_value
    g = _gen(seed)
    if unit_keys:
        q, k = _unit(g, B, T, H, K), _unit(g, B, T, H, K)
    else:
        q, k = _randn(g, B, T, H, K), _randn(g, B, T, H, K)
    v = _randn(g, B, T, H, V)
    return q, k, v, g


# ------------------------------------------------------------------------------ references

def _outer(k, v):
    """k [B, H, K], v [B, H, V] -> [B, H, K, V]."""
    return k[..., :, None] * v[..., None, :]


def _read(S, q):
    """o = S^T q: S [B, H, K, V], q [B, H, K] -> [B, H, V]."""
    return (S * q[..., :, None]).sum(-2)


def _zero_state(q, v):
    Bq, _, H, K = q.shape
    return torch.zeros(Bq, H, K, v.shape[-1], dtype=q.dtype)


def _loop(q, k, v, S0, step):
    """Run S_t = step(S_{t-1}, t) and read o_t = S_t^T q_t after every write."""
    S = _zero_state(q, v) if S0 is None else S0.clone()
    outs = []
    for t in range(q.shape[1]):
        S = step(S, t)
        outs.append(_read(S, q[:, t]))
    return torch.stack(outs, dim=1), S


def ref_linear_attention(q, k, v, S0=None):
    return _loop(q, k, v, S0, lambda S, t: S + _outer(k[:, t], v[:, t]))


def ref_retnet(q, k, v, gamma, S0=None):
    return _loop(q, k, v, S0, lambda S, t: gamma[:, t, :, None, None] * S + _outer(k[:, t], v[:, t]))


def ref_gla(q, k, v, a, S0=None):
    # Diag(a_t) over the key channels (the rows of S).
    return _loop(q, k, v, S0, lambda S, t: a[:, t, :, :, None] * S + _outer(k[:, t], v[:, t]))


def ref_mamba2(q, k, v, a, dt, S0=None):
    return _loop(q, k, v, S0, lambda S, t: a[:, t, :, None, None] * S
                 + dt[:, t, :, None, None] * _outer(k[:, t], v[:, t]))


def _delta(S, k, v, beta):
    """S - beta k (k^T S - v^T)."""
    err = _read(S, k) - v                                    # [B, H, V]
    return S - beta[..., None, None] * _outer(k, err)


def ref_deltanet(q, k, v, beta, S0=None):
    return _loop(q, k, v, S0, lambda S, t: _delta(S, k[:, t], v[:, t], beta[:, t]))


def ref_gated_deltanet(q, k, v, alpha, beta, S0=None):
    # a_t (I - beta k k^T) S + beta k v^T: decay first, then the delta error at the decayed state.
    return _loop(q, k, v, S0, lambda S, t: _delta(alpha[:, t, :, None, None] * S, k[:, t], v[:, t], beta[:, t]))


def ref_longhorn(q, k, v, beta, S0=None):
    def step(S, t):
        kt = k[:, t]
        eps = beta[:, t] / (1 + beta[:, t] * (kt * kt).sum(-1, keepdim=True))    # [B, H, V]
        err = _read(S, kt) - v[:, t]                                            # S^T k - v
        return S - _outer(kt, eps * err)
    return _loop(q, k, v, S0, step)


def ref_titans_tokens(q, k, v, alpha, theta, eta, M0, S0, chunk):
    """Titans matrix memory, token by token, every gradient at the chunk-start memory.
    l2 bias 1/2||k^T M - v||^2 -> u = k (M^T k - v)^T;  S = eta S - theta u;  M = (1 - alpha) M + S."""
    M, S = M0.clone(), S0.clone()
    outs = []
    for t in range(q.shape[1]):
        if t % chunk == 0:
            M_start = M
        u = _outer(k[:, t], _read(M_start, k[:, t]) - v[:, t])
        S = eta[:, t, :, None, None] * S - theta[:, t, :, None, None] * u
        M = (1 - alpha[:, t, :, None, None]) * M + S
        outs.append(_read(M, q[:, t]))
    return torch.stack(outs, dim=1), M, S


def ref_titans_chunked(q, k, v, alpha, theta, eta, M0, S0, chunk):
    """MATH.md §3.4 chunked closed form (stable P.N coefficients), row convention, for the loss
    1/2||k^T M - v||^2 (so the factor 2 of the §3.4 formulas becomes 1)."""
    Tn = q.shape[1]
    assert Tn % chunk == 0
    tr = lambda x: x.transpose(1, 2)                         # [B, T, H, ...] -> [B, H, T, ...]
    Q, Kx, Vx = tr(q), tr(k), tr(v)
    log_keep, log_eta, th = tr(torch.log1p(-alpha)), tr(torch.log(eta)), tr(theta)
    M, S = M0.clone(), S0.clone()
    outs = []
    lower = torch.ones(chunk, chunk, dtype=torch.bool).tril()
    for c0 in range(0, Tn, chunk):
        sl = slice(c0, c0 + chunk)
        Qc, Kc, Vc = Q[:, :, sl], Kx[:, :, sl], Vx[:, :, sl]   # [B, H, C, D]
        lb = log_keep[:, :, sl].cumsum(-1)                   # log b_t
        lm = log_eta[:, :, sl].cumsum(-1)                    # log m_t
        neg_inf = torch.tensor(float("-inf"), dtype=DT)
        P = torch.exp(torch.where(lower, lb[..., :, None] - lb[..., None, :], neg_inf))          # P[t, i]
        N = th[:, :, sl][..., None, :] * torch.exp(
            torch.where(lower, lm[..., :, None] - lm[..., None, :], neg_inf))                    # N[i, j]
        G = P @ N
        f = (P @ torch.exp(lm)[..., None])[..., 0]
        b = torch.exp(lb)
        E = Kc @ M - Vc                                      # rows e_j^T = k_j^T M_0 - v_j^T
        O = (b[..., None] * (Qc @ M) + f[..., None] * (Qc @ S)
             - ((Qc @ Kc.transpose(-1, -2)) * G) @ E)        # G is already lower triangular
        M_next = (b[..., -1, None, None] * M + f[..., -1, None, None] * S
                  - (G[..., -1, :, None] * Kc).transpose(-1, -2) @ E)
        S = torch.exp(lm[..., -1, None, None]) * S - (N[..., -1, :, None] * Kc).transpose(-1, -2) @ E
        M = M_next
        outs.append(O)
    return torch.cat(outs, dim=2).transpose(1, 2), M, S


# ---------------------------------------------------------------------------------- models

def _random_state(g, q, v, scale=0.3):
    return scale * _randn(g, q.shape[0], q.shape[2], q.shape[3], v.shape[-1])


def _case(name, seed):
    """(q, k, v, gates, reference function taking (q, k, v, S0)) for one matrix spec."""
    if name == "linear_attention":
        q, k, v, g = _qkv(name, seed, unit_keys=False)
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        return q, k, v, {}, ref_linear_attention, g
    if name == "retnet":
        q, k, v, g = _qkv(name, seed, unit_keys=False)
        H = q.shape[2]
        gamma_h = 1 - 2.0 ** (-5 - torch.arange(H, dtype=DT))
        gamma = gamma_h.expand(B, T, H).clone()
        return q, k, v, {"gamma": gamma}, lambda q, k, v, S0: ref_retnet(q, k, v, gamma, S0), g
    if name == "gla":
        q, k, v, g = _qkv(name, seed, unit_keys=False)
        a = torch.exp(torch.nn.functional.logsigmoid(2 * _randn(g, *k.shape)) / 4)
        return q, k, v, {"a": a}, lambda q, k, v, S0: ref_gla(q, k, v, a, S0), g
    if name == "mamba2":
        q, k, v, g = _qkv(name, seed, unit_keys=False)
        dt = torch.nn.functional.softplus(_randn(g, B, T, q.shape[2]) - 1)
        a = torch.exp(-dt * _uniform(g, 0.2, 2.0, 1, 1, q.shape[2]))
        return q, k, v, {"a": a, "dt": dt}, lambda q, k, v, S0: ref_mamba2(q, k, v, a, dt, S0), g
    if name == "deltanet":
        q, k, v, g = _qkv(name, seed, unit_keys=True)
        beta = _uniform(g, 0.05, 0.95, B, T, q.shape[2])
        return q, k, v, {"beta": beta}, lambda q, k, v, S0: ref_deltanet(q, k, v, beta, S0), g
    if name == "gated_deltanet":
        q, k, v, g = _qkv(name, seed, unit_keys=True)
        alpha = _uniform(g, 0.5, 1.0, B, T, q.shape[2])
        beta = _uniform(g, 0.05, 0.95, B, T, q.shape[2])
        return (q, k, v, {"alpha": alpha, "beta": beta},
                lambda q, k, v, S0: ref_gated_deltanet(q, k, v, alpha, beta, S0), g)
    if name == "longhorn":
        q, k, v, g = _qkv(name, seed, unit_keys=False)    # Longhorn's keys are not normalised
        beta = torch.sigmoid(_randn(g, *v.shape))         # one per value channel
        return q, k, v, {"beta": beta}, lambda q, k, v, S0: ref_longhorn(q, k, v, beta, S0), g
    raise KeyError(name)


MATRIX_SPECS = ["linear_attention", "retnet", "gla", "mamba2", "deltanet", "gated_deltanet", "longhorn"]


def test_spec_levels_are_what_the_references_assume():
    expect = {  # (bias, retention, gates, gate axes that are not scalar)
        "linear_attention": ("dot", "none", (), {}),
        "retnet": ("dot", "decay", ("gamma",), {}),
        "gla": ("dot", "decay", ("a",), {"a": "key"}),
        "mamba2": ("dot", "decay", ("a", "dt"), {}),
        "deltanet": ("l2", "none", ("beta",), {}),
        "gated_deltanet": ("l2", "decay", ("alpha", "beta"), {}),
        "longhorn": ("l2", "implicit", ("beta",), {"beta": "value"}),
    }
    for name, (bias, retention, gates, axes) in expect.items():
        lv = _level(name)
        assert lv.memory.kind == "matrix", name
        assert (lv.bias.kind, lv.retention.kind) == (bias, retention), name
        assert set(_op(name).gates) == set(gates), name
        assert {g: a for g, a in lv.gate_axes.items() if a != "scalar"} == axes, name
    titans = _level("titans", depth=1)
    assert (titans.bias.kind, titans.retention.kind, titans.algorithm.kind) == ("l2", "decay", "momentum")


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_init", "given_init"])
@pytest.mark.parametrize("name", MATRIX_SPECS)
def test_matrix_spec_matches_closed_form(name, with_state):
    q, k, v, gates, reference, g = _case(name, seed=100 + MATRIX_SPECS.index(name))
    S0 = _random_state(g, q, v) if with_state else None
    S0_copy = None if S0 is None else S0.clone()
    o, S = _op(name)(q, k, v, **gates, initial_state=S0, output_final_state=True)
    if with_state:
        assert torch.equal(S0, S0_copy), "the op changed its initial_state in place"
    o_ref, S_ref = reference(q, k, v, S0)
    assert o.dtype == DT and o.shape == o_ref.shape
    assert torch.is_tensor(S) and S.shape == S_ref.shape
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(S, S_ref, **TOL)


def test_without_final_state_returns_none():
    q, k, v, gates, reference, _ = _case("deltanet", seed=3)
    o, S = _op("deltanet")(q, k, v, **gates)
    assert S is None
    torch.testing.assert_close(o, reference(q, k, v, None)[0], **TOL)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_streaming_in_two_pieces_equals_whole(name):
    q, k, v, gates, _, g = _case(name, seed=11)
    S0 = _random_state(g, q, v)
    op = _op(name)
    cut = 20
    first = {n: x[:, :cut] for n, x in gates.items()}
    rest = {n: x[:, cut:] for n, x in gates.items()}
    o_all, S_all = op(q, k, v, **gates, initial_state=S0, output_final_state=True)
    o1, S1 = op(q[:, :cut], k[:, :cut], v[:, :cut], **first, initial_state=S0, output_final_state=True)
    o2, S2 = op(q[:, cut:], k[:, cut:], v[:, cut:], **rest, initial_state=S1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S2, S_all, rtol=1e-12, atol=1e-12)
    # and from a zero start
    o_all, S_all = op(q, k, v, **gates, output_final_state=True)
    o1, S1 = op(q[:, :cut], k[:, :cut], v[:, :cut], **first, output_final_state=True)
    o2, S2 = op(q[:, cut:], k[:, cut:], v[:, cut:], **rest, initial_state=S1, output_final_state=True)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S2, S_all, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------- Titans, matrix memory

def _titans_inputs(seed, T=T, heads=2, d=32):
    g = _gen(seed)
    q, k = _unit(g, B, T, heads, d), _unit(g, B, T, heads, d)
    v = _randn(g, B, T, heads, d)
    alpha = _uniform(g, 0.0, 0.2, B, T, heads)     # forget rate: memory kept by (1 - alpha)
    theta = _uniform(g, 0.05, 0.5, B, T, heads)    # step size
    eta = _uniform(g, 0.5, 0.99, B, T, heads)      # momentum
    M0 = 0.3 * _randn(g, B, heads, d, d)
    S0 = 0.1 * _randn(g, B, heads, d, d)
    return q, k, v, dict(alpha=alpha, theta=theta, eta=eta), M0, S0


def _titans_op(chunk=None):
    overrides = dict(depth=1) if chunk is None else dict(depth=1, chunk=chunk)
    program = _program("titans", **overrides)
    lv = program.levels[0]
    assert lv.memory.kind in ("matrix", "mlp")
    assert (lv.d_key, lv.d_value, lv.heads) == (32, 32, 2)
    return program.op("memory"), lv


def _run_titans(op, q, k, v, gates, M0, S0):
    M0_copy, S0_copy = M0.clone(), S0.clone()
    o, state = op(q, k, v, **gates, initial_state=(M0, S0), output_final_state=True)
    assert torch.equal(M0, M0_copy) and torch.equal(S0, S0_copy), "the op changed its initial_state in place"
    assert isinstance(state, tuple) and len(state) == 2
    M, S = state
    assert M.shape == M0.shape and S.shape == S0.shape
    return o, M, S


@pytest.mark.parametrize("chunk", [None, 5])
def test_titans_matrix_matches_chunk_start_token_loop(chunk):
    op, lv = _titans_op(chunk)
    C = lv.grad_chunk
    assert C == (16 if chunk is None else chunk)
    q, k, v, gates, M0, S0 = _titans_inputs(seed=1)
    o, M, S = _run_titans(op, q, k, v, gates, M0, S0)
    o_ref, M_ref, S_ref = ref_titans_tokens(q, k, v, gates["alpha"], gates["theta"], gates["eta"], M0, S0, C)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(M, M_ref, **TOL)
    torch.testing.assert_close(S, S_ref, **TOL)


@pytest.mark.parametrize("chunk", [4, 12, 36])
def test_titans_matrix_matches_chunked_closed_form(chunk):
    Tc = 36
    op, lv = _titans_op(chunk)
    assert lv.grad_chunk == chunk and Tc % chunk == 0
    q, k, v, gates, M0, S0 = _titans_inputs(seed=2, T=Tc)
    o, M, S = _run_titans(op, q, k, v, gates, M0, S0)
    o_ref, M_ref, S_ref = ref_titans_chunked(q, k, v, gates["alpha"], gates["theta"], gates["eta"], M0, S0, chunk)
    # the two references agree with each other too
    o_tok, M_tok, S_tok = ref_titans_tokens(q, k, v, gates["alpha"], gates["theta"], gates["eta"], M0, S0, chunk)
    torch.testing.assert_close(o_ref, o_tok, **TOL)
    torch.testing.assert_close(M_ref, M_tok, **TOL)
    torch.testing.assert_close(S_ref, S_tok, **TOL)
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(M, M_ref, **TOL)
    torch.testing.assert_close(S, S_ref, **TOL)


def test_titans_matrix_chunk_one_is_per_token_momentum():
    op, lv = _titans_op(chunk=1)
    assert lv.grad_chunk == 1
    q, k, v, gates, M0, S0 = _titans_inputs(seed=3)
    o, M, S = _run_titans(op, q, k, v, gates, M0, S0)
    # plain per-token momentum recurrence, gradient at the current memory M_{t-1}
    alpha, theta, eta = gates["alpha"], gates["theta"], gates["eta"]
    M_ref, S_ref, outs = M0.clone(), S0.clone(), []
    for t in range(T):
        grad = _outer(k[:, t], _read(M_ref, k[:, t]) - v[:, t])
        S_ref = eta[:, t, :, None, None] * S_ref - theta[:, t, :, None, None] * grad
        M_ref = (1 - alpha[:, t, :, None, None]) * M_ref + S_ref
        outs.append(_read(M_ref, q[:, t]))
    torch.testing.assert_close(o, torch.stack(outs, dim=1), **TOL)
    torch.testing.assert_close(M, M_ref, **TOL)
    torch.testing.assert_close(S, S_ref, **TOL)


def test_titans_matrix_streams_at_chunk_boundaries():
    op, lv = _titans_op(chunk=4)
    q, k, v, gates, M0, S0 = _titans_inputs(seed=4)
    cut = 20                                               # a multiple of the chunk
    o_all, M_all, S_all = _run_titans(op, q, k, v, gates, M0, S0)
    o1, M1, S1 = _run_titans(op, q[:, :cut], k[:, :cut], v[:, :cut],
                             {n: x[:, :cut] for n, x in gates.items()}, M0, S0)
    o2, M2, S2 = _run_titans(op, q[:, cut:], k[:, cut:], v[:, cut:],
                             {n: x[:, cut:] for n, x in gates.items()}, M1, S1)
    torch.testing.assert_close(torch.cat([o1, o2], dim=1), o_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(M2, M_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(S2, S_all, rtol=1e-12, atol=1e-12)
