"""Evolution strategies in one process: ``meta.es_particles`` particle students trained side by side
on the same batches (common random numbers), each with the centre φ plus its own antithetic
perturbation; every ``meta_every`` steps each reports its quiz loss and the centre moves by the
(persistent) ES estimate. Under Ray the particles are workers and the LossNetServer plays the part
of ``ESTrainer.es_update`` (same ``ESEstimator``, same ``LossNetOptimizer``).

Cost: es_particles × a KD run (no meta-step at all), so ES is for learning a loss once and reusing
it (``lossnet.init_from`` + ``lossnet.frozen``) at KD's cost.
"""
from __future__ import annotations

import copy
import statistics
import time
from types import MappingProxyType
from typing import Any, Callable

import torch

from ..config import Config
from ..data import Batch, DataBundle, cycle
from ..losses import LossNetworks
from ..meta import ESEstimator, LossNetOptimizer, es_index, flatten
from .loop import EpochRecord, Trainer, TrainState


def perturbed(center: torch.Tensor, index: torch.Tensor, es: ESEstimator, round_: int, particle: int) -> torch.Tensor:
    flat = center.clone()
    flat[index] += es.perturbation(round_, particle)
    return flat


@torch.no_grad()
def particle_quiz_loss(trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
    """The particle's quiz objective (``meta.quiz_objective``) in eval mode (running BatchNorm statistics):
    what it would score."""
    from ..meta.gradient import quiz_objective

    was = trainer.bundle.training
    trainer.bundle.eval()
    try:
        return quiz_objective(trainer.bundle(x).logits.float(), y, trainer.cfg.meta.quiz_objective).item()
    finally:
        trainer.bundle.train(was)


class ESTrainer:
    """The particles, the centre φ with its optimizer, and the ES estimator (same epoch API as Trainer)."""

    def __init__(self, cfg: Config, data: DataBundle, teacher, lossnets: LossNetworks, device: torch.device | None = None):
        m = cfg.meta
        self.cfg, self.data = cfg, data
        self.lossnets = lossnets
        self.optimizer = LossNetOptimizer(lossnets, m.lr, m.clip_norm)
        self.meta_updater = self.optimizer
        self.index = es_index(lossnets, m.es_params)
        self.es = ESEstimator(len(self.index), m.es_particles, m.es_sigma, m.es_persistent, seed=cfg.run.seed)
        self.particles = [Trainer(cfg, data, teacher, device=device, lossnets=copy.deepcopy(lossnets))
                          for _ in range(m.es_particles)]
        self.device = self.particles[0].device
        self.lossnets.to(self.device)
        self.state = TrainState()
        self.meta_time = 0.0
        self._quiz_iter = None
        self.last_losses: dict[int, float] = {}
        self._perturb()

    @property
    def rank(self) -> int:
        return 0

    def lossnet_version(self) -> int:
        return self.optimizer.version

    def _perturb(self) -> None:
        center = flatten(list(self.lossnets.parameters()))
        for p, tr in enumerate(self.particles):
            flat = perturbed(center, self.index, self.es, self.es.rounds, p)
            LossNetOptimizer(tr.lossnets, 0.0, 1.0).load_flat(flat)

    def es_update(self) -> dict[str, float]:
        t0 = time.perf_counter()
        if self._quiz_iter is None:
            self._quiz_iter = cycle(self.data.quiz)
        b = next(self._quiz_iter)
        x, y = b[0].to(self.device), b[1].to(self.device)
        losses = {p: particle_quiz_loss(tr, x, y) for p, tr in enumerate(self.particles)}
        self.last_losses = losses
        g, used = self.es.gradient(self.es.rounds, losses)
        full = torch.zeros(self.optimizer.numel)
        full[self.index] = g
        scale = 1.0 if self.cfg.meta.lr_schedule == "constant" else (
            self.particles[0].optimizer.param_groups[0]["lr"] / self.cfg.optim.lr)
        accepted = used > 0 and self.optimizer.submit(full, lr_scale=scale, quiz_loss=statistics.mean(losses.values()))
        self._perturb()
        self.meta_time += time.perf_counter() - t0
        return {"meta_quiz_loss": statistics.mean(losses.values()), "meta_accepted": float(accepted)}

    def train_epoch(self, on_step: Callable[[dict], None] | None = None) -> dict[str, float]:
        loader = self.data.train
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.state.epoch)
        for tr in self.particles:
            tr.student.train()
        sums: dict[str, float] = {}
        n = 0
        freeze = self.cfg.meta.freeze_after_epoch
        for batch in loader:
            batch = batch if isinstance(batch, Batch) else Batch(*batch)
            stats = [tr.train_step(batch) for tr in self.particles]
            self.state.step += 1
            merged = {k: statistics.mean(s[k] for s in stats) for k in stats[0]}
            if (freeze is None or self.state.epoch < freeze) and self.state.step % self.cfg.meta.meta_every == 0:
                merged.update(self.es_update())
            for k, v in merged.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            if on_step is not None:
                on_step(merged)
        return {f"train_{k}": v / max(n, 1) for k, v in sums.items()}

    def end_epoch(self, train_metrics: dict[str, float], epoch_s: float) -> EpochRecord:
        recs = [tr.end_epoch({}, epoch_s) for tr in self.particles]
        self.state.epoch += 1
        metrics: dict[str, Any] = dict(train_metrics)
        for key in ("test_top1", "test_top5", "test_loss", "quiz_top1", "quiz_loss"):
            vals = [r.metrics[key] for r in recs]
            metrics[key] = statistics.mean(vals)
            metrics[f"{key}_min"], metrics[f"{key}_max"] = min(vals), max(vals)
        metrics.update({"epoch": self.state.epoch, "epoch_s": epoch_s, "meta_s": self.meta_time, "lr": recs[0].metrics["lr"],
                        "particles": len(self.particles)})
        metrics.update({f"meta_{k}": v for k, v in self.optimizer.counters().items() if isinstance(v, (int, float))})
        self.state.history.append(metrics)
        return self.record(metrics)

    def record(self, metrics: dict[str, Any] | None = None) -> EpochRecord:
        state = MappingProxyType({k: v.detach().to("cpu", copy=True) for k, v in self.lossnets.state_dict().items()})
        return EpochRecord(self.state.epoch, self.state.step, MappingProxyType(dict(metrics or {})), self.optimizer.version,
                           state, MappingProxyType(self.optimizer.counters()), 0, 1, self.state_dict)

    def result(self, wall: float) -> dict[str, Any]:
        res = self.particles[0].result(wall)
        last = self.state.history[-1] if self.state.history else {}
        res.update({"test_top1": last.get("test_top1"), "test_top5": last.get("test_top5"), "quiz_top1": last.get("quiz_top1"),
                    "epochs": self.state.epoch, "steps": self.state.step, "history": self.state.history, "meta_s": self.meta_time,
                    "meta": self.optimizer.counters(), "lossnet_version": self.optimizer.version,
                    "particles": [{"test_top1": tr.state.history[-1]["test_top1"], "quiz_top1": tr.state.history[-1]["quiz_top1"]}
                                  for tr in self.particles if tr.state.history],
                    "best_test_top1": max((h["test_top1"] for h in self.state.history), default=None)})
        return res

    def state_dict(self) -> dict[str, Any]:
        return {"particles": [tr.state_dict() for tr in self.particles], "center": self.optimizer.state_dict(),
                "es": self.es.state_dict(), "epoch": self.state.epoch, "step": self.state.step, "history": self.state.history,
                "meta_s": self.meta_time}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        for tr, s in zip(self.particles, sd["particles"]):
            tr.load_state_dict(s)
        self.optimizer.load_state_dict(sd["center"])
        self.es.load_state_dict(sd["es"])
        self.state.epoch, self.state.step, self.state.history = sd["epoch"], sd["step"], list(sd["history"])
        self.meta_time = float(sd.get("meta_s", 0.0))
        self._perturb()
