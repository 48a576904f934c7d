"""The parts a training run is built from — device, student (with its feature connector), optimizer, lr
schedule — as small functions, so ``build_run`` and the teacher's own CE run assemble them the same way and
the ``Trainer`` receives them ready."""
from __future__ import annotations

import random

import numpy as np
import torch

from ..config import OptimCfg
from ..losses import Connector
from ..meta import StudentBundle
from ..models import build_model


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_teacher(teacher: torch.nn.Module, num_classes: int, in_channels: int, image_size: int, device, teacher_name: str,
                  dataset: str, student_name: str) -> None:
    """A teacher that predicts another number of classes than the data set has is a clear error, not a shape crash."""
    with torch.no_grad():
        t_out = teacher(torch.zeros(2, in_channels, image_size, image_size, device=device)).shape[1]
    if t_out != num_classes:
        raise ValueError(f"teacher {teacher_name} predicts {t_out} classes but the data set {dataset} has {num_classes}; "
                         f"student {student_name} is built for {num_classes}. Use a teacher trained on this data set.")


def build_student(name: str, num_classes: int, in_channels: int, image_size: int, device: torch.device,
                  teacher: torch.nn.Module | None = None, features: bool = False, channels_last: bool = False) -> StudentBundle:
    """A fresh student (from the global RNG: seed first), with a 1×1 connector to the teacher's feature shape
    when the loss reads features."""
    net = build_model(name, num_classes, in_channels)
    connector, t_size = None, None
    if features:
        with torch.no_grad():
            probe = torch.zeros(1, in_channels, image_size, image_size, device=device)
            t_shape = teacher.forward_features(probe).shape
        connector, t_size = Connector(net.feature_channels, t_shape[1]), tuple(t_shape[-2:])
    bundle = StudentBundle(net, connector, t_size).to(device)
    if channels_last:
        bundle.to(memory_format=torch.channels_last)
    return bundle


def build_optimizer(bundle: torch.nn.Module, o: OptimCfg) -> torch.optim.SGD:
    params = [p for p in bundle.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)


def build_scheduler(opt: torch.optim.Optimizer, o: OptimCfg, epochs: int | None = None):
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs or o.epochs)
    if o.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=o.milestones, gamma=o.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
