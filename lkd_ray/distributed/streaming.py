"""The train split of a Parquet data set streamed through Ray Data: shards are read in a file order
reshuffled every epoch, images decoded and augmented in Ray Data's CPU tasks, rows shuffled again
in a local buffer, then split across the Train workers, so GPUs are not starved by decoding.

Augmentation is the data set's spec keyed by (seed, epoch, id), like the in-memory path. Ray Data's
tasks do not know the epoch, so a tiny named ``EpochClock`` actor carries it: every rank sets it
before iterating an epoch (the execution for that epoch starts only then), every decode task reads it.
"""
from __future__ import annotations

import ray
import torch

from ..config import Config
from ..data.loaders import Batch
from ..data.parquet import decode_batch, read_meta
from ..storage import open_storage


@ray.remote(num_cpus=0)
class EpochClock:
    def __init__(self):
        self.epoch = 0

    def set(self, epoch: int) -> int:
        self.epoch = max(self.epoch, int(epoch))
        return self.epoch

    def get(self) -> int:
        return self.epoch


class _Decode:
    """The map function: decode + augment one batch at the clock's epoch."""

    def __init__(self, meta: dict, size: int, channels: int, train: bool, seed: int, clock_name: str | None, namespace: str | None):
        self.kw = dict(meta=meta, size=size, channels=channels, train=train, seed=seed)
        self.clock_name, self.namespace = clock_name, namespace

    def __call__(self, batch: dict) -> dict:
        epoch = 0
        if self.clock_name:
            epoch = ray.get(ray.get_actor(self.clock_name, namespace=self.namespace).get.remote())
        return decode_batch(batch, epoch=epoch, **self.kw)


def train_dataset(cfg: Config, clock_name: str | None = None, namespace: str | None = None) -> "ray.data.Dataset":
    d = cfg.data
    fs, base = open_storage(d.root, d.endpoint_url).arrow_fs()
    meta = read_meta(fs, base)
    size = d.image_size or meta["image_size"]
    ds = ray.data.read_parquet(f"{base}/train", filesystem=fs,
                               shuffle=ray.data.FileShuffleConfig(seed=cfg.run.seed, reseed_after_execution=True))
    return ds.map_batches(_Decode(meta, size, d.channels, d.augment, cfg.run.seed, clock_name, namespace),
                          batch_format="numpy", batch_size=64)


class StreamingLoader:
    """The trainer-facing side of a worker's dataset shard: ``Batch``es, ``len``, ``set_epoch``.

    ``seen`` (when enabled) collects the sample ids of the current epoch, so tests can check that an
    epoch covers every sample exactly once across ranks.
    """

    def __init__(self, shard, batch_size: int, rows: int, world_size: int, record_ids: bool = False,
                 shuffle_buffer: int | None = None, clock=None, seed: int = 0):
        self.shard, self.batch_size, self.rows, self.world = shard, batch_size, rows, world_size
        self.record_ids, self.clock, self.seed = record_ids, clock, seed
        self.shuffle_buffer = shuffle_buffer if shuffle_buffer is not None else max(1024, 8 * batch_size)
        self.epoch = 0
        self.seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.seen = []
        if self.clock is not None:
            ray.get(self.clock.set.remote(epoch))

    def fork(self, reseed: int = 0) -> StreamingLoader:
        """The same shard for a second stream (fresh meta-batches): its own epoch, no shared epoch clock and no id
        record, so drawing from it never moves the epoch of the loader being trained on (the shard's order is Ray
        Data's local shuffle: ``reseed`` has nothing to move)."""
        import copy

        other = copy.copy(self)
        other.clock, other.record_ids, other.seen, other.epoch = None, False, [], 0
        return other

    def __len__(self) -> int:
        return (self.rows // self.world) // self.batch_size

    def __iter__(self):
        for b in self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True,
                                               local_shuffle_buffer_size=self.shuffle_buffer or None,
                                               local_shuffle_seed=None,
                                               dtypes={"x": torch.float32, "y": torch.int64, "id": torch.int64}):
            if self.record_ids:
                self.seen.extend(b["id"].tolist())
            yield Batch(b["x"], b["y"], None, b["id"])
