"""Implicit differentiation (Lorraine, Vicol & Duvenaud, AISTATS 2020): the hypergradient of the quiz
loss as if the student sat at a stationary point of its training loss, with the inverse Hessian
replaced by a Neumann series of K Hessian-vector products.

    dQ/dφ = −∇θQᵀ · H⁻¹ · ∂²L/∂θ∂φ,     H⁻¹ ≈ α Σ_{j=0..K} (I − αH)^j

No unrolled trajectory: it measures where the loss *moves the student's optimum*, not how one step
changes the quiz loss, so a pure rescaling of the loss (which moves no optimum) gets no
hypergradient at a stationary point — the shortcut that one-step unrolls reward.
Cost: one training and one quiz forward+backward, a double-backward per HVP (≈ 2 student passes
each) and one mixed partial: about 2K + 4 student forward+backward passes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .gradient import MetaBatch, SGDHyper, preserved_buffers, quiz_loss


def neumann_hypergradient(theta: Sequence[torch.Tensor], train_loss: Callable[[Sequence[torch.Tensor]], torch.Tensor],
                          quiz: Callable[[Sequence[torch.Tensor]], torch.Tensor], phi: Sequence[torch.Tensor],
                          steps: int, alpha: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(Q(θ), dQ/dφ)`` by implicit differentiation at θ with a K-term Neumann series.

    ``theta`` are leaves with ``requires_grad``; ``train_loss(θ)`` depends on φ (the loss networks),
    ``quiz(θ)`` does not. Exact (K → ∞, α < 2/λ_max) at a stationary point of ``train_loss``.
    """
    theta = list(theta)
    g_train = torch.autograd.grad(train_loss(theta), theta, create_graph=True)
    q = quiz(theta)
    v = [torch.zeros_like(t) if g is None else g.detach() for g, t in zip(torch.autograd.grad(q, theta, allow_unused=True), theta)]
    p = [x.clone() for x in v]
    for _ in range(steps):
        hv = torch.autograd.grad(g_train, theta, grad_outputs=v, retain_graph=True, allow_unused=True)
        v = [x - alpha * (torch.zeros_like(x) if h is None else h.detach()) for x, h in zip(v, hv)]
        p = [a + b for a, b in zip(p, v)]
    mixed = torch.autograd.grad(g_train, list(phi), grad_outputs=[-alpha * x for x in p], allow_unused=True)
    return q.detach(), [torch.zeros_like(f) if g is None else g.detach() for f, g in zip(phi, mixed)]


def implicit_gradient(module: nn.Module, hyper: SGDHyper, objective, batches: Sequence[MetaBatch], quiz_inputs: torch.Tensor,
                      quiz_y: torch.Tensor, phi: Sequence[torch.Tensor], steps: int, alpha: float | None = None,
                      quiz_kind: str = "ce"):
    """The trainer-facing form: θ is ``module``'s trainable parameters, the training loss is the
    student's objective on ``batches`` plus SGD's weight decay (½·wd·‖θ‖², whose gradient SGD adds).
    α defaults to ``neumann_step(hyper)``. Side-effect free: BatchNorm buffers are restored."""
    from torch.func import functional_call

    names = [n for n, p in module.named_parameters() if p.requires_grad]
    frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad}
    theta = [p.detach().clone().requires_grad_(True) for n, p in module.named_parameters() if p.requires_grad]

    def run(params, inputs):
        buffers = {n: b.clone() for n, b in module.named_buffers()}  # batch statistics never touch the real ones
        return functional_call(module, ({**dict(zip(names, params)), **frozen}, buffers), (inputs,))

    def train_loss(params):
        loss = sum(objective(run(params, b.inputs), b) for b in batches) / len(batches)
        if hyper.weight_decay:
            loss = loss + 0.5 * hyper.weight_decay * sum((t * t).sum() for t in params)
        return loss

    with preserved_buffers(module):
        return neumann_hypergradient(theta, train_loss, lambda params: quiz_loss(run(params, quiz_inputs), quiz_y, quiz_kind), phi,
                                     steps, neumann_step(hyper) if alpha is None else alpha)


def neumann_step(hyper: SGDHyper) -> float:
    """The series' step: lr/(1 + momentum). SGD with heavy-ball momentum β trains stably while lr·λ_max < 2(1 + β)
    (3.8 at β = 0.9), but the series needs α·λ_max < 2; this α meets it wherever the student's own training is
    stable (at α = lr it diverges for 2 < lr·λ_max < 3.8). Nesterov momentum: the same bound, the same step."""
    return hyper.lr / (1.0 + hyper.momentum)
