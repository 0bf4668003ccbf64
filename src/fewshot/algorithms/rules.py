"""Inner update rules: how one adaptation step turns gradients into new parameters.

A rule maps the adapted parameters phi_s, their support-loss gradients g_s, the support losses
L_s (one per task, for rules that read them, such as an LSTM meta-learner) and its own state to
phi_{s+1}. Every tensor has a leading task dimension (one copy per task); a rule's own
parameters (learned step sizes, say) have none and broadcast over tasks, so they are
meta-learned by the outer optimizer like the model's. Rules are `nn.Module`s: what they learn is
in the algorithm's `parameters()` and `state_dict()`.

A gradient that is None (a parameter the loss did not use) leaves its parameter unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fewshot.errors import ConfigError, require_positive

Params = dict[str, torch.Tensor]


class InnerRule(nn.Module):
    """Base class: `init_state` once per adaptation, then `forward` once per inner step."""

    def init_state(self, params: Params) -> Any:
        """The rule's state before the first step (e.g. Adam's moments); None if stateless."""
        return None

    def forward(
        self, params: Params, grads: Params, losses: torch.Tensor, state: Any, step: int
    ) -> tuple[Params, Any]:
        """phi_{s+1} and the next state from phi_s = `params`, g_s = `grads` and the support
        losses L_s = `losses` (shape (tasks,)) at step s = `step`."""
        raise NotImplementedError


class SGD(InnerRule):
    """phi_{s+1} = phi_s - alpha * g_s, one fixed step size alpha (MAML, ANIL, FOMAML)."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        require_positive(inner_lr=lr)
        self.lr = lr

    def forward(self, params, grads, losses, state, step):
        return {
            n: p if grads[n] is None else p - self.lr * grads[n] for n, p in params.items()
        }, state


class MomentumSGD(InnerRule):
    """SGD with momentum, dampening and weight decay, as `torch.optim.SGD` defines them:

        g'_s = g_s + lambda * phi_s,   b_0 = g'_0,   b_s = mu * b_{s-1} + (1 - tau) * g'_s,
        phi_{s+1} = phi_s - alpha * b_s.

    The fine-tuning of the transfer-learning baselines (Chen et al. 2019: alpha 0.01, mu 0.9,
    tau 0.9, lambda 0.001); with mu = lambda = 0 it is plain SGD.
    """

    def __init__(
        self, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        require_positive(lr=lr)
        for name, value in (
            ("momentum", momentum),
            ("dampening", dampening),
            ("weight_decay", weight_decay),
        ):
            if value < 0:
                raise ConfigError(f"`{name}` must be >= 0, got {value}.")
        self.lr, self.momentum = lr, momentum
        self.dampening, self.weight_decay = dampening, weight_decay

    def init_state(self, params):
        return {}  # the momentum buffers, created by the first step

    def forward(self, params, grads, losses, state, step):
        updated, buffers = {}, {}
        for n, p in params.items():
            g = grads[n]
            if g is None:
                updated[n] = p
                continue
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                previous = state.get(n)
                g = g if previous is None else (self.momentum * previous + (1 - self.dampening) * g)
                buffers[n] = g
            updated[n] = p - self.lr * g
        return updated, buffers


def _key(name: str) -> str:
    # nn.ParameterDict keys may not contain dots; parameter names do.
    return name.replace(".", "__")


def _rates(params: Params, make) -> nn.ParameterDict:
    """One learned tensor `make(p)` per parameter, keyed by its name."""
    keys = {_key(n) for n in params}
    if len(keys) < len(params):
        raise ValueError("parameter names collide once dots become '__'; rename a parameter")
    return nn.ParameterDict({_key(n): nn.Parameter(make(p.detach())) for n, p in params.items()})


class PerCoordinateSGD(InnerRule):
    """phi_{s+1} = phi_s - alpha ⊙ g_s with a learned step size for every coordinate (Meta-SGD).

    Args:
        params: the adapted parameters (name -> tensor, without task dimension): one step size
            of the same shape for each.
        lr: the initial value of every step size.
    """

    def __init__(self, params: Params, lr: float) -> None:
        super().__init__()
        require_positive(inner_lr=lr)
        self.rates = _rates(params, lambda p: torch.full_like(p, lr))

    def rate(self, name: str) -> torch.Tensor:
        return self.rates[_key(name)]

    def forward(self, params, grads, losses, state, step):
        return {
            n: p if grads[n] is None else p - self.rate(n) * grads[n] for n, p in params.items()
        }, state


class PerLayerPerStepSGD(InnerRule):
    """phi_{s+1} = phi_s - alpha_{l,s} * g_s with a learned step size for every parameter
    tensor l and every step s (MAML++'s LSLR, Antoniou et al. 2019). Steps past `steps`
    (adapting with more steps than in training) reuse the last step's sizes.

    Args:
        params: the adapted parameters (name -> tensor, without task dimension).
        steps: the number of inner steps with their own step sizes.
        lr: the initial value of every step size.
    """

    def __init__(self, params: Params, steps: int, lr: float) -> None:
        super().__init__()
        require_positive(inner_lr=lr, inner_steps=steps)
        self.steps = steps
        self.rates = _rates(params, lambda p: torch.full((steps,), lr, dtype=p.dtype))

    def rate(self, name: str, step: int) -> torch.Tensor:
        return self.rates[_key(name)][min(step, self.steps - 1)]

    def forward(self, params, grads, losses, state, step):
        return {
            n: p if grads[n] is None else p - self.rate(n, step) * grads[n]
            for n, p in params.items()
        }, state


class Adam(InnerRule):
    """Adam (Kingma & Ba 2015) as the inner optimizer, with fresh moments for every task:

        m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,
        phi <- phi - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps),  t = s + 1.

    Reptile (Nichol et al. 2018) adapts with it, with b1 = 0.
    """

    def __init__(
        self, lr: float, betas: tuple[float, float] = (0.0, 0.999), eps: float = 1e-8
    ) -> None:
        super().__init__()
        require_positive(inner_lr=lr)
        self.lr, self.betas, self.eps = lr, betas, eps

    def init_state(self, params):
        zeros = {n: torch.zeros_like(p) for n, p in params.items()}
        return zeros, dict(zeros)

    def forward(self, params, grads, losses, state, step):
        (b1, b2), t = self.betas, step + 1
        first, second = dict(state[0]), dict(state[1])
        new = {}
        for n, p in params.items():
            g = grads[n]
            if g is None:
                new[n] = p
                continue
            # torch.optim.Adam's arrangement of the same formula: fused ops, half as many
            # (Reptile's inner loop spends much of its time here), and m = g when b1 = 0.
            first[n] = g if b1 == 0 else torch.lerp(first[n], g, 1 - b1)
            second[n] = torch.addcmul(b2 * second[n], g, g, value=1 - b2)
            root = _sqrt_with_zero_gradient_at_zero(second[n]) / math.sqrt(1 - b2**t)
            new[n] = torch.addcdiv(p, first[n], root + self.eps, value=-self.lr / (1 - b1**t))
        return new, (first, second)


def _sqrt_with_zero_gradient_at_zero(v: torch.Tensor) -> torch.Tensor:
    """sqrt(v) for v >= 0 whose derivative at v = 0 is 0 instead of infinite.

    Where a coordinate's inner gradient is exactly zero (a dead ReLU), sqrt's infinite slope
    times the zero that reaches it would give NaN in a second-order meta-gradient; there the
    update does not depend on v, so 0 is the right derivative. Where nothing differentiates
    through v (first-order adaptation, Reptile), plain sqrt gives the same values with a
    quarter of the operations.
    """
    if not v.requires_grad:
        return v.sqrt()
    positive = v > 0
    return torch.where(positive, torch.where(positive, v, torch.ones_like(v)).sqrt(), 0.0)
