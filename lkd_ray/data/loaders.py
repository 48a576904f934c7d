"""Batch iterators. Small data sets live in memory as one tensor and are augmented per batch
(no per-image Python), which is what makes CPU runs fast; large ones use torch's DataLoader.

Sharding and shuffling are torch's ``DistributedSampler`` (seeded, ``set_epoch``); augmentation is
the shared spec of ``transforms`` keyed by sample id, so a sample's view does not depend on which
rank or batch it lands in. With a teacher-output cache attached, batches carry the teacher's logits
for exactly the view they hold.
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from .transforms import CropFlip


FORK_SEED = 0x5EED  # how far a fresh-batch stream's shuffle seed sits from the training loader's


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    t_logits: torch.Tensor | None = None   # the teacher's logits for these views (teacher-output cache)
    ids: torch.Tensor | None = None        # sample ids (positions in the original training set)


class InMemoryLoader:
    """Iterate ``Batch``es over normalised float images held in one tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                 augment: CropFlip | None = None, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1, ids: np.ndarray | None = None):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in count")
        self.images, self.labels = images, labels
        self.ids = np.arange(len(labels)) if ids is None else np.asarray(ids)
        self.batch_size, self.shuffle, self.augment, self.seed, self.drop_last = batch_size, shuffle, augment, seed, drop_last
        self.rank, self.world_size = rank, world_size
        # equal shards (drop_last): DDP ranks must run the same number of steps
        self.sampler = DistributedSampler(range(len(labels)), num_replicas=world_size, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=True)
        self.epoch = 0
        self.teacher_logits: torch.Tensor | None = None   # N × slots × C
        self.cached_views: torch.Tensor | None = None     # N × slots: the view each slot holds (None: slot = view)

    def attach_teacher_cache(self, logits: torch.Tensor, views: torch.Tensor | None = None) -> None:
        if logits.shape[0] != len(self.labels):
            raise ValueError(f"teacher-output cache holds {logits.shape[0]} images, the loader {len(self.labels)}")
        if self.augment is None and logits.shape[1] != 1:
            raise ValueError("a loader without augmentation takes a cache of one view per image")
        self.teacher_logits, self.cached_views = logits, views

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def fork(self, reseed: int = 0) -> InMemoryLoader:
        """The same images, labels and teacher cache (shared, not copied) with a sampler and epoch of its own (its
        shuffle seed moved by ``reseed``): a second stream that never moves the epoch of the loader it came from —
        with ``reseed=FORK_SEED`` (fresh meta-batches) nor repeats the order of the one being trained on."""
        other = copy.copy(self)
        other.sampler = DistributedSampler(range(len(self.labels)), num_replicas=self.world_size, rank=self.rank,
                                           shuffle=self.shuffle, seed=self.seed + reseed, drop_last=True)
        other.epoch = 0
        return other

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def views_for(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cache slot, view number) of each row in this epoch."""
        ids = self.ids[rows]
        if self.cached_views is None:
            views = self.augment.views(ids, self.seed, self.epoch)
            return views, views
        k = self.cached_views.shape[1]
        from .transforms import hash_u64

        slots = (hash_u64(self.seed, self.epoch, ids, 7) % np.uint64(k)).astype(np.int64)
        return slots, self.cached_views[torch.as_tensor(rows), torch.as_tensor(slots)].numpy()

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, first_batch: int):
        """This epoch's batches from batch ``first_batch`` on (a resumed stream seeks instead of replaying)."""
        idx = np.fromiter(iter(self.sampler), dtype=np.int64) if self.shuffle or self.world_size > 1 else np.arange(len(self.labels))
        for start in range(first_batch * self.batch_size, len(idx), self.batch_size):
            rows = idx[start:start + self.batch_size]
            if self.drop_last and len(rows) < self.batch_size:
                break
            bt = torch.from_numpy(rows)
            x, y, t = self.images[bt], self.labels[bt], None
            if self.augment is not None:
                slots, views = self.views_for(rows)
                x = self.augment.apply(x, views)
                if self.teacher_logits is not None:
                    t = self.teacher_logits[bt, torch.from_numpy(slots)]
            elif self.teacher_logits is not None:
                t = self.teacher_logits[bt, 0]
            yield Batch(x, y, t, torch.from_numpy(self.ids[rows]))


def cycle(loader, start: int = 0):
    """Endless iteration over a loader (quiz batches for meta-steps), reshuffling each pass; ``start`` batches
    are skipped without being produced when the loader can seek (``iter_from``): pass ``start // len`` is
    shuffled as it was, and its first ``start % len`` batches are never built."""
    n = len(loader)
    if n == 0:
        raise ValueError("a loader yielded no batch (split smaller than one batch?); lower the batch size or raise the split")
    epoch, skip = divmod(int(start), n)
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if skip and hasattr(loader, "iter_from"):
            it = loader.iter_from(skip)
        else:
            it = iter(loader)
            for _ in range(skip):  # a loader that cannot seek (a stream): skip by reading
                next(it)
        skip = 0
        yield from it
        epoch += 1
