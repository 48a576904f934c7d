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
    """ℓ_φ(z_s, z_t, y) = base(z_s, z_t) + τ²·mean_i Σ_c g_φ(v_ic)."""

    def __init__(self, inputs: Sequence[str] = ("log_ps", "log_pt", "ps", "pt", "onehot"),
                 hidden: Sequence[int] = (32, 32), activation: str = "silu", base: str = "kd",
                 tau: float = 4.0, state_inputs: bool = False, dist_beta: float = 1.0, dist_gamma: float = 1.0):
        super().__init__()
        self.inputs, self.base, self.tau, self.state_inputs = list(inputs), base, float(tau), state_inputs
        self.dist_beta, self.dist_gamma = dist_beta, dist_gamma
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
        return self.base_loss(z_s, z_t, y) + self.residual(z_s, z_t, y, state)


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

    def __init__(self, logit: LogitLossNet | None, feature: FeatureLossNet | None):
        super().__init__()
        self.logit = logit
        self.feature = feature
