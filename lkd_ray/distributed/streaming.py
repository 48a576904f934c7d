"""The train split of a Parquet data set streamed through Ray Data: shards are read and JPEGs
decoded and augmented in Ray Data's CPU tasks, then split across the Train workers, so GPUs are
not starved by decoding. Quiz and val splits are small and decoded in-process."""
from __future__ import annotations

import ray
import torch

from ..config import Config
from ..data.parquet import decode_batch, read_meta
from ..storage import open_storage


def train_dataset(cfg: Config) -> "ray.data.Dataset":
    d = cfg.data
    fs, base = open_storage(d.root, d.endpoint_url).arrow_fs()
    meta = read_meta(fs, base)
    size = d.image_size or meta["image_size"]
    ds = ray.data.read_parquet(f"{base}/train", filesystem=fs)
    return ds.map_batches(decode_batch, batch_format="numpy", batch_size=64,
                          fn_kwargs=dict(size=size, channels=d.channels, mean=meta["mean"][:d.channels],
                                         std=meta["std"][:d.channels], train=d.augment, seed=cfg.run.seed))


class StreamingLoader:
    """The trainer-facing side of a worker's dataset shard: ``(x, y)`` batches, ``len``, ``set_epoch``.

    ``seen`` (when enabled) collects the sample ids of the current epoch, so tests can check that an
    epoch covers every sample exactly once across ranks.
    """

    def __init__(self, shard, batch_size: int, rows: int, world_size: int, record_ids: bool = False, shuffle_buffer: int = 256):
        self.shard, self.batch_size, self.rows, self.world = shard, batch_size, rows, world_size
        self.record_ids, self.shuffle_buffer = record_ids, shuffle_buffer
        self.epoch = 0
        self.seen: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.seen = []

    def __len__(self) -> int:
        return (self.rows // self.world) // self.batch_size

    def __iter__(self):
        for b in self.shard.iter_torch_batches(batch_size=self.batch_size, drop_last=True,
                                               local_shuffle_buffer_size=self.shuffle_buffer or None,
                                               dtypes={"x": torch.float32, "y": torch.int64, "id": torch.int64}):
            if self.record_ids:
                self.seen.extend(b["id"].tolist())
            yield b["x"], b["y"]
