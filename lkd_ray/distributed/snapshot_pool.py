"""The SnapshotPool: earlier student states drawn uniformly for meta-steps — durable in storage, fast
from Ray's object store.

A recorded snapshot goes to storage once (durability: ``<run>/snapshots/<step>.pt``, in a sharded
manifest with sizes and sha256; the recording rank writes it from a background thread, and the index
writes its manifest shards from one, so neither a training step nor any rank's draw waits on a storage
PUT, however long an outage lasts) and into the object store once (speed): the index actor puts it there
itself, so the copy outlives the worker that recorded it, keeps at most ``object_bytes`` of them (the
oldest references are dropped beyond that; Ray spills to disk under memory pressure) and hands out
references with each draw. A worker reads a drawn snapshot straight from its node's object store;
when the copy is gone (evicted, or lost with a node) a ``ray.util.ActorPool`` of loader actors fills
the miss from storage (LRU cache bounded in bytes, checksum-verified). ``RaySnapshotStore`` is the
trainer-facing side: it implements the single-process ``SnapshotStore`` interface and asks for the
next draw as soon as it served one, so the draw is ready before the next meta-step needs it.

Only an object that is not what was written (checksum mismatch) or does not load is marked corrupt
and skipped for the rest of the run; a read that fails because storage is unreachable (after the
storage layer's own retries) is transient: that draw starts from the current student instead, and the
snapshot stays in the pool.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from typing import Any

import ray
import torch
from ray.util import ActorPool

from ..storage import CorruptObject, StorageError, open_storage, safe_key
from ..train.snapshots import draw_index

log = logging.getLogger(__name__)


MANIFEST_SHARD = 256  # entries per manifest shard: a record rewrites one small shard, not the whole history


@ray.remote(num_cpus=0)
class SnapshotIndex:
    """Every recorded snapshot (or the newest ``max_snapshots``), drawn from by every rank.

    The manifest is sharded (``snapshots/manifest/<NNNNN>.json``, 256 entries each): recording
    rewrites only the newest shard, so writes stay O(1) per snapshot over a long run. With
    ``max_snapshots`` the oldest entries leave the index and their objects are deleted.
    """

    def __init__(self, storage_uri: str, run: str, sampling: str = "uniform", seed: int = 0, endpoint_url: str | None = None,
                 max_snapshots: int | None = None, outage_s: float | None = None, object_bytes: int = 1 << 30):
        self.storage = open_storage(storage_uri, endpoint_url, outage_s)
        self.run = run
        self.object_bytes = int(object_bytes)
        self.refs: OrderedDict[str, tuple[int, ray.ObjectRef]] = OrderedDict()  # key → (size, ref), oldest first
        self.object_used = 0
        self.sampling, self.max_snapshots = sampling, max_snapshots
        self.rng = random.Random(seed)
        self.entries: list[dict] = []
        self.evicted = 0  # entries dropped by max_snapshots (positions in the full history before ``entries``)
        self.skipped: list[str] = []
        self.draws = 0
        self.draw_log: dict[int, list[tuple[int, int]]] = {}  # rank → [(drawn position, live count)]
        self.manifest_writes = 0
        self.manifest_failures = 0
        self._pending: dict[int, dict] = {}   # manifest shard → its newest content, waiting for the writer
        self._deletes: list[str] = []
        self._writing = False  # the writer holds work it took from the queues
        self._wlock = threading.Condition()
        self._load()
        threading.Thread(target=self._write_forever, daemon=True, name="snapshot-manifest").start()

    def _write_forever(self) -> None:
        """Write manifest shards (newest content per shard) and delete evicted objects, off the draw path;
        a storage failure keeps them pending and retries with backoff."""
        delay = 0.5
        while True:
            with self._wlock:
                while not self._pending and not self._deletes:
                    self._wlock.wait()
                shards, self._pending = self._pending, {}
                deletes, self._deletes = self._deletes, []
                self._writing = True
            try:
                for shard, payload in sorted(shards.items()):
                    self.storage.put_json(self._shard_key(shard), payload)
                    self.manifest_writes += 1
                delay = 0.5
            except Exception as exc:  # keep the newest content of every unwritten shard and retry
                self.manifest_failures += 1
                log.warning("snapshot manifest write failed (%s); retrying in %.1fs", exc, delay)
                with self._wlock:
                    self._pending = {**shards, **self._pending}
                    self._deletes = deletes + self._deletes
                    self._writing = False
                time.sleep(delay)
                delay = min(2 * delay, 10.0)
                continue
            for key in deletes:
                try:
                    self.storage.delete(key)
                except Exception as exc:  # an orphaned object is harmless: the index no longer names it
                    log.warning("could not delete evicted snapshot %s: %s", key, exc)
            with self._wlock:
                self._writing = False
                self._wlock.notify_all()

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until the manifest is written and evicted objects deleted (tests, shutdown); False if storage did
        not take it in time."""
        deadline = time.monotonic() + timeout_s
        with self._wlock:
            while self._pending or self._deletes or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wlock.wait(left)
        return True

    def _shard_key(self, i: int) -> str:
        return safe_key(self.run, "snapshots", "manifest", f"{i:05d}.json")

    def _load(self) -> None:
        i = 0
        while self.storage.exists(self._shard_key(i)):
            shard = self.storage.get_json(self._shard_key(i))
            self.entries += shard["snapshots"]
            self.evicted = max(self.evicted, int(shard.get("evicted", 0)))
            i += 1
        self.entries = [e for e in self.entries if not e.get("evicted")]
        self._bound()

    def _bound(self) -> list[dict]:
        gone: list[dict] = []
        if self.max_snapshots is not None and len(self.entries) > self.max_snapshots:
            gone = self.entries[:len(self.entries) - self.max_snapshots]
            self.entries = self.entries[len(gone):]
            self.evicted += len(gone)
        return gone

    def _keep(self, key: str, size: int, state) -> None:
        """Put the state in the object store (owned by this actor), within ``object_bytes``."""
        if key in self.refs:  # a resumed run records the same snapshot again: replace, do not count twice
            self.object_used -= self.refs.pop(key)[0]
        if size > self.object_bytes:
            return
        self.refs[key] = (size, ray.put(state))
        self.object_used += size
        while self.object_used > self.object_bytes:
            _, (s, _) = self.refs.popitem(last=False)  # dropping the reference frees the copy
            self.object_used -= s

    def record(self, entry: dict, state: dict | None = None) -> int:
        """Add one stored snapshot (``{"key", "size", "sha256", "step"}``); persist its manifest shard; keep
        ``state`` (when given) in the object store for fast draws."""
        if state is not None:
            self._keep(entry["key"], int(entry.get("size", 0)), state)
        if any(e["step"] == entry["step"] for e in self.entries):  # a resumed run re-records a step
            self.entries = [e for e in self.entries if e["step"] != entry["step"]]
        self.entries.append(entry)
        gone = self._bound()
        position = self.evicted + len(self.entries) - 1  # in the whole history
        shard = position // MANIFEST_SHARD
        first = shard * MANIFEST_SHARD
        live = [e for k, e in enumerate(self.entries) if self.evicted + k >= first]
        for e in gone:  # bounded: the objects leave the object store now, and storage in the background
            if e["key"] in self.refs:
                self.object_used -= self.refs.pop(e["key"])[0]
        with self._wlock:
            self._pending[shard] = {"snapshots": live, "evicted": self.evicted, "first": first}
            self._deletes += [e["key"] for e in gone]
            self._wlock.notify_all()
        return len(self.entries)

    def sample(self, rank: int = 0) -> dict | None:
        """One draw: the manifest entry, with ``"ref"`` (a list holding the object-store copy) when there is one."""
        live = [e for e in self.entries if e["key"] not in self.skipped]
        if not live:
            return None
        self.draws += 1
        i = draw_index(len(live), self.sampling, self.rng)
        log_ = self.draw_log.setdefault(int(rank), [])
        if len(log_) < 100_000:
            log_.append((i, len(live)))
        held = self.refs.get(live[i]["key"])
        return {**live[i], "ref": [held[1]] if held else None}

    def forget(self, key: str) -> None:
        """An object-store copy was lost (its node died): serve that snapshot from storage from now on."""
        if key in self.refs:
            self.object_used -= self.refs.pop(key)[0]

    def mark_corrupt(self, key: str) -> None:
        if key not in self.skipped:
            self.skipped.append(key)

    def stats(self) -> dict:
        return {"snapshots": len(self.entries), "evicted": self.evicted, "corrupt_skipped": len(self.skipped),
                "draws": self.draws, "draws_per_rank": {r: len(v) for r, v in self.draw_log.items()},
                "manifest_writes": self.manifest_writes, "manifest_pending": len(self._pending),
                "manifest_failures": self.manifest_failures, "object_store_snapshots": len(self.refs),
                "object_store_bytes": self.object_used, "object_store_limit": self.object_bytes}

    def draw_history(self) -> dict[int, list[tuple[int, int]]]:
        return {r: list(v) for r, v in self.draw_log.items()}

    def entries_list(self) -> list[dict]:
        return list(self.entries)


@ray.remote(num_cpus=0)
class SnapshotLoader:
    def __init__(self, storage_uri: str, cache_bytes: int = 256 << 20, endpoint_url: str | None = None,
                 outage_s: float | None = None):
        self.storage = open_storage(storage_uri, endpoint_url, outage_s)
        self.cache: OrderedDict[str, tuple[int, dict]] = OrderedDict()
        self.cache_bytes, self.used = cache_bytes, 0
        self.hits = self.misses = self.transient_errors = 0

    def load(self, entry: dict) -> dict[str, Any]:
        """Return ``{"entry", "state" | None, "error" | None, "corrupt": bool}``; a corrupt object is reported,
        never loaded; a read error that is not corruption is reported as transient (``corrupt`` False)."""
        key = entry["key"]
        if key in self.cache:
            self.cache.move_to_end(key)
            self.hits += 1
            return {"entry": entry, "state": self.cache[key][1], "error": None, "corrupt": False}
        self.misses += 1
        try:
            state = self.storage.get_torch(key, expect_sha256=entry["sha256"])
        except CorruptObject as e:
            return {"entry": entry, "state": None, "error": str(e), "corrupt": True}
        except StorageError as e:
            self.transient_errors += 1
            return {"entry": entry, "state": None, "error": str(e), "corrupt": False}
        size = int(entry.get("size", 0))
        if size <= self.cache_bytes:
            self.cache[key] = (size, state)
            self.used += size
            while self.used > self.cache_bytes:
                _, (s, _) = self.cache.popitem(last=False)
                self.used -= s
        return {"entry": entry, "state": state, "error": None, "corrupt": False}

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "cached_bytes": self.used, "cached": len(self.cache),
                "transient_errors": self.transient_errors}


class RaySnapshotStore:
    """``SnapshotStore`` over the pool. Rank 0 records; every rank samples, with the next draw requested
    as soon as one is served (so it is ready, usually in the local object store, when the next meta-step
    needs it)."""

    def __init__(self, storage_uri: str, run: str, index, loaders: list, record: bool, endpoint_url: str | None = None,
                 prefetch: bool = True, rank: int = 0, outage_s: float | None = None, copy_timeout_s: float = 30.0):
        self.storage = open_storage(storage_uri, endpoint_url, outage_s)
        self.run, self.index, self.loaders, self.record_enabled, self.prefetch = run, index, loaders, record, prefetch
        self.rank, self.copy_timeout_s = rank, copy_timeout_s  # a copy not readable within this is treated as lost
        self.pool = ActorPool(loaders)
        self._next = None  # the prefetched draw: a Future of (_request + _resolve) running in a background thread
        self._executor = None
        self._recorder = None  # one background thread storing and registering recorded snapshots, in order
        self._recording: list = []
        self.corrupt_seen = self.transient_seen = 0
        self.from_object_store = self.from_storage = self.lost_copies = 0
        self._n = ray.get(index.stats.remote())["snapshots"]

    def record(self, step: int, state: dict[str, torch.Tensor]) -> None:
        """Queue the snapshot: a background thread stores it (durable first) and then registers it with the
        index, so the training step never waits on a storage PUT. Snapshots are recorded in order."""
        if not self.record_enabled:
            return
        if self._recorder is None:
            from concurrent.futures import ThreadPoolExecutor

            self._recorder = ThreadPoolExecutor(1, thread_name_prefix="snapshot-record")
        self._recording.append(self._recorder.submit(self._store, step, state))
        self._recording = [f for f in self._recording if not f.done() or f.exception() is not None]
        for f in self._recording:
            if f.done():
                raise f.exception()

    def _store(self, step: int, state: dict[str, torch.Tensor]) -> None:
        entry = self.storage.put_torch(safe_key(self.run, "snapshots", f"{step}.pt"), state)  # retried over outages
        self._n = ray.get(self.index.record.remote({**entry, "step": step}, state))

    def flush(self) -> None:
        """Wait for queued recordings (end of an epoch, before a checkpoint names them); raise their errors."""
        for f in self._recording:
            f.result()
        self._recording = []

    def _request(self) -> dict | None:
        """Draw now and start moving the state: a pull into the local object store, or a loader's fetch
        from storage when there is no object-store copy. Returns the pending draw (None: nothing recorded)."""
        entry = ray.get(self.index.sample.remote(self.rank))
        if entry is None:
            return None
        if entry.get("ref"):
            ray.wait(entry["ref"], timeout=0, fetch_local=True)  # starts the transfer if the copy is on another node
        else:
            self.pool.submit(lambda a, e: a.load.remote(e), {k: v for k, v in entry.items() if k != "ref"})
        return entry

    def _resolve(self, entry: dict) -> dict:
        """The drawn state: from the object store, or — when that copy is gone — from storage."""
        if entry.get("ref"):
            try:
                state = ray.get(entry["ref"][0], timeout=self.copy_timeout_s)
                self.from_object_store += 1
                return {"entry": entry, "state": state, "error": None}
            except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.GetTimeoutError) as e:
                self.lost_copies += 1
                log.warning("object-store copy of snapshot %s is gone (%s); reading it from storage", entry["key"],
                            type(e).__name__)
                self.index.forget.remote(entry["key"])
                self.pool.submit(lambda a, e: a.load.remote(e), {k: v for k, v in entry.items() if k != "ref"})
        self.from_storage += 1
        return self.pool.get_next()

    def _fetch(self) -> dict | None:
        entry = self._request()
        return None if entry is None else self._resolve(entry)

    def sample(self, rng: random.Random | None = None) -> dict[str, torch.Tensor] | None:
        """The prefetched draw (drawn, moved and deserialised in the background while the caller trained),
        then the next one is started."""
        for _ in range(8):  # skip past corrupt objects
            out = self._next.result() if self._next is not None else self._fetch()
            self._next = None
            if out is None:
                return None
            if out["error"] is None:
                if self.prefetch:
                    if self._executor is None:
                        from concurrent.futures import ThreadPoolExecutor

                        self._executor = ThreadPoolExecutor(1, thread_name_prefix="snapshot-prefetch")
                    self._next = self._executor.submit(self._fetch)
                return out["state"]
            if not out.get("corrupt", True):  # storage unreachable: this draw starts from the current student
                self.transient_seen += 1
                log.warning("could not read snapshot %s (%s); this meta-step starts from the current student, the "
                            "snapshot stays in the pool", out["entry"]["key"], out["error"])
                return None
            self.corrupt_seen += 1
            log.warning("skipping snapshot %s: %s", out["entry"]["key"], out["error"])
            ray.get(self.index.mark_corrupt.remote(out["entry"]["key"]))
        return None

    def stats(self) -> dict:
        return {"from_object_store": self.from_object_store, "from_storage": self.from_storage, "lost_copies": self.lost_copies,
                "corrupt_seen": self.corrupt_seen, "transient_seen": self.transient_seen}

    def __len__(self) -> int:
        """Snapshots in the shared index (every rank sees the recording rank's count)."""
        self._n = ray.get(self.index.stats.remote())["snapshots"]
        return int(self._n)


def start_snapshot_pool(storage_uri: str, run: str, sampling: str, seed: int, num_loaders: int = 2,
                        cache_bytes: int = 256 << 20, endpoint_url: str | None = None, namespace_name: str | None = None,
                        max_snapshots: int | None = None, outage_s: float | None = None, object_bytes: int = 1 << 30):
    """Create (or reuse, by name) the index actor and the loader actors for a run."""
    name = namespace_name or f"lkd-snapshots-{run}"
    index = SnapshotIndex.options(name=name, get_if_exists=True).remote(storage_uri, run, sampling, seed, endpoint_url,
                                                                        max_snapshots, outage_s, object_bytes)
    loaders = [SnapshotLoader.options(name=f"{name}-loader{i}", get_if_exists=True).remote(storage_uri, cache_bytes, endpoint_url,
                                                                                          outage_s)
               for i in range(num_loaders)]
    return index, loaders
