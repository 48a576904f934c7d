"""Meta-learning as one object the training loop calls after every student step: when to meta-step, from
which student state, on which batches and through which updater. The ``Trainer`` knows none of it.

* ``GradientMetaLearner`` — the unrolled (``higher`` / ``torch.func``) or implicit meta-gradient every
  ``meta_every`` steps, from the current student or an earlier snapshot, sent to a ``MetaUpdater`` (a local
  ``LossNetOptimizer`` or the Ray LossNetServer); records snapshots; keeps the quiz and fresh-batch streams.
* ``ESParticleLearner`` — this student is one evolution-strategies particle: every ``meta_every`` steps it
  reports its quiz loss to a coordinator (the Ray LossNetServer) and takes the new perturbed φ.
* ``ESPopulation`` — the whole ES population in one process: the trainer's student is particle 0, the other
  particles are trainers of their own, stepped on the same batch (common random numbers); the centre φ is
  updated with the same ``ESEstimator`` and ``LossNetOptimizer`` the server uses.
"""
from __future__ import annotations

import contextlib
import random
import statistics
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Protocol

import torch
from torch import nn

from ..config import MetaCfg
from ..data import Batch, cycle
from ..data.loaders import FORK_SEED
from ..losses import LossNetworks, TeacherOutputs
from ..meta import ESEstimator, LossNetOptimizer, MetaBatch, MetaStep, MetaUpdater, es_index, flatten
from ..meta.gradient import quiz_objective
from .snapshots import SnapshotStore, cpu_state


@dataclass
class StepContext:
    """What a meta-learner sees after one student step."""

    step: int                      # student steps taken so far (this one included)
    epoch: int
    batch: Batch                   # the raw batch (for particles that train on it too)
    meta_batch: MetaBatch          # the same batch on the device, with the teacher's outputs
    state: torch.Tensor | None     # the student's state inputs (progress, quiz accuracy), for learned losses
    stats: dict[str, torch.Tensor]  # the step's loss terms (device tensors)


class MetaLearner(Protocol):
    lossnets: LossNetworks | None
    meta_time: float

    def after_step(self, trainer, ctx: StepContext) -> dict[str, Any]: ...
    def end_epoch(self, trainer, metrics: dict[str, Any], epoch_s: float) -> dict[str, Any]: ...
    def version(self) -> int | None: ...
    def counters(self) -> dict | None: ...
    def learned_state(self) -> Mapping[str, torch.Tensor] | None: ...
    def result(self) -> dict[str, Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, sd: dict[str, Any]) -> None: ...


@contextlib.contextmanager
def requires_grad(module: nn.Module | None):
    """φ needs gradients only inside a meta-step; student steps leave it out of backward."""
    if module is None:
        yield
        return
    module.requires_grad_(True)
    try:
        yield
    finally:
        module.requires_grad_(False)


def frozen_at(cfg: MetaCfg, epoch: int) -> bool:
    return cfg.freeze_after_epoch is not None and epoch >= cfg.freeze_after_epoch


def detached(lossnets: nn.Module) -> Mapping[str, torch.Tensor]:
    return MappingProxyType({k: v.detach().to("cpu", copy=True) for k, v in lossnets.state_dict().items()})


class Stream:
    """An endless stream of batches from a loader that resumes where it stopped without replaying the batches it
    already gave (``cycle(loader, start)`` seeks straight to batch ``consumed``). It draws from a fork of the
    loader (``fork``: its own sampler and epoch, taken at the first draw so a teacher cache attached after
    construction comes along): moving to its next pass never moves the epoch of the loader the Trainer iterates.
    ``reseed`` moves the fork's shuffle seed (a fresh-batch stream: not the training order)."""

    def __init__(self, loader, reseed: int = 0):
        self.loader, self.reseed, self.consumed, self._it, self._own = loader, reseed, 0, None, None

    def next(self):
        if self._it is None:
            if self._own is None:
                self._own = self.loader.fork(self.reseed) if hasattr(self.loader, "fork") else self.loader
            self._it = cycle(self._own, start=self.consumed)
        self.consumed += 1
        return next(self._it)

    def seek(self, consumed: int) -> None:
        self.consumed, self._it = int(consumed), None


class GradientMetaLearner:
    """Meta-gradients (unroll or implicit) every ``meta_every`` steps, through ``updater``."""

    def __init__(self, cfg: MetaCfg, method, lossnets: LossNetworks, updater: MetaUpdater, snapshots: SnapshotStore,
                 data, teacher, to_device, seed: int, rank: int = 0):
        self.cfg, self.lossnets, self.updater, self.snapshots = cfg, lossnets, updater, snapshots
        self.teacher, self.to_device, self.rank = teacher, to_device, rank
        self.step_fn = MetaStep(cfg, method, lossnets)
        self.snap_rng = random.Random(seed * 7919 + 1 + 104729 * rank)
        self.quiz, self.fresh = Stream(data.quiz), Stream(data.train, reseed=FORK_SEED)
        self.meta_time = 0.0

    def active(self, epoch: int) -> bool:
        return not frozen_at(self.cfg, epoch)

    def after_step(self, trainer, ctx: StepContext) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.active(ctx.epoch) and ctx.step % self.cfg.meta_every == 0:
            out = self.meta_update(trainer, ctx.meta_batch, ctx.state)
        if self.rank == 0 and ctx.step % self.cfg.snapshot_every == 0:
            self.snapshots.record(ctx.step, cpu_state(trainer.bundle))
        return out

    def _fresh_batch(self) -> MetaBatch:
        b = self.fresh.next()
        b = b if isinstance(b, Batch) else Batch(*b)
        x, y = self.to_device(b.x, b.y)
        t = self.teacher.outputs(x, b) or TeacherOutputs(None)
        return MetaBatch(x, y, t.logits, t.features)

    def meta_update(self, trainer, batch: MetaBatch, state) -> dict[str, Any]:
        t0 = time.perf_counter()
        m = self.cfg
        batches = [(batch if m.batch_source == "same" else self._fresh_batch()).first(m.unroll_batch_size)
                   for _ in range(m.unroll_steps)]
        q = self.quiz.next()
        xq, yq = self.to_device(q[0], q[1])
        start = None
        if m.p_snapshot > 0 and self.snap_rng.random() < m.p_snapshot:
            start = self.snapshots.sample(self.snap_rng)  # None while nothing is recorded
            if start is not None:
                start = {k: v.to(trainer.device) for k, v in start.items()}
        with trainer.autocast(), requires_grad(self.lossnets):
            loss, grads = self.step_fn.compute(trainer.bundle, trainer.optimizer, batches, xq, yq, state, trainer.state.epoch,
                                               start)
        q_loss = loss.item()
        accepted = self.updater.submit(flatten(grads), lr_scale=trainer.meta_lr_scale(), from_snapshot=start is not None,
                                       quiz_loss=q_loss)
        self.meta_time += time.perf_counter() - t0
        out = {"meta_quiz_loss": q_loss, "meta_from_snapshot": float(start is not None)}
        if accepted is not None:  # None: an async submission whose outcome arrives later
            out["meta_accepted"] = float(accepted)
        return out

    def end_epoch(self, trainer, metrics, epoch_s) -> dict[str, Any]:
        counters = self.counters() or {}
        return {"snapshots": len(self.snapshots),
                **{f"meta_{k}": v for k, v in counters.items() if isinstance(v, (int, float))}}

    def version(self) -> int:
        return self.updater.version

    def counters(self) -> dict:
        return self.updater.counters()

    def learned_state(self):
        return detached(self.lossnets)

    def result(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"snap_rng": list(self.snap_rng.getstate()[1]), "consumed": {"quiz": self.quiz.consumed, "fresh": self.fresh.consumed},
                "updater": self.updater.state_dict() if isinstance(self.updater, LossNetOptimizer) else {},
                "meta_s": self.meta_time}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.snap_rng.setstate((3, tuple(sd["snap_rng"]), None))
        self.quiz.seek(sd.get("consumed", {}).get("quiz", 0))
        self.fresh.seek(sd.get("consumed", {}).get("fresh", 0))
        if isinstance(self.updater, LossNetOptimizer) and sd.get("updater"):
            self.updater.load_state_dict(sd["updater"])
        self.meta_time = float(sd.get("meta_s", 0.0))


# --------------------------------------------------------------------------- evolution strategies
def perturbed(center: torch.Tensor, index: torch.Tensor, es: ESEstimator, round_: int, particle: int) -> torch.Tensor:
    flat = center.clone()
    flat[index] += es.perturbation(round_, particle)
    return flat


@torch.no_grad()
def particle_quiz_loss(trainer, x: torch.Tensor, y: torch.Tensor, kind: str) -> float:
    """The particle's quiz objective (``meta.quiz_objective``) in eval mode (running BatchNorm statistics):
    what it would score."""
    was = trainer.bundle.training
    trainer.bundle.eval()
    try:
        return quiz_objective(trainer.bundle(x).logits.float(), y, kind).item()
    finally:
        trainer.bundle.train(was)


class ESParticleLearner:
    """This student is one ES particle; ``particle`` (e.g. the Ray ``ESParticle`` client) reports the quiz loss
    every ``meta_every`` steps and loads the next perturbed φ into ``lossnets``."""

    def __init__(self, cfg: MetaCfg, lossnets: LossNetworks, particle):
        self.cfg, self.lossnets, self.particle = cfg, lossnets, particle
        self.meta_time = 0.0

    def after_step(self, trainer, ctx: StepContext) -> dict[str, Any]:
        if frozen_at(self.cfg, ctx.epoch) or ctx.step % self.cfg.meta_every:
            return {}
        t0 = time.perf_counter()
        out = self.particle.step(trainer)
        self.meta_time += time.perf_counter() - t0
        return out

    def end_epoch(self, trainer, metrics, epoch_s) -> dict[str, Any]:
        return {}

    def version(self) -> int:
        return self.particle.version

    def counters(self) -> None:
        return None

    def learned_state(self):
        return detached(self.lossnets)

    def result(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        own = self.particle.state_dict() if hasattr(self.particle, "state_dict") else {}
        return {"meta_s": self.meta_time, "particle": own}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Runs after the trainer loaded φ from the checkpoint: the particle then sets its own φ and quiz position."""
        self.meta_time = float(sd.get("meta_s", 0.0))
        if hasattr(self.particle, "load_state_dict"):
            self.particle.load_state_dict(sd.get("particle") or {})


class ESPopulation:
    """Every ES particle in one process. The trainer that owns this learner trains particle 0; ``particles``
    (built like it, each with its own copy of φ) train particles 1..P−1 on the same batches. Every ``meta_every``
    steps each particle's quiz loss on one shared quiz batch goes into the (persistent) antithetic estimate of
    the centre's gradient, one Adam step on the centre, and every particle takes the centre plus its next
    perturbation. Cost: P students (no meta-step); learn a loss once, reuse it frozen at KD's cost."""

    def __init__(self, cfg: MetaCfg, seed: int, lossnets: LossNetworks, particles: list, data):
        self.cfg, self.lossnets, self.particles = cfg, lossnets, particles
        self.optimizer = LossNetOptimizer(lossnets, cfg.lr, cfg.clip_norm)
        self.index = es_index(lossnets, cfg.es_params)
        self.es = ESEstimator(len(self.index), cfg.es_particles, cfg.es_sigma, cfg.es_persistent, seed=seed)
        self.quiz = Stream(data.quiz)
        self.meta_time = 0.0
        self.last_losses: dict[int, float] = {}
        self._last: list[dict] = []
        self._trainer = None

    def attach(self, trainer) -> None:
        """The owning trainer (particle 0) exists: give every particle its first perturbation."""
        self._trainer = trainer
        self.lossnets.to(trainer.device)
        self._perturb()

    def _all(self) -> list:
        return [self._trainer, *self.particles]

    def _perturb(self) -> None:
        center = flatten(list(self.lossnets.parameters()))
        for p, tr in enumerate(self._all()):
            LossNetOptimizer(tr.lossnets, 0.0, 1.0).load_flat(perturbed(center, self.index, self.es, self.es.rounds, p))

    def after_step(self, trainer, ctx: StepContext) -> dict[str, Any]:
        stats = [ctx.stats] + [tr.train_step(ctx.batch) for tr in self.particles]
        merged: dict[str, Any] = {k: torch.stack([s[k].double() for s in stats]).mean() for k in ctx.stats}
        if not frozen_at(self.cfg, ctx.epoch) and ctx.step % self.cfg.meta_every == 0:
            merged.update(self.es_update(trainer))
        return merged

    def check_finite(self) -> None:
        """Every other particle's divergence mark (the owning trainer checks its own): a diverged particle stops the
        run, naming itself, instead of training on with a NaN loss that only ever drops its pair from the estimate."""
        for p, tr in enumerate(self.particles, start=1):
            try:
                tr.check_finite()
            except RuntimeError as e:  # TrainingDiverged (loop.py imports this module)
                raise type(e)(f"ES particle {p}: {e}") from None

    def es_update(self, trainer) -> dict[str, float]:
        t0 = time.perf_counter()
        b = self.quiz.next()
        x, y = b[0].to(trainer.device), b[1].to(trainer.device)
        losses = {p: particle_quiz_loss(tr, x, y, self.cfg.quiz_objective) for p, tr in enumerate(self._all())}
        self.last_losses = losses
        g, used = self.es.gradient(self.es.rounds, losses)
        full = torch.zeros(self.optimizer.numel)
        full[self.index] = g
        accepted = used > 0 and self.optimizer.submit(full, lr_scale=trainer.meta_lr_scale(),
                                                      quiz_loss=statistics.mean(losses.values()))
        self._perturb()
        self.meta_time += time.perf_counter() - t0
        return {"meta_quiz_loss": statistics.mean(losses.values()), "meta_accepted": float(accepted)}

    def end_epoch(self, trainer, metrics, epoch_s) -> dict[str, Any]:
        """Every other particle ends its epoch too; the run's metrics are the population's (mean, min, max)."""
        recs = [metrics] + [dict(tr.end_epoch({}, epoch_s).metrics) for tr in self.particles]
        self._last = [{"test_top1": r["test_top1"], "quiz_top1": r["quiz_top1"]} for r in recs]
        out: dict[str, Any] = {}
        for key in ("test_top1", "test_top5", "test_loss", "quiz_top1", "quiz_loss"):
            vals = [r[key] for r in recs]
            out[key] = statistics.mean(vals)
            out[f"{key}_min"], out[f"{key}_max"] = min(vals), max(vals)
        out["particles"] = len(recs)
        out.update({f"meta_{k}": v for k, v in self.optimizer.counters().items() if isinstance(v, (int, float))})
        return out

    def version(self) -> int:
        return self.optimizer.version

    def counters(self) -> dict:
        return self.optimizer.counters()

    def learned_state(self):
        return detached(self.lossnets)

    def result(self) -> dict[str, Any]:
        return {"particles": list(self._last)}

    def state_dict(self) -> dict[str, Any]:
        return {"particles": [tr.state_dict() for tr in self.particles], "center": self.optimizer.state_dict(),
                "es": self.es.state_dict(), "quiz": self.quiz.consumed, "meta_s": self.meta_time}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for tr, s in zip(self.particles, sd["particles"]):
            tr.load_state_dict(s)
        self.optimizer.load_state_dict(sd["center"])
        self.es.load_state_dict(sd["es"])
        self.quiz.seek(sd.get("quiz", 0))
        self.meta_time = float(sd.get("meta_s", 0.0))
        self._perturb()

