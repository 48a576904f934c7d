"""The student objective L_s = w_ce·CE + w_logit·ℓ_logit + w_feat·ℓ_feat for every method.

One code path for CE, KD, DKD, DIST and LKD, so each comparison is one flag on the same recipe.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LossCfg, LossNetCfg
from . import handcrafted
from .learnable import FeatureLossNet, LogitLossNet, LossNetworks


def _full(t: torch.Tensor) -> torch.Tensor:
    """Losses run in fp32 (or fp64 in gradchecks), never in bf16/fp16 autocast precision."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


@dataclass
class StudentOutputs:
    logits: torch.Tensor
    features: torch.Tensor | None = None  # connector output (teacher's shape), when w_feat > 0


class DistillObjective:
    """Callable ``(student_out, t_logits, t_feat, y, state, epoch) -> (total, {name: value})``."""

    def __init__(self, cfg: LossCfg, lossnets: LossNetworks | None = None):
        self.cfg = cfg
        self.lossnets = lossnets
        if cfg.method == "lkd" and (lossnets is None or lossnets.logit is None):
            raise ValueError("method 'lkd' needs a logit loss network")

    @property
    def uses_features(self) -> bool:
        return self.cfg.w_feat > 0

    def __call__(self, out: StudentOutputs, t_logits: torch.Tensor, t_feat: torch.Tensor | None,
                 y: torch.Tensor, state: torch.Tensor | None = None, epoch: int = 0):
        c = self.cfg
        z_s = _full(out.logits)
        z_t = _full(t_logits) if t_logits is not None else None
        parts: dict[str, torch.Tensor] = {}
        if c.w_ce:
            parts["ce"] = c.w_ce * handcrafted.ce(z_s, y)
        if c.method != "ce" and c.w_logit:
            if c.method == "kd":
                term = handcrafted.kd(z_s, z_t, c.tau)
            elif c.method == "dkd":
                warm = min(1.0, (epoch + 1) / c.dkd_warmup_epochs) if c.dkd_warmup_epochs else 1.0
                term = warm * handcrafted.dkd(z_s, z_t, y, c.dkd_alpha, c.dkd_beta, c.tau)
            elif c.method == "dist":
                term = handcrafted.dist(z_s, z_t, c.dist_beta, c.dist_gamma, c.tau)
            else:
                term = self.lossnets.logit(z_s, z_t, y, state)
            parts[c.method] = c.w_logit * term
        if self.uses_features:
            if out.features is None or t_feat is None:
                raise ValueError("w_feat > 0 needs student connector features and teacher features")
            f_s, f_t = _full(out.features), _full(t_feat)
            if c.method == "lkd" and self.lossnets.feature is not None:
                parts["feat"] = c.w_feat * self.lossnets.feature(f_s, f_t, state)
            else:
                parts["feat"] = c.w_feat * handcrafted.feature_mse(f_s, f_t)
        total = sum(parts.values()) if parts else z_s.sum() * 0
        return total, parts


def build_lossnets(loss: LossCfg, net: LossNetCfg, seed: int = 0) -> LossNetworks | None:
    """The learnable networks for method 'lkd' (None for hand-crafted methods).

    Initialised from their own seeded RNG, so every process that builds them (the single-process
    trainer, each Ray worker, the LossNetServer) starts from the same φ without sharing state.
    """
    if loss.method != "lkd":
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logit = LogitLossNet(net.inputs, net.hidden, net.activation, net.base, loss.tau, net.state_inputs,
                             loss.dist_beta, loss.dist_gamma)
        feature = FeatureLossNet(net.feature_hidden, net.activation, net.state_inputs) if loss.w_feat > 0 else None
    return LossNetworks(logit, feature)
