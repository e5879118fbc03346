"""Render a delta-family level (DeltaNet, Gated DeltaNet; MATH.md §3.2-3.3) as chunked Triton kernels,
forward and backward: `level_<name>_triton_chunk.py`.

Within a chunk the WY/UT form (`chunk_wy_fwd_kernel`): the strictly lower G_ij = exp(ge_i - g_j)
(k_i . b_j k_j), its unit lower-triangular inverse A = (I + G)^-1 by forward substitution in fp32,
W = A (exp(ge) K) and U = A V; across chunks the state recurrence (pseudo-values D = U - W S_0, then
S_C = exp(g_C) S_0 + ...); then the outputs. The kernels are in `triton_chunk_common`; this module
says which levels qualify (a scalar decay and a scalar step size, both printed from the derived rules)
and what the generated docstring states. A step per value channel or through ||k_t||^2 (Longhorn, the
implicit step) has one system per channel instead: `triton_chunk_delta_channels`.
"""
from __future__ import annotations

from nlc.derive.rules import LevelRules
from nlc.plan import KernelPlan

from . import triton_chunk_common as common
from . import triton_chunk_delta_channels as channels
from .torch_chunk_decay import show


def unsupported(rules: LevelRules, plan: KernelPlan) -> str | None:
    """Why the chunked Triton kernels cannot run this level, or None when they can."""
    if channels.applies(rules, plan):
        return channels.unsupported(rules, plan)
    return common.unsupported(rules, plan, "delta")


def render(rules: LevelRules, plan: KernelPlan, model: str, file: str) -> str:
    """The source of `level_<name>_triton_chunk.py` for a delta-family level `unsupported` accepts: a step
    per value channel or through ||k||^2 takes the per-channel systems (`triton_chunk_delta_channels`)."""
    if channels.applies(rules, plan):
        return channels.render(rules, plan, model, file)
    form = common.chunk_form(rules, plan)
    retained = form.error == "g"
    math_lines = [
        "  recurrence  S_t = a_t S_(t-1) - b_t k_t (c_t S_(t-1)^T k_t - v_t)^T,  c_t = "
        + ("a_t (the error at the decayed state)" if retained else "1 (the error at the old state)"),
        f"  decay       a_t = {show(form.decay)}",
        f"  step size   b_t = {show(form.step)}",
        f"  read        o_t = {'S_t' if form.read == 'g' else 'S_(t-1)'}^T q_t",
        "The error side sees " + ("ge = g (c_t = a_t)" if retained else "ge = gb (c_t = 1)") + ".",
    ]
    return common.render(rules, plan, model, file, math_lines)
