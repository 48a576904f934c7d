"""Distillation methods by name. Each one turns the student's outputs, the frozen teacher's and the
labels into a dict of named loss terms (mdistiller's ``Distiller`` shape); the student minimises
their sum. One registry, so a new method is one class here, not an if/elif in every module.

    L_s = w_ce·CE(z_s, y) + w_logit·ℓ_logit(z_s, z_t, y) + w_feat·ℓ_feat(F_s, F_t)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..config import LossCfg, LossNetCfg
from . import handcrafted
from .ce_rules import build_ce_rule
from .learnable import FeatureLossNet, KDWeight, LogitLossNet, LossNetworks, SampleLossNet


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    """Losses run in fp32 (or fp64 in gradchecks), never in bf16/fp16 autocast precision."""
    return t.float() if t is not None and t.dtype in (torch.bfloat16, torch.float16) else t


@dataclass
class StudentOutputs:
    logits: torch.Tensor
    features: torch.Tensor | None = None  # connector output (teacher's shape), when w_feat > 0


@dataclass(frozen=True)
class TeacherOutputs:
    logits: torch.Tensor | None
    features: torch.Tensor | None = None


class Method:
    """A distillation method: ``method(student_out, teacher_out, y, state, epoch) -> (total, {name: term})``."""

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = True
    learnable: ClassVar[bool] = False  # owns loss networks that the meta-step trains

    def __init__(self, cfg: LossCfg, lossnets: LossNetworks | None = None):
        self.cfg = cfg
        self.lossnets = lossnets
        self.ce_rule = build_ce_rule(cfg)

    @property
    def owns_ce(self) -> bool:
        """True when the logit term carries the CE term itself (a per-sample loss network weighs both)."""
        return False

    @property
    def uses_features(self) -> bool:
        return self.cfg.w_feat > 0

    def logit_term(self, z_s, z_t, y, state, epoch) -> torch.Tensor | None:
        return None

    def ramp(self, epoch: int) -> tuple[float, float]:
        """(weight factor, temperature factor) at ``epoch`` of ``loss.ramp_epochs``' linear ramp: 1 at epoch 0, the
        configured end factors from epoch ``ramp_epochs`` on; (1, 1) without a ramp."""
        c = self.cfg
        if not c.ramp_epochs:
            return 1.0, 1.0
        f = min(1.0, epoch / c.ramp_epochs)
        return 1.0 + (c.ramp_weight - 1.0) * f, 1.0 + (c.ramp_tau - 1.0) * f

    def feature_term(self, f_s, f_t, state) -> torch.Tensor:
        return handcrafted.feature_mse(f_s, f_t)

    def __call__(self, out: StudentOutputs, teacher: TeacherOutputs | None, y: torch.Tensor,
                 state: torch.Tensor | None = None, epoch: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        z_s = _full(out.logits)
        parts: dict[str, torch.Tensor] = {}
        if c.w_ce and not self.owns_ce:
            w_ce = c.w_ce * self.ramp(epoch)[0]  # ×1.0 without a ramp: exact
            # plain CE: the library's mean-reduced CE, which the records before the rules ran exactly
            if c.ce_rule == "plain" and c.disagree_weight == 1:
                parts["ce"] = w_ce * handcrafted.ce(z_s, y, c.label_smoothing)
            else:
                z_t = _full(teacher.logits) if teacher is not None else None
                parts["ce"] = w_ce * self.ce_rule(z_s, y, z_t, epoch)
        if self.needs_teacher and (c.w_logit or self.owns_ce):
            if teacher is None or teacher.logits is None:
                raise ValueError(f"method {self.name!r} distils from the teacher's logits; none were given")
            term = self.logit_term(z_s, _full(teacher.logits), y, state, epoch)
            if term is not None:
                parts[self.name] = term if self.owns_ce else c.w_logit * term
        if self.uses_features:
            if out.features is None or teacher is None or teacher.features is None:
                raise ValueError("w_feat > 0 needs student connector features and teacher features")
            parts["feat"] = c.w_feat * self.feature_term(_full(out.features), _full(teacher.features), state)
        total = sum(parts.values()) if parts else z_s.sum() * 0
        return total, parts


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


@register
class CE(Method):
    name = "ce"
    needs_teacher = False


@register
class KD(Method):
    name = "kd"

    def logit_term(self, z_s, z_t, y, state, epoch):
        w, t = self.ramp(epoch)  # (1, 1) without a ramp: exact
        return w * handcrafted.kd(z_s, z_t, self.cfg.tau * t)


@register
class DKD(Method):
    name = "dkd"

    def logit_term(self, z_s, z_t, y, state, epoch):
        c = self.cfg
        warm = min(1.0, (epoch + 1) / c.dkd_warmup_epochs) if c.dkd_warmup_epochs else 1.0
        return warm * handcrafted.dkd(z_s, z_t, y, c.dkd_alpha, c.dkd_beta, c.tau)


@register
class DIST(Method):
    name = "dist"

    def logit_term(self, z_s, z_t, y, state, epoch):
        c = self.cfg
        if c.ramp_epochs:  # the inter-class term ramps (weight and τ); the intra-class term, a batch statistic, stays
            w, t = self.ramp(epoch)
            return (c.dist_beta * w * handcrafted.dist_inter_per_sample(z_s, z_t, c.tau * t).mean()
                    + c.dist_gamma * handcrafted.dist_intra(z_s, z_t, c.tau))
        return handcrafted.dist(z_s, z_t, c.dist_beta, c.dist_gamma, c.tau)


@register
class WSL(Method):
    name = "wsl"

    def logit_term(self, z_s, z_t, y, state, epoch):
        return handcrafted.wsl(z_s, z_t, y, self.cfg.tau)


@register
class LKD(Method):
    """The learned logit loss ℓ_φ (and, with w_feat > 0, the learned feature loss ℓ_ψ)."""

    name = "lkd"
    learnable = True

    def __init__(self, cfg: LossCfg, lossnets: LossNetworks | None = None):
        super().__init__(cfg, lossnets)
        if lossnets is None or lossnets.logit is None:
            raise ValueError(f"method {self.name!r} needs its loss networks (build_lossnets)")

    @property
    def owns_ce(self) -> bool:
        return bool(getattr(self.lossnets.logit, "owns_ce", False))

    def logit_term(self, z_s, z_t, y, state, epoch):
        if isinstance(self.lossnets.logit, SampleLossNet):  # its label rule may change over training (small_loss)
            return self.lossnets.logit(z_s, z_t, y, state, epoch=epoch)
        return self.lossnets.logit(z_s, z_t, y, state)

    def feature_term(self, f_s, f_t, state):
        if self.lossnets.feature is not None:
            return self.lossnets.feature(f_s, f_t, state)
        return super().feature_term(f_s, f_t, state)


@register
class Control(LKD):
    """KD with one meta-learned weight: the control that tells a learned loss from a learned step size."""

    name = "control"


def build_method(cfg: LossCfg, lossnets: LossNetworks | None = None) -> Method:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; valid: {', '.join(METHODS)}")
    return METHODS[cfg.method](cfg, lossnets)


def build_lossnets(loss: LossCfg, net: LossNetCfg, seed: int = 0) -> LossNetworks | None:
    """The learnable networks of a learnable method (None for hand-crafted ones).

    Initialised from their own seeded RNG, so every process that builds them (the single-process
    trainer, each Ray worker, the LossNetServer) starts from the same φ without sharing state.
    """
    cls = METHODS.get(loss.method)
    if cls is None or not cls.learnable:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if loss.method == "control":
            return LossNetworks(KDWeight(loss.tau), None)
        if net.kind == "sample":
            logit = SampleLossNet(net.sample_inputs, net.sample_outputs, net.hidden, net.activation, loss.tau, loss.w_ce,
                                  loss.w_logit, loss.label_smoothing, net.state_inputs, net.lock, net.trust, net.lock_scope,
                                  net.base, loss.dist_beta, loss.dist_gamma, build_ce_rule(loss))
        else:
            logit = LogitLossNet(net.inputs, net.hidden, net.activation, net.base, loss.tau, net.state_inputs,
                                 loss.dist_beta, loss.dist_gamma, net.lock, net.trust, net.lock_scope)
        feature = FeatureLossNet(net.feature_hidden, net.activation, net.state_inputs) if loss.w_feat > 0 else None
    return LossNetworks(logit, feature)
