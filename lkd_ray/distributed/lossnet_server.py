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
  as a *copy* of the whole state taken when it was applied, with a hash of all of it (``state_sha256``,
  also kept in ``version_hashes()``), and written in the background (the storage layer rides out an outage
  up to its bound), so an outage never blocks rounds nor loses an applied update, and a file always holds
  exactly its version. The state carries the counters and the set of rounds applied per sender
  (``rounds.py``: async calls arrive out of order, so a late round is applied, a true replay is not), so a
  restart resumes from the newest intact version, counts nothing twice and recognises replays. A save that
  fails stops the run: storage that refused it or stayed down past the bound with ``LossNetStorageError``
  (a ``StorageError``: the jobs' storage exit code), anything else with ``LossNetPersistError`` (its own).

Validation (sender, sizes, dtype, finiteness, lr scale) rejects bad messages. Counters count each event
once: ``rejected`` is refused submissions (any reason); ``meta_rejected_nonfinite`` is the non-finite
meta-gradients among them or dropped from a round's mean (a breakdown, never added to ``rejected``).
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
from ..errors import RecordFailure
from ..meta.versions import VersionStore, with_hash
from ..storage import StorageError, open_storage, safe_key
from .rounds import AppliedRounds

log = logging.getLogger(__name__)


class LossNetPersistError(RecordFailure, RuntimeError):
    """The LossNetServer could not save its state for a reason other than a storage outage (a bug or a
    payload that cannot be written): the run stops rather than continue without its record."""


class LossNetStorageError(StorageError):
    """The LossNetServer could not save a version because storage refused it (no bucket, no access: retrying
    cannot help) or stayed down past the outage bound (the storage layer retried that long already): the run
    stops with the storage error's exit code rather than train on unrecorded."""


def _copy(obj: Any) -> Any:
    """A deep copy of a state dict's tensors (Adam's state_dict holds references to live tensors)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy(v) for v in obj)
    return obj


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
        self.applied: dict[str, AppliedRounds] = {}  # sender → rounds applied (replays recognised, restarts too)
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
        self.persist_fatal: str | None = None   # why the persister stopped: the run must stop
        self.persist_fatal_storage = False      # ... because storage refused or stayed down past the bound
        self.hashes: dict[int, str] = {}        # version → content hash taken when it was applied
        self._qlock = threading.Condition()
        self.restore()
        if persist and self.persisted_version is None:
            self._enqueue()  # v0 (or the loaded init_from φ): a restart before the first update finds it

    # --------------------------------------------------------------- state and persistence
    @property
    def version(self) -> int:
        return self.opt.version

    def state(self) -> dict[str, Any]:
        """The server's state *now*, as copies (safe to write later while Adam keeps stepping), with the hash of
        all of it (``with_hash``)."""
        sd = {**_copy(self.opt.state_dict()), "version": self.version, "stats": _copy(self.stats),
              "applied_rounds": {k: v.to_list() for k, v in self.applied.items()},
              "es": _copy(self.es.state_dict()) if self.es is not None else None, "config": self.cfg.to_dict()}
        return with_hash(sd)

    def _enqueue(self) -> None:
        if not self.persist_enabled:
            return
        self.raise_if_fatal()
        payload = self.state()
        with self._qlock:
            self.hashes[self.version] = payload["state_sha256"]
            self.queue.append((self.version, payload))
            self._qlock.notify_all()

    def version_hashes(self) -> dict[int, str]:
        return dict(self.hashes)

    def raise_if_fatal(self) -> None:
        if self.persist_fatal is None:
            return
        if self.persist_fatal_storage:
            raise LossNetStorageError(f"the LossNetServer could not save a loss-network version: {self.persist_fatal}")
        raise LossNetPersistError(f"the LossNetServer stopped saving loss-network versions: {self.persist_fatal}")

    def persist_pending(self) -> int:
        return len(self.queue)

    def drain_once(self) -> bool:
        """Write queued versions oldest first; on a storage error keep them queued and return False (the error in
        ``persist_error``). True if the queue emptied. Any other exception propagates."""
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

    def persist_forever(self) -> None:
        """The persister thread's loop: drain until a save fails, then stop, recording why. It does not retry: the
        storage layer already rode out the outage up to its bound (``--storage-outage-s``), so a storage error
        here is an outage past that bound or an answer retrying cannot change (no bucket, access denied), and
        any other exception is a bug. Either way the run must not go on unrecorded."""
        try:
            while True:
                with self._qlock:
                    while not self.queue:
                        self._qlock.wait()
                if not self.drain_once():
                    self._stop(f"version {self.queue[0][0] if self.queue else '?'}: {self.persist_error}", storage=True)
                    return
        except Exception as e:
            self._stop(f"{type(e).__name__}: {e}", storage=False)

    def _stop(self, why: str, storage: bool) -> None:
        with self._qlock:
            self.persist_fatal, self.persist_fatal_storage = why, storage
            self._qlock.notify_all()
        log.error("LossNetServer: the persister stopped: %s", why, exc_info=not storage)

    def wait_persisted(self, stall_s: float) -> None:
        """Block until every applied version is persisted, the persister failed, or none was persisted for
        ``stall_s`` (storage still down)."""
        with self._qlock:
            last, progress = len(self.queue), time.monotonic()
            while self.queue and self.persist_fatal is None:
                left = stall_s - (time.monotonic() - progress)
                if left <= 0:
                    return
                self._qlock.wait(left)
                if len(self.queue) < last:
                    last, progress = len(self.queue), time.monotonic()

    def restore(self) -> bool:
        sd = self.versions.load_latest(warn=log.warning)
        if sd is None:
            return False
        if sd.get("state_sha256"):
            self.hashes[int(sd["version"])] = sd["state_sha256"]
        self.opt.load_state_dict(sd)
        self.opt.stats.version = int(sd["version"])
        self.stats.update({k: v for k, v in sd.get("stats", {}).items() if k in self.stats and k not in ("restored_from",)})
        if sd.get("applied_rounds") is not None:
            self.applied = {str(k): AppliedRounds(v) for k, v in sd["applied_rounds"].items()}
        else:  # saved before the set of applied rounds: every round up to the last one counts as applied
            self.applied = {str(k): AppliedRounds.up_to(int(v)) for k, v in sd.get("last_round", {}).items()}
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

    def _mark(self, sender: str, round_: int | None) -> None:
        if round_ is not None:
            self.applied.setdefault(sender, AppliedRounds()).add(round_)

    def _replay(self, sender: str, round_: int | None) -> dict | None:
        """A round of this sender that was applied already (not merely an older one: async calls arrive out of order)."""
        if round_ is not None and sender in self.applied and round_ in self.applied[sender]:
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
        self.raise_if_fatal()  # no step the run could not record
        self.stats["submitted"] += 1
        replay = self._replay(sender, round_)
        if replay is not None:
            return replay
        self.opt.stats.rejected_nonfinite += int(nonfinite)  # ranks dropped from the round's mean (a breakdown)
        if grad is None:
            self._mark(sender, round_)
            self.stats["rounds"] += 1
            return self._reject("non-finite: every rank")
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
        self._mark(sender, round_)
        self.stats["rounds"] += 1
        if not ok:
            return self._reject("non-finite: meta-gradient has NaN/Inf")
        self.stats["accepted"] += 1
        self._enqueue()  # after the bookkeeping: the saved state counts this round exactly once
        return {"accepted": True, "version": self.version}

    def apply_batch(self, items: list[dict]) -> list[dict]:
        """Async: every queued submission that is within the staleness bound and finite, averaged, one step."""
        self.raise_if_fatal()  # no step the run could not record
        out: list[dict] = []
        good: list[tuple[int, torch.Tensor, dict]] = []
        in_batch: set = set()
        for i, it in enumerate(items):
            self.stats["submitted"] += 1
            replay = self._replay(it["sender"], it.get("round"))
            if replay is None and it.get("round") is not None and (it["sender"], it["round"]) in in_batch:
                self.stats["duplicates"] += 1  # the same round twice in one batch: applied once
                replay = {"accepted": True, "duplicate": True, "version": self.version}
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
            in_batch.add((it["sender"], it.get("round")))
            out.append({})
        if good:
            scale = sum(float(it.get("lr_scale", 1.0)) for _, _, it in good) / len(good)
            ok = self._apply([g for _, g, _ in good], scale, sum(int(it.get("from_snapshot", 0)) for _, _, it in good),
                             good[-1][2].get("quiz_loss"))
            for i, _, it in good:
                self._mark(it["sender"], it.get("round"))
                self.stats["accepted"] += int(ok)
                out[i] = {"accepted": ok, "version": self.version, "batched": len(good)}
            if ok:
                self._enqueue()
        return out

    @property
    def es_round(self) -> int:
        return self.es.rounds if self.es is not None else 0

    def es_report(self, particle: int, round_: int, loss: float, lr_scale: float = 1.0) -> dict:
        """ES: one particle's quiz loss for round ``round_`` (the noise it perturbed with). A round closes when
        every particle reported: the estimate becomes one update (at the particles' ``lr_scale``, the meta lr
        schedule), and the round advances whether or not a usable pair made an update — so rounds and versions
        are counted apart and ``version == accepted`` holds, as in one process (``ESStrategy``)."""
        self.raise_if_fatal()  # no step the run could not record
        self.stats["submitted"] += 1
        if self.es is None:
            return self._reject("wrong mode: this server is not running ES")
        if not isinstance(particle, int) or not 0 <= particle < self.es.particles:
            return self._reject(f"unknown particle: {particle!r} ({self.es.particles} particles)")
        if round_ != self.es_round:
            if round_ < self.es_round:
                self.stats["duplicates"] += 1
                return {"accepted": True, "duplicate": True, "version": self.version, "round": self.es_round}
            return self._reject(f"wrong round: {round_} (server at round {self.es_round})")
        _, why = self._check(torch.zeros(self.opt.numel), lr_scale)
        if why is not None:
            return self._reject(why)
        self.es_losses[particle] = float(loss)
        self.es_lr_scale = float(lr_scale)
        closed = False
        if len(self.es_losses) == self.es.particles:
            g, used = self.es.gradient(round_, self.es_losses)
            full = torch.zeros(self.opt.numel)
            full[self.es_index] = g
            losses = list(self.es_losses.values())
            self.es_losses = {}
            finite = [v for v in losses if math.isfinite(v)]
            if used and self._apply([full], self.es_lr_scale, 0, sum(finite) / len(finite) if finite else None):
                self.stats["accepted"] += 1
            self.stats["rounds"] += 1
            self._enqueue()
            closed = True
        return {"accepted": True, "version": self.version, "closed": closed, "round": self.es_round}

    def get(self, newer_than: int = -1) -> tuple[int, torch.Tensor | None]:
        return self.version, (flatten(list(self.lossnets.parameters())) if self.version > newer_than else None)

    def report(self) -> dict:
        return {**self.stats, **{f"meta_{k}": v for k, v in self.opt.counters().items()}, "version": self.version,
                "es_round": self.es_round, "persisted_version": self.persisted_version,
                "persist_pending": self.persist_pending(), "persist_failures": self.persist_failures,
                "persist_error": self.persist_error, "persist_fatal": self.persist_fatal,
                "persist_fatal_storage": self.persist_fatal_storage}


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
            self._persister = threading.Thread(target=self.core.persist_forever, daemon=True, name="lossnet-persist")
            self._persister.start()

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
                try:
                    async with self.lock:
                        results = self.core.apply_batch([b for b, _ in batch])
                except Exception as e:  # the persister stopped (or a bug): every submission of the batch gets the
                    for _, fut in batch:  # error, none waits for an answer that would never come
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                for (_, fut), res in zip(batch, results):
                    if not fut.done():
                        fut.set_result(res)

        async def es_report(self, particle: int, round_: int, loss: float, lr_scale: float = 1.0,
                            timeout_s: float = 600.0) -> dict:
            async with self.cond:
                try:
                    res = self.core.es_report(particle, round_, loss, lr_scale)
                except Exception:  # the persister stopped: wake the particles waiting for this round, which will
                    self.cond.notify_all()  # not close, so they stop too instead of waiting out ``timeout_s``
                    raise
                if res.get("closed"):
                    self.cond.notify_all()
                elif res.get("accepted") and not res.get("duplicate"):
                    await asyncio.wait_for(self.cond.wait_for(
                        lambda: self.core.es_round > round_ or self.core.persist_fatal is not None), timeout_s)
                self.core.raise_if_fatal()
                res["version"], res["round"] = self.core.version, self.core.es_round
                res["phi"] = self.core.get(-1)[1]
                return res

        async def adopt(self, version: int, flat_phi, reason: str) -> dict:
            async with self.lock:
                return self.core.adopt(version, flat_phi, reason)

        async def get(self, newer_than: int = -1):
            return self.core.get(newer_than)

        async def report(self) -> dict:
            return self.core.report()

        async def version_hashes(self) -> dict[int, str]:
            return self.core.version_hashes()

        async def flush(self, stall_s: float = 135.0) -> dict:
            """Wait until every applied version is persisted, or until none was for ``stall_s`` (storage still
            down: a long backlog after an outage drains however long it takes); report the outcome. Raises
            ``LossNetPersistError`` when the persister failed for a reason other than storage."""
            await asyncio.to_thread(self.core.wait_persisted, stall_s)
            self.core.raise_if_fatal()
            return self.core.report()

        async def ping(self) -> bool:
            return True
