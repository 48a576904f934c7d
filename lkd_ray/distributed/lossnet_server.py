"""The LossNetServer: one named Ray actor per run that owns φ, ψ, their Adam state and a version.

Workers submit meta-gradients tagged with (rank, round). **sync** (default): a round is averaged
once every rank has reported, then Adam steps and the version bumps; a worker's ``submit`` returns
when its round is applied, so all ranks train on the same φ. **async**: each arrival is applied at
once if its base version is within ``max_staleness``; workers fetch the newest φ when they like.
Every submission is validated (rank, round, shapes, dtype, finiteness); bad ones are rejected and
counted, never applied. State persists to ``<run>/lossnet/v<version>.pt`` + ``latest.json``; a
restarted actor (``max_restarts``) restores it and the workers carry on.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import ray
import torch

from ..config import Config
from ..losses import build_lossnets
from ..meta.step import MetaCounters, NonFiniteMetaGradient, check_and_clip, set_meta_lr
from ..storage import open_storage, safe_key


class LossNetServerCore:
    """The server's logic without Ray (unit-testable, and what the actor wraps)."""

    def __init__(self, cfg: dict, storage_uri: str, run: str, world_size: int, mode: str = "sync",
                 max_staleness: int = 4, persist_every: int = 10, endpoint_url: str | None = None):
        self.cfg = Config.model_validate(cfg)
        self.lossnets = build_lossnets(self.cfg.loss, self.cfg.lossnet, self.cfg.run.seed)  # same φ0 as every worker
        if self.lossnets is None:
            raise ValueError("the LossNetServer serves method 'lkd' only")
        self.params = list(self.lossnets.parameters())
        self.adam = torch.optim.Adam(self.params, lr=self.cfg.meta.lr)
        self.world_size, self.mode, self.max_staleness, self.persist_every = world_size, mode, max_staleness, persist_every
        self.storage = open_storage(storage_uri, endpoint_url)
        self.prefix = safe_key(run, "lossnet")
        self.counters = MetaCounters()
        self.stats = {"submitted": 0, "accepted": 0, "rejected": 0, "rejected_reasons": {}, "max_staleness_seen": 0,
                      "wait_s": 0.0, "restored_from": None, "rounds": 0}
        self.round: int | None = 0
        self.pending: dict[int, torch.Tensor | None] = {}  # rank → flattened grad (None: rejected as non-finite)
        self.pending_scale: dict[int, float] = {}  # rank → its meta-lr scale for this round
        self.restore()

    # --------------------------------------------------------------- persistence
    def state(self) -> dict[str, Any]:
        return {"lossnets": self.lossnets.state_dict(), "adam": self.adam.state_dict(), "version": self.counters.version,
                "round": self.round if self.round is not None else -1, "counters": self.counters.as_dict(),
                "config": self.cfg.to_dict()}  # lets `python -m lkd_ray plot` rebuild φ from the version alone

    def persist(self) -> dict:
        v = self.counters.version
        entry = self.storage.put_torch(f"{self.prefix}/v{v}.pt", self.state())
        self.storage.put_json(f"{self.prefix}/latest.json", {**entry, "version": v})  # pointer written after the object
        return entry

    def restore(self) -> bool:
        if not self.storage.exists(f"{self.prefix}/latest.json"):
            return False
        ptr = self.storage.get_json(f"{self.prefix}/latest.json")
        sd = self.storage.get_torch(ptr["key"], expect_sha256=ptr["sha256"])
        self.lossnets.load_state_dict(sd["lossnets"])
        self.adam.load_state_dict(sd["adam"])
        self.counters = MetaCounters(**sd["counters"])
        self.round = None  # resynchronise with the workers' next round
        self.stats["restored_from"] = ptr["version"]
        return True

    # --------------------------------------------------------------- validation
    def _reject(self, reason: str) -> dict:
        self.stats["rejected"] += 1
        self.stats["rejected_reasons"][reason.split(":")[0]] = self.stats["rejected_reasons"].get(reason.split(":")[0], 0) + 1
        return {"accepted": False, "reason": reason, "version": self.counters.version}

    def _validate(self, rank: int, grads: list) -> tuple[list[torch.Tensor] | None, str | None]:
        if not isinstance(rank, int) or not 0 <= rank < self.world_size:
            return None, f"unknown rank: {rank!r} (world size {self.world_size})"
        if len(grads) != len(self.params):
            return None, f"wrong tensor count: {len(grads)} vs {len(self.params)}"
        out = []
        for g, p in zip(grads, self.params):
            g = torch.as_tensor(g)
            if tuple(g.shape) != tuple(p.shape):
                return None, f"wrong shape: {tuple(g.shape)} vs {tuple(p.shape)}"
            if not g.is_floating_point():
                return None, f"wrong dtype: {g.dtype}"
            out.append(g.to(p.dtype))
        return out, None

    def _apply(self, grads: list[torch.Tensor], lr_scale: float = 1.0) -> bool:
        try:
            clipped, norm = check_and_clip(grads, self.cfg.meta.clip_norm)
        except NonFiniteMetaGradient:
            self.counters.rejected_nonfinite += 1
            return False
        for p, g in zip(self.params, clipped):
            p.grad = g
        set_meta_lr(self.adam, self.cfg.meta.lr * lr_scale)
        self.adam.step()
        self.adam.zero_grad(set_to_none=True)
        self.counters.version += 1
        self.counters.accepted += 1
        self.counters.last_norm = norm
        if self.persist_every and self.counters.version % self.persist_every == 0:
            self.persist()
        return True

    # --------------------------------------------------------------- protocol
    def submit(self, rank: int, round_: int, grads: list, base_version: int, lr_scale: float = 1.0) -> dict:
        """Record one worker's meta-gradient; returns whether it was accepted (and, sync, if its round closed).

        ``lr_scale`` multiplies the meta lr for this update (``meta.lr_schedule=student``); a sync round
        uses the mean of its ranks' scales (they agree unless a rank lags a step)."""
        self.stats["submitted"] += 1
        checked, why = self._validate(rank, grads)
        if checked is None:
            return self._reject(why)
        if not isinstance(lr_scale, (int, float)) or not math.isfinite(lr_scale) or not 0 <= lr_scale <= 100:
            return self._reject(f"bad lr_scale: {lr_scale!r} (expected a finite number in [0, 100])")
        finite = all(torch.isfinite(g).all() for g in checked)
        if self.mode == "async":
            stale = self.counters.version - base_version
            self.stats["max_staleness_seen"] = max(self.stats["max_staleness_seen"], stale)
            if stale > self.max_staleness:
                return self._reject(f"stale: base version {base_version}, server at {self.counters.version}")
            if not finite:
                self.counters.rejected_nonfinite += 1
                return self._reject("non-finite: meta-gradient has NaN/Inf")
            self._apply(checked, float(lr_scale))
            self.stats["accepted"] += 1
            return {"accepted": True, "version": self.counters.version, "closed": True}
        if self.round is None or (round_ > self.round and not self.pending):
            self.round = round_  # after a restart, or a round every rank skipped: follow the workers
        if round_ != self.round:
            return self._reject(f"wrong round: {round_} (server round {self.round})")
        if rank in self.pending:
            return self._reject(f"duplicate: rank {rank} already submitted round {round_}")
        self.pending[rank] = torch.cat([g.flatten() for g in checked]) if finite else None
        self.pending_scale[rank] = float(lr_scale)
        if not finite:
            self.counters.rejected_nonfinite += 1
            self.stats["rejected"] += 1
            self.stats["rejected_reasons"]["non-finite"] = self.stats["rejected_reasons"].get("non-finite", 0) + 1
        else:
            self.stats["accepted"] += 1
        closed = False
        if len(self.pending) == self.world_size:
            good = [g for g in self.pending.values() if g is not None]
            if good:
                mean = torch.stack(good).mean(0)
                sizes = [p.numel() for p in self.params]
                scale = sum(self.pending_scale.values()) / len(self.pending_scale)
                self._apply([c.view_as(p) for c, p in zip(mean.split(sizes), self.params)], scale)
            self.pending.clear()
            self.pending_scale.clear()
            self.round += 1
            self.stats["rounds"] += 1
            closed = True
        return {"accepted": finite, "version": self.counters.version, "closed": closed, "round": round_}

    def get(self, newer_than: int = -1) -> tuple[int, dict | None]:
        v = self.counters.version
        return v, (self.lossnets.state_dict() if v > newer_than else None)

    def report(self) -> dict:
        return {**self.stats, **{f"meta_{k}": v for k, v in self.counters.as_dict().items()}, "version": self.counters.version,
                "round": self.round}


@ray.remote(num_cpus=0)
class LossNetServer:
    """Async Ray actor around ``LossNetServerCore``; sync-mode submits wait for their round to close."""

    def __init__(self, *args, **kwargs):
        self.core = LossNetServerCore(*args, **kwargs)
        self.cond = asyncio.Condition()

    async def submit(self, rank: int, round_: int, grads: list, base_version: int, wait: bool = True,
                     lr_scale: float = 1.0) -> dict:
        async with self.cond:
            res = self.core.submit(rank, round_, grads, base_version, lr_scale)
            if res.get("closed"):
                self.cond.notify_all()
            if self.core.mode == "sync" and wait and res.get("round") is not None and not res.get("closed"):
                t0 = time.perf_counter()
                await self.cond.wait_for(lambda: self.core.round is None or self.core.round > round_)
                self.core.stats["wait_s"] += time.perf_counter() - t0
            res["version"] = self.core.counters.version
            return res

    async def get(self, newer_than: int = -1):
        return self.core.get(newer_than)

    async def report(self) -> dict:
        return self.core.report()

    async def persist(self) -> dict:
        return self.core.persist()

    async def ping(self) -> bool:
        return True
