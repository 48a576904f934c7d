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

KEY_VERSION = 3


def teacher_data(cfg: Config, data: DataBundle) -> DataBundle:
    """The teacher's training data: the whole training pool with the run's given labels (noisy ones included),
    whatever subset ``data.labels_per_class`` keeps for the student."""
    batch = cfg.model.teacher_batch_size or cfg.data.batch_size
    if cfg.data.labels_per_class is None and batch == cfg.data.batch_size:
        return data
    from ..data import build_data

    return build_data(cfg.data.model_copy(update={"batch_size": batch}), cfg.run.seed, cache_dir=cfg.run.cache_dir,
                      role="teacher")


def teacher_recipe(cfg: Config, data: DataBundle) -> dict[str, Any]:
    """Everything that changes a teacher trained here (what its cache key hashes); ``data`` is the teacher's."""
    d, m, o = cfg.data, cfg.model, cfg.optim
    return {"key_version": KEY_VERSION, "teacher": m.teacher, "epochs": m.teacher_epochs, "seed": cfg.run.seed,
            "data": {"dataset": d.dataset, "identity": data.fingerprint(), "images": data.train_size, "channels": d.channels,
                     "image_size": d.image_size, "quiz_fraction": d.quiz_fraction, "split_seed": d.split_seed,
                     "train_subset": d.train_subset, "label_noise": d.label_noise,
                     "noise_kind": d.noise_kind if d.label_noise else None, "augment": d.augment,
                     "batch_size": m.teacher_batch_size or d.batch_size, "synthetic_size": d.synthetic_size},
            "optim": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay, "nesterov": o.nesterov,
                      "schedule": o.schedule, "milestones": list(o.milestones), "gamma": o.gamma}}


def teacher_key(cfg: Config, data: DataBundle) -> str:
    """The teacher's identity for ``data`` (the student's data: its teacher data is derived here)."""
    return _key(teacher_recipe(cfg, teacher_data(cfg, data)))


def _key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def teacher_cache_path(cfg: Config, data: DataBundle) -> Path:
    return Path(cfg.run.cache_dir) / "teachers" / f"{cfg.model.teacher}-{cfg.data.dataset}-{teacher_key(cfg, data)}.pt"


def train_teacher(cfg: Config, data: DataBundle, device=None, label: str | None = None) -> dict[str, Any]:
    """The teacher's own run, built here: ``model.teacher`` from the seed, trained with CE on ``data`` (the
    teacher's data) for ``model.teacher_epochs`` epochs with the run's optimiser recipe. Returns the result with
    ``_trainer``."""
    from ..losses import build_method
    from ..losses.methods import CE
    from .loop import LoopSettings, Trainer, fit
    from .parts import build_optimizer, build_scheduler, build_student, resolve_device, seed_everything
    from .progress import Progress
    from .teacher_source import NoTeacher

    device = device or resolve_device(cfg.run.device)
    epochs = cfg.model.teacher_epochs
    seed_everything(cfg.run.seed)
    bundle = build_student(cfg.model.teacher, data.num_classes, data.in_channels, data.image_size, device,
                           channels_last=cfg.run.channels_last)
    optimizer = build_optimizer(bundle, cfg.optim)
    settings = LoopSettings(epochs, cfg.optim.lr, bf16=cfg.run.bf16, channels_last=cfg.run.channels_last,
                            log_every=cfg.run.log_every)
    method = build_method(cfg.loss.model_copy(update={"method": CE.name, "w_ce": 1.0, "label_smoothing": 0.0, "w_feat": 0.0,
                                                      "ce_rule": "plain"}))
    trainer = Trainer(settings, data, bundle, optimizer, build_scheduler(optimizer, cfg.optim, epochs), method, NoTeacher(),
                      device=device)
    res = fit(trainer, (), Progress(label or f"teacher {cfg.model.teacher}", epochs, enabled=cfg.run.progress))
    res["_trainer"] = trainer
    return res


def prepare_teacher(cfg: Config, data: DataBundle, device=None, log=print) -> tuple[torch.nn.Module, dict]:
    """Return (frozen teacher, info with its test accuracy when known). ``data`` is the student's data; a teacher
    trained here sees the whole training pool (``teacher_data``)."""
    m = cfg.model
    if m.teacher_weights:
        teacher = load_teacher(m.teacher, m.teacher_weights, data.num_classes, data.in_channels)
        return teacher, {"source": m.teacher_weights, "key": hashlib.sha256(m.teacher_weights.encode()).hexdigest()[:16]}
    tdata = teacher_data(cfg, data)
    recipe = teacher_recipe(cfg, tdata)
    key = _key(recipe)
    path = Path(cfg.run.cache_dir) / "teachers" / f"{m.teacher}-{cfg.data.dataset}-{key}.pt"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        info = json.loads(meta_path.read_text())
        teacher = load_teacher(m.teacher, str(path), data.num_classes, data.in_channels)
        log(f"teacher {m.teacher}: cached at {path} (test top-1 {info['test_top1']:.2f}%)")
        return teacher, info
    noise = f", {cfg.data.label_noise:.0%} {cfg.data.noise_kind} label noise" if cfg.data.label_noise else ""
    log(f"teacher {m.teacher}: training for {m.teacher_epochs} epochs on {tdata.train_size} {cfg.data.dataset} images"
        f"{noise} (once; cached at {path})")
    res = train_teacher(cfg, tdata, device)
    trainer = res.pop("_trainer")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(trainer.bundle.net.state_dict(), tmp)
    tmp.replace(path)
    info = {"source": str(path), "key": key, "test_top1": res["test_top1"], "test_top5": res["test_top5"],
            "quiz_top1": res["quiz_top1"], "wall_s": res["wall_s"], "epochs": m.teacher_epochs,
            "best_epoch": max(res["history"], key=lambda h: h["quiz_top1"])["epoch"] if res["history"] else None,
            "curve": [{"epoch": h["epoch"], "quiz_top1": h["quiz_top1"], "test_top1": h["test_top1"]} for h in res["history"]],
            "recipe": recipe}
    atomic_write_bytes(meta_path, (dumps(info, indent=1) + "\n").encode())
    log(f"teacher {m.teacher}: test top-1 {info['test_top1']:.2f}% after {info['wall_s']:.0f}s")
    return load_teacher(m.teacher, str(path), data.num_classes, data.in_channels), info
