"""Hand-crafted distillation losses, each ``(z_s, z_t, y) -> scalar`` averaged over the batch.

KD (Hinton et al. 2015), DKD (Zhao et al., CVPR 2022), DIST (Huang et al., NeurIPS 2022), as their
reference implementations define them (τ² scaling included).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def ce(z_s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(z_s, y)


def kd(z_s: torch.Tensor, z_t: torch.Tensor, tau: float = 4.0) -> torch.Tensor:
    """τ² · KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), summed over classes, mean over the batch."""
    return F.kl_div(F.log_softmax(z_s / tau, 1), F.log_softmax(z_t / tau, 1), reduction="batchmean", log_target=True) * tau**2


def dkd(z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor, alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0) -> torch.Tensor:
    """Decoupled KD: α·TCKD (binary target vs rest) + β·NCKD (among non-target classes)."""
    gt = F.one_hot(y, z_s.shape[1]).to(z_s.dtype)
    p_s, p_t = F.softmax(z_s / tau, 1), F.softmax(z_t / tau, 1)
    b_s = torch.stack([(p_s * gt).sum(1), (p_s * (1 - gt)).sum(1)], 1)
    b_t = torch.stack([(p_t * gt).sum(1), (p_t * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(torch.log(b_s.clamp_min(1e-12)), b_t, reduction="batchmean") * tau**2
    log_q_s = F.log_softmax(z_s / tau - 1000.0 * gt, 1)
    q_t = F.softmax(z_t / tau - 1000.0 * gt, 1)
    nckd = F.kl_div(log_q_s, q_t, reduction="batchmean") * tau**2
    return alpha * tckd + beta * nckd


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


def feature_mse(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(f_s, f_t)
