"""Getting a teacher: load published weights, or — for the offline recipe — train one once with
this project and cache it (keyed by everything that changes it)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import Config
from ..data import DataBundle
from ..models import load_teacher
from .logging import atomic_write_json


def teacher_cache_path(cfg: Config) -> Path:
    d, m = cfg.data, cfg.model
    key = f"{d.dataset}-{m.teacher}-e{m.teacher_epochs}-s{cfg.run.seed}-c{d.channels}-i{d.image_size or 'native'}-q{d.quiz_fraction}-{d.split_seed}"
    return Path(cfg.run.cache_dir) / "teachers" / f"{key}.pt"


def prepare_teacher(cfg: Config, data: DataBundle, device=None, log=print) -> tuple[torch.nn.Module, dict]:
    """Return (frozen teacher, info with its test accuracy when known)."""
    m = cfg.model
    if m.teacher_weights:
        teacher = load_teacher(m.teacher, m.teacher_weights, data.num_classes, data.in_channels)
        return teacher, {"source": m.teacher_weights}
    path = teacher_cache_path(cfg)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        info = json.loads(meta_path.read_text())
        teacher = load_teacher(m.teacher, str(path), data.num_classes, data.in_channels)
        log(f"teacher {m.teacher}: cached at {path} (test top-1 {info['test_top1']:.2f}%)")
        return teacher, info
    from .loop import Trainer

    tcfg = cfg.model_copy(deep=True)
    tcfg.loss.method = "ce"
    tcfg.loss.w_feat = 0.0
    tcfg.model.student = m.teacher
    tcfg.optim.epochs = m.teacher_epochs
    log(f"teacher {m.teacher}: training for {m.teacher_epochs} epochs on {cfg.data.dataset} (once; cached at {path})")
    trainer = Trainer(tcfg, None, data, device=device, log=False)
    res = trainer.fit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(trainer.bundle.net.state_dict(), tmp)
    tmp.replace(path)
    info = {"source": str(path), "test_top1": res["test_top1"], "test_top5": res["test_top5"], "wall_s": res["wall_s"],
            "epochs": m.teacher_epochs}
    atomic_write_json(meta_path, info)
    log(f"teacher {m.teacher}: test top-1 {info['test_top1']:.2f}% after {info['wall_s']:.0f}s")
    return load_teacher(m.teacher, str(path), data.num_classes, data.in_channels), info
