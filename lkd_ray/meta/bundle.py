"""What a meta-step unrolls: the student network plus its feature connector (both trained by the
student's optimizer), with a full view (images in) and a head view (detached features in)."""
from __future__ import annotations

import torch
from torch import nn

from ..losses.learnable import Connector
from ..losses.methods import StudentOutputs
from ..models.base import HeadView, TappedModel


class StudentBundle(nn.Module):
    def __init__(self, net: TappedModel, connector: Connector | None = None, t_feat_size: tuple[int, int] | None = None):
        super().__init__()
        self.net = net
        self.connector = connector
        self.t_feat_size = t_feat_size

    def forward(self, x: torch.Tensor) -> StudentOutputs:
        f = self.net.forward_features(x)
        proj = self.connector(f, self.t_feat_size) if self.connector is not None else None
        return StudentOutputs(self.net.forward_head(f), proj)

    def head_view(self) -> "HeadBundle":
        return HeadBundle(self)


class HeadBundle(nn.Module):
    """The classifier head and connector only; its parameters are the real student's (shared)."""

    def __init__(self, bundle: StudentBundle):
        super().__init__()
        self.head = HeadView(bundle.net)
        self.connector = bundle.connector
        self.t_feat_size = bundle.t_feat_size

    def forward(self, f: torch.Tensor) -> StudentOutputs:
        proj = self.connector(f, self.t_feat_size) if self.connector is not None else None
        return StudentOutputs(self.head(f), proj)
