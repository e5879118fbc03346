"""nlc.runtime.vjp against torch.func.vjp: values, cotangents, aux, a primal that also reaches the
output through a closed-over tensor, no_grad detachment, and second order (gradcheck); tapped_vjp
at intermediate tensors."""
import torch

from nlc.runtime.vjp import tapped_vjp, vjp


def _mlp(W1, W2, x):
    return torch.tanh(x @ W1) @ W2


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    W1, W2 = (torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True))
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    dy = torch.randn(5, 2, generator=g, dtype=torch.float64)
    return W1, W2, x, dy


def test_matches_torch_func():
    W1, W2, x, dy = _tensors()
    y, pull = vjp(lambda a, b: _mlp(a, b, x), W1, W2)
    y_ref, pull_ref = torch.func.vjp(lambda a, b: _mlp(a, b, x), W1, W2)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(pull(dy), pull_ref(dy), strict=True):
        torch.testing.assert_close(a, b)


def test_aux_and_unused_primal():
    W1, W2, x, dy = _tensors(1)
    y, pull, aux = vjp(lambda a, b, c: (_mlp(a, b, x), [x @ a]), W1, W2, torch.ones(3), has_aux=True)
    grads = pull(dy)
    assert grads[2].shape == (3,) and not grads[2].any()  # unused: zeros, as torch.func gives
    torch.testing.assert_close(aux[0], x @ W1)


def test_only_the_argument_counts():
    """The output also depends on W1 through a closed-over input computed from it: the vjp is with
    respect to the argument alone (torch.func's meaning), not the total derivative."""
    W1, W2, x, dy = _tensors(2)
    x_from_W1 = x + W1.sum()
    _, pull = vjp(lambda a: _mlp(a, W2, x_from_W1), W1)
    _, pull_ref = torch.func.vjp(lambda a: _mlp(a, W2, x_from_W1), W1)
    torch.testing.assert_close(pull(dy)[0], pull_ref(dy)[0])


def test_no_grad_detaches():
    W1, W2, x, dy = _tensors(3)
    with torch.no_grad():
        y, pull, aux = vjp(lambda a: (_mlp(a, W2, x), x @ a), W1, has_aux=True)
        (g,) = pull(dy)
    assert not (y.requires_grad or aux.requires_grad or g.requires_grad)


def test_pullback_is_differentiable():
    """Second order: the cotangent of W1 as a function of W1, W2, x and dy, against finite differences."""
    W1, W2, x, dy = _tensors(4)
    x.requires_grad_(True)
    dy.requires_grad_(True)

    def cotangent(W1, W2, x, dy):
        return vjp(lambda a: _mlp(a, W2, x), W1)[1](dy)[0]
    assert torch.autograd.gradcheck(cotangent, (W1, W2, x, dy))


def _tapped_mlp(W1, W2, x):
    """fn(tap) for the MLP, tapping its two pre-activations."""
    def fn(tap):
        z1 = tap(x @ W1)
        return tap(torch.tanh(z1) @ W2)
    return fn


def test_tapped_vjp_equals_the_vjp_at_the_tapped_tensors():
    """∂<dy, out>/∂(each tapped tensor), in tap order, equals torch.func.vjp of the rest of the
    network at that tensor; with grad mode on the results are differentiable in the weights (second
    order, checked against torch.func twice), under no_grad they are detached."""
    W1, W2, x, dy = _tensors(3)
    out, pull = tapped_vjp(_tapped_mlp(W1, W2, x))
    d_z1, d_z2 = pull(dy)
    z1 = x @ W1
    _, pull_z1 = torch.func.vjp(lambda z: torch.tanh(z) @ W2, z1)
    torch.testing.assert_close(d_z1, pull_z1(dy)[0])
    torch.testing.assert_close(d_z2, dy)
    torch.testing.assert_close(out, _mlp(W1, W2, x))

    def inner(W1, W2):
        return tapped_vjp(_tapped_mlp(W1, W2, x))[1](dy)[0]
    assert torch.autograd.gradcheck(inner, (W1, W2))
    with torch.no_grad():
        out, pull = tapped_vjp(_tapped_mlp(W1, W2, x))
        assert not out.requires_grad and not any(d.requires_grad for d in pull(dy))
