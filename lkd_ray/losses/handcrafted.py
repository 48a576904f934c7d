"""Hand-crafted distillation losses, each ``(z_s, z_t, y) -> scalar`` averaged over the batch.

KD (Hinton et al. 2015), DKD (Zhao et al., CVPR 2022), DIST (Huang et al., NeurIPS 2022), WSL (Zhou et
al., ICLR 2021), as their reference implementations define them (τ² scaling included).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def ce(z_s: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(z_s, y, label_smoothing=label_smoothing)


def kd(z_s: torch.Tensor, z_t: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), summed over classes, mean over the batch."""
    return F.kl_div(F.log_softmax(z_s / tau, 1), F.log_softmax(z_t / tau, 1), reduction="batchmean", log_target=True) * tau**2


def dkd(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0) -> torch.Tensor:
    """Decoupled KD: α·TCKD (binary target vs rest) + β·NCKD (among non-target classes).

    Everything is computed in log space (logsumexp over the target / non-target classes), so a
    confidently wrong student at τ = 1 still gets a finite loss *and* a gradient: a clamped
    probability would cap TCKD and zero its gradient once the logit gap passes ~35 (float32).
    """
    gt = F.one_hot(y, z_s.shape[1]).bool()
    s, t = z_s / tau, z_t / tau
    neg_inf = torch.finfo(s.dtype).min

    def binary_log_probs(z):  # log [p_target, 1 − p_target]
        lse = torch.logsumexp(z, 1)
        log_target = z.gather(1, y[:, None]).squeeze(1) - lse
        log_rest = torch.logsumexp(z.masked_fill(gt, neg_inf), 1) - lse
        return torch.stack([log_target, log_rest], 1)

    tckd = F.kl_div(binary_log_probs(s), binary_log_probs(t), reduction="batchmean", log_target=True) * tau**2
    log_q_s = F.log_softmax(s.masked_fill(gt, neg_inf), 1)  # non-target distributions; the target entry is masked out
    log_q_t = F.log_softmax(t.masked_fill(gt, neg_inf), 1)
    nckd = torch.where(gt, torch.zeros_like(log_q_t), log_q_t.exp() * (log_q_t - log_q_s)).sum(1).mean() * tau**2
    return alpha * tckd + beta * nckd


def wsl(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """Weighted soft labels: τ²·mean_i w_i·KL_i(τ), w_i = 1 − exp(−CE_s,i / CE_t,i) on detached logits (τ = 1).
    A sample the teacher fits better than the student gets weight near 1; one where the teacher is worse than
    the student (often a mislabelled or teacher-confused sample), near 0."""
    with torch.no_grad():
        ce_s = F.cross_entropy(z_s.detach(), y, reduction="none")
        ce_t = F.cross_entropy(z_t, y, reduction="none")
        w = 1 - torch.exp(-(ce_s / (ce_t + 1e-7)).clamp_min(0))
    log_s, log_t = F.log_softmax(z_s / tau, 1), F.log_softmax(z_t / tau, 1)
    return (w * (log_t.exp() * (log_t - log_s)).sum(1)).mean() * tau**2


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return F.cosine_similarity(a, b, dim=1, eps=eps)


def dist(z_s: torch.Tensor, z_t: torch.Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> torch.Tensor:
    """DIST: τ²·(β·(1 − mean inter-class Pearson) + γ·(1 − mean intra-class Pearson))."""
    p_s, p_t = F.softmax(z_s / tau, 1), F.softmax(z_t / tau, 1)
    inter = 1 - _pearson_rows(p_s, p_t).mean()
    intra = 1 - _pearson_rows(p_s.t(), p_t.t()).mean()
    return tau**2 * (beta * inter + gamma * intra)


def dist_inter_per_sample(z_s: torch.Tensor, z_t: torch.Tensor, tau: torch.Tensor | float = 1.0) -> torch.Tensor:
    """DIST's inter-class term per sample, τ_i²·(1 − Pearson(p_s,i, p_t,i)) at τ_i (a number or one per sample):
    the part of DIST a per-sample weight can act on (the intra-class term is a statistic of the whole batch)."""
    t = tau if isinstance(tau, (int, float)) else tau[:, None]
    p_s, p_t = F.softmax(z_s / t, 1), F.softmax(z_t / t, 1)
    return (1 - _pearson_rows(p_s, p_t)) * (t**2 if isinstance(tau, (int, float)) else tau**2)


def dist_intra(z_s: torch.Tensor, z_t: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """DIST's intra-class term, τ²·(1 − mean over classes of the Pearson correlation across the batch)."""
    p_s, p_t = F.softmax(z_s / tau, 1), F.softmax(z_t / tau, 1)
    return tau**2 * (1 - _pearson_rows(p_s.t(), p_t.t()).mean())


def feature_mse(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(f_s, f_t)
