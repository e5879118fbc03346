"""A generated sample of the design space: every memory x bias x retention x algorithm (and the
gradient/update/read knobs) that the checker accepts, as small single-level specs."""
from __future__ import annotations

import functools
import itertools

import torch

from nlc import SpecError
from nlc.derive.rules import derive
from nlc.lower import check
from nlc.plan import plan
from nlc.program import CHUNKED_FAMILIES

MEMORIES = {"matrix": "matrix", "vector": "vector", "mlp1": "mlp(depth = 1)",
            "mlp2": "mlp(depth = 2, expand = 1)"}
BIASES = {"dot": "dot", "l2": "l2", "lp3": "lp(p = 3)", "l1": "l1(eps = 1e-3)",
          "huber": "huber(delta = 0.5)", "huber_norm": "huber(delta = 0.5, form = norm)",
          "yaad": "huber(delta = delta, form = mixture)", "robust": "robust(shift = 0.1)",
          "omega": "omega(window = 3, gamma = gamma) of l2"}
RETENTIONS = {"none": "none", "decay": "decay(alpha)", "l2": "l2(global = 2)",
              "lq": "lq(q = 4, decay = alpha)", "lq_miras": "lq(q = 4, map = miras)",
              "lq_chunk": "lq(q = 4, map = miras, apply = chunk)",
              "kl": "kl(decay = alpha)", "kl_global": "kl(global = 2)",
              "kl_chunk": "kl(decay = alpha, apply = chunk)",
              "elastic": "elastic(l1 = 20, l2 = 2)", "implicit": "implicit", "dgd": "dgd(decay = alpha)"}
ALGORITHMS = {"gd": "gd(lr = eta)", "momentum": "momentum(lr = eta, beta = theta)",
              "muon": "muon(lr = eta, beta = theta, steps = 3)", "ftrl": "ftrl(lr = eta)"}
SCHEDULES = {"token": "", "chunk": "gradient chunk_start(2)", "period": "update every 2",
             "before": "read before", "retained": "gradient retained", "outer": "update outer",
             "period_chunk": "update every 2\n  gradient chunk_start(2)"}

# Gate values for tests: step sizes small enough that every stable rule stays finite over ~100
# tokens, decays close to 1; other gates anywhere in a middle range.
GATE_RANGES = {"eta": (0.05, 0.2), "alpha": (0.6, 0.95)}
OTHER_GATES = (0.25, 0.75)


def gate_range(name: str) -> tuple[float, float]:
    return GATE_RANGES.get(name, OTHER_GATES)


TEMPLATE = """
model point
param d_model = 6
param heads = 1
param chunk = 5
let q[heads, 3] = l2norm(linear(x))
let k[heads, 3] = l2norm(linear(x))
let v[heads, 3] = linear(x)
gate alpha[heads] = sigmoid(linear(x))
gate eta[heads] = 0.5 * sigmoid(linear(x))
gate theta[heads] = 0.5 * sigmoid(linear(x))
gate gamma[heads] = sigmoid(linear(x))
gate delta[heads] = softplus(linear(x))
level memory {{
  memory {memory}
  bias {bias}
  retention {retention}
  algorithm {algorithm}
  init {init}
  {schedule}
}}
output = linear(memory)
"""


def spec_text(memory, bias, retention, algorithm, schedule="token") -> str:
    init = "learned" if memory != "matrix" or retention in ("kl", "kl_global", "kl_chunk", "lq_chunk") else "zero"
    return TEMPLATE.format(memory=MEMORIES[memory], bias=BIASES[bias], retention=RETENTIONS[retention],
                           algorithm=ALGORITHMS[algorithm], schedule=SCHEDULES[schedule], init=init)


@functools.lru_cache(maxsize=None)
def _checked(text: str):
    """The checker's result for a point's text, None where it refuses it (cached: several test
    modules sample overlapping parts of the space, and parsing dominates their collection time)."""
    try:
        return check(text)[0]
    except SpecError:
        return None


def points(memories=tuple(MEMORIES), schedules=("token",)):
    """(id, spec text) for every combination the checker accepts."""
    for memory, bias, retention, algorithm, schedule in itertools.product(
            memories, BIASES, RETENTIONS, ALGORITHMS, schedules):
        text = spec_text(memory, bias, retention, algorithm, schedule)
        if _checked(text) is not None:
            yield f"{memory}-{bias}-{retention}-{algorithm}-{schedule}", text


def chunked_points(memories, schedules):
    """(id, spec text) of the points whose level gets a generated chunk-parallel form."""
    for name, text in points(memories, schedules):
        if plan(derive(_checked(text))["memory"], 5).family in CHUNKED_FAMILIES:
            yield name, text


def op_inputs(op, T, seed, step=1.0):
    """float64 inputs of a level op at B=2: unit-norm q, k, Gaussian v, every gate drawn in its test
    range (`gate_range`; step-size gates `eta` scaled by `step`) and half the default state."""
    g = torch.Generator().manual_seed(seed)
    lv = op.level
    unit = lambda d: torch.nn.functional.normalize(
        torch.randn(2, T, lv.heads, d, generator=g, dtype=torch.float64), dim=-1)
    q, k = unit(lv.d_key), unit(lv.d_key)
    v = torch.randn(2, T, lv.heads, lv.d_value, generator=g, dtype=torch.float64)
    gates = {}
    for name in op.gates:
        axis = lv.gate_axes[name]
        tail = () if axis == "scalar" else ((lv.d_key,) if axis == "key" else (lv.d_value,))
        a, b = gate_range(name)
        gates[name] = a + (b - a) * torch.rand(2, T, lv.heads, *tail, generator=g, dtype=torch.float64)
        if name == "eta":
            gates[name] = step * gates[name]
    state = op.initial_state(2)
    state = tuple(0.5 * s for s in state)
    return q, k, v, gates, state
