"""One name → one constructor. The names are the config's vocabulary (``lkd_ray.config.MODEL_NAMES``, so a
config is validated before anything is built); this registry implements exactly those names."""
from __future__ import annotations

from ..config import MODEL_NAMES as CONFIG_NAMES
from . import cifar_other, cifar_resnet, imagenet, small
from .base import TappedModel

_FAMILIES = (cifar_resnet, cifar_other, imagenet, small)
MODEL_NAMES: list[str] = [n for fam in _FAMILIES for n in fam.NAMES]
if tuple(MODEL_NAMES) != tuple(CONFIG_NAMES):  # the vocabulary and the implementations must not drift apart
    raise ImportError(f"lkd_ray.config.MODEL_NAMES {CONFIG_NAMES} differs from the models built here {MODEL_NAMES}")


def build_model(name: str, num_classes: int, in_channels: int = 3) -> TappedModel:
    """Build ``name`` with a fresh initialisation; unknown names list the valid ones."""
    for fam in _FAMILIES:
        if name in fam.NAMES:
            return fam.build(name, num_classes, in_channels)
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")
