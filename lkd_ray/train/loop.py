"""The Trainer: the student step, the epoch loop, evaluation and the loop's own state — nothing else.

Every part arrives built (``build_run``): the student and its optimizer and schedule, the distillation
method, where the teacher's outputs come from (``TeacherSource``) and what happens after each step for
meta-learning (a ``MetaLearner``: gradient meta-steps, an ES particle, an ES population). What varies
between a laptop and a GPU fleet is in those parts. Outputs are callbacks that get a read-only
``EpochRecord``, never the trainer.

On a GPU the step never waits for the host: loss terms are summed on the device, a non-finite loss is
noted on the device with its step, and the host looks (one sync) every ``log_every`` steps and at the end
of an epoch.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..config import Config
from ..data import Batch, DataBundle
from ..losses import LossNetworks, TeacherOutputs
from ..meta import MetaBatch, StudentBundle
from .meta_learning import MetaLearner, StepContext, detached
from .teacher_source import TeacherSource


class TrainingDiverged(RuntimeError):
    pass


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean CE over every image of a loader, in eval mode."""
    was = model.training
    model.eval()
    n = 0
    c1 = c5 = loss = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast():
            z = model(x)
        z = (z.logits if hasattr(z, "logits") else z).float()
        loss = loss + torch.nn.functional.cross_entropy(z, y, reduction="sum").double()
        top = z.topk(min(5, z.shape[1]), 1).indices
        c1 = c1 + (top[:, 0] == y).sum()
        c5 = c5 + (top == y[:, None]).any(1).sum()
        n += y.numel()
    model.train(was)
    c1, c5, loss = (v.item() for v in (c1, c5, loss))  # one sync per evaluation
    return {"top1": 100.0 * c1 / max(n, 1), "top5": 100.0 * c5 / max(n, 1), "loss": loss / max(n, 1)}


@torch.no_grad()
def evaluate_selection(model: nn.Module, loader, device: torch.device, autocast=contextlib.nullcontext) -> dict[str, float]:
    """The selection split's top-1, CE and calibrated CE (CE at the split's best temperature): what tuning picks
    on. Calibrated, so a setting cannot lead by confidence alone; the split is small (hundreds of images), so its
    logits are kept and the temperature fitted over all of them."""
    from ..meta.gradient import quiz_objective

    was = model.training
    model.eval()
    zs, ys = [], []
    for batch in loader:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with autocast():
            z = model(x)
        zs.append((z.logits if hasattr(z, "logits") else z).float())
        ys.append(y)
    model.train(was)
    z, y = torch.cat(zs), torch.cat(ys)
    return {"select_top1": 100.0 * (z.argmax(1) == y).double().mean().item(),
            "select_loss": quiz_objective(z, y, "ce").item(), "select_loss_cal": quiz_objective(z, y, "calibrated").item()}


@dataclass(frozen=True)
class LoopSettings:
    """What the loop itself needs to know (not how its parts were made)."""

    epochs: int
    base_lr: float
    meta_lr_schedule: str = "constant"
    bf16: bool = False
    channels_last: bool = False
    log_every: int = 50

    @classmethod
    def from_config(cls, cfg: Config, epochs: int | None = None) -> "LoopSettings":
        return cls(epochs or cfg.optim.epochs, cfg.optim.lr, cfg.meta.lr_schedule, cfg.run.bf16, cfg.run.channels_last,
                   cfg.run.log_every)


def autocast_for(settings: LoopSettings, device: torch.device) -> Callable:
    """bf16 autocast on CUDA when asked, else nothing (a context-manager factory)."""
    if settings.bf16 and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


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


class Trainer:
    def __init__(self, settings: LoopSettings, data: DataBundle, bundle: StudentBundle, optimizer: torch.optim.Optimizer,
                 scheduler, method, teacher: TeacherSource, *, device: torch.device, student: nn.Module | None = None,
                 meta: MetaLearner | None = None, lossnets: LossNetworks | None = None, rank: int = 0, world_size: int = 1):
        if len(data.train) == 0:
            raise ValueError(f"the training split ({data.train_size} images over {world_size} worker(s)) is smaller than "
                             "one batch; lower data.batch_size")
        self.settings, self.data, self.bundle, self.optimizer, self.scheduler = settings, data, bundle, optimizer, scheduler
        self.method, self.teacher, self.device = method, teacher, device
        self.student = student if student is not None else bundle  # the module that runs the step (DDP-wrapped or not)
        self.meta, self.lossnets, self.rank, self.world_size = meta, lossnets, rank, world_size
        self.learnable = bool(getattr(method, "learnable", False))
        self.state = TrainState()
        self._bad = torch.full((), -1, dtype=torch.long, device=device)  # the first step whose loss was non-finite
        self._last: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def epoch(self) -> int:
        return self.state.epoch

    def autocast(self):
        return autocast_for(self.settings, self.device)()

    def to_device(self, x, y):
        x = x.to(self.device, non_blocking=True)
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def student_state(self) -> torch.Tensor:
        progress = self.state.step / max(1, self.settings.epochs * len(self.data.train))
        return torch.tensor([progress, self.state.quiz_acc / 100.0], device=self.device)

    def meta_lr_scale(self) -> float:
        """1, or the student's current lr over its initial lr (``meta.lr_schedule=student``)."""
        if self.settings.meta_lr_schedule == "constant":
            return 1.0
        return self.optimizer.param_groups[0]["lr"] / self.settings.base_lr

    def lossnet_version(self) -> int | None:
        if self.meta is not None:
            return self.meta.version()
        return 0 if self.lossnets is not None else None

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: Batch | tuple) -> dict[str, Any]:
        """One student step. Returns the loss terms as device tensors (no host sync) and the meta-learner's floats."""
        batch = batch if isinstance(batch, Batch) else Batch(*batch)
        x, y = self.to_device(batch.x, batch.y)
        t = self.teacher.outputs(x, batch)
        state = self.student_state() if self.learnable else None
        with self.autocast():
            out = self.student(x)
            loss, parts = self.method(out, t, y, state, self.state.epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.state.step += 1
        self._bad = torch.where(~torch.isfinite(loss.detach()) & (self._bad < 0), self.state.step, self._bad)
        stats: dict[str, Any] = {"loss": loss.detach(), **{f"loss_{k}": v.detach() for k, v in parts.items()}}
        if self.meta is not None:
            t = t or TeacherOutputs(None)
            ctx = StepContext(self.state.step, self.state.epoch, batch, MetaBatch(x, y, t.logits, t.features), state, stats)
            stats.update(self.meta.after_step(self, ctx))
        return stats

    def check_finite(self, sums: dict[str, Any] | None = None, n: int = 1) -> None:
        """The host looks at the device's divergence mark (one sync), and at those of the students the meta-learner
        trains beside this one (an ES population's other particles)."""
        bad = int(self._bad)
        if bad >= 0:
            parts = {k: float(v) / max(n, 1) for k, v in (sums or {}).items()}
            raise TrainingDiverged(f"the student's loss became non-finite at step {bad} (epoch {self.state.epoch + 1}; "
                                   f"this epoch's mean loss terms so far: {parts}); lower optim.lr or meta.lr, or check "
                                   "the teacher")
        others = getattr(self.meta, "check_finite", None)  # students this trainer's meta-learner trains beside it
        if others is not None:
            others()

    # ------------------------------------------------------------------ epochs
    def train_epoch(self, on_step: Callable[[dict], None] | None = None) -> dict[str, float]:
        """One pass over this rank's training shard. ``on_step`` sees the scalars of the last host sync (every
        ``log_every`` steps), so a progress display never adds a sync."""
        self.student.train()
        loader = self.data.train
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.state.epoch)
        sums: dict[str, Any] = {}
        n = 0
        for batch in loader:
            stats = self.train_step(batch)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + (v.double() if isinstance(v, torch.Tensor) else v)
            n += 1
            if n % self.settings.log_every == 0:
                self.check_finite(sums, n)
                self._last = {k: float(v) / n for k, v in sums.items()}
            if on_step is not None:
                on_step(self._last)
        self.check_finite(sums, n)
        return {f"train_{k}": float(v) / max(n, 1) for k, v in sums.items()}

    def evaluate(self) -> dict[str, float]:
        test = evaluate(self.bundle, self.data.test, self.device, self.autocast)
        quiz = evaluate(self.bundle, self.data.quiz_eval or self.data.quiz, self.device, self.autocast)  # every image, in order
        out = {"test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"], "quiz_top1": quiz["top1"],
               "quiz_loss": quiz["loss"]}
        if getattr(self.data, "select_eval", None) is not None:
            out.update(evaluate_selection(self.bundle, self.data.select_eval, self.device, self.autocast))
        return out

    def end_epoch(self, train_metrics: dict[str, float], epoch_s: float) -> EpochRecord:
        """Step the lr schedule, evaluate, append to the history and return the epoch's record."""
        metrics = dict(train_metrics)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.state.epoch += 1
        metrics.update(self.evaluate())
        self.state.quiz_acc = metrics["quiz_top1"]
        metrics.update({"epoch": self.state.epoch, "epoch_s": epoch_s,
                        "meta_s": self.meta.meta_time if self.meta is not None else 0.0, "snapshots": 0})
        if self.meta is not None:
            metrics.update(self.meta.end_epoch(self, dict(metrics), epoch_s))
        self.state.history.append(metrics)
        return self.record(metrics)

    def record(self, metrics: dict[str, Any] | None = None) -> EpochRecord:
        if self.meta is not None:
            learned, counters = self.meta.learned_state(), self.meta.counters()
        else:
            learned, counters = (detached(self.lossnets) if self.lossnets is not None else None), None
        return EpochRecord(self.state.epoch, self.state.step, MappingProxyType(dict(metrics or {})), self.lossnet_version(),
                           learned, MappingProxyType(counters) if counters is not None else None, self.rank,
                           self.world_size, self.state_dict)

    def result(self, wall: float) -> dict[str, Any]:
        last = self.state.history[-1] if self.state.history else {}
        return {
            "epochs": self.state.epoch, "steps": self.state.step,
            "test_top1": last.get("test_top1"), "test_top5": last.get("test_top5"), "quiz_top1": last.get("quiz_top1"),
            **{k: last[k] for k in ("select_top1", "select_loss", "select_loss_cal") if k in last},
            "best_test_top1": max((h["test_top1"] for h in self.state.history), default=None),
            "wall_s": wall, "meta_s": self.meta.meta_time if self.meta is not None else 0.0,
            "meta": self.meta.counters() if self.meta is not None else None,
            "lossnet_version": self.lossnet_version(), "history": self.state.history,
            **(self.meta.result() if self.meta is not None else {}),
        }

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; weights-only-loadable (tensors, numbers, strings, lists)."""
        return {
            "student": self.bundle.net.state_dict(),
            "connector": self.bundle.connector.state_dict() if self.bundle.connector is not None else {},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": self.state.epoch, "step": self.state.step, "quiz_acc": self.state.quiz_acc,
            "history": self.state.history, "torch_rng": torch.get_rng_state(),
            "meta": self.meta.state_dict() if self.meta is not None else {},
            "lossnets": self.lossnets.state_dict() if self.lossnets is not None else {},
            "lossnet_version": self.lossnet_version(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.bundle.net.load_state_dict(sd["student"])
        if self.bundle.connector is not None:
            self.bundle.connector.load_state_dict(sd["connector"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.state.epoch, self.state.step, self.state.quiz_acc = sd["epoch"], sd["step"], sd["quiz_acc"]
        self.state.history = list(sd["history"])
        torch.set_rng_state(sd["torch_rng"])
        if self.lossnets is not None and sd.get("lossnets"):
            self.lossnets.load_state_dict(sd["lossnets"])
        if self.meta is not None and sd.get("meta"):
            self.meta.load_state_dict(sd["meta"])


def fit(trainer: Trainer, callbacks=(), progress=None, describe: dict[str, Any] | None = None) -> dict[str, Any]:
    """The single-process loop: epochs until done, callbacks after each; returns the result record (``describe``:
    what the run is — method, models, data, config — merged in)."""
    t0 = time.perf_counter()
    if trainer.state.epoch == 0:
        rec = trainer.record()
        for cb in callbacks:
            cb.on_fit_start(rec)
    total = trainer.settings.epochs * len(trainer.data.train)
    if progress is not None:
        progress.start(total, done=trainer.state.step)
    while trainer.state.epoch < trainer.settings.epochs:
        e0 = time.perf_counter()
        metrics = trainer.train_epoch(on_step=progress.step if progress is not None else None)
        rec = trainer.end_epoch(metrics, time.perf_counter() - e0)
        if progress is not None:
            progress.epoch(rec)
        for cb in callbacks:
            cb.on_epoch_end(rec)
    if progress is not None:
        progress.close()
    result = {**(describe or {}), **trainer.result(time.perf_counter() - t0)}
    for cb in callbacks:
        cb.on_fit_end(result)
    return result
