"""The LossNetServer: one named Ray actor per run that owns φ, ψ, their Adam state and a version.

It wraps the same ``LossNetOptimizer`` the single-process trainer uses (clipping, non-finite
rejection, counters) and adds what only a shared service needs:

* **sync**: the ranks of one trainer average their meta-gradients over the Train process group and
  the leader submits the round: one message and one Adam step per round, whatever the rank count.
* **async** (independent trials, several trainers): arrivals are batched — every submission queued
  while a step runs is applied in the next step, averaged, within the staleness bound.
* **es**: particles send (particle, round, quiz loss); a round closes when every particle reported,
  and the (persistent) ES estimate becomes one update. Messages are a few bytes.
* **durability**: every version is queued for persisting (``<run>/lossnet/v<N>.pt`` + ``latest.json``)
  and written in the background with retries, so a storage outage never blocks rounds nor loses an
  applied update; the state carries the counters and the last round per sender, so a restart
  resumes from the newest intact version, counts nothing twice and recognises replayed submissions.

Validation (sender, sizes, dtype, finiteness, lr scale) rejects bad messages and counts them.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from typing import Any

import torch

from ..config import Config
from ..losses import build_lossnets
from ..meta import ESEstimator, LossNetOptimizer, es_index, flatten
from ..meta.versions import VersionStore
from ..storage import StorageError, open_storage, safe_key

log = logging.getLogger(__name__)


class LossNetServerCore:
    """The server's logic without Ray (unit-testable; the actor wraps it)."""

    def __init__(self, cfg: Config | dict, storage_uri: str, run: str, mode: str = "sync", max_staleness: int = 4,
                 endpoint_url: str | None = None, particles: int = 0, persist: bool = True, retry_s: float = 60.0,
                 storage_outage_s: float | None = None):
        self.cfg = cfg if isinstance(cfg, Config) else Config.model_validate(cfg)
        if mode not in ("sync", "async", "es"):
            raise ValueError(f"unknown LossNetServer mode {mode!r}; valid: sync, async, es")
        self.lossnets = build_lossnets(self.cfg.loss, self.cfg.lossnet, self.cfg.run.seed)  # same φ0 as every worker
        if self.lossnets is None:
            raise ValueError(f"the LossNetServer serves learnable methods (lkd, control), not {self.cfg.loss.method!r}")
        if self.cfg.lossnet.init_from:
            from ..train.run import load_lossnets_from

            load_lossnets_from(self.lossnets, self.cfg)
        self.opt = LossNetOptimizer(self.lossnets, self.cfg.meta.lr, self.cfg.meta.clip_norm)
        self.mode, self.max_staleness = mode, max_staleness
        self.versions = VersionStore(open_storage(storage_uri, endpoint_url, storage_outage_s), safe_key(run, "lossnet"))
        self.stats: dict[str, Any] = {"submitted": 0, "accepted": 0, "rejected": 0, "rejected_reasons": {},
                                      "max_staleness_seen": 0, "rounds": 0, "batches": 0, "restored_from": None,
                                      "adopted_from": None, "duplicates": 0, "behind": 0}
        self.last_round: dict[str, int] = {}  # sender → last round applied (replays after a restart are recognised)
        self.es: ESEstimator | None = None
        self.es_index = None
        if mode == "es":
            self.es_index = es_index(self.lossnets, self.cfg.meta.es_params)
            self.es = ESEstimator(len(self.es_index), particles, self.cfg.meta.es_sigma, self.cfg.meta.es_persistent,
                                  seed=self.cfg.run.seed)
            self.es_losses: dict[int, float] = {}
        self.persist_enabled, self.retry_s = persist, retry_s
        self.queue: deque[tuple[int, dict]] = deque()
        self.persisted_version: int | None = None
        self.persist_failures = 0
        self.persist_error: str | None = None
        self._qlock = threading.Condition()
        self.restore()
        if persist and self.persisted_version is None:
            self._enqueue()  # v0 (or the loaded init_from φ): a restart before the first update finds it

    # --------------------------------------------------------------- state and persistence
    @property
    def version(self) -> int:
        return self.opt.version

    def state(self) -> dict[str, Any]:
        return {**self.opt.state_dict(), "version": self.version, "stats": dict(self.stats), "last_round": dict(self.last_round),
                "es": self.es.state_dict() if self.es is not None else None, "config": self.cfg.to_dict()}

    def _enqueue(self) -> None:
        if not self.persist_enabled:
            return
        with self._qlock:
            self.queue.append((self.version, self.state()))
            self._qlock.notify_all()

    def persist_pending(self) -> int:
        return len(self.queue)

    def drain_once(self, deadline_s: float | None = None) -> bool:
        """Write queued versions oldest first; on a storage error keep them queued. True if the queue emptied."""
        while True:
            with self._qlock:
                if not self.queue:
                    return True
                version, payload = self.queue[0]
            try:
                self.versions.save(version, payload)
            except StorageError as e:
                self.persist_failures += 1
                self.persist_error = str(e)
                return False
            with self._qlock:
                if self.queue and self.queue[0][0] == version:
                    self.queue.popleft()
                self.persisted_version = version
                self.persist_error = None
                self._qlock.notify_all()

    def restore(self) -> bool:
        sd = self.versions.load_latest(warn=log.warning)
        if sd is None:
            return False
        self.opt.load_state_dict(sd)
        self.opt.stats.version = int(sd["version"])
        self.stats.update({k: v for k, v in sd.get("stats", {}).items() if k in self.stats and k not in ("restored_from",)})
        self.last_round = {str(k): int(v) for k, v in sd.get("last_round", {}).items()}
        if self.es is not None and sd.get("es"):
            self.es.load_state_dict(sd["es"])
        self.stats["restored_from"] = int(sd["version"])
        self.persisted_version = int(sd["version"])
        log.warning("LossNetServer restored version %s from %s", sd["version"], self.versions.storage.uri)
        return True

    def adopt(self, version: int, flat_phi: torch.Tensor, reason: str) -> dict:
        """A worker holds a newer φ than this server restored (its save was lost): take it, so versions never
        go backwards; Adam moments stay those of the restored version. Logged."""
        if version <= self.version:
            return {"adopted": False, "version": self.version}
        old = self.version
        self.opt.load_flat(flat_phi)
        self.opt.stats.version = int(version)
        # each version step was one applied update (sync/async): the lost ones count, so that after any restart
        # version == updates applied, each exactly once
        if self.mode != "es":
            self.opt.stats.accepted += int(version) - old
            self.stats["accepted"] += int(version) - old
            self.stats["rounds"] += int(version) - old
        self.stats["adopted_from"] = {"server_version": old, "worker_version": int(version), "reason": reason}
        log.warning("LossNetServer at version %s adopted version %s from a worker (%s)", old, version, reason)
        self._enqueue()
        return {"adopted": True, "version": self.version}

    # --------------------------------------------------------------- validation
    def _reject(self, reason: str) -> dict:
        self.stats["rejected"] += 1
        key = reason.split(":")[0]
        self.stats["rejected_reasons"][key] = self.stats["rejected_reasons"].get(key, 0) + 1
        return {"accepted": False, "reason": reason, "version": self.version}

    def _check(self, grad, lr_scale) -> tuple[torch.Tensor | None, str | None]:
        if not isinstance(grad, torch.Tensor):
            return None, f"wrong type: expected one flat tensor, got {type(grad).__name__}"
        if not grad.is_floating_point():
            return None, f"wrong dtype: {grad.dtype}"
        if grad.dim() != 1 or grad.numel() != self.opt.numel:
            return None, f"wrong size: {tuple(grad.shape)} vs ({self.opt.numel},)"
        if not isinstance(lr_scale, (int, float)) or isinstance(lr_scale, bool) or not math.isfinite(lr_scale) \
                or not 0 <= lr_scale <= 100:
            return None, f"bad lr_scale: {lr_scale!r} (expected a finite number in [0, 100])"
        return grad.float(), None

    def _replay(self, sender: str, round_: int | None) -> dict | None:
        if round_ is not None and self.last_round.get(sender, -1) >= round_:
            self.stats["duplicates"] += 1
            return {"accepted": True, "duplicate": True, "version": self.version}
        return None

    def _apply(self, grads: list[torch.Tensor], lr_scale: float, from_snapshot: int, quiz_loss: float | None) -> bool:
        grad = grads[0] if len(grads) == 1 else torch.stack(grads).mean(0)
        ok = self.opt.submit(grad, lr_scale=lr_scale, from_snapshot=False, quiz_loss=quiz_loss)
        if ok:
            self.opt.stats.from_snapshot += int(from_snapshot)
            self.stats["batches"] += 1
        return ok

    # --------------------------------------------------------------- protocol
    def submit(self, sender: str, round_: int | None, grad: torch.Tensor | None, base_version: int, lr_scale: float = 1.0,
               from_snapshot: int = 0, quiz_loss: float | None = None, nonfinite: int = 0) -> dict:
        """One round's meta-gradient from a trainer's leader (sync) — applied now. ``grad`` None means every
        rank's gradient was non-finite (``nonfinite`` counts them); they are counted, nothing is applied."""
        self.stats["submitted"] += 1
        replay = self._replay(sender, round_)
        if replay is not None:
            return replay
        self.opt.stats.rejected_nonfinite += int(nonfinite)
        if nonfinite:
            self.stats["rejected_reasons"]["non-finite"] = self.stats["rejected_reasons"].get("non-finite", 0) + int(nonfinite)
        if grad is None:
            if round_ is not None:
                self.last_round[sender] = round_
            self.stats["rounds"] += 1
            return {"accepted": False, "reason": "non-finite: every rank", "version": self.version}
        checked, why = self._check(grad, lr_scale)
        if checked is None:
            return self._reject(why)
        if self.mode == "sync" and base_version > self.version:
            # the server restarted from an older save: not a refused round — the leader hands over its newer φ
            # (``adopt``) and resubmits, so it is counted apart from rejections
            self.stats["behind"] += 1
            return {"accepted": False, "reason": f"wrong version: round computed at v{base_version}, server behind at "
                    f"v{self.version} (restarted from an older save): adopt, then resubmit", "version": self.version}
        if self.mode == "sync" and base_version != self.version:
            return self._reject(f"wrong version: round computed at v{base_version}, server at v{self.version}")
        ok = self._apply([checked], float(lr_scale), from_snapshot, quiz_loss)
        if round_ is not None:
            self.last_round[sender] = round_
        self.stats["rounds"] += 1
        if not ok:
            return self._reject("non-finite: meta-gradient has NaN/Inf")
        self.stats["accepted"] += 1
        self._enqueue()  # after the bookkeeping: the saved state counts this round exactly once
        return {"accepted": True, "version": self.version}

    def apply_batch(self, items: list[dict]) -> list[dict]:
        """Async: every queued submission that is within the staleness bound and finite, averaged, one step."""
        out: list[dict] = []
        good: list[tuple[int, torch.Tensor, dict]] = []
        for i, it in enumerate(items):
            self.stats["submitted"] += 1
            replay = self._replay(it["sender"], it.get("round"))
            if replay is not None:
                out.append(replay)
                continue
            checked, why = self._check(it["grad"], it.get("lr_scale", 1.0))
            if checked is None:
                out.append(self._reject(why))
                continue
            stale = self.version - int(it["base_version"])
            self.stats["max_staleness_seen"] = max(self.stats["max_staleness_seen"], stale)
            if stale > self.max_staleness:
                out.append(self._reject(f"stale: base version {it['base_version']}, server at {self.version}"))
                continue
            if not torch.isfinite(checked).all():
                self.opt.stats.rejected_nonfinite += 1
                out.append(self._reject("non-finite: meta-gradient has NaN/Inf"))
                continue
            good.append((i, checked, it))
            out.append({})
        if good:
            scale = sum(float(it.get("lr_scale", 1.0)) for _, _, it in good) / len(good)
            ok = self._apply([g for _, g, _ in good], scale, sum(int(it.get("from_snapshot", 0)) for _, _, it in good),
                             good[-1][2].get("quiz_loss"))
            for i, _, it in good:
                if it.get("round") is not None:
                    self.last_round[it["sender"]] = it["round"]
                self.stats["accepted"] += int(ok)
                out[i] = {"accepted": ok, "version": self.version, "batched": len(good)}
            if ok:
                self._enqueue()
        return out

    def es_report(self, particle: int, round_: int, loss: float) -> dict:
        """ES: one particle's quiz loss for round ``round_`` (= the centre's version it perturbed)."""
        self.stats["submitted"] += 1
        if self.es is None:
            return self._reject("wrong mode: this server is not running ES")
        if not isinstance(particle, int) or not 0 <= particle < self.es.particles:
            return self._reject(f"unknown particle: {particle!r} ({self.es.particles} particles)")
        if round_ != self.version:
            if round_ < self.version:
                self.stats["duplicates"] += 1
                return {"accepted": True, "duplicate": True, "version": self.version}
            return self._reject(f"wrong round: {round_} (server at {self.version})")
        self.es_losses[particle] = float(loss)
        closed = False
        if len(self.es_losses) == self.es.particles:
            g, used = self.es.gradient(self.version, self.es_losses)
            full = torch.zeros(self.opt.numel)
            full[self.es_index] = g
            losses = list(self.es_losses.values())
            self.es_losses = {}
            finite = [v for v in losses if math.isfinite(v)]
            if used and self._apply([full], 1.0, 0, sum(finite) / len(finite) if finite else None):
                self.stats["accepted"] += 1
            else:
                self.opt.stats.version += 1  # the round closes even without a usable pair: particles move on
            self.stats["rounds"] += 1
            self._enqueue()
            closed = True
        return {"accepted": True, "version": self.version, "closed": closed}

    def get(self, newer_than: int = -1) -> tuple[int, torch.Tensor | None]:
        return self.version, (flatten(list(self.lossnets.parameters())) if self.version > newer_than else None)

    def report(self) -> dict:
        return {**self.stats, **{f"meta_{k}": v for k, v in self.opt.counters().items()}, "version": self.version,
                "persisted_version": self.persisted_version, "persist_pending": self.persist_pending(),
                "persist_failures": self.persist_failures, "persist_error": self.persist_error}


try:
    import ray
except ImportError:  # pragma: no cover - the core above is usable without Ray
    ray = None


if ray is not None:
    @ray.remote(num_cpus=0)
    class LossNetServer:
        """Async Ray actor around ``LossNetServerCore``: sync submits apply at once; async submits are
        batched; ES reports wait for their round to close; a background task persists every version."""

        def __init__(self, *args, **kwargs):
            self.core = LossNetServerCore(*args, **kwargs)
            self.lock = asyncio.Lock()
            self.cond = asyncio.Condition(self.lock)
            self.pending: list[tuple[dict, asyncio.Future]] = []
            self._batcher: asyncio.Task | None = None
            self._persister = threading.Thread(target=self._persist_loop, daemon=True, name="lossnet-persist")
            self._persister.start()

        def _persist_loop(self) -> None:
            delay = 0.5
            while True:
                with self.core._qlock:
                    while not self.core.queue:
                        self.core._qlock.wait()
                if self.core.drain_once():
                    delay = 0.5
                    continue
                log.warning("LossNetServer: saving version %s failed (%s); retrying in %.1fs",
                            self.core.queue[0][0] if self.core.queue else "?", self.core.persist_error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

        async def submit(self, sender: str, round_: int | None, grad, base_version: int, lr_scale: float = 1.0,
                         from_snapshot: int = 0, quiz_loss: float | None = None, nonfinite: int = 0,
                         want_phi: bool = True) -> dict:
            async with self.lock:
                res = self.core.submit(sender, round_, grad, base_version, lr_scale, from_snapshot, quiz_loss, nonfinite)
                if want_phi:
                    res["phi"] = self.core.get(-1)[1]
                return res

        async def submit_async(self, sender: str, round_: int | None, grad, base_version: int, lr_scale: float = 1.0,
                               from_snapshot: int = 0, quiz_loss: float | None = None) -> dict:
            fut = asyncio.get_running_loop().create_future()
            self.pending.append(({"sender": sender, "round": round_, "grad": grad, "base_version": base_version,
                                  "lr_scale": lr_scale, "from_snapshot": from_snapshot, "quiz_loss": quiz_loss}, fut))
            if self._batcher is None or self._batcher.done():
                self._batcher = asyncio.get_running_loop().create_task(self._drain())
            return await fut

        async def _drain(self) -> None:
            while self.pending:
                await asyncio.sleep(0)  # let every arrival of this tick join the batch
                batch, self.pending = self.pending, []
                async with self.lock:
                    results = self.core.apply_batch([b for b, _ in batch])
                for (_, fut), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)

        async def es_report(self, particle: int, round_: int, loss: float, timeout_s: float = 600.0) -> dict:
            async with self.cond:
                res = self.core.es_report(particle, round_, loss)
                if res.get("closed"):
                    self.cond.notify_all()
                elif res.get("accepted") and not res.get("duplicate"):
                    await asyncio.wait_for(self.cond.wait_for(lambda: self.core.version > round_), timeout_s)
                res["version"] = self.core.version
                res["phi"] = self.core.get(-1)[1]
                return res

        async def adopt(self, version: int, flat_phi, reason: str) -> dict:
            async with self.lock:
                return self.core.adopt(version, flat_phi, reason)

        async def get(self, newer_than: int = -1):
            return self.core.get(newer_than)

        async def report(self) -> dict:
            return self.core.report()

        async def flush(self, stall_s: float = 135.0) -> dict:
            """Wait until every applied version is persisted, or until none was for ``stall_s`` (storage still
            down: a long backlog after an outage drains however long it takes); report the outcome."""
            last, progress = self.core.persist_pending(), time.monotonic()
            while self.core.persist_pending() and time.monotonic() - progress < stall_s:
                await asyncio.sleep(0.05)
                if self.core.persist_pending() < last:
                    last, progress = self.core.persist_pending(), time.monotonic()
            return self.core.report()

        async def ping(self) -> bool:
            return True
