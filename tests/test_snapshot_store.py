"""The single-process snapshot store: bounded in memory by default, older snapshots spilled to files, the draw
uniform over all of them."""
import random

import torch

from lkd_ray.config import build_config
from lkd_ray.train.snapshots import InMemorySnapshotStore, state_bytes


def _state(i: int) -> dict:
    return {"w": torch.full((64, 4), float(i)), "b": torch.arange(4) + i}


def test_snapshots_beyond_the_byte_bound_spill_to_files_and_still_draw(tmp_path):
    one = state_bytes(_state(0))
    store = InMemorySnapshotStore("uniform", max_bytes=3 * one, spill_dir=str(tmp_path))
    for i in range(10):
        store.record(i, _state(i))
        assert store.in_memory <= 3 * one
    assert len(store) == 10 and store.spilled == 7
    assert len(list(tmp_path.rglob("*.pt"))) == 7
    seen = set()
    rng = random.Random(0)
    for _ in range(300):
        s = store.sample(rng)
        i = int(s["b"][0])
        assert torch.equal(s["w"], _state(i)["w"])  # a spilled snapshot comes back exactly
        seen.add(i)
    assert seen == set(range(10))  # uniform over the whole history, spilled or not


def test_max_snapshots_still_bounds_the_count_and_deletes_spilled_files(tmp_path):
    one = state_bytes(_state(0))
    store = InMemorySnapshotStore("uniform", max_snapshots=4, max_bytes=one, spill_dir=str(tmp_path))
    for i in range(9):
        store.record(i, _state(i))
    assert len(store) == 4 and store.steps == [5, 6, 7, 8]
    assert len(list(tmp_path.rglob("*.pt"))) == 3  # the newest stays in memory; evicted files are gone


def test_the_trainers_default_store_is_bounded():
    cfg = build_config("fashion_mnist")
    assert cfg.meta.snapshot_memory_mb == 1024


class _Reads(list):
    """A list that counts how many of its items are read (the store's work per record)."""

    reads = 0

    def __getitem__(self, i):
        _Reads.reads += 1
        return super().__getitem__(i)


def test_recording_does_not_rescan_the_history(tmp_path):
    """Each record spills at most what went over the byte bound: the work per call stays flat as the history grows
    (it once walked every earlier snapshot on every call)."""
    one = state_bytes(_state(0))
    store = InMemorySnapshotStore("uniform", max_bytes=2 * one, spill_dir=str(tmp_path))
    store.states = _Reads()
    per_call = []
    for i in range(200):
        before = _Reads.reads
        store.record(i, _state(i))
        per_call.append(_Reads.reads - before)
    assert max(per_call[100:]) <= 2, per_call[-5:]
    assert store.spilled == 198 and store.in_memory == 2 * one
    assert torch.equal(store.sample(random.Random(3))["w"], _state(int(store.sample(random.Random(3))["b"][0]))["w"])
