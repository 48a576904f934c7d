"""Getting a teacher: load published weights, or — for the offline recipe — train one once with
this project and cache it, keyed by a hash of everything that trains it (the data's identity
included), so a changed data root, subset, augmentation, batch size or optimizer retrains."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data import DataBundle
from ..models import load_teacher
from ..storage import atomic_write_bytes
from .outputs import dumps

KEY_VERSION = 2


def teacher_recipe(cfg: Config, data: DataBundle) -> dict[str, Any]:
    """Everything that changes a teacher trained here (what its cache key hashes)."""
    d, m, o = cfg.data, cfg.model, cfg.optim
    return {"key_version": KEY_VERSION, "teacher": m.teacher, "epochs": m.teacher_epochs, "seed": cfg.run.seed,
            "data": {"dataset": d.dataset, "identity": data.fingerprint(), "channels": d.channels, "image_size": d.image_size,
                     "quiz_fraction": d.quiz_fraction, "split_seed": d.split_seed, "train_subset": d.train_subset,
                     "augment": d.augment, "batch_size": d.batch_size, "synthetic_size": d.synthetic_size},
            "optim": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay, "nesterov": o.nesterov,
                      "schedule": o.schedule, "milestones": list(o.milestones), "gamma": o.gamma}}


def teacher_key(cfg: Config, data: DataBundle) -> str:
    blob = json.dumps(teacher_recipe(cfg, data), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def teacher_cache_path(cfg: Config, data: DataBundle) -> Path:
    return Path(cfg.run.cache_dir) / "teachers" / f"{cfg.model.teacher}-{cfg.data.dataset}-{teacher_key(cfg, data)}.pt"


def prepare_teacher(cfg: Config, data: DataBundle, device=None, log=print) -> tuple[torch.nn.Module, dict]:
    """Return (frozen teacher, info with its test accuracy when known)."""
    m = cfg.model
    if m.teacher_weights:
        teacher = load_teacher(m.teacher, m.teacher_weights, data.num_classes, data.in_channels)
        return teacher, {"source": m.teacher_weights, "key": hashlib.sha256(m.teacher_weights.encode()).hexdigest()[:16]}
    path = teacher_cache_path(cfg, data)
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        info = json.loads(meta_path.read_text())
        teacher = load_teacher(m.teacher, str(path), data.num_classes, data.in_channels)
        log(f"teacher {m.teacher}: cached at {path} (test top-1 {info['test_top1']:.2f}%)")
        return teacher, info
    from .run import build_run

    tcfg = cfg.model_copy(deep=True)
    tcfg.loss.method = "ce"
    tcfg.loss.w_feat = 0.0
    tcfg.model.student = m.teacher
    tcfg.model.teacher_cache = False
    tcfg.optim.epochs = m.teacher_epochs
    tcfg.meta.p_snapshot = 0.0
    log(f"teacher {m.teacher}: training for {m.teacher_epochs} epochs on {cfg.data.dataset} (once; cached at {path})")
    res = build_run(tcfg, data=data, device=device, log=log).fit(progress_label=f"teacher {m.teacher}")
    trainer = res.pop("_trainer")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(trainer.bundle.net.state_dict(), tmp)
    tmp.replace(path)
    info = {"source": str(path), "key": teacher_key(cfg, data), "test_top1": res["test_top1"], "test_top5": res["test_top5"],
            "quiz_top1": res["quiz_top1"], "wall_s": res["wall_s"], "epochs": m.teacher_epochs,
            "curve": [{"epoch": h["epoch"], "quiz_top1": h["quiz_top1"], "test_top1": h["test_top1"]} for h in res["history"]],
            "recipe": teacher_recipe(cfg, data)}
    atomic_write_bytes(meta_path, (dumps(info, indent=1) + "\n").encode())
    log(f"teacher {m.teacher}: test top-1 {info['test_top1']:.2f}% after {info['wall_s']:.0f}s")
    return load_teacher(m.teacher, str(path), data.num_classes, data.in_channels), info
