"""Batch iterators. Small data sets live in memory as one tensor and are augmented per batch
(no per-image Python), which is what makes CPU runs fast; large ones use torch's DataLoader."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.nn import functional as F


class InMemoryLoader:
    """Iterate (x, y) batches over normalised float images held in one tensor.

    ``rank``/``world_size`` shard every epoch's permutation so DDP ranks see disjoint samples;
    ``set_epoch`` reseeds the shuffle (as DistributedSampler does).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 augment: bool = False, pad: int = 2, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, pad_value: float = 0.0):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in count")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.augment, self.pad = batch_size, shuffle, augment, pad
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.pad_value = pad_value  # the background's value after normalisation, so crops add no grey borders
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        n = self.images.shape[0]
        idx = np.random.default_rng((self.seed, self.epoch)).permutation(n) if self.shuffle else np.arange(n)
        if self.world_size > 1:
            per = n // self.world_size  # equal shards: DDP ranks must run the same number of steps
            idx = idx[self.rank * per:(self.rank + 1) * per]
        return idx

    def __len__(self) -> int:
        n = self.images.shape[0] // self.world_size
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        idx = self._indices()
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) & 0x7FFFFFFF)
        for start in range(0, len(idx), self.batch_size):
            b = idx[start:start + self.batch_size]
            if self.drop_last and len(b) < self.batch_size:
                break
            bt = torch.from_numpy(b)
            x, y = self.images[bt], self.labels[bt]
            if self.augment:
                x = random_crop_flip(x, self.pad, gen, self.pad_value)
            yield x, y


def random_crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator, pad_value: float = 0.0) -> torch.Tensor:
    """Per-image random crop (zero padding ``pad``) and horizontal flip, batched."""
    n, c, h, w = x.shape
    if pad:
        xp = F.pad(x, (pad, pad, pad, pad), value=pad_value)
        oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        iy = (oy[:, None] + torch.arange(h))[:, None, :, None]
        ix = (ox[:, None] + torch.arange(w))[:, None, None, :]
        x = xp[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], iy, ix]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cycle(loader):
    """Endless iteration over a loader (quiz batches for meta-steps), reshuffling each pass."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("a loader yielded no batch (split smaller than one batch?); lower the batch size or raise the split")
        epoch += 1
