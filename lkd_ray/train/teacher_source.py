"""Where a student step gets the teacher's outputs from: the live frozen teacher, or logits cached once per
augmented view (``teacher_cache``), or nowhere (CE). One interface, chosen once when the run is built."""
from __future__ import annotations

import contextlib
from typing import Callable, Protocol

import torch

from ..data import Batch
from ..losses import TeacherOutputs


class TeacherSource(Protocol):
    def outputs(self, x: torch.Tensor, batch: Batch) -> TeacherOutputs | None: ...


class NoTeacher:
    """CE and the teacher's own training: no teacher."""

    def outputs(self, x, batch) -> None:
        return None


class LiveTeacher:
    """The frozen teacher run on the batch (eval mode, no grad; features too when the loss reads them)."""

    def __init__(self, model: torch.nn.Module, features: bool, autocast: Callable = contextlib.nullcontext):
        self.model, self.features, self.autocast = model, features, autocast

    def outputs(self, x, batch) -> TeacherOutputs:
        with torch.no_grad(), self.autocast():
            if self.features:
                f = self.model.forward_features(x)
                return TeacherOutputs(self.model.forward_head(f), f)
            return TeacherOutputs(self.model(x))


class CachedTeacher:
    """The teacher's logits for exactly the view the batch holds, read from the teacher-output cache."""

    def __init__(self, device: torch.device):
        self.device = device

    def outputs(self, x, batch) -> TeacherOutputs:
        if batch.t_logits is None:
            raise ValueError("the teacher-output cache gave this batch no logits (was it attached to this loader?)")
        return TeacherOutputs(batch.t_logits.to(self.device, non_blocking=True))
