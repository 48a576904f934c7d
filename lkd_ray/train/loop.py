"""The single-process distillation loop for every method (ce | kd | dkd | dist | lkd).

Pluggable at its seams so the Ray workers reuse it unchanged: the student wrapper (DDP), the
meta-updater (local Adam or the LossNetServer), the snapshot store (in memory or the S3 pool)
and an end-of-epoch hook (``ray.train.report``).
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import nn

from ..config import Config
from ..data import DataBundle, build_data, cycle
from ..losses import Connector, DistillObjective, build_lossnets
from ..meta import MetaBatch, MetaOptimizer, MetaStep, StudentBundle
from ..models import TappedModel, build_model
from .logging import RunLogger, atomic_write_json
from .snapshots import InMemorySnapshotStore, SnapshotStore, cpu_state


class TrainingDiverged(RuntimeError):
    pass


class MetaUpdater(Protocol):
    """Where meta-gradients go: applied locally, or sent to the Ray LossNetServer."""

    def apply(self, grads: list[torch.Tensor], lr_scale: float = 1.0) -> bool: ...


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
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
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


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    quiz_acc: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: Config, teacher: TappedModel | None, data: DataBundle | None = None, *,
                 device: torch.device | None = None, out_dir: str | Path | None = None,
                 snapshot_store: SnapshotStore | None = None, meta_updater: MetaUpdater | None = None,
                 wrap_student: Callable[[nn.Module], nn.Module] | None = None,
                 on_epoch_end: Callable[["Trainer", dict], None] | None = None,
                 rank: int = 0, world_size: int = 1, log: bool = True):
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.device = device or resolve_device(cfg.run.device)
        seed_everything(cfg.run.seed)
        self.data = data or build_data(cfg.data, cfg.run.seed, rank, world_size, cfg.run.cache_dir)
        if len(self.data.train) == 0:
            raise ValueError(f"the training split ({self.data.train_size} images over {world_size} worker(s)) is smaller than "
                             f"one batch of {cfg.data.batch_size}; lower data.batch_size")
        if teacher is None and cfg.loss.method != "ce":
            raise ValueError(f"method {cfg.loss.method!r} distils from a teacher; none was given")
        self.teacher = teacher.to(self.device).eval().requires_grad_(False) if teacher is not None else None
        net = build_model(cfg.model.student, self.data.num_classes, self.data.in_channels)
        if self.teacher is not None:
            self._check_teacher(net)
        connector, t_size = None, None
        if cfg.loss.w_feat > 0:
            with torch.no_grad():
                probe = torch.zeros(1, self.data.in_channels, self.data.image_size, self.data.image_size)
                t_shape = self.teacher.cpu().forward_features(probe).shape
                self.teacher.to(self.device)
            connector, t_size = Connector(net.feature_channels, t_shape[1]), tuple(t_shape[-2:])
        self.bundle = StudentBundle(net, connector, t_size).to(self.device)
        if cfg.run.channels_last:
            self.bundle.to(memory_format=torch.channels_last)
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)
        self.student = wrap_student(self.bundle) if wrap_student else self.bundle
        o = cfg.optim
        self.optimizer = torch.optim.SGD(self.bundle.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay, nesterov=o.nesterov)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.lossnets = build_lossnets(cfg.loss, cfg.lossnet, cfg.run.seed)
        if self.lossnets is not None:
            self.lossnets.to(self.device)
        self.objective = DistillObjective(cfg.loss, self.lossnets)
        self.is_lkd = cfg.loss.method == "lkd"
        self.meta_step = MetaStep(cfg.meta, self.objective, self.lossnets) if self.is_lkd else None
        self.meta_optimizer = MetaOptimizer(self.lossnets, cfg.meta.lr, cfg.meta.clip_norm) if self.is_lkd else None
        self.meta_updater: MetaUpdater | None = meta_updater or self.meta_optimizer
        self.snapshots = snapshot_store if snapshot_store is not None else InMemorySnapshotStore(cfg.meta.sampling, cfg.meta.max_snapshots)
        self.snap_rng = random.Random(cfg.run.seed * 7919 + 1)
        self.on_epoch_end = on_epoch_end
        self.state = TrainState()
        self.out_dir = Path(out_dir) if out_dir else None
        self.logger = RunLogger(self.out_dir, enabled=log and rank == 0)
        self.meta_time = 0.0
        self._quiz_iter = None
        self._fresh_iter = None

    # ------------------------------------------------------------------ helpers
    def _check_teacher(self, net: nn.Module) -> None:
        with torch.no_grad():
            probe = torch.zeros(2, self.data.in_channels, self.data.image_size, self.data.image_size)
            t_out = self.teacher.cpu().eval()(probe).shape[1]
            self.teacher.to(self.device)
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

    def teacher_outputs(self, x):
        if self.teacher is None:
            return None, None
        with torch.no_grad(), self.autocast():
            if self.objective.uses_features:
                f = self.teacher.forward_features(x)
                return self.teacher.forward_head(f), f
            return self.teacher(x), None

    def meta_active(self) -> bool:
        f = self.cfg.meta.freeze_after_epoch
        return self.is_lkd and (f is None or self.state.epoch < f)

    # ------------------------------------------------------------------ steps
    def train_step(self, x, y) -> dict[str, float]:
        x, y = self._to(x, y)
        t_logits, t_feat = self.teacher_outputs(x)
        state = self.student_state() if self.is_lkd else None
        with self.autocast():
            out = self.student(x)
            loss, parts = self.objective(out, t_logits, t_feat, y, state, self.state.epoch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"student loss is {loss.item()} at step {self.state.step} ({ {k: v.item() for k, v in parts.items()} }); "
                                   "lower optim.lr or meta.lr, or check the teacher")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.state.step += 1
        stats = {"loss": loss.item(), **{f"loss_{k}": v.item() for k, v in parts.items()}}
        if self.meta_active() and self.state.step % self.cfg.meta.meta_every == 0:
            stats.update(self.meta_update(MetaBatch(x, y, t_logits, t_feat), state))
        if self.is_lkd and self.rank == 0 and self.state.step % self.cfg.meta.snapshot_every == 0:
            self.snapshots.record(self.state.step, cpu_state(self.bundle))
        return stats

    def _quiz_batch(self):
        if self._quiz_iter is None:
            self._quiz_iter = cycle(self.data.quiz)
        return self._to(*next(self._quiz_iter))

    def _fresh_batch(self) -> MetaBatch:
        if self._fresh_iter is None:
            self._fresh_iter = cycle(self.data.train)
        x, y = self._to(*next(self._fresh_iter))
        t_logits, t_feat = self.teacher_outputs(x)
        return MetaBatch(x, y, t_logits, t_feat)

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
        if m.p_snapshot > 0 and len(self.snapshots) > 0 and self.snap_rng.random() < m.p_snapshot:
            start = self.snapshots.sample(self.snap_rng)
            if start is not None:
                start = {k: v.to(self.device) for k, v in start.items()}
        with self.autocast():
            q, grads = self.meta_step.compute(self.bundle, self.optimizer, batches, xq, yq, state, self.state.epoch, start)
        accepted = self.meta_updater.apply(grads, self.meta_lr_scale())
        if self.meta_optimizer is not None and start is not None:
            self.meta_optimizer.counters.from_snapshot += 1
        if self.meta_optimizer is not None:
            self.meta_optimizer.counters.last_quiz_loss = q.item()
        self.meta_time += time.perf_counter() - t0
        return {"meta_quiz_loss": q.item(), "meta_accepted": float(accepted)}

    # ------------------------------------------------------------------ epochs
    def train_epoch(self) -> dict[str, float]:
        from tqdm.auto import tqdm

        self.student.train()
        loader = self.data.train
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.state.epoch)
        sums: dict[str, float] = {}
        n = 0
        bar = tqdm(loader, total=len(loader), desc=f"{self.cfg.loss.method} epoch {self.state.epoch + 1}/{self.cfg.optim.epochs}",
                   disable=not (self.cfg.run.progress and self.rank == 0), leave=False, dynamic_ncols=True)
        for x, y in bar:
            stats = self.train_step(x, y)
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            if n % 20 == 0:
                bar.set_postfix(loss=f"{stats['loss']:.3f}")
        bar.close()
        return {f"train_{k}": v / max(n, 1) for k, v in sums.items()}

    def save_lossnet_version(self) -> Path | None:
        """Write φ to ``out_dir/lossnet/v<version>.pt`` (the LossNetServer's layout) so ``plot`` can show
        what the loss looked like at each point in training. Atomic; a version already written is kept."""
        if self.out_dir is None or self.rank != 0 or self.meta_optimizer is None or self.meta_updater is not self.meta_optimizer:
            return None  # under Ray the LossNetServer persists the versions
        import io

        from ..storage import atomic_write_bytes

        v = self.meta_optimizer.counters.version
        path = self.out_dir / "lossnet" / f"v{v}.pt"
        if not path.exists():
            buf = io.BytesIO()
            torch.save({"lossnets": self.lossnets.state_dict(), "version": v, "epoch": self.state.epoch,
                        "step": self.state.step, "counters": self.meta_optimizer.counters.as_dict(),
                        "config": self.cfg.to_dict()}, buf)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue())
        return path

    def fit(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        if self.state.epoch == 0:
            self.save_lossnet_version()
        while self.state.epoch < self.cfg.optim.epochs:
            e0 = time.perf_counter()
            metrics = self.train_epoch()
            metrics["lr"] = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            self.state.epoch += 1
            test = evaluate(self.bundle, self.data.test, self.device, self.autocast)
            quiz = evaluate(self.bundle, self.data.quiz, self.device, self.autocast)
            self.state.quiz_acc = quiz["top1"]
            metrics.update({"epoch": self.state.epoch, "test_top1": test["top1"], "test_top5": test["top5"],
                            "test_loss": test["loss"], "quiz_top1": quiz["top1"], "epoch_s": time.perf_counter() - e0,
                            "meta_s": self.meta_time})
            if self.meta_optimizer is not None and self.meta_updater is self.meta_optimizer:  # remote: the server reports
                metrics.update({f"meta_{k}": v for k, v in self.meta_optimizer.counters.as_dict().items()})
            metrics["snapshots"] = len(self.snapshots) if self.is_lkd else 0
            self.state.history.append(metrics)
            self.logger.log(self.state.step, metrics)
            self.save_lossnet_version()
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, metrics)
        wall = time.perf_counter() - t0
        return self.finish(wall)

    def finish(self, wall: float) -> dict[str, Any]:
        last = self.state.history[-1] if self.state.history else {}
        result = {
            "method": self.cfg.loss.method, "student": self.cfg.model.student, "teacher": self.cfg.model.teacher,
            "dataset": self.cfg.data.dataset, "synthetic_data": bool(self.data.synthetic),
            "epochs": self.state.epoch, "steps": self.state.step, "seed": self.cfg.run.seed,
            "test_top1": last.get("test_top1"), "test_top5": last.get("test_top5"), "quiz_top1": last.get("quiz_top1"),
            "best_test_top1": max((h["test_top1"] for h in self.state.history), default=None),
            "wall_s": wall, "meta_s": self.meta_time,
            "meta": self.meta_optimizer.counters.as_dict() if self.meta_optimizer is not None else None,
            "history": self.state.history, "config": self.cfg.to_dict(),
        }
        if self.out_dir is not None and self.rank == 0:
            atomic_write_json(self.out_dir / "result.json", result)
            if self.lossnets is not None:
                torch.save(self.lossnets.state_dict(), self.out_dir / "lossnet_final.pt")
        self.logger.close()
        return result

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs; weights-only-loadable (tensors, numbers, strings, lists)."""
        return {
            "student": self.bundle.net.state_dict(),
            "connector": self.bundle.connector.state_dict() if self.bundle.connector is not None else {},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "epoch": self.state.epoch, "step": self.state.step, "quiz_acc": self.state.quiz_acc,
            "history": self.state.history,
            "torch_rng": torch.get_rng_state(), "snap_rng": list(self.snap_rng.getstate()[1]),
            "meta": self.meta_optimizer.state_dict() if self.meta_optimizer is not None else {},
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
        self.snap_rng.setstate((3, tuple(sd["snap_rng"]), None))
        if self.meta_optimizer is not None and sd.get("meta"):
            self.meta_optimizer.load_state_dict(sd["meta"])
