"""Model registry: one name → one constructor, for students and teachers alike."""
from __future__ import annotations

from .base import HeadView, TappedModel
from .registry import MODEL_NAMES, build_model
from .teacher import TeacherLoadError, load_teacher, load_weights

__all__ = ["MODEL_NAMES", "build_model", "HeadView", "TappedModel", "load_teacher", "load_weights", "TeacherLoadError"]
