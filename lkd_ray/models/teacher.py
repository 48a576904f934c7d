"""Teacher weights from torchvision's published weights or from KD-community checkpoint files.

Community checkpoints keep the state dict at the top level or under ``model`` / ``state_dict``
(sometimes with DDP's ``module.`` prefix). Loading is always ``weights_only=True``.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn


class TeacherLoadError(RuntimeError):
    pass


def _fetch_state(source: str, arch: str) -> dict:
    if source.startswith("torchvision"):
        from .imagenet import TORCHVISION_WEIGHTS

        if arch not in TORCHVISION_WEIGHTS:
            raise TeacherLoadError(
                f"torchvision publishes no weights for {arch!r}; torchvision weights exist for "
                f"{', '.join(TORCHVISION_WEIGHTS)}. Give a checkpoint path/URI instead.")
        enum = TORCHVISION_WEIGHTS[arch]
        tag = source.partition(":")[2] or "DEFAULT"
        try:
            weights = enum[tag]
        except KeyError:
            raise TeacherLoadError(f"unknown torchvision weights {tag!r} for {arch}; valid: {', '.join(w.name for w in enum)}, DEFAULT") from None
        try:
            return weights.get_state_dict(progress=True)
        except Exception as e:  # offline machines land here
            raise TeacherLoadError(
                f"could not download torchvision weights {enum.__name__}.{weights.name} ({e}); "
                "on an offline machine put the .pth file in $TORCH_HOME/hub/checkpoints or pass its path") from e
    if source.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
    if source.startswith("s3://"):
        from ..storage import read_uri_bytes  # storage is optional until a job uses S3
        import io

        return torch.load(io.BytesIO(read_uri_bytes(source)), map_location="cpu", weights_only=True)
    path = source[len("file://"):] if source.startswith("file://") else source
    if not os.path.exists(path):
        raise TeacherLoadError(f"teacher checkpoint {path!r} does not exist; give a local path, file://, http(s):// or s3:// URI, or torchvision[:WEIGHTS]")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TeacherLoadError(f"teacher checkpoint {path!r} cannot be read as weights ({type(e).__name__}: {e})") from e


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint laid out the way the KD community does."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "student"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherLoadError("checkpoint holds no state dict (looked at the top level and under 'model', 'state_dict', 'student')")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], arch: str, what: str = "checkpoint") -> None:
    """Strict load with an error that names both sides of any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shape:
        parts = []
        if shape:
            parts.append("shape mismatches (checkpoint vs model): " + "; ".join(f"{k}: {a} vs {b}" for k, a, b in shape[:5]))
        if missing:
            parts.append(f"{len(missing)} keys missing from the {what}, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys in the {what}, e.g. {unexpected[:3]}")
        head = _class_count(own), _class_count(state)
        hint = ""
        if head[0] and head[1] and head[0] != head[1]:
            hint = f" The {what} has {head[1]} classes, the model {arch} was built for {head[0]}: set the data set/num_classes to match."
        elif missing and unexpected:
            hint = f" The {what} is probably not a {arch}."
        raise TeacherLoadError(f"{what} does not fit model {arch!r}: " + " | ".join(parts) + hint)
    model.load_state_dict(state, strict=True)


def _class_count(state: dict[str, torch.Tensor]) -> int | None:
    last = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(last[-1].shape[0]) if last else None


def load_teacher(arch: str, source: str, num_classes: int, in_channels: int = 3,
                 build: Callable[..., nn.Module] | None = None) -> nn.Module:
    """Build ``arch``, load weights from ``source`` and freeze it (eval mode, no grad)."""
    if build is None:
        from .registry import build_model as build
    model = build(arch, num_classes, in_channels)
    state = extract_state_dict(_fetch_state(source, arch))
    load_weights(model, state, arch, what=f"teacher checkpoint {source!r}")
    model.eval().requires_grad_(False)
    return model
