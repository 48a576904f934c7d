"""The contract every model in the zoo keeps, so losses and meta-steps never special-case architectures.

A classifier is split at its *feature tap* (the stage the feature loss reads):
``forward(x) == forward_head(forward_features(x))``. ``head_modules`` names the submodules
``forward_head`` touches, which is what the cheap ``scope=head`` meta-step unrolls.
"""
from __future__ import annotations

import torch
from torch import nn


class TappedModel(nn.Module):
    feature_tap: str = ""            # name of the module whose output forward_features returns
    head_modules: tuple[str, ...] = ()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class HeadView(nn.Module):
    """A module holding only ``model.head_modules`` whose forward is ``model.forward_head``.

    It shares (not copies) the submodules, so an optimizer over the view's parameters updates
    the real head; `higher` can patch it like any module.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not model.head_modules:
            raise ValueError(f"{type(model).__name__} declares no head_modules; scope=head needs them")
        for name in model.head_modules:
            self.add_module(name, getattr(model, name))
        self._head_fn = type(model).forward_head

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self._head_fn(self, f)


def pool_flatten(f: torch.Tensor) -> torch.Tensor:
    return torch.flatten(nn.functional.adaptive_avg_pool2d(f, 1), 1)
