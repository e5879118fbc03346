"""A tiny space and tiny training settings, so that a whole exploration takes seconds."""
import pytest

TINY_SPACE = """model tiny
param d_model = 16
param heads = 1
param d_key = 8
param chunk = 8
param max_lr = 1
gate beta[heads] = max_lr * sigmoid(linear(x))
let q[heads, d_key] = l2norm(silu(conv(linear(x), 4)))
let k[heads, d_key] = l2norm(silu(conv(linear(x), 4)))
let v[heads, d_key] = silu(conv(linear(x), 4))
level memory {
  memory matrix
  bias l2
  retention none
  algorithm gd(lr = beta)
}
space tiny over memory {
  bias in {dot, l2, lp(p = 3)}
}
output = x + linear(memory)
"""

# explore arguments: a 32-token MQAR with 2 and 4 pairs, a few steps at one learning rate
TINY_ARGS = ["--task", "mqar", "--task-arg", "vocab=64", "--task-arg", "seq_len=32",
             "--task-arg", "kv_pairs=2,4", "--steps", "6", "--batch", "8", "--lrs", "0.003",
             "--train-examples", "32", "--test-examples", "16", "--layers", "1", "--quiet",
             "--threads", "1"]


@pytest.fixture
def tiny_spec(tmp_path):
    path = tmp_path / "tiny_space.nl"
    path.write_text(TINY_SPACE)
    return path
