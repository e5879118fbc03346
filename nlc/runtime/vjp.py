"""`vjp`: torch.func.vjp's contract by plain autograd, for generated code; `tapped_vjp`: the same
at tensors computed inside the function (a layer's output), for per-layer gradient factors.

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


def tapped_vjp(fn, has_aux: bool = False):
    """A vjp at tensors computed inside fn: fn(tap) returns out (or (out, aux) with has_aux) and
    passes each such tensor t through tap(t), which returns t. Returns (out, pullback) or (out,
    pullback, aux); pullback(cotangent like out) -> ∂<cotangent, out>/∂t per tapped t, in the order
    they were tapped.

    Tapping a layer's output instead of adding a fresh zero leaf to it (the same gradient) keeps the
    pullback's cost local: autograd skips the part of the graph older than the tensors it
    differentiates with respect to, and a fresh leaf is older than everything, so each pullback would
    walk the whole outer graph (quadratic in the number of chunks of a long sequence)."""
    if torch.compiler.is_compiling():
        return torch.compiler.disable(_tapped_vjp)(fn, has_aux=has_aux, eager_pullback=True)
    return _tapped_vjp(fn, has_aux=has_aux)


def _vjp(fn, *primals, has_aux: bool = False, eager_pullback: bool = False):
    outer = torch.is_grad_enabled()
    with torch.enable_grad():
        # a fresh node per primal: only fn's use of the argument counts, not other paths from the
        # output to the same tensor (through closed-over inputs computed from it), as in torch.func
        leaves = tuple(p.view_as(p) if p.requires_grad else p.detach().requires_grad_() for p in primals)
        result = fn(*leaves)
    return _with_pullback(result, leaves, has_aux, outer, eager_pullback)


def _tapped_vjp(fn, has_aux: bool = False, eager_pullback: bool = False):
    outer = torch.is_grad_enabled()
    taps = []

    def tap(t):
        t = t if t.requires_grad else t.detach().requires_grad_()  # no graph yet: start one
        taps.append(t)
        return t
    with torch.enable_grad():
        result = fn(tap)
    return _with_pullback(result, taps, has_aux, outer, eager_pullback)


def _with_pullback(result, leaves, has_aux, outer, eager_pullback):
    """(out, pullback[, aux]) of fn's result, differentiating with respect to leaves."""
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
