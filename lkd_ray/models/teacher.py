"""Teacher weights from torchvision's published weights or from KD-community checkpoint files.

Community checkpoints keep the state dict at the top level or under ``model`` / ``state_dict``
(sometimes with DDP's ``module.`` prefix). Loading is always ``weights_only=True``.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import torch
from torch import nn

from ..errors import BadInput

FIELD = "model.teacher_weights"
SAVE_HINT = ("save the teacher as a weights-only state dict, torch.save(model.state_dict(), PATH), or unset "
             "model.teacher_weights to train one here")


class TeacherLoadError(BadInput, RuntimeError):
    """The teacher's weights are missing, unreadable or do not fit ``model.teacher`` (bad input, exit 2)."""


def _read_checkpoint(f, where: str):
    """``torch.load(weights_only=True)``; anything else (a pickled module, not a checkpoint) is bad input in one line."""
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
        first = text.splitlines()[0].split(". ")[0].rstrip(". ") if text else ""  # torch's own text runs for lines
        raise TeacherLoadError(where, f"cannot be read as weights with torch.load(weights_only=True) ({type(e).__name__}"
                               f"{': ' + first if first else ''})", SAVE_HINT) from e


def _fetch_state(source: str, arch: str) -> dict:
    if source.startswith("torchvision"):
        from .imagenet import TORCHVISION_WEIGHTS

        if arch not in TORCHVISION_WEIGHTS:
            raise TeacherLoadError(
                f"{FIELD}={source!r}", f"torchvision publishes no weights for {arch!r}; torchvision weights exist for "
                f"{', '.join(TORCHVISION_WEIGHTS)}", "give a checkpoint path/URI instead")
        enum = TORCHVISION_WEIGHTS[arch]
        tag = source.partition(":")[2] or "DEFAULT"
        try:
            weights = enum[tag]
        except KeyError:
            raise TeacherLoadError(f"{FIELD}={source!r}", f"unknown torchvision weights {tag!r} for {arch}",
                                   f"valid: {', '.join(w.name for w in enum)}, DEFAULT") from None
        try:
            return weights.get_state_dict(progress=True)
        except Exception as e:  # offline machines land here
            raise TeacherLoadError(
                f"{FIELD}={source!r}", f"could not download torchvision weights {enum.__name__}.{weights.name} "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                "on an offline machine put the .pth file in $TORCH_HOME/hub/checkpoints or pass its path") from e
    if source.startswith(("http://", "https://")):
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
    if source.startswith("s3://"):
        from ..storage import open_storage  # storage is optional until a job uses S3
        import io

        folder, _, key = source.rstrip("/").rpartition("/")
        if folder in ("s3:/", "s3:") or not open_storage(folder).exists(key):  # an unreachable endpoint stays a storage failure (exit 3)
            raise TeacherLoadError(f"{FIELD}={source!r}", "no such object", "give the s3://bucket/key of the teacher "
                                   "checkpoint (the endpoint comes from AWS_ENDPOINT_URL)")
        return _read_checkpoint(io.BytesIO(open_storage(folder).get_bytes(key)), f"{FIELD}={source!r}")
    path = source[len("file://"):] if source.startswith("file://") else source
    if not os.path.exists(path):
        raise TeacherLoadError(f"{FIELD}={source!r}", "the teacher checkpoint does not exist",
                               "give a local path, file://, http(s):// or s3:// URI, or torchvision[:WEIGHTS]")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise TeacherLoadError(f"{FIELD}={source!r}", "the teacher checkpoint is not a readable file",
                               "give the path of a checkpoint file this user can read")
    return _read_checkpoint(path, f"{FIELD}={source!r}")


def extract_state_dict(obj, what: str = "the teacher checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside a checkpoint laid out the way the KD community does."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "student"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherLoadError(what, "holds no state dict (looked at the top level and under 'model', 'state_dict', "
                               "'student')", SAVE_HINT)
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], arch: str, what: str = "checkpoint") -> None:
    """Strict load with an error that names both sides of any mismatch (the first mismatching key and its shapes
    first)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shape:
        parts = []
        if shape:
            parts.append("shape mismatches (checkpoint vs model): " + "; ".join(f"{k}: {a} vs {b}" for k, a, b in shape[:5]))
        if missing:
            parts.append(f"{len(missing)} keys missing from the checkpoint, e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys in the checkpoint, e.g. {unexpected[:3]}")
        head = _class_count(own), _class_count(state)
        fix = f"give a checkpoint of a {arch} (model.teacher) for this data set"
        if head[0] and head[1] and head[0] != head[1]:
            fix = (f"the checkpoint has {head[1]} classes, the model {arch} was built for {head[0]}: set the data "
                   f"set/num_classes to match, or {fix}")
        elif missing and unexpected:
            fix = f"the checkpoint is probably not a {arch}: set model.teacher to its architecture, or {fix}"
        raise TeacherLoadError(what, f"does not fit model {arch!r}: " + " | ".join(parts), fix)
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
    state = extract_state_dict(_fetch_state(source, arch), f"{FIELD}={source!r}")
    load_weights(model, state, arch, what=f"{FIELD}={source!r}")
    model.eval().requires_grad_(False)
    return model
