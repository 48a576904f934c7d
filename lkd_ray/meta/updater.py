"""The one place a meta-gradient becomes an update of the loss networks.

``LossNetOptimizer`` owns φ (and ψ), their Adam state, the version and the counters: it checks a
gradient (non-finite ones are rejected and counted, never applied), clips it, steps Adam and bumps
the version. The single-process trainer uses it directly; the Ray ``LossNetServer`` wraps the same
class, so clipping, rejection and counting cannot drift apart between the two paths.

Gradients travel as one flat float32 buffer (``flatten``), the cheapest thing to send and check.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol, Sequence

import torch
from torch import nn


class NonFiniteMetaGradient(ValueError):
    pass


@dataclass
class MetaCounters:
    version: int = 0            # updates applied so far (the version of φ)
    accepted: int = 0           # meta-gradients applied (a sync round of n ranks counts once)
    rejected_nonfinite: int = 0
    from_snapshot: int = 0      # applied meta-gradients whose unroll started from an earlier student
    last_norm: float = 0.0
    last_quiz_loss: float | None = None

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "MetaCounters":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One float32 CPU vector (torch's ``parameters_to_vector``, detached): the message format."""
    if not tensors:
        return torch.zeros(0)
    return torch.nn.utils.parameters_to_vector([t.detach().float().cpu() for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of ``flat`` shaped like ``like`` (for gradients: ``vector_to_parameters`` only sets parameters)."""
    sizes = [p.numel() for p in like]
    if flat.numel() != sum(sizes):
        raise ValueError(f"flat buffer has {flat.numel()} values, the loss networks {sum(sizes)}")
    return [c.view_as(p).to(device=p.device, dtype=p.dtype) for c, p in zip(flat.split(sizes), like)]


def check_and_clip(grad: torch.Tensor, clip_norm: float) -> tuple[torch.Tensor, float]:
    """Reject a non-finite meta-gradient (never applied); otherwise clip its global norm."""
    norm = torch.linalg.vector_norm(grad.float()).item()
    if not math.isfinite(norm):
        raise NonFiniteMetaGradient(f"meta-gradient has non-finite values (norm={norm}); rejected, not applied")
    return grad * min(1.0, clip_norm / (norm + 1e-12)), norm


class MetaUpdater(Protocol):
    """Where the trainer sends meta-gradients: a local ``LossNetOptimizer`` or the Ray LossNetServer."""

    @property
    def version(self) -> int: ...

    def submit(self, grad: torch.Tensor, *, lr_scale: float = 1.0, from_snapshot: bool = False,
               quiz_loss: float | None = None) -> bool | None:
        """True/False: applied or refused; None: sent, the outcome arrives later (an async server)."""

    def counters(self) -> dict: ...


class LossNetOptimizer:
    """Adam on the loss networks with clipping, non-finite rejection, a version and counters."""

    def __init__(self, lossnets: nn.Module, lr: float, clip_norm: float):
        self.lossnets = lossnets
        self.params = list(lossnets.parameters())
        self.adam = torch.optim.Adam(self.params, lr=lr)
        self.lr, self.clip_norm = lr, clip_norm
        self.stats = MetaCounters()

    @property
    def version(self) -> int:
        return self.stats.version

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def counters(self) -> dict:
        return self.stats.as_dict()

    def submit(self, grad: torch.Tensor | Sequence[torch.Tensor], *, lr_scale: float = 1.0, from_snapshot: bool = False,
               quiz_loss: float | None = None) -> bool:
        """Apply one meta-gradient (flat, or a list aligned with the parameters). False: rejected as non-finite."""
        flat = grad if isinstance(grad, torch.Tensor) else flatten(grad)
        if flat.numel() != self.numel:
            raise ValueError(f"meta-gradient has {flat.numel()} values, the loss networks {self.numel}")
        if quiz_loss is not None:
            self.stats.last_quiz_loss = float(quiz_loss)
        try:
            clipped, norm = check_and_clip(flat, self.clip_norm)
        except NonFiniteMetaGradient:
            self.stats.rejected_nonfinite += 1
            return False
        if not (math.isfinite(lr_scale) and lr_scale >= 0):
            raise ValueError(f"meta learning-rate scale must be finite and ≥ 0, got {lr_scale}")
        for p, g in zip(self.params, unflatten(clipped, self.params)):
            p.grad = g
        for group in self.adam.param_groups:
            group["lr"] = self.lr * lr_scale
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)
        self.stats.version += 1
        self.stats.accepted += 1
        self.stats.from_snapshot += int(bool(from_snapshot))
        self.stats.last_norm = norm
        return True

    def load_flat(self, flat: torch.Tensor) -> None:
        if flat.numel() != self.numel:
            raise ValueError(f"flat buffer has {flat.numel()} values, the loss networks {self.numel}")
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat.to(self.params[0].device, self.params[0].dtype).clone(), self.params)

    def state_dict(self) -> dict:
        return {"lossnets": self.lossnets.state_dict(), "adam": self.adam.state_dict(), "counters": self.stats.as_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.lossnets.load_state_dict(sd["lossnets"])
        self.adam.load_state_dict(sd["adam"])
        self.stats = MetaCounters.from_dict(sd["counters"])
