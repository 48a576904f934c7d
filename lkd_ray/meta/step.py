"""The meta-step: pick the unroll's starting point (current student or an earlier snapshot) and
scope, compute the meta-gradient, and — locally — apply it with Adam, clipped, finite-checked."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..config import MetaCfg
from ..losses.objective import DistillObjective
from .bundle import StudentBundle
from .gradient import MetaBatch, SGDHyper, meta_gradient, momentum_buffers, preserved_buffers


class NonFiniteMetaGradient(ValueError):
    pass


def check_and_clip(grads: Sequence[torch.Tensor], clip_norm: float) -> tuple[list[torch.Tensor], float]:
    """Reject a non-finite meta-gradient (never applied); otherwise clip its global norm."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()
    if not math.isfinite(norm):
        raise NonFiniteMetaGradient(f"meta-gradient has non-finite values (norm={norm}); rejected, not applied")
    scale = min(1.0, clip_norm / (norm + 1e-12))
    return [g * scale for g in grads], norm


@dataclass
class MetaCounters:
    version: int = 0
    accepted: int = 0
    rejected_nonfinite: int = 0
    from_snapshot: int = 0
    last_norm: float = 0.0
    last_quiz_loss: float = float("nan")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def set_meta_lr(adam: torch.optim.Optimizer, lr: float) -> None:
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"meta learning rate must be finite and ≥ 0, got {lr}")
    for g in adam.param_groups:
        g["lr"] = lr


class MetaOptimizer:
    """Adam on φ, ψ owned in-process (the single-process trainer; Ray swaps in its LossNetServer)."""

    def __init__(self, lossnets: nn.Module, lr: float, clip_norm: float):
        self.lossnets = lossnets
        self.params = [p for p in lossnets.parameters()]
        self.adam = torch.optim.Adam(self.params, lr=lr)
        self.lr = lr
        self.clip_norm = clip_norm
        self.counters = MetaCounters()

    def apply(self, grads: Sequence[torch.Tensor], lr_scale: float = 1.0) -> bool:
        try:
            clipped, norm = check_and_clip(grads, self.clip_norm)
        except NonFiniteMetaGradient:
            self.counters.rejected_nonfinite += 1
            return False
        for p, g in zip(self.params, clipped):
            p.grad = g.to(p.dtype)
        set_meta_lr(self.adam, self.lr * lr_scale)
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)
        self.counters.version += 1
        self.counters.accepted += 1
        self.counters.last_norm = norm
        return True

    def state_dict(self) -> dict:
        return {"lossnets": self.lossnets.state_dict(), "adam": self.adam.state_dict(), "counters": self.counters.as_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.lossnets.load_state_dict(sd["lossnets"])
        self.adam.load_state_dict(sd["adam"])
        self.counters = MetaCounters(**sd["counters"])


@dataclass
class MetaStep:
    """Computes meta-gradients for one student; holds a scratch copy for snapshot starts."""

    cfg: MetaCfg
    objective: DistillObjective
    lossnets: nn.Module
    _scratch: StudentBundle | None = field(default=None, repr=False)

    @property
    def phi(self) -> list[nn.Parameter]:
        return list(self.lossnets.parameters())

    def compute(self, bundle: StudentBundle, optimizer: torch.optim.Optimizer, batches: Sequence[MetaBatch],
                quiz_x: torch.Tensor, quiz_y: torch.Tensor, state: torch.Tensor | None = None, epoch: int = 0,
                start_state: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``batches`` carry images; for scope=head they are turned into detached features here."""
        hyper = SGDHyper.from_optimizer(optimizer)
        src = bundle
        if start_state is not None:
            if self._scratch is None:
                self._scratch = copy.deepcopy(bundle)
            self._scratch.load_state_dict(start_state)
            self._scratch.train(bundle.training)
            src = self._scratch
        if self.cfg.scope == "head":
            with torch.no_grad(), preserved_buffers(src):
                batches = [MetaBatch(src.net.forward_features(b.inputs), b.y, b.t_logits, b.t_feat) for b in batches]
                quiz_x = src.net.forward_features(quiz_x)
            module: nn.Module = src.head_view()
        else:
            module = src
        params = [p for p in module.parameters() if p.requires_grad]
        bufs = [None] * len(params) if start_state is not None else momentum_buffers(optimizer, params)

        def obj(out, b: MetaBatch) -> torch.Tensor:
            return self.objective(out, b.t_logits, b.t_feat, b.y, state, epoch)[0]

        return meta_gradient(module, hyper, bufs, obj, batches, quiz_x, quiz_y, self.phi, self.cfg.backend)
