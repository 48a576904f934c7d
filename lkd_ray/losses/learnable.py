"""Learnable loss networks (DESIGN §1): residuals on a hand-crafted base with a zero-initialised
last layer, so at step 0 LKD *is* the base loss and moves only where the quiz loss asks.

The logit network is *generic*: one small MLP shared across classes, applied per (sample, class),
so the same network serves 10 or 1000 classes. Activations are smooth because the meta-gradient
differentiates through the network's input-gradient.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import handcrafted

ACTIVATIONS = {"silu": nn.SiLU, "softplus": nn.Softplus, "gelu": nn.GELU, "tanh": nn.Tanh}
STATE_DIM = 2  # (fraction of training done, running quiz accuracy)
LOCKS = ("none", "norm", "nontarget")


def _mlp(in_dim: int, hidden: Sequence[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), ACTIVATIONS[activation]()]
        in_dim = h
    # No bias: a constant added to the loss has no effect on the student, so it would get no meta-gradient.
    last = nn.Linear(in_dim, 1, bias=False)
    nn.init.zeros_(last.weight)
    layers.append(last)
    return nn.Sequential(*layers)


def _with_state(v: torch.Tensor, state: torch.Tensor | None, use_state: bool) -> torch.Tensor:
    if not use_state:
        return v
    if state is None:
        state = v.new_zeros(STATE_DIM)
    return torch.cat([v, state.to(v.dtype).expand(*v.shape[:-1], STATE_DIM)], -1)


class LogitLossNet(nn.Module):
    """ℓ_φ(z_s, z_t, y) = base(z_s, z_t) + τ²·mean_i Σ_c g_φ(v_ic), optionally scale-locked.

    With ``lock`` set, φ may turn the gradient the student receives (w.r.t. its logits) but not
    change its size: the residual's gradient r is bounded to ‖r‖ ≤ trust·‖∇base‖ (a cone around the
    base gradient), added to the base gradient and the sum rescaled to the base gradient's norm
    (``norm``), or only the non-target components are reshaped that way while the target-logit
    component stays the base loss's (``nontarget``). The locked loss is written as
    ``base(z) + Σ W(φ)⊙(z − sg(z))`` with ``W = ĝ − ∇base`` evaluated at sg(z): its value is the
    base loss, its gradient is exactly the locked gradient ĝ, and its dependence on φ is exact, so a
    one-step unroll differentiates it exactly. (Longer unrolls and the implicit estimator see
    ∇base's curvature only, not the lock's — the locked field is not the gradient of any loss.)
    """

    def __init__(self, inputs: Sequence[str] = ("log_ps", "log_pt", "ps", "pt", "onehot"),
                 hidden: Sequence[int] = (32, 32), activation: str = "silu", base: str = "kd",
                 tau: float = 4.0, state_inputs: bool = False, dist_beta: float = 1.0, dist_gamma: float = 1.0,
                 lock: str = "none", trust: float | None = None):
        super().__init__()
        if lock not in LOCKS:
            raise ValueError(f"unknown lock {lock!r}; valid: {', '.join(LOCKS)}")
        if lock != "none" and base == "none":
            raise ValueError("a scale lock keeps the base loss's gradient norm: it needs lossnet.base kd or dist, not none")
        self.inputs, self.base, self.tau, self.state_inputs = list(inputs), base, float(tau), state_inputs
        self.dist_beta, self.dist_gamma = dist_beta, dist_gamma
        self.lock, self.trust = lock, trust
        self.g = _mlp(len(self.inputs) + (STATE_DIM if state_inputs else 0), hidden, activation)

    def features(self, z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-(sample, class) input vectors, shape (N, C, len(inputs))."""
        log_ps, log_pt = F.log_softmax(z_s / self.tau, 1), F.log_softmax(z_t / self.tau, 1)
        cols = {
            "log_ps": lambda: log_ps, "log_pt": lambda: log_pt,
            "ps": lambda: log_ps.exp(), "pt": lambda: log_pt.exp(),
            "onehot": lambda: F.one_hot(y, z_s.shape[1]).to(z_s.dtype),
            "log_ratio": lambda: log_ps - log_pt,
        }
        return torch.stack([cols[k]() for k in self.inputs], -1)

    def base_loss(self, z_s, z_t, y):
        if self.base == "kd":
            return handcrafted.kd(z_s, z_t, self.tau)
        if self.base == "dist":
            return handcrafted.dist(z_s, z_t, self.dist_beta, self.dist_gamma, self.tau)
        return z_s.new_zeros(())

    def residual(self, z_s, z_t, y, state=None) -> torch.Tensor:
        v = _with_state(self.features(z_s, z_t, y), state, self.state_inputs)
        return self.tau**2 * self.g(v).squeeze(-1).sum(1).mean()

    def forward(self, z_s, z_t, y, state: torch.Tensor | None = None) -> torch.Tensor:
        if self.lock == "none":
            return self.base_loss(z_s, z_t, y) + self.residual(z_s, z_t, y, state)
        if not torch.is_grad_enabled():  # the locked loss's value is the base loss's; only its gradient differs
            return self.base_loss(z_s, z_t, y)
        return self.base_loss(z_s, z_t, y) + (self.locked_gradient_offset(z_s, z_t, y, state) * (z_s - z_s.detach())).sum()

    def locked_gradient_offset(self, z_s, z_t, y, state=None) -> torch.Tensor:
        """W = ĝ − ∇base at sg(z_s): what the lock adds to the base loss's logit gradient (differentiable in φ)."""
        z = z_s.detach().requires_grad_(True)
        with torch.enable_grad():
            g_b = torch.autograd.grad(self.base_loss(z, z_t, y), z)[0]
            r = torch.autograd.grad(self.residual(z, z_t, y, state), z, create_graph=True)[0]
        mask = (1 - F.one_hot(y, z.shape[1]).to(z.dtype)) if self.lock == "nontarget" else torch.ones_like(z)
        return locked_direction(g_b * mask, r * mask, self.trust) - g_b * mask


def locked_direction(g_base: torch.Tensor, r: torch.Tensor, trust: float | None, eps: float = 1e-12) -> torch.Tensor:
    """(g_base + s·r)·‖g_base‖/‖g_base + s·r‖ with s = min(1, trust·‖g_base‖/‖r‖): the base gradient
    turned by at most asin(trust) towards r, at the base gradient's norm (norms over the whole batch)."""
    nb = torch.linalg.vector_norm(g_base)
    if trust is not None:
        nr = torch.linalg.vector_norm(r)
        s = torch.where(nr > trust * nb, trust * nb / nr.clamp_min(eps), torch.ones_like(nr))
        r = r * s
    d = g_base + r
    return d * (nb / torch.linalg.vector_norm(d).clamp_min(eps))


class KDWeight(nn.Module):
    """The scalar control: w·KD with w = exp(s) meta-learned, s₀ = 0 (so it starts as KD)."""

    state_inputs = False

    def __init__(self, tau: float = 4.0):
        super().__init__()
        self.tau = float(tau)
        self.log_w = nn.Parameter(torch.zeros(()))

    @property
    def weight(self) -> float:
        return float(self.log_w.detach().exp())

    def forward(self, z_s, z_t, y, state: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_w.exp().to(z_s.dtype) * handcrafted.kd(z_s, z_t, self.tau)


class Connector(nn.Module):
    """1×1 conv + BN mapping student features to the teacher's channels and spatial size.

    Trained with the student (it lives in the student's optimizer), as FitNets-style hints are.
    """

    def __init__(self, c_s: int, c_t: int):
        super().__init__()
        self.conv = nn.Conv2d(c_s, c_t, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_t)

    def forward(self, f_s: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(f_s.shape[-2:]) != tuple(size):
            f_s = F.adaptive_avg_pool2d(f_s, size)
        return self.bn(self.conv(f_s))


class FeatureLossNet(nn.Module):
    """ℓ_ψ(f̂_s, f_t) = MSE(f̂_s, f_t) + mean over elements of h_ψ([f̂_s, f_t, f̂_s − f_t])."""

    def __init__(self, hidden: Sequence[int] = (16,), activation: str = "silu", state_inputs: bool = False):
        super().__init__()
        self.state_inputs = state_inputs
        self.h = _mlp(3 + (STATE_DIM if state_inputs else 0), hidden, activation)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        if f_s.shape != f_t.shape:
            raise ValueError(f"feature loss needs equal shapes after the connector: student {tuple(f_s.shape)} vs teacher {tuple(f_t.shape)}")
        v = _with_state(torch.stack([f_s, f_t, f_s - f_t], -1), state, self.state_inputs)
        return F.mse_loss(f_s, f_t) + self.h(v).mean()


class LossNetworks(nn.Module):
    """φ and ψ together: the parameters the meta-optimizer owns (and the Ray LossNetServer serves)."""

    def __init__(self, logit: LogitLossNet | KDWeight | None, feature: FeatureLossNet | None):
        super().__init__()
        self.logit = logit
        self.feature = feature

    def es_parameters(self, which: str = "last") -> list[nn.Parameter]:
        """What evolution strategies perturb: every entry, or only each network's last layer (far fewer
        numbers, so far less variance; the last layer is also what starts at zero)."""
        if which == "all":
            return list(self.parameters())
        out: list[nn.Parameter] = []
        for net in (self.logit, self.feature):
            if isinstance(net, KDWeight):
                out.append(net.log_w)
            elif net is not None:
                out.append((net.g if isinstance(net, LogitLossNet) else net.h)[-1].weight)
        return out
