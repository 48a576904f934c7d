"""Model registry: one name → one constructor, for students and teachers alike."""
from __future__ import annotations

from . import cifar_other, cifar_resnet, imagenet, small
from .base import HeadView, TappedModel
from .teacher import TeacherLoadError, load_teacher, load_weights

_FAMILIES = (cifar_resnet, cifar_other, imagenet, small)
MODEL_NAMES: list[str] = [n for fam in _FAMILIES for n in fam.NAMES]


def build_model(name: str, num_classes: int, in_channels: int = 3) -> TappedModel:
    """Build ``name`` with a fresh initialisation; unknown names list the valid ones."""
    for fam in _FAMILIES:
        if name in fam.NAMES:
            return fam.build(name, num_classes, in_channels)
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}")


__all__ = ["MODEL_NAMES", "build_model", "HeadView", "TappedModel", "load_teacher", "load_weights", "TeacherLoadError"]
