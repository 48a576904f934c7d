"""The single-process distillation trainer for every method: a student step, an epoch, an
evaluation and a resumable state — nothing about files, Ray or progress displays.

What varies between a laptop and a GPU fleet is injected: the student wrapper (DDP), where
meta-gradients go (a local ``LossNetOptimizer`` or the Ray LossNetServer, both ``MetaUpdater``s)
and where earlier students live (``SnapshotStore``). Outputs are callbacks in ``outputs``; they
receive a read-only ``EpochRecord``, never the trainer.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data import Batch, DataBundle, cycle
from ..losses import Connector, LossNetworks, TeacherOutputs, build_method
from ..meta import LossNetOptimizer, MetaBatch, MetaStep, MetaUpdater, StudentBundle, flatten
from ..models import TappedModel, build_model
from .snapshots import InMemorySnapshotStore, SnapshotStore, cpu_state


class TrainingDiverged(RuntimeError):
    pass


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


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean CE over a loader, in eval mode."""
    was = model.training
    model.eval()
    n = c1 = c5 = 0
    loss = 0.0
    for batch in loader:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast():
            z = model(x)
        z = (z.logits if hasattr(z, "logits") else z).float()
        loss += torch.nn.functional.cross_entropy(z, y, reduction="sum").item()
        top = z.topk(min(5, z.shape[1]), 1).indices
        c1 += (top[:, 0] == y).sum().item()
        c5 += (top == y[:, None]).any(1).sum().item()
        n += y.numel()
    model.train(was)
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "loss": loss / max(n, 1)}


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config):
    o = cfg.optim
    if o.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o.epochs)
    if o.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=o.milestones, gamma=o.gamma)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@dataclass(frozen=True)
class EpochRecord:
    """What outputs see at the end of an epoch (or at the start of training, epoch 0)."""

    epoch: int
    step: int
    metrics: Mapping[str, Any]
    lossnet_version: int | None
    lossnet_state: Mapping[str, torch.Tensor] | None  # a detached copy of φ (and ψ)
    meta: Mapping[str, Any] | None
    rank: int = 0
    world_size: int = 1
    state: Callable[[], dict] | None = field(default=None, repr=False, compare=False)  # a fresh resumable state dict


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    quiz_acc: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def _requires_grad(module: nn.Module | None):
    """φ needs gradients only inside a meta-step; student steps leave it out of backward."""
    if module is None:
        yield
        return
    module.requires_grad_(True)
    try:
        yield
    finally:
        module.requires_grad_(False)


class Trainer:
    def __init__(self, cfg: Config, data: DataBundle, teacher: TappedModel | None, *, device: torch.device | None = None,
                 lossnets: LossNetworks | None = None, meta_updater: MetaUpdater | None = None,
                 snapshots: SnapshotStore | None = None, wrap_student: Callable[[nn.Module], nn.Module] | None = None,
                 rank: int = 0, world_size: int = 1, particle=None):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = device or resolve_device(cfg.run.device)
        seed_everything(cfg.run.seed)
        self.data = data
        if len(self.data.train) == 0:
            raise ValueError(f"the training split ({self.data.train_size} images over {world_size} worker(s)) is smaller than "
                             f"one batch of {cfg.data.batch_size}; lower data.batch_size")
        self.lossnets = lossnets
        self.method = build_method(cfg.loss, lossnets)
        if teacher is None and self.method.needs_teacher and not self.cached_teacher:
            raise ValueError(f"method {cfg.loss.method!r} distils from a teacher; none was given")
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        net = build_model(cfg.model.student, self.data.num_classes, self.data.in_channels)
        if self.teacher is not None:
            self._check_teacher()
        connector, t_size = None, None
        if cfg.loss.w_feat > 0:
            with torch.no_grad():
                probe = torch.zeros(1, self.data.in_channels, self.data.image_size, self.data.image_size, device=self.device)
                t_shape = self.teacher.forward_features(probe).shape
            connector, t_size = Connector(net.feature_channels, t_shape[1]), tuple(t_shape[-2:])
        self.bundle = StudentBundle(net, connector, t_size).to(self.device)
        if cfg.run.channels_last:
            self.bundle.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        self.student = wrap_student(self.bundle) if wrap_student else self.bundle
        o = cfg.optim
        self.params = [p for p in self.bundle.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                         nesterov=o.nesterov)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.learnable = self.method.learnable
        if self.lossnets is not None:
            self.lossnets.to(self.device).requires_grad_(False)
        adapts = self.learnable and not cfg.lossnet.frozen and cfg.meta.estimator != "es"
        self.meta_step = MetaStep(cfg.meta, self.method, self.lossnets) if adapts else None
        self.meta_updater: MetaUpdater | None = None
        if adapts:
            self.meta_updater = meta_updater or LossNetOptimizer(self.lossnets, cfg.meta.lr, cfg.meta.clip_norm)
        mb = cfg.meta.snapshot_memory_mb
        self.snapshots = snapshots if snapshots is not None else InMemorySnapshotStore(
            cfg.meta.sampling, cfg.meta.max_snapshots, None if mb is None else mb << 20, cfg.run.cache_dir)
        self.snap_rng = random.Random(cfg.run.seed * 7919 + 1 + 104729 * rank)
        self.particle = particle  # an ES particle (under Ray): reports its quiz loss every meta_every steps
        self.state = TrainState()
        self.meta_time = 0.0
        self._quiz_iter = None
        self._fresh_iter = None
        self._consumed = {"quiz": 0, "fresh": 0}  # batches drawn from each endless iterator (replayed on resume)

    # ------------------------------------------------------------------ helpers
    @property
    def cached_teacher(self) -> bool:
        return bool(self.cfg.model.teacher_cache) and getattr(self.data.train, "teacher_logits", None) is not None

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def _check_teacher(self) -> None:
        with torch.no_grad():
            probe = torch.zeros(2, self.data.in_channels, self.data.image_size, self.data.image_size, device=self.device)
            t_out = self.teacher(probe).shape[1]
        if t_out != self.data.num_classes:
            raise ValueError(f"teacher {self.cfg.model.teacher} predicts {t_out} classes but the data set "
                             f"{self.cfg.data.dataset} has {self.data.num_classes}; student {self.cfg.model.student} "
                             f"is built for {self.data.num_classes}. Use a teacher trained on this data set.")

    def autocast(self):
        if self.cfg.run.bf16 and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to(self, x, y):
        x = x.to(self.device, non_blocking=True)
        if self.cfg.run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def student_state(self) -> torch.Tensor:
        progress = self.state.step / max(1, self.cfg.optim.epochs * len(self.data.train))
        return torch.tensor([progress, self.state.quiz_acc / 100.0], device=self.device)

    def teacher_outputs(self, x, cached: torch.Tensor | None = None) -> TeacherOutputs | None:
        """The frozen teacher's logits (and features, for a feature loss); from the cache when the batch has them
        and the run asked for it (``model.teacher_cache``)."""
        if cached is not None and self.cfg.model.teacher_cache:
            return TeacherOutputs(cached.to(self.device, non_blocking=True))
        if self.teacher is None:
            return None
        with torch.no_grad(), self.autocast():
            if self.method.uses_features:
                f = self.teacher.forward_features(x)
                return TeacherOutputs(self.teacher.forward_head(f), f)
            return TeacherOutputs(self.teacher(x))

    def meta_active(self) -> bool:
        f = self.cfg.meta.freeze_after_epoch
        return self.meta_step is not None and (f is None or self.state.epoch < f)

    def lossnet_version(self) -> int | None:
        if self.meta_updater is not None:
            return self.meta_updater.version
        if self.particle is not None:
            return self.particle.version
        return 0 if self.lossnets is not None else None

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: Batch | tuple) -> dict[str, float]:
        batch = batch if isinstance(batch, Batch) else Batch(*batch)
        x, y = self._to(batch.x, batch.y)
        teacher = self.teacher_outputs(x, batch.t_logits)
        state = self.student_state() if self.learnable else None
        with self.autocast():
            out = self.student(x)
            loss, parts = self.method(out, teacher, y, state, self.state.epoch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"student loss is {loss.item()} at step {self.state.step} ({ {k: v.item() for k, v in parts.items()} }); "
                                   "lower optim.lr or meta.lr, or check the teacher")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.state.step += 1
        stats = {"loss": loss.item(), **{f"loss_{k}": v.item() for k, v in parts.items()}}
        if self.meta_active() and self.state.step % self.cfg.meta.meta_every == 0:
            t = teacher or TeacherOutputs(None)
            stats.update(self.meta_update(MetaBatch(x, y, t.logits, t.features), state))
        if self.particle is not None and self.state.step % self.cfg.meta.meta_every == 0:
            f = self.cfg.meta.freeze_after_epoch
            if f is None or self.state.epoch < f:
                stats.update(self.particle.step(self))
        if self.meta_step is not None and self.rank == 0 and self.state.step % self.cfg.meta.snapshot_every == 0:
            self.snapshots.record(self.state.step, cpu_state(self.bundle))
        return stats

    def _endless(self, name: str):
        """The quiz / fresh-batch iterator, fast-forwarded to where a resumed run left it."""
        it = getattr(self, f"_{name}_iter")
        if it is None:
            it = cycle(self.data.quiz if name == "quiz" else self.data.train)
            for _ in range(self._consumed[name]):
                next(it)
            setattr(self, f"_{name}_iter", it)
        self._consumed[name] += 1
        return next(it)

    def _quiz_batch(self):
        b = self._endless("quiz")
        return self._to(b[0], b[1])

    def _fresh_batch(self) -> MetaBatch:
        b = self._endless("fresh")
        b = b if isinstance(b, Batch) else Batch(*b)
        x, y = self._to(b.x, b.y)
        t = self.teacher_outputs(x, b.t_logits) or TeacherOutputs(None)
        return MetaBatch(x, y, t.logits, t.features)

    def meta_lr_scale(self) -> float:
        """1, or the student's current lr over its initial lr (``meta.lr_schedule=student``)."""
        if self.cfg.meta.lr_schedule == "constant":
            return 1.0
        return self.optimizer.param_groups[0]["lr"] / self.cfg.optim.lr

    def meta_update(self, batch: MetaBatch, state) -> dict[str, float]:
        t0 = time.perf_counter()
        m = self.cfg.meta
        batches = [batch if m.batch_source == "same" else self._fresh_batch() for _ in range(m.unroll_steps)]
        xq, yq = self._quiz_batch()
        start = None
        if m.p_snapshot > 0 and self.snap_rng.random() < m.p_snapshot:
            start = self.snapshots.sample(self.snap_rng)  # None while nothing is recorded
            if start is not None:
                start = {k: v.to(self.device) for k, v in start.items()}
        with self.autocast(), _requires_grad(self.lossnets):
            q, grads = self.meta_step.compute(self.bundle, self.optimizer, batches, xq, yq, state, self.state.epoch, start)
        accepted = self.meta_updater.submit(flatten(grads), lr_scale=self.meta_lr_scale(), from_snapshot=start is not None,
                                            quiz_loss=q.item())
        self.meta_time += time.perf_counter() - t0
        out = {"meta_quiz_loss": q.item(), "meta_from_snapshot": float(start is not None)}
        if accepted is not None:  # None: an async submission whose outcome arrives later
            out["meta_accepted"] = float(accepted)
        return out

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, on_step: Callable[[dict], None] | None = None) -> dict[str, float]:
        """One pass over this rank's training shard; ``on_step`` sees each step's scalars (progress bars)."""
        self.student.train()
        loader = self.data.train
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.state.epoch)
        sums: dict[str, float] = {}
        n = 0
        for batch in loader:
            stats = self.train_step(batch)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            if on_step is not None:
                on_step(stats)
        return {f"train_{k}": v / max(n, 1) for k, v in sums.items()}

    def evaluate(self) -> dict[str, float]:
        test = evaluate(self.bundle, self.data.test, self.device, self.autocast)
        quiz = evaluate(self.bundle, self.data.quiz_eval or self.data.quiz, self.device, self.autocast)  # every image, in order
        return {"test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"], "quiz_top1": quiz["top1"],
                "quiz_loss": quiz["loss"]}

    def end_epoch(self, train_metrics: dict[str, float], epoch_s: float) -> EpochRecord:
        """Step the lr schedule, evaluate, append to the history and return the epoch's record."""
        metrics = dict(train_metrics)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.state.epoch += 1
        metrics.update(self.evaluate())
        self.state.quiz_acc = metrics["quiz_top1"]
        metrics.update({"epoch": self.state.epoch, "epoch_s": epoch_s, "meta_s": self.meta_time,
                        "snapshots": len(self.snapshots) if self.meta_step is not None else 0})
        if self.meta_updater is not None:
            metrics.update({f"meta_{k}": v for k, v in self.meta_updater.counters().items() if isinstance(v, (int, float))})
        self.state.history.append(metrics)
        return self.record(metrics)

    def record(self, metrics: dict[str, Any] | None = None) -> EpochRecord:
        lossnet_state = None
        if self.lossnets is not None:
            lossnet_state = MappingProxyType({k: v.detach().to("cpu", copy=True) for k, v in self.lossnets.state_dict().items()})
        return EpochRecord(self.state.epoch, self.state.step, MappingProxyType(dict(metrics or {})), self.lossnet_version(),
                           lossnet_state, MappingProxyType(self.meta_updater.counters()) if self.meta_updater else None,
                           self.rank, self.world_size, self.state_dict)

    def result(self, wall: float) -> dict[str, Any]:
        last = self.state.history[-1] if self.state.history else {}
        return {
            "method": self.cfg.loss.method, "student": self.cfg.model.student, "teacher": self.cfg.model.teacher,
            "dataset": self.cfg.data.dataset, "synthetic_data": bool(self.data.synthetic),
            "epochs": self.state.epoch, "steps": self.state.step, "seed": self.cfg.run.seed,
            "test_top1": last.get("test_top1"), "test_top5": last.get("test_top5"), "quiz_top1": last.get("quiz_top1"),
            "best_test_top1": max((h["test_top1"] for h in self.state.history), default=None),
            "wall_s": wall, "meta_s": self.meta_time,
            "meta": self.meta_updater.counters() if self.meta_updater is not None else None,
            "lossnet_version": self.lossnet_version(),
            "history": self.state.history, "config": self.cfg.to_dict(),
        }

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; weights-only-loadable (tensors, numbers, strings, lists)."""
        return {
            "student": self.bundle.net.state_dict(),
            "connector": self.bundle.connector.state_dict() if self.bundle.connector is not None else {},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": self.state.epoch, "step": self.state.step, "quiz_acc": self.state.quiz_acc,
            "history": self.state.history, "meta_s": self.meta_time,
            "torch_rng": torch.get_rng_state(), "snap_rng": list(self.snap_rng.getstate()[1]),
            "meta": self.meta_updater.state_dict() if isinstance(self.meta_updater, LossNetOptimizer) else {},
            "lossnets": self.lossnets.state_dict() if self.lossnets is not None else {},
            "lossnet_version": self.lossnet_version(), "consumed": dict(self._consumed),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.bundle.net.load_state_dict(sd["student"])
        if self.bundle.connector is not None:
            self.bundle.connector.load_state_dict(sd["connector"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.state.epoch, self.state.step, self.state.quiz_acc = sd["epoch"], sd["step"], sd["quiz_acc"]
        self.state.history = list(sd["history"])
        self.meta_time = float(sd.get("meta_s", 0.0))
        torch.set_rng_state(sd["torch_rng"])
        self.snap_rng.setstate((3, tuple(sd["snap_rng"]), None))
        if isinstance(self.meta_updater, LossNetOptimizer) and sd.get("meta"):
            self.meta_updater.load_state_dict(sd["meta"])
        elif self.lossnets is not None and sd.get("lossnets"):
            self.lossnets.load_state_dict(sd["lossnets"])
        self._quiz_iter = self._fresh_iter = None
        self._consumed = {"quiz": 0, "fresh": 0, **sd.get("consumed", {})}


def fit(trainer, callbacks=(), progress=None) -> dict[str, Any]:
    """The single-process loop: epochs until done, callbacks after each; returns the result record."""
    t0 = time.perf_counter()
    if trainer.state.epoch == 0:
        rec = trainer.record()
        for cb in callbacks:
            cb.on_fit_start(rec)
    total = trainer.cfg.optim.epochs * len(trainer.data.train)
    if progress is not None:
        progress.start(total, done=trainer.state.step)
    while trainer.state.epoch < trainer.cfg.optim.epochs:
        e0 = time.perf_counter()
        metrics = trainer.train_epoch(on_step=progress.step if progress is not None else None)
        rec = trainer.end_epoch(metrics, time.perf_counter() - e0)
        if progress is not None:
            progress.epoch(rec)
        for cb in callbacks:
            cb.on_epoch_end(rec)
    if progress is not None:
        progress.close()
    result = trainer.result(time.perf_counter() - t0)
    for cb in callbacks:
        cb.on_fit_end(result)
    return result
