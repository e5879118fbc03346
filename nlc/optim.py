"""`SpecOptimizer`: the outer optimizer a spec declares (`optimizer { ... }`, MATH.md §4.6), a
torch.optim.Optimizer built from its derived rule (`nlc.derive.optimizer`).

Each parameter W is viewed as rows [R, C] (a vector as one row; more axes flattened after the
first) with gradient G. Its memory θ has keys g_j (the rows of G) and values e_j (V = I). One step:

    θ <- retain(θ, -lr_m · dℓ/dθ)      gd on the bias ℓ(M_θ(G), I), through the retention's map
    W <- W - lr · readout(M_θ(I))       the memory read at the unit queries (θ itself for a matrix)

dot + decay(beta) + gd(lr = 1) on a matrix memory is heavy-ball momentum (torch.optim.SGD with
momentum = beta); l2 gives delta momentum θ (beta - lr_m G^T G) + lr_m G; an MLP memory is deep
momentum (DMGD); readout newton_schulz(T) on a momentum is Muon. m3 keeps a fast memory M1, a
second-moment memory V (dot rule on G ⊙ G) and a slow memory M2 that learns the sum of the last
`every` gradients once every `every` steps:
    W <- W - lr · (readout(M1) + alpha · readout(M2)) / (sqrt(V) + eps).
The readout acts on parameters with two or more axes; vectors step by the read itself.

State per parameter, all in `state_dict` (a resumed run continues bit for bit): the memory's tensors
('m' for a matrix memory; 'w0', 'w1', ... and 'b0', ... for an MLP, input layer first), and for m3
'm_slow', 'v', 'slow_sum' and the step count 'count'. An MLP memory starts with its hidden layers
drawn from a generator seeded by (seed, parameter index) and its last layer at zero (a zero read)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .derive.optimizer import OptimizerRule

ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}


def newton_schulz(X: torch.Tensor, steps: int) -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalization of one [R, C] matrix (MATH.md §1.4)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = X / X.norm().clamp_min(1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


class SpecOptimizer(torch.optim.Optimizer):
    """The spec's optimizer over `params` with outer learning rate `lr` (scheduled like AdamW's)."""

    def __init__(self, params, rule: OptimizerRule, lr: float = 1e-3, seed: int = 0):
        super().__init__(params, {"lr": lr})
        self.rule, self.seed = rule, seed
        opt = rule.optimizer
        self.memory, self.algorithm, self.readout = opt.memory, opt.algorithm, opt.readout

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                grad = p.grad.reshape(p.shape[0] if p.dim() > 1 else 1, -1)
                state = self.state[p]
                if not state:
                    self._start(state, grad, index)
                matrix = p.dim() > 1
                update = self._m3(state, grad, matrix) if self.algorithm.kind == "m3" else \
                    self._momentum(state, grad, matrix)
                p.add_(update.view_as(p), alpha=-group["lr"])
        return loss

    # ---- one memory ------------------------------------------------------------------------
    def _start(self, state: dict, grad: torch.Tensor, index: int) -> None:
        rows, cols = grad.shape
        zeros = lambda *shape: grad.new_zeros(shape)  # noqa: E731
        if self.algorithm.kind == "m3":
            state.update(m=zeros(rows, cols), m_slow=zeros(rows, cols), v=zeros(rows, cols),
                         slow_sum=zeros(rows, cols), count=0)
        elif self.memory.kind == "matrix":
            state["m"] = zeros(rows, cols)
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            hidden = max(1, int(self.memory.expand * cols))
            sizes = [cols] + [hidden] * (self.memory.depth - 1) + [rows]
            for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
                last = i == self.memory.depth - 1
                w = torch.randn(fan_out, fan_in, generator=generator, dtype=torch.float64) * fan_out ** -0.5
                state[f"w{i}"] = zeros(fan_out, fan_in) if last else w.to(grad)
                if self.memory.bias:
                    state[f"b{i}"] = zeros(fan_out)

    def _weights(self, state: dict) -> dict[str, torch.Tensor]:
        if self.memory.kind == "matrix":
            return {"m": state["m"]}
        return {k: t for k, t in state.items() if k[0] in "wb" and k[1:].isdigit()}

    def _mlp(self, weights: dict[str, torch.Tensor], keys: torch.Tensor) -> torch.Tensor:
        """M(k) for each row k of keys [N, C] -> [N, R]."""
        h = keys
        for i in range(self.memory.depth):
            h = h @ weights[f"w{i}"].T + (weights[f"b{i}"] if f"b{i}" in weights else 0)
            if i < self.memory.depth - 1:
                h = ACTIVATIONS[self.memory.act](h)
        return h

    def _learn(self, rule: OptimizerRule, weights: dict[str, torch.Tensor], keys: torch.Tensor,
               lr: float) -> None:
        """One gd step of the memory on its bias for keys [R, C] (values I), through the retention."""
        grads = self._memory_grad(rule, weights, keys)
        for name, tensor in weights.items():
            new = rule.retain(tensor, -lr * grads[name], lr)
            if rule.threshold is not None:
                new = torch.sign(new) * (new.abs() - rule.threshold(lr)).clamp_min(0)
            tensor.copy_(new)

    def _memory_grad(self, rule: OptimizerRule, weights, keys) -> dict[str, torch.Tensor]:
        """dℓ/dθ by the chain rule: dℓ/dY (derived) times the memory's Jacobian (outer product for a
        matrix, vjp for an MLP). Y [R keys, R values] is formed only when dℓ/dy depends on it."""
        values = torch.eye(keys.shape[0], dtype=keys.dtype, device=keys.device)
        if self.memory.kind == "matrix":
            if rule.coefficient is not None:
                return {"m": rule.coefficient * keys}  # c · V^T G with V = I
            return {"m": self._cotangent(rule, keys @ weights["m"].T, values).T @ keys}
        outputs, pullback = torch.func.vjp(lambda w: self._mlp(w, keys), weights)
        cotangent = (rule.coefficient * values if rule.coefficient is not None
                     else self._cotangent(rule, outputs, values))
        return pullback(cotangent)[0]

    @staticmethod
    def _cotangent(rule: OptimizerRule, outputs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        error = outputs - values
        norm = error.norm(dim=-1, keepdim=True)  # over the value axis, per key
        return torch.as_tensor(rule.output_grad(error, values, outputs, norm)).expand_as(outputs)

    def _read(self, weights: dict[str, torch.Tensor], matrix: bool) -> torch.Tensor:
        """The memory at the unit queries, mapped by the readout: [R, C]."""
        if self.memory.kind == "matrix":
            read = weights["m"]
        else:
            cols = weights["w0"].shape[1]
            read = self._mlp(weights, torch.eye(cols, dtype=weights["w0"].dtype,
                                                device=weights["w0"].device)).T
        if self.readout.kind == "newton_schulz" and matrix:
            return newton_schulz(read, int(self.readout.args["steps"]))
        return read

    # ---- algorithms ------------------------------------------------------------------------
    def _momentum(self, state: dict, grad: torch.Tensor, matrix: bool) -> torch.Tensor:
        weights = self._weights(state)
        self._learn(self.rule, weights, grad, self.rule.lr)
        return self._read(weights, matrix)

    def _m3(self, state: dict, grad: torch.Tensor, matrix: bool) -> torch.Tensor:
        args = self.algorithm.args
        state["count"] += 1
        self._learn(self.rule, {"m": state["m"]}, grad, args["beta1"])
        self._learn(self.rule.second_moment, {"m": state["v"]}, grad * grad, args["beta2"])
        state["slow_sum"].add_(grad)
        if state["count"] % args["every"] == 0:
            self._learn(self.rule, {"m": state["m_slow"]}, state["slow_sum"], args["beta3"])
            state["slow_sum"].zero_()
        fast, slow = self._read({"m": state["m"]}, matrix), self._read({"m": state["m_slow"]}, matrix)
        return (fast + args["alpha"] * slow) / (state["v"].sqrt() + args["eps"])
