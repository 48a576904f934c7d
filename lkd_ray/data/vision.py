"""CIFAR-10/100 and ImageNet through torchvision, with each recipe's augmentation. Nothing is
downloaded: the data must already be at ``data.root``."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..config import DataCfg
from .fashion import DataNotFound
from .split import stratified_split


def _transforms(cfg: DataCfg):
    from torchvision import transforms as T
    from . import CIFAR_STATS, IMAGENET_STATS

    if cfg.dataset in CIFAR_STATS:
        mean, std = CIFAR_STATS[cfg.dataset]
        size = cfg.image_size or 32
        train = T.Compose([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        test = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
    else:
        mean, std = IMAGENET_STATS
        size = cfg.image_size or 224
        train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
        test = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    return (train if cfg.augment else test), test, size


def _datasets(cfg: DataCfg, train_tf, test_tf):
    from torchvision import datasets

    root = cfg.root
    if not root or not os.path.isdir(root):
        raise DataNotFound(f"data.root {root!r} is not a directory; point it at your {cfg.dataset} copy (nothing is downloaded)")
    try:
        if cfg.dataset in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
            return (cls(root, train=True, transform=train_tf, download=False), cls(root, train=True, transform=test_tf, download=False),
                    cls(root, train=False, transform=test_tf, download=False))
        tr, va = os.path.join(root, "train"), os.path.join(root, "val")
        for d in (tr, va):
            if not os.path.isdir(d):
                raise DataNotFound(f"ImageNet root {root!r} needs train/ and val/ class folders (ImageFolder layout); {d!r} is missing")
        return datasets.ImageFolder(tr, train_tf), datasets.ImageFolder(tr, test_tf), datasets.ImageFolder(va, test_tf)
    except RuntimeError as e:
        raise DataNotFound(f"{cfg.dataset} not found under {root!r}: {e}. Download it yourself and pass data.root.") from e


class _ShardedLoader:
    """DataLoader over a per-epoch seeded permutation shard (what DistributedSampler does), with set_epoch."""

    def __init__(self, ds, indices: np.ndarray, cfg: DataCfg, shuffle: bool, seed: int, rank: int, world: int, batch: int, drop_last: bool):
        self.ds, self.indices, self.cfg, self.shuffle = ds, indices, cfg, shuffle
        self.seed, self.rank, self.world, self.batch, self.drop_last, self.epoch = seed, rank, world, batch, drop_last, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _shard(self):
        idx = np.random.default_rng((self.seed, self.epoch)).permutation(self.indices) if self.shuffle else self.indices
        per = len(idx) // self.world
        return idx[self.rank * per:(self.rank + 1) * per] if self.world > 1 else idx

    def __len__(self):
        n = len(self.indices) // self.world
        return n // self.batch if self.drop_last else -(-n // self.batch)

    def __iter__(self):
        return iter(DataLoader(Subset(self.ds, self._shard().tolist()), batch_size=self.batch, shuffle=False,
                               num_workers=self.cfg.num_workers, pin_memory=torch.cuda.is_available(),
                               drop_last=self.drop_last, persistent_workers=False))


def build_torchvision_data(cfg: DataCfg, seed: int, rank: int, world: int):
    from . import DataBundle

    train_tf, test_tf, size = _transforms(cfg)
    train_ds, quiz_ds, test_ds = _datasets(cfg, train_tf, test_tf)
    targets = np.asarray(train_ds.targets)
    tr_idx, quiz_idx = stratified_split(targets, cfg.quiz_fraction, cfg.split_seed)
    if cfg.train_subset is not None:
        tr_idx = np.sort(np.random.default_rng(cfg.split_seed + 1).choice(tr_idx, min(cfg.train_subset, len(tr_idx)), replace=False))
    qb = min(cfg.quiz_batch_size or cfg.batch_size, len(quiz_idx))
    tr = _ShardedLoader(train_ds, tr_idx, cfg, True, seed, rank, world, cfg.batch_size, True)
    qz = _ShardedLoader(quiz_ds, quiz_idx, cfg, True, seed + 7, 0, 1, qb, True)
    te = _ShardedLoader(test_ds, np.arange(len(test_ds)), cfg, False, 0, 0, 1, cfg.eval_batch_size, False)
    num_classes = len(train_ds.classes)
    return DataBundle(tr, qz, te, num_classes, 3, size, len(tr_idx), len(quiz_idx), len(test_ds), quiz_idx)
