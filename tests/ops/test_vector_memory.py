"""The vector (elementwise, HGRN-style) memory m [B, H, V], o_t = m_t * q_t, against its closed form."""
import torch

import nlc

SPEC = """
model elementwise
param d_model = 8
param heads = 2
let q[heads, 4] = linear(x)
let k[heads, 4] = linear(x)
let v[heads, 4] = linear(x)
gate alpha[heads, 4] = sigmoid(linear(x))
gate eta[heads] = sigmoid(linear(x))
level memory {
  memory vector
  bias l2
  retention decay(alpha)
  algorithm gd(lr = eta)
}
output = linear(memory)
"""


def test_vector_memory_matches_its_closed_form():
    op = nlc.compile(SPEC).op("memory")
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 13, 2, 4
    q, k, v = (torch.randn(B, T, H, D, generator=g, dtype=torch.float64) for _ in range(3))
    alpha = torch.rand(B, T, H, D, generator=g, dtype=torch.float64)
    eta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    o, m = op(q, k, v, alpha=alpha, eta=eta, output_final_state=True)
    ref, outs = torch.zeros(B, H, D, dtype=torch.float64), []
    for t in range(T):
        # ½||m ⊙ k - v||²: gradient (m ⊙ k - v) ⊙ k, per channel decay alpha
        ref = alpha[:, t] * ref - eta[:, t, :, None] * (ref * k[:, t] - v[:, t]) * k[:, t]
        outs.append(ref * q[:, t])
    torch.testing.assert_close(o, torch.stack(outs, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m, ref, rtol=1e-12, atol=1e-12)
