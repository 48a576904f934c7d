"""The label term's rule: how the student's loss on the *given* label is formed, per sample, on any
distillation base (KD, DIST, DKD, WSL and the per-sample loss network). The noisy-label field's own rules,
each as its paper defines it, so a learned loss is compared with — and can start from — what practitioners
write by hand:

    plain       CE_i (with label smoothing ε)
    agree       1[argmax z_t,i = y_i] · CE_i                 CE only where the teacher agrees with the label
    agree_soft  p_t(y_i) · CE_i                              CE weighted by the teacher's probability of the label
    relabel     CE(z_s,i, argmax z_t,i)                      hard bootstrapping with the teacher: where the teacher's
                                                             top class differs from the label, learn the teacher's class
    gce         (1 − p_s(y_i)^q) / q                         generalised CE (Zhang & Sabuncu, NeurIPS 2018)
    sce         α·CE_i + β·RCE_i,  RCE_i = −Σ_k p_k·log max(1[k=y_i], 1e-4)   symmetric CE (Wang et al., ICCV 2019)
    boot_soft   −Σ_k (β·1[k=y_i] + (1 − β)·p_k)·log p_k      soft bootstrapping (Reed et al., 2015)
    boot_hard   −β·log p_y_i − (1 − β)·log p_argmax          hard bootstrapping (Reed et al., 2015; argmax not differentiated)
    small_loss  CE_i on the batch's (1 − r_e) lowest-CE samples, mean over those kept (Co-teaching's criterion,
                Han et al. 2018, one network); r_e = rate·min(1, e / ramp_epochs) at epoch e

Any rule can be scaled by ``loss.disagree_weight`` κ on the samples whose given label is not the teacher's top
class (κ·value there, the value elsewhere): κ = 0 on ``plain`` is ``agree``; κ < 1 on ``relabel`` trusts the
teacher's relabelling less than the labels it confirms — the per-sample weighting the learned residual found on
noisy-pair45-8k, written by hand so the learned loss is measured against it.

Every rule returns one value per sample whose batch mean is the term (``per_sample``); the per-sample loss
network weighs exactly these values, so at φ₀ it is the rule. Rules that read the teacher say so
(``needs_teacher``): the config refuses them on a method without a teacher.
"""
from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch.nn import functional as F

from ..config import LossCfg


class CERule:
    """The label term per sample: ``rule.per_sample(z_s, y, z_t, epoch) -> (N,)``; the term is its mean."""

    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False

    def __init__(self, cfg: LossCfg):
        self.cfg = cfg

    def per_sample(self, z_s: torch.Tensor, y: torch.Tensor, z_t: torch.Tensor | None = None, epoch: int = 0) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, z_s, y, z_t=None, epoch: int = 0) -> torch.Tensor:
        return self.per_sample(z_s, y, z_t, epoch).mean()

    def _teacher(self, z_t):
        if z_t is None:
            raise ValueError(f"loss.ce_rule={self.name!r} reads the teacher's logits; none were given")
        return z_t.detach()


CE_RULES: dict[str, type[CERule]] = {}


def register(cls: type[CERule]) -> type[CERule]:
    CE_RULES[cls.name] = cls
    return cls


def _ce(z_s, y, eps: float = 0.0):
    return F.cross_entropy(z_s, y, reduction="none", label_smoothing=eps)


@register
class Plain(CERule):
    name = "plain"

    def per_sample(self, z_s, y, z_t=None, epoch=0):
        return _ce(z_s, y, self.cfg.label_smoothing)


@register
class Agree(CERule):
    name = "agree"
    needs_teacher = True

    def per_sample(self, z_s, y, z_t=None, epoch=0):
        keep = (self._teacher(z_t).argmax(1) == y).to(z_s.dtype)
        return keep * _ce(z_s, y, self.cfg.label_smoothing)


@register
class AgreeSoft(CERule):
    name = "agree_soft"
    needs_teacher = True

    def per_sample(self, z_s, y, z_t=None, epoch=0):
        p_y = F.softmax(self._teacher(z_t).to(z_s.dtype), 1).gather(1, y[:, None]).squeeze(1)
        return p_y * _ce(z_s, y, self.cfg.label_smoothing)


@register
class Relabel(CERule):
    name = "relabel"
    needs_teacher = True

    def per_sample(self, z_s, y, z_t=None, epoch=0):
        return _ce(z_s, self._teacher(z_t).argmax(1), self.cfg.label_smoothing)


@register
class GCE(CERule):
    name = "gce"

    def per_sample(self, z_s, y, z_t=None, epoch=0):
        q = self.cfg.gce_q
        log_p_y = F.log_softmax(z_s, 1).gather(1, y[:, None]).squeeze(1)
        return (1 - torch.exp(q * log_p_y)) / q  # p^q in log space: finite for a confidently wrong student


@register
class SCE(CERule):
    name = "sce"
    RCE_LOG_ZERO: ClassVar[float] = math.log(1e-4)  # the paper's clamp of the one-hot label (A = log 1e-4)

    def per_sample(self, z_s, y, z_t=None, epoch=0):
        p = F.softmax(z_s, 1).clamp(min=1e-7, max=1.0)
        rce = -self.RCE_LOG_ZERO * (p.sum(1) - p.gather(1, y[:, None]).squeeze(1))  # −Σ_{k≠y} p_k·log 1e-4
        return self.cfg.sce_alpha * _ce(z_s, y) + self.cfg.sce_beta * rce


@register
class BootSoft(CERule):
    name = "boot_soft"

    def per_sample(self, z_s, y, z_t=None, epoch=0):
        b = self.cfg.boot_beta
        log_p = F.log_softmax(z_s, 1)
        target = b * F.one_hot(y, z_s.shape[1]).to(z_s.dtype) + (1 - b) * log_p.exp()
        return -(target * log_p).sum(1)


@register
class BootHard(CERule):
    name = "boot_hard"

    def per_sample(self, z_s, y, z_t=None, epoch=0):
        b = self.cfg.boot_beta
        log_p = F.log_softmax(z_s, 1)
        top = log_p.detach().argmax(1)
        return -(b * log_p.gather(1, y[:, None]).squeeze(1) + (1 - b) * log_p.gather(1, top[:, None]).squeeze(1))


@register
class SmallLoss(CERule):
    name = "small_loss"

    def rate(self, epoch: int) -> float:
        ramp = self.cfg.forget_ramp_epochs
        return self.cfg.forget_rate * (min(1.0, epoch / ramp) if ramp else 1.0)

    def per_sample(self, z_s, y, z_t=None, epoch=0):
        ce = _ce(z_s, y, self.cfg.label_smoothing)
        n = ce.shape[0]
        kept = n - int(round(self.rate(epoch) * n))
        kept = max(1, kept)
        order = ce.detach().argsort(stable=True)
        keep = torch.zeros_like(ce)
        keep[order[:kept]] = n / kept  # the batch mean of keep·CE is the mean CE over the kept samples
        return keep * ce


class DisagreeWeighted(CERule):
    """A rule scaled by ``loss.disagree_weight`` where the teacher's top class is not the given label."""

    needs_teacher = True

    def __init__(self, cfg: LossCfg, inner: CERule):
        super().__init__(cfg)
        self.inner = inner
        self.name = f"{inner.name}+disagree_weight"  # never 'plain': a loss network must call it, not its CE shortcut

    def per_sample(self, z_s, y, z_t=None, epoch=0):
        agree = self._teacher(z_t).argmax(1) == y
        w = torch.where(agree, z_s.new_ones(()), z_s.new_full((), self.cfg.disagree_weight))
        return w * self.inner.per_sample(z_s, y, z_t, epoch)


def build_ce_rule(cfg: LossCfg) -> CERule:
    if cfg.ce_rule not in CE_RULES:
        raise ValueError(f"unknown loss.ce_rule {cfg.ce_rule!r}; valid: {', '.join(CE_RULES)}")
    rule = CE_RULES[cfg.ce_rule](cfg)
    return rule if cfg.disagree_weight == 1 else DisagreeWeighted(cfg, rule)
