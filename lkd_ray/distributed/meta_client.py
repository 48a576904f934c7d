"""The worker side of the LossNetServer: a ``MetaUpdater`` for the trainer, and an ES particle.

**sync**: the ranks of one trainer all-reduce their meta-gradients over the Train process group
(gloo on CPU, NCCL on GPU), the leader (rank 0) submits the round — one message, one Adam step,
whatever the rank count — and broadcasts the new φ (one flat buffer) back to every rank.
**async**: each rank submits on its own (fire and forget) and picks up newer φ when it arrives; finished
calls are collected as they complete, so what the server refused (and any error of the call) is counted
per rank (``client_counters``) and reaches the run's result.
"""
from __future__ import annotations

import logging

import ray
import torch
import torch.distributed as dist

from ..meta import LossNetOptimizer, flatten

log = logging.getLogger(__name__)


def _load(lossnets: torch.nn.Module, flat: torch.Tensor) -> None:
    LossNetOptimizer(lossnets, 0.0, 1.0).load_flat(flat)


class RemoteMetaUpdater:
    def __init__(self, server, rank: int, world: int, mode: str, lossnets: torch.nn.Module, sender: str,
                 device: torch.device | None = None):
        self.server, self.rank, self.world, self.mode, self.lossnets = server, rank, world, mode, lossnets
        self.sender, self.device = sender, device or torch.device("cpu")
        self.round = 0
        self._version = -1
        self._server_counters: dict = {}
        self._inflight: list = []
        self._pending_get = None
        self.client = {"submitted": 0, "accepted": 0, "rejected": 0, "duplicates": 0, "errors": 0, "rejected_reasons": {}}
        self.pull(blocking=True)

    @property
    def version(self) -> int:
        return self._version

    def counters(self) -> dict:
        return dict(self._server_counters, version=self._version,
                    **{f"client_{k}": v for k, v in self.client.items() if isinstance(v, int)})

    def client_counters(self) -> dict:
        return {"sender": self.sender, "rank": self.rank, "mode": self.mode, **self.client,
                "rejected_reasons": dict(self.client["rejected_reasons"])}

    def _collect(self, refs: list) -> None:
        """Count the outcome of finished async submissions (the server's answer, or the call's error)."""
        for ref in refs:
            try:
                res = ray.get(ref)
            except ray.exceptions.RayError as e:
                from .lossnet_server import LossNetPersistError, LossNetStorageError

                if isinstance(getattr(e, "cause", None), (LossNetPersistError, LossNetStorageError)):
                    raise  # the server stopped saving versions: the run stops (exit 4 / 3), not counted and carried on
                self.client["errors"] += 1
                log.warning("async meta-gradient submission from %s failed: %s", self.sender, str(e).splitlines()[0])
                continue
            if res.get("duplicate"):
                self.client["duplicates"] += 1
            elif res.get("accepted"):
                self.client["accepted"] += 1
            else:
                self.client["rejected"] += 1
                why = str(res.get("reason", "?")).split(":")[0]
                self.client["rejected_reasons"][why] = self.client["rejected_reasons"].get(why, 0) + 1

    def refresh_counters(self) -> dict:
        self._server_counters = {k[len("meta_"):]: v for k, v in ray.get(self.server.report.remote()).items()
                                 if k.startswith("meta_")}
        return self.counters()

    def pull(self, blocking: bool = False) -> None:
        if blocking:
            v, flat = ray.get(self.server.get.remote(self._version))
            self._set(v, flat)
            return
        if self._pending_get is not None:
            ready, _ = ray.wait([self._pending_get], timeout=0)
            if ready:
                self._set(*ray.get(self._pending_get))
                self._pending_get = None
        if self._pending_get is None:
            self._pending_get = self.server.get.remote(self._version)

    def _set(self, v: int, flat: torch.Tensor | None) -> None:
        if flat is not None and v > self._version:
            _load(self.lossnets, flat)
            self._version = v

    def _broadcast(self, version: int, accepted: bool, flat: torch.Tensor | None) -> tuple[int, bool, torch.Tensor]:
        """Rank 0's outcome of the round → every rank (one small header, one flat buffer)."""
        n = sum(p.numel() for p in self.lossnets.parameters())
        head = torch.tensor([float(version), float(accepted)], dtype=torch.float64, device=self.device)
        body = (flat.to(self.device, torch.float32) if self.rank == 0 else torch.zeros(n, device=self.device))
        dist.broadcast(head, 0)
        dist.broadcast(body, 0)
        return int(head[0].item()), bool(head[1].item()), body.cpu()

    def submit(self, grad: torch.Tensor, *, lr_scale: float = 1.0, from_snapshot: bool = False,
               quiz_loss: float | None = None) -> bool | None:
        """Sync: the round's outcome. Async: None — the submission is on its way; its outcome is counted when the
        call completes (``client_counters``)."""
        grad = grad.detach().float().cpu()
        if self.mode != "sync":
            if self._inflight:
                done, self._inflight = ray.wait(self._inflight, num_returns=len(self._inflight), timeout=0)
                self._collect(done)
            self._inflight.append(self.server.submit_async.remote(self.sender, self.round, grad, self._version, lr_scale,
                                                                  int(from_snapshot), quiz_loss))
            self.client["submitted"] += 1
            self.round += 1
            self.pull(blocking=False)
            return None
        finite = bool(torch.isfinite(grad).all())
        nonfinite = 0
        if self.world > 1:  # average over the ranks that produced a finite meta-gradient
            buf = torch.cat([grad if finite else torch.zeros_like(grad),
                             torch.tensor([float(finite), float(lr_scale), float(from_snapshot), quiz_loss or 0.0])])
            buf = buf.to(self.device)
            dist.all_reduce(buf)
            buf = buf.cpu()
            n_finite = int(round(buf[-4].item()))
            nonfinite = self.world - n_finite
            grad = buf[:-4] / max(n_finite, 1)
            lr_scale, from_snapshot = buf[-3].item() / self.world, int(round(buf[-2].item()))
            quiz_loss = buf[-1].item() / self.world
            finite = n_finite > 0
        elif not finite:
            nonfinite = 1
        accepted, version, flat = False, self._version, None
        if self.rank == 0:
            res = self._leader_submit(grad if finite else None, lr_scale, from_snapshot, quiz_loss, nonfinite)
            accepted, version, flat = bool(res["accepted"]), int(res["version"]), res["phi"]
        if self.world > 1:
            version, accepted, flat = self._broadcast(version, accepted, flat)
        if flat is not None and version != self._version:
            _load(self.lossnets, flat)
            self._version = version
        self.round += 1
        return accepted

    def _leader_submit(self, grad, lr_scale, from_snapshot, quiz_loss, nonfinite) -> dict:
        res = ray.get(self.server.submit.remote(self.sender, self.round, grad, self._version, lr_scale, from_snapshot,
                                                quiz_loss, nonfinite))
        if not res["accepted"] and str(res.get("reason", "")).startswith("wrong version"):
            server_v = res["version"]
            if server_v < self._version:  # the server restarted from an older save: give it our newer φ
                ray.get(self.server.adopt.remote(self._version, flatten(list(self.lossnets.parameters())),
                                                 f"restored v{server_v} after a restart; leader {self.sender} holds v{self._version}"))
            else:  # the server moved on without us (another trainer, or a resumed run): take its φ, then retry
                log.warning("leader %s at v%s, server at v%s: taking the server's φ", self.sender, self._version, server_v)
                self.pull(blocking=True)
            res = ray.get(self.server.submit.remote(self.sender, self.round, grad, self._version, lr_scale, from_snapshot,
                                                    quiz_loss, nonfinite))
        return res

    def flush(self) -> None:
        """Wait for every async submission and count its outcome."""
        if self._inflight:
            refs, self._inflight = self._inflight, []
            self._collect(refs)


class ESParticle:
    """One ES particle per Ray worker: train with centre + perturbation, report (particle, round, loss),
    wait for the round to close, take the new centre. A message is a few bytes."""

    def __init__(self, server, particle: int, cfg, lossnets: torch.nn.Module):
        from ..meta import ESEstimator, es_index

        self.server, self.particle, self.cfg, self.lossnets = server, particle, cfg, lossnets
        m = cfg.meta
        self.index = es_index(lossnets, m.es_params)
        self.es = ESEstimator(len(self.index), m.es_particles, m.es_sigma, m.es_persistent, seed=cfg.run.seed)
        self._quiz, self._quiz_start = None, 0
        v, flat = ray.get(server.get.remote(-1))
        self._take(v, ray.get(server.report.remote())["es_round"], flat)

    def _take(self, version: int, round_: int, center: torch.Tensor) -> None:
        from ..train.meta_learning import perturbed

        self.version, self.round = int(version), int(round_)
        _load(self.lossnets, perturbed(center, self.index, self.es, self.round, self.particle))

    def step(self, trainer) -> dict:
        from ..train.meta_learning import Stream, particle_quiz_loss

        if self._quiz is None:
            self._quiz = Stream(trainer.data.quiz)
            self._quiz.seek(self._quiz_start)
        b = self._quiz.next()
        loss = particle_quiz_loss(trainer, b[0].to(trainer.device), b[1].to(trainer.device), self.cfg.meta.quiz_objective)
        res = ray.get(self.server.es_report.remote(self.particle, self.round, loss, trainer.meta_lr_scale()))
        self._take(res["version"], res["round"], res["phi"])
        return {"meta_quiz_loss": loss, "meta_accepted": float(bool(res.get("accepted")))}

    def state_dict(self) -> dict:
        """What this particle needs beyond its trainer's state to resume: how far it read its quiz stream."""
        return {"quiz_consumed": self._quiz.consumed if self._quiz is not None else 0}

    def load_state_dict(self, sd: dict) -> None:
        """Resume: seek the quiz stream, and take the server's current centre with *this* particle's perturbation
        (the loaded trainer state holds φ as it was at the checkpoint, which the server may have moved past)."""
        self._quiz, self._quiz_start = None, int(sd.get("quiz_consumed", 0))
        v, flat = ray.get(self.server.get.remote(-1))
        self._take(v, ray.get(self.server.report.remote())["es_round"], flat)
