"""nlc.runtime.vjp against torch.func.vjp: values, cotangents, aux, a primal that also reaches the
output through a closed-over tensor, no_grad detachment, and second order (gradcheck)."""
import torch

from nlc.runtime.vjp import vjp


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
