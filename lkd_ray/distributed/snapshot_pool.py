"""The SnapshotPool: earlier student states in object storage, drawn uniformly for meta-steps.

An index actor holds the manifest of every recorded snapshot (persisted as
``<run>/snapshots/manifest.json``, written after each object). A ``ray.util.ActorPool`` of loader
actors fetches a drawn snapshot from storage (LRU cache bounded in bytes, checksum-verified) and
hands it back through the object store. ``RaySnapshotStore`` is the trainer-facing side: it
implements the single-process ``SnapshotStore`` interface and prefetches the next draw.
"""
from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Any

import ray
import torch
from ray.util import ActorPool

from ..storage import ChecksumMismatch, StorageError, open_storage, safe_key
from ..train.snapshots import draw_index

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
class SnapshotIndex:
    def __init__(self, storage_uri: str, run: str, sampling: str = "uniform", seed: int = 0, endpoint_url: str | None = None):
        self.storage = open_storage(storage_uri, endpoint_url)
        self.key = safe_key(run, "snapshots", "manifest.json")
        self.sampling = sampling
        self.rng = random.Random(seed)
        self.entries: list[dict] = self.storage.get_json(self.key)["snapshots"] if self.storage.exists(self.key) else []
        self.skipped: list[str] = []
        self.draws = 0

    def record(self, entry: dict) -> int:
        """Add one stored snapshot (``{"key", "size", "sha256", "step"}``) and persist the manifest."""
        self.entries = [e for e in self.entries if e["step"] != entry["step"]] + [entry]  # a resumed run re-records
        self.storage.put_json(self.key, {"snapshots": self.entries})
        return len(self.entries)

    def sample(self) -> dict | None:
        live = [e for e in self.entries if e["key"] not in self.skipped]
        if not live:
            return None
        self.draws += 1
        return live[draw_index(len(live), self.sampling, self.rng)]

    def mark_corrupt(self, key: str) -> None:
        if key not in self.skipped:
            self.skipped.append(key)

    def stats(self) -> dict:
        return {"snapshots": len(self.entries), "corrupt_skipped": len(self.skipped), "draws": self.draws}

    def entries_list(self) -> list[dict]:
        return list(self.entries)


@ray.remote(num_cpus=0)
class SnapshotLoader:
    def __init__(self, storage_uri: str, cache_bytes: int = 256 << 20, endpoint_url: str | None = None):
        self.storage = open_storage(storage_uri, endpoint_url)
        self.cache: OrderedDict[str, tuple[int, dict]] = OrderedDict()
        self.cache_bytes, self.used = cache_bytes, 0
        self.hits = self.misses = 0

    def load(self, entry: dict) -> dict[str, Any]:
        """Return ``{"entry", "state" | None, "error" | None}``; a corrupt object is reported, never loaded."""
        key = entry["key"]
        if key in self.cache:
            self.cache.move_to_end(key)
            self.hits += 1
            return {"entry": entry, "state": self.cache[key][1], "error": None}
        self.misses += 1
        try:
            state = self.storage.get_torch(key, expect_sha256=entry["sha256"])
        except (ChecksumMismatch, StorageError) as e:
            return {"entry": entry, "state": None, "error": str(e)}
        size = int(entry.get("size", 0))
        if size <= self.cache_bytes:
            self.cache[key] = (size, state)
            self.used += size
            while self.used > self.cache_bytes:
                _, (s, _) = self.cache.popitem(last=False)
                self.used -= s
        return {"entry": entry, "state": state, "error": None}

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "cached_bytes": self.used, "cached": len(self.cache)}


class RaySnapshotStore:
    """``SnapshotStore`` over the pool. Rank 0 records; every rank samples (prefetching the next draw)."""

    def __init__(self, storage_uri: str, run: str, index, loaders: list, record: bool, endpoint_url: str | None = None,
                 prefetch: bool = True):
        self.storage = open_storage(storage_uri, endpoint_url)
        self.run, self.index, self.loaders, self.record_enabled, self.prefetch = run, index, loaders, record, prefetch
        self.pool = ActorPool(loaders)
        self._pending = 0
        self.corrupt_seen = 0
        self._n = ray.get(index.stats.remote())["snapshots"]

    def record(self, step: int, state: dict[str, torch.Tensor]) -> None:
        if not self.record_enabled:
            return
        entry = self.storage.put_torch(safe_key(self.run, "snapshots", f"{step}.pt"), state)
        self._n = ray.get(self.index.record.remote({**entry, "step": step}))

    def _submit_draw(self) -> bool:
        entry = ray.get(self.index.sample.remote())
        if entry is None:
            return False
        self.pool.submit(lambda a, e: a.load.remote(e), entry)
        self._pending += 1
        return True

    def sample(self, rng: random.Random | None = None) -> dict[str, torch.Tensor] | None:
        """The pending (prefetched) draw, then start fetching the next one while the caller trains."""
        for _ in range(8):  # skip past corrupt objects
            if not self._pending and not self._submit_draw():
                return None
            out = self.pool.get_next()
            self._pending -= 1
            if out["error"] is None:
                if self.prefetch:
                    self._submit_draw()
                return out["state"]
            self.corrupt_seen += 1
            log.warning("skipping snapshot %s: %s", out["entry"]["key"], out["error"])
            ray.get(self.index.mark_corrupt.remote(out["entry"]["key"]))
        return None

    def __len__(self) -> int:
        return int(self._n)


def start_snapshot_pool(storage_uri: str, run: str, sampling: str, seed: int, num_loaders: int = 2,
                        cache_bytes: int = 256 << 20, endpoint_url: str | None = None, namespace_name: str | None = None):
    """Create (or reuse, by name) the index actor and the loader actors for a run."""
    name = namespace_name or f"lkd-snapshots-{run}"
    index = SnapshotIndex.options(name=name, get_if_exists=True).remote(storage_uri, run, sampling, seed, endpoint_url)
    loaders = [SnapshotLoader.options(name=f"{name}-loader{i}", get_if_exists=True).remote(storage_uri, cache_bytes, endpoint_url)
               for i in range(num_loaders)]
    return index, loaders
