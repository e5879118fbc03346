"""Render a decay-family level (linear attention, RetNet, Mamba2; MATH.md §3.1) as chunked Triton
kernels, forward and backward: `level_<name>_triton_chunk.py`.

S_t = a_t S_(t-1) + b_t k_t v_t^T: within a chunk one masked, decayed matmul P = (Q U^T) * exp(go_i - g_j)
and the chunk-start term; across chunks the state recurrence. The kernels are in `triton_chunk_common`
(the delta family's without the WY/UT form: the values written are v itself); this module says which
levels qualify (a scalar decay and a scalar step size, printed from the derived rules) and what the
generated docstring states. Per-key-channel decays (GLA) keep a clear reason and run the fused
recurrent kernels.
"""
from __future__ import annotations

from nlc.derive.rules import LevelRules
from nlc.plan import KernelPlan

from . import triton_chunk_common as common
from .torch_chunk_decay import show


def unsupported(rules: LevelRules, plan: KernelPlan) -> str | None:
    """Why the chunked Triton kernels cannot run this level, or None when they can."""
    return common.unsupported(rules, plan, "decay")


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_triton_chunk.py` for a decay-family level `unsupported` accepts."""
    form = common.chunk_form(rules, plan)
    math_lines = [
        "  recurrence  S_t = a_t S_(t-1) + b_t k_t v_t^T",
        f"  decay       a_t = {show(form.decay)}",
        f"  step size   b_t = {show(form.step)}",
        f"  read        o_t = {'S_t' if form.read == 'g' else 'S_(t-1)'}^T q_t",
    ]
    return common.render(rules, plan, model, file, math_lines)
