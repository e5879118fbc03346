"""`vjp`: torch.func.vjp's contract by plain autograd, for generated code.

torch.func refuses saved-tensor hooks, so a layer whose forward took an inner vector-Jacobian
product with it could not run under activation checkpointing (`torch.utils.checkpoint` without
reentrancy) or saved-tensor offloading. Plain autograd runs under both. The pullback is itself
differentiable while grad mode is on (the outer backward pass goes through the inner gradient, as
the frozen, mapped and period families need), and detached under no_grad.

Under torch.compile both run eagerly, outside the graph (`torch.compiler.disable`, applied only
while compiling, so importing this module does not import torch._dynamo): aot_autograd cannot trace
a gradient whose graph the outer backward differentiates again.
"""
from __future__ import annotations

import torch


def vjp(fn, *primals, has_aux: bool = False):
    """(fn(*primals), pullback) or, with has_aux, (out, pullback, aux) where fn returns (out, aux).
    out: one tensor; pullback(cotangent shaped like out) -> one tensor per primal, zeros for a
    primal `out` does not depend on. primals: tensors; aux: tensors or lists/tuples of them."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_vjp)(fn, *primals, has_aux=has_aux, eager_pullback=True)
    return _vjp(fn, *primals, has_aux=has_aux)


def _vjp(fn, *primals, has_aux: bool = False, eager_pullback: bool = False):
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        # a fresh node per primal: only fn's use of the argument counts, not other paths from the
        # output to the same tensor (through closed-over inputs computed from it), as in torch.func
        leaves = tuple(p.view_as(p) if p.requires_grad else p.detach().requires_grad_() for p in primals)
        result = fn(*leaves)
    out, aux = result if has_aux else (result, None)

    def pullback(cotangent):
        with torch.enable_grad():
            grads = torch.autograd.grad(out, leaves, cotangent, retain_graph=True, create_graph=outer,
                                        allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads))

    if eager_pullback:
        pullback = torch.compiler.disable(pullback)
    if not outer:  # nothing outside may hold the inner graph
        out_seen, aux = out.detach(), _detached(aux)
    else:
        out_seen = out
    return (out_seen, pullback, aux) if has_aux else (out_seen, pullback)


def _detached(x):
    if torch.is_tensor(x):
        return x.detach()
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(v) for v in x)
    return x
