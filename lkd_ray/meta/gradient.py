"""Meta-gradients of the quiz loss with respect to the loss networks, through k unrolled steps of
the student's own SGD (momentum, weight decay, current lr).

Two backends that must agree: `higher` (default) and a hand-rolled ``torch.func.functional_call``
version. Both are side-effect free: the real student's parameters, optimizer state and BatchNorm
buffers are untouched (buffers are restored; the virtual step works on copies).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..losses.methods import StudentOutputs

Objective = Callable[[StudentOutputs, "MetaBatch"], torch.Tensor]


@dataclass
class MetaBatch:
    """One training batch as the unroll needs it: inputs (images, or features for scope=head),
    labels and the frozen teacher's outputs."""
    inputs: torch.Tensor
    y: torch.Tensor
    t_logits: torch.Tensor
    t_feat: torch.Tensor | None = None

    def first(self, n: int | None) -> "MetaBatch":
        """The batch's first ``n`` samples (None or ≥ its size: the batch itself)."""
        if n is None or n >= len(self.y):
            return self
        return MetaBatch(self.inputs[:n], self.y[:n], self.t_logits[:n] if self.t_logits is not None else None,
                         None if self.t_feat is None else self.t_feat[:n])


@dataclass(frozen=True)
class SGDHyper:
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    @classmethod
    def from_optimizer(cls, opt: torch.optim.Optimizer) -> "SGDHyper":
        if not isinstance(opt, torch.optim.SGD):
            raise TypeError(f"the meta-step unrolls SGD (the KD recipes' optimizer); got {type(opt).__name__}")
        if len(opt.param_groups) != 1:
            raise ValueError("the meta-step expects one parameter group in the student optimizer")
        g = opt.param_groups[0]
        if g.get("maximize"):
            raise ValueError("SGD(maximize=True) is not supported by the unrolled step")
        return cls(float(g["lr"]), g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"])


def momentum_buffers(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> list[torch.Tensor | None]:
    return [opt.state.get(p, {}).get("momentum_buffer") for p in params]


@contextlib.contextmanager
def preserved_buffers(module: nn.Module):
    """Restore BatchNorm running statistics (and any other buffer) bit for bit on exit."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)


def _grads_or_zeros(loss: torch.Tensor, wrt: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    gs = torch.autograd.grad(loss, list(wrt), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(wrt, gs)]


def calibrated_scale(z: torch.Tensor, y: torch.Tensor, iters: int = 16) -> torch.Tensor:
    """β* = argmin_β CE(β·z, y) for detached logits z (CE(β·z) is convex in β): Newton steps from β = 1."""
    z = z.detach()
    beta = torch.ones((), dtype=z.dtype, device=z.device)
    zy = z.gather(1, y[:, None]).squeeze(1)
    for _ in range(iters):
        p = torch.softmax(beta * z, 1)
        mean = (p * z).sum(1)
        g = (mean - zy).mean()                          # d CE / d β
        h = ((p * z * z).sum(1) - mean**2).mean()       # d² CE / d β²  (a variance: ≥ 0)
        step = g / h.clamp_min(1e-12)
        beta = (beta - step).clamp(beta / 4, beta * 4).clamp_min(1e-3)
    return beta


def quiz_objective(logits: torch.Tensor, y: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    """The meta-objective on a quiz batch. ``calibrated``: CE at the batch's best temperature, held fixed
    while differentiating (envelope theorem: its derivative is the derivative of CE(β*·z) at β*), so
    making the student less confident earns nothing — only ranking the right class higher does."""
    z = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    if kind == "ce":
        return F.cross_entropy(z, y)
    if kind == "calibrated":
        return F.cross_entropy(calibrated_scale(z, y) * z, y)
    if kind == "error":
        return (z.argmax(1) != y).to(z.dtype).mean()
    raise ValueError(f"unknown quiz objective {kind!r}; valid: ce, calibrated, error")


def quiz_loss(out: StudentOutputs, y: torch.Tensor, kind: str = "ce") -> torch.Tensor:
    return quiz_objective(out.logits, y, kind)


def _unroll_higher(module, hyper, bufs, objective, batches, quiz_inputs, quiz_y, phi, quiz_kind="ce"):
    import higher

    params = [p for p in module.parameters() if p.requires_grad]
    mirror = torch.optim.SGD(params, lr=hyper.lr, momentum=hyper.momentum, dampening=hyper.dampening,
                             weight_decay=hyper.weight_decay, nesterov=hyper.nesterov)
    for p, b in zip(params, bufs):
        if b is not None and hyper.momentum:
            mirror.state[p]["momentum_buffer"] = b
    with higher.innerloop_ctx(module, mirror, copy_initial_weights=True, track_higher_grads=True) as (fmodel, diffopt):
        for batch in batches:
            diffopt.step(objective(fmodel(batch.inputs), batch))
        q = quiz_loss(fmodel(quiz_inputs), quiz_y, quiz_kind)
        return q.detach(), _grads_or_zeros(q, phi)


def _unroll_func(module, hyper, bufs, objective, batches, quiz_inputs, quiz_y, phi, quiz_kind="ce"):
    from torch.func import functional_call

    names = [n for n, p in module.named_parameters() if p.requires_grad]
    theta = [p.detach().clone().requires_grad_(True) for n, p in module.named_parameters() if p.requires_grad]
    frozen = {n: p for n, p in module.named_parameters() if not p.requires_grad}
    buffers = {n: b.clone() for n, b in module.named_buffers()}  # clones: the real BN stats stay put
    mom = [None if b is None else b.detach().clone() for b in bufs]
    h = hyper
    for batch in batches:
        out = functional_call(module, ({**dict(zip(names, theta)), **frozen}, buffers), (batch.inputs,))
        grads = torch.autograd.grad(objective(out, batch), theta, create_graph=True)
        new_theta, new_mom = [], []
        for p, g, m in zip(theta, grads, mom):
            d = g + h.weight_decay * p if h.weight_decay else g
            if h.momentum:
                m = d if m is None else h.momentum * m + (1 - h.dampening) * d
                d = d + h.momentum * m if h.nesterov else m
            new_theta.append(p - h.lr * d)
            new_mom.append(m)
        theta, mom = new_theta, new_mom
    out = functional_call(module, ({**dict(zip(names, theta)), **frozen}, buffers), (quiz_inputs,))
    q = quiz_loss(out, quiz_y, quiz_kind)
    return q.detach(), _grads_or_zeros(q, phi)


BACKENDS = {"higher": _unroll_higher, "torch.func": _unroll_func}


def meta_gradient(module: nn.Module, hyper: SGDHyper, momentum: Sequence[torch.Tensor | None],
                  objective: Objective, batches: Sequence[MetaBatch], quiz_inputs: torch.Tensor,
                  quiz_y: torch.Tensor, phi: Sequence[torch.Tensor], backend: str = "higher", quiz_kind: str = "ce"):
    """Return ``(quiz_loss_after_unroll, [dQ/dφ_i])`` for k = len(batches) virtual SGD steps of ``module``.

    ``momentum`` aligns with ``module``'s trainable parameters (None: no buffer yet, as for a
    snapshot start). ``module`` may be the full student bundle or its head view.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown meta backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if not batches:
        raise ValueError("meta_gradient needs at least one training batch to unroll")
    n_params = sum(1 for p in module.parameters() if p.requires_grad)
    if len(momentum) != n_params:
        raise ValueError(f"momentum buffers ({len(momentum)}) do not align with the module's {n_params} parameters")
    with preserved_buffers(module):
        return BACKENDS[backend](module, hyper, list(momentum), objective, list(batches), quiz_inputs, quiz_y, list(phi),
                                 quiz_kind)
