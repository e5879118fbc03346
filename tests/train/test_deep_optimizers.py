"""Deep optimizers (MATH.md §4.6): the `optimizer { ... }` declaration, its derived rule, the
torch optimizer built from it, training and exact resume with it, and its located errors."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

import nlc
from nlc import graph
from nlc.cli import main
from nlc.derive.optimizer import derive_optimizer
from nlc.diagnostics import SpecError
from nlc.lower import check
from nlc.optim import SpecOptimizer
from nlc.train import train
from nlc.train.loop import CHECKPOINT
from tests.test_bad_specs import BASE as LAYER  # a one-level spec, 15 lines

SPEC = "specs/deep_optimizers.nl"


def optimizer(params, body: str, lr: float):
    """The SpecOptimizer of `optimizer { body }` over params."""
    checked, _ = check(LAYER + f"optimizer {{ {body} }}\n", "t.nl")
    return SpecOptimizer(params, derive_optimizer(checked.optimizer), lr)


def parameters(seed=0):
    """A matrix, a vector and a 3-axis tensor, float64."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
            for shape in ((5, 3), (4,), (3, 2, 2))]


def loss_of(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return sum((p * torch.randn(p.shape, generator=g, dtype=torch.float64)).sin().sum()
               + (p ** 2).sum() for p in params)


def newton_schulz_reference(M, steps):
    """Quintic Newton-Schulz (MATH.md §1.4), written independently: always on the wide side."""
    X = M.T if M.shape[0] > M.shape[1] else M
    X = X / torch.linalg.matrix_norm(X)
    for _ in range(steps):
        gram = X @ X.T
        X = 3.4445 * X - 4.7750 * gram @ X + 2.0315 * gram @ gram @ X
    return X.T if M.shape[0] > M.shape[1] else X


def test_dot_momentum_is_sgd_momentum_step_for_step():
    ours, theirs = parameters(), parameters()
    opt = optimizer(ours, "memory matrix  bias dot  retention decay(0.9)  algorithm gd(lr = 1)", 0.1)
    sgd = torch.optim.SGD(theirs, lr=0.1, momentum=0.9)
    for step in range(6):
        for params, o in ((ours, opt), (theirs, sgd)):
            o.zero_grad()
            loss_of(params, step).backward()
            o.step()
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), step


def test_muon_is_newton_schulz_of_the_momentum():
    params = parameters()[:1]
    opt = optimizer(params, "memory matrix  bias dot  retention decay(0.95)  algorithm gd(lr = 1)  "
                            "readout newton_schulz(5)", 0.02)
    momentum = torch.zeros_like(params[0])
    for step in range(4):
        before = params[0].detach().clone()
        opt.zero_grad()
        loss_of(params, step).backward()
        momentum = 0.95 * momentum + params[0].grad
        opt.step()
        expected = before - 0.02 * newton_schulz_reference(momentum, 5)
        torch.testing.assert_close(params[0].detach(), expected, rtol=1e-12, atol=1e-12)


def test_delta_momentum_follows_math():
    """l2 bias: m <- m (beta I - lr_m G^T G) + lr_m G (MATH.md §4.6, P = I)."""
    params = parameters()[:1]
    opt = optimizer(params, "memory matrix  bias l2  retention decay(0.9)  algorithm gd(lr = 0.3)", 0.1)
    m = torch.zeros_like(params[0])
    for step in range(4):
        before = params[0].detach().clone()
        opt.zero_grad()
        loss_of(params, step).backward()
        G = params[0].grad
        m = m @ (0.9 * torch.eye(3, dtype=torch.float64) - 0.3 * G.T @ G) + 0.3 * G
        opt.step()
        torch.testing.assert_close(params[0].detach(), before - 0.1 * m, rtol=1e-12, atol=1e-12)


def test_deep_momentum_learns_its_mlp_by_the_derived_rule():
    params = parameters()[:1]
    opt = optimizer(params, "memory mlp(depth = 2, expand = 2, act = tanh)  bias dot  "
                            "retention decay(0.9)  algorithm gd(lr = 0.5)", 0.1)
    start = params[0].detach().clone()
    opt.zero_grad()
    loss_of(params, 0).backward()
    G = params[0].grad.clone()
    opt.step()
    state = opt.state[params[0]]
    # step 1 by hand: the last layer starts at 0, so only it learns: w1 = 0.5 tanh(G w0^T) (its
    # gradient of -tr(M(G)) is -tanh(G w0^T)), and retention scales w0 by 0.9
    w0 = state["w0"] / 0.9
    torch.testing.assert_close(state["w1"], 0.5 * torch.tanh(G @ w0.T), rtol=1e-12, atol=1e-12)
    read = state["w1"] @ torch.tanh(state["w0"])  # the memory at the unit queries, [R, C]
    torch.testing.assert_close(params[0].detach(), start - 0.1 * read, rtol=1e-12, atol=1e-12)
    # step 2: both layers follow gd on -tr(M(G)) through decay(0.9), by autograd
    weights = {k: state[k].clone().requires_grad_() for k in ("w0", "w1")}
    opt.zero_grad()
    loss_of(params, 1).backward()
    G = params[0].grad.clone()
    objective = -torch.trace(torch.tanh(G @ weights["w0"].T) @ weights["w1"].T)
    grads = torch.autograd.grad(objective, list(weights.values()))
    opt.step()
    for (name, w), g in zip(weights.items(), grads):
        torch.testing.assert_close(state[name], 0.9 * w.detach() - 0.5 * g, rtol=1e-12, atol=1e-12)
    assert not torch.equal(params[0].detach(), start)


def test_m3_matches_math():
    """fast M1 += b1 g, V += b2 g^2; every f steps M2 += b3 (sum of the last f gradients);
    W -= lr (NS(M1) + alpha NS(M2)) / (sqrt(V) + eps) (MATH.md §4.6)."""
    params = parameters()[:1]
    opt = optimizer(params, "memory matrix  bias dot  algorithm m3(beta1 = 0.9, beta2 = 0.5, "
                            "beta3 = 0.3, alpha = 0.7, every = 3, eps = 1e-6)  readout newton_schulz(4)",
                    0.01)
    M1, V, M2, window = (torch.zeros_like(params[0]) for _ in range(4))
    for step in range(1, 8):
        before = params[0].detach().clone()
        opt.zero_grad()
        loss_of(params, step).backward()
        g = params[0].grad
        M1, V, window = M1 + 0.9 * g, V + 0.5 * g ** 2, window + g
        if step % 3 == 0:
            M2, window = M2 + 0.3 * window, torch.zeros_like(window)
        slow = newton_schulz_reference(M2, 4) if M2.abs().sum() > 0 else M2
        update = (newton_schulz_reference(M1, 4) + 0.7 * slow) / (V.sqrt() + 1e-6)
        opt.step()
        torch.testing.assert_close(params[0].detach(), before - 0.01 * update, rtol=1e-10, atol=1e-12)


@pytest.fixture
def deep(config):
    return dataclasses.replace(config, spec=SPEC, lr=None, optimizer="spec")


def _weights(folder):
    return torch.load(folder / CHECKPOINT, weights_only=True)


def test_training_with_the_spec_optimizer_lowers_the_loss(deep):
    model, summary = train(dataclasses.replace(deep, steps=16, checkpoint_every=100))
    losses = [json.loads(line)["loss"] for line in (Path(deep.out) / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-4:]) < sum(losses[:4])
    state = _weights(Path(deep.out))["optimizer"]
    assert {"w0", "w1"} <= set(state["state"][0])  # the MLP memory of deep momentum
    assert state["param_groups"][0]["initial_lr"] == 0.05  # the declaration's lr


def test_resume_with_the_spec_optimizer_is_exact(deep, tmp_path):
    straight = dataclasses.replace(deep, out=str(tmp_path / "straight"))
    split = dataclasses.replace(deep, out=str(tmp_path / "split"))
    _, whole = train(straight)
    train(split, stop_at=5)
    _, resumed = train(split, resume=True)
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for index, state in a["optimizer"]["state"].items():
        assert all(torch.equal(t, b["optimizer"]["state"][index][k]) for k, t in state.items())
    assert resumed["val_loss"] == whole["val_loss"]


def test_optimizer_choice(config, deep):
    from nlc.train import RunError
    with pytest.raises(RunError, match="declares no `optimizer"):
        train(dataclasses.replace(config, optimizer="spec"))
    model, _ = train(dataclasses.replace(deep, optimizer="adamw", steps=1))
    state = _weights(Path(deep.out))["optimizer"]["state"]
    assert "exp_avg" in state[0]
    with pytest.raises(ValueError, match="declares no `optimizer"):
        nlc.compile(config.spec, **config.overrides).optimizer(model.parameters())


def test_graph_shows_the_optimizer_as_the_outer_level(capsys):
    program = nlc.compile(SPEC)
    g = program.graph
    assert g.nodes[graph.OPTIMIZER]["kind"] == "level" and g.nodes[graph.OPTIMIZER]["span"].line > 1
    assert g.edges[graph.OUTER, graph.OPTIMIZER]["kind"] == "nests"
    assert graph.by_frequency(g)[-2:] == [graph.OPTIMIZER, graph.OUTER]
    assert main(["graph", SPEC, "--text"]) == 0
    text = capsys.readouterr().out
    assert "  optimizer  [specs/deep_optimizers.nl:" in text and "outer nests optimizer" in text
    assert "    memory: mlp(depth=2, expand=2, act=tanh)" in text and "    lr: 0.05" in text
    assert "optimizer (outer level" in program.dump("rules")
    assert main(["check", SPEC]) == 0
    assert "optimizer (outer level): memory mlp(depth=2" in capsys.readouterr().out


BAD = [
    ("unknown_field", "memory matrix  bias dot  algorithm gd(lr = 1)  speed 3",
     "unknown optimizer field 'speed'", "speed 3", "one of: memory"),
    ("momentum_word", "memory matrix  bias dot  algorithm momentum(lr = 1, beta = 0.9)",
     "unknown optimizer algorithm 'momentum'", "momentum(", "gd(lr) or m3"),
    ("gate_argument", "memory matrix  bias dot  retention decay(beta)  algorithm gd(lr = 1)",
     "reads gate 'beta'", "decay(beta)", "numbers or parameters"),
    ("kl_retention", "memory matrix  bias dot  retention kl(decay = 0.9)  algorithm gd(lr = 1)",
     "retention 'kl' has no elementwise map", "kl(", "none or decay"),
    ("m3_on_mlp", "memory mlp(depth = 2)  bias dot  algorithm m3(every = 4)",
     "m3 orthogonalizes matrix momenta", "mlp(", "memory matrix"),
    ("m3_needs_every", "memory matrix  bias dot  algorithm m3(beta1 = 0.9)",
     "m3() needs 'every'", "m3(", "m3(every = ...)"),
    ("residual_mlp", "memory mlp(depth = 2, residual = true)  bias dot  algorithm gd(lr = 1)",
     "has no residual form", "true", "residual = false"),
    ("vector_memory", "memory vector  bias dot  algorithm gd(lr = 1)",
     "keys (gradient rows) and values", "vector", "matrix or mlp"),
    ("omega_bias", "memory matrix  bias omega(window = 2) of l2  algorithm gd(lr = 1)",
     "omega sums a window", "omega(", "dot, l2"),
    ("bad_readout", "memory matrix  bias dot  algorithm gd(lr = 1)  readout newton(5)",
     "unknown optimizer readout 'newton'", "newton(", "identity or newton_schulz"),
    ("missing_bias", "memory matrix  algorithm gd(lr = 1)", "the optimizer has no 'bias'", None,
     "a `bias ...` line"),
    ("negative_lr", "memory matrix  bias dot  algorithm gd(lr = 1)  lr -1",
     "lr must be > 0", "-1", "a positive learning rate"),
]


@pytest.mark.parametrize("name,body,message,at,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_optimizer_declarations_are_located(name, body, message, at, expected):
    """`at`: the text the error points at (None: the whole declaration)."""
    text = LAYER + f"optimizer {{ {body} }}\n"
    column = 1 if at is None else len("optimizer { ") + body.index(at) + 1
    with pytest.raises(SpecError) as err:
        check(text, "bad.nl")
    first = err.value.diagnostics[0]
    assert message in first.message
    assert (first.span.file, first.span.line, first.span.column) == ("bad.nl", 16, column)
    assert expected in (first.expected or "")


def test_second_optimizer_is_an_error():
    text = LAYER + "optimizer { memory matrix  bias dot  algorithm gd(lr = 1) }\n" * 2
    with pytest.raises(SpecError, match="second optimizer declaration") as err:
        check(text, "bad.nl")
    assert err.value.diagnostics[0].span.line == 17
