"""CIFAR-10/100 and ImageNet through torchvision, with each recipe's augmentation. Nothing is
downloaded: the data must already be at ``data.root``."""
from __future__ import annotations

import copy
import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..config import DataCfg
from .fashion import DataNotFound


def _specs(cfg: DataCfg):
    """(train spec, eval spec, mean, std, size): the recipes' augmentation, shared with the other data paths."""
    from .bundle import CIFAR_STATS, IMAGENET_STATS
    from .transforms import CropFlip, ResizeCenterCrop, ResizedCropFlip

    if cfg.dataset in CIFAR_STATS:
        mean, std = CIFAR_STATS[cfg.dataset]
        return CropFlip(4, 0.0) if cfg.augment else None, None, mean, std, cfg.image_size or 32
    mean, std = IMAGENET_STATS
    size = cfg.image_size or 224
    test = ResizeCenterCrop(size, int(round(size * 256 / 224)))
    return (ResizedCropFlip(size) if cfg.augment else test), test, mean, std, size


class _Augmented(Dataset):
    """A torchvision data set (PIL images) through the shared spec, keyed by (seed, epoch, index)."""

    def __init__(self, base, spec, mean, std, channels: int, seed: int, labels: np.ndarray | None = None):
        self.base, self.spec, self.mean, self.std, self.channels, self.seed = base, spec, mean, std, channels, seed
        self.labels = labels  # the run's given labels (label noise), in place of the data set's own
        self.epoch = 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i: int):
        from .transforms import CropFlip, pil_to_tensor

        img, y = self.base[i]
        if self.labels is not None:
            y = int(self.labels[i])
        if self.spec is None or isinstance(self.spec, CropFlip):
            x = torch.from_numpy(pil_to_tensor(img, self.channels, self.mean, self.std))
            if self.spec is not None:
                x = self.spec.apply(x[None], self.spec.views([i], self.seed, self.epoch))[0]
            return x, y
        return torch.from_numpy(pil_to_tensor(self.spec.apply_pil(img, self.seed, self.epoch, i), self.channels, self.mean, self.std)), y


def _datasets(cfg: DataCfg, train_tf, test_tf):
    from torchvision import datasets

    root = cfg.root
    if not root or not os.path.isdir(root):
        raise DataNotFound(f"data.root={root!r}", "is not a folder", f"point it at your {cfg.dataset} copy (nothing is downloaded)")
    try:
        if cfg.dataset in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
            return (cls(root, train=True, transform=train_tf, download=False), cls(root, train=True, transform=test_tf, download=False),
                    cls(root, train=False, transform=test_tf, download=False))
        tr, va = os.path.join(root, "train"), os.path.join(root, "val")
        for d in (tr, va):
            if not os.path.isdir(d):
                raise DataNotFound(f"data.root={root!r}", f"{d!r} is missing",
                                   "an ImageNet root needs train/ and val/ class folders (ImageFolder layout)")
        return datasets.ImageFolder(tr, train_tf), datasets.ImageFolder(tr, test_tf), datasets.ImageFolder(va, test_tf)
    except RuntimeError as e:
        raise DataNotFound(f"data.root={root!r}", f"no {cfg.dataset} there ({str(e).splitlines()[0]})",
                           "download it yourself and point data.root at it") from e


class _ShardedLoader:
    """A DataLoader over a subset of indices, sharded and shuffled by torch's DistributedSampler."""

    def __init__(self, ds: _Augmented, indices: np.ndarray, cfg: DataCfg, shuffle: bool, seed: int, rank: int, world: int,
                 batch: int, drop_last: bool):
        self.ds, self.cfg, self.batch, self.drop_last = ds, cfg, batch, drop_last
        self.subset = Subset(ds, np.asarray(indices).tolist())
        self.sampler = DistributedSampler(self.subset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.ds.epoch = epoch

    def fork(self, reseed: int = 0) -> _ShardedLoader:
        """The same images with a data set epoch and sampler of their own (see ``InMemoryLoader.fork``)."""
        other = copy.copy(self)
        other.ds = copy.copy(self.ds)
        other.ds.epoch = 0
        other.subset = Subset(other.ds, self.subset.indices)
        s = self.sampler
        other.sampler = DistributedSampler(other.subset, num_replicas=s.num_replicas, rank=s.rank, shuffle=s.shuffle,
                                           seed=s.seed + reseed, drop_last=True)
        return other

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch if self.drop_last else -(-n // self.batch)

    def __iter__(self):
        return self.iter_from(0)

    def iter_from(self, first_batch: int):
        """This epoch's batches from batch ``first_batch`` on, without loading the ones before."""
        from .loaders import Batch

        order = list(iter(self.sampler))[first_batch * self.batch:]
        for x, y in DataLoader(Subset(self.subset, order), batch_size=self.batch, shuffle=False,
                               num_workers=self.cfg.num_workers, pin_memory=torch.cuda.is_available(),
                               drop_last=self.drop_last, persistent_workers=False):
            yield Batch(x, y)


def build_torchvision_data(cfg: DataCfg, seed: int, rank: int, world: int, role: str = "student"):
    from .bundle import DataBundle, audited, relabelled, split_for

    train_spec, test_spec, mean, std, size = _specs(cfg)
    train_raw, quiz_raw, test_raw = _datasets(cfg, None, None)
    targets = np.asarray(train_raw.targets)
    num_classes = len(train_raw.classes)
    sp = split_for(cfg, targets, num_classes)
    given = sp.labels if relabelled(cfg) else None  # the quiz's entries of sp.labels are clean (or the trusted labels)
    train_ds, quiz_ds, test_ds = (_Augmented(d, spc, mean, std, 3, seed, lab)
                                  for d, spc, lab in ((train_raw, train_spec, given), (quiz_raw, test_spec, given),
                                                      (test_raw, test_spec, None)))
    tr_idx = sp.student if role == "student" else sp.teacher
    qb = min(cfg.quiz_batch_size or cfg.batch_size, len(sp.quiz))
    tr = _ShardedLoader(train_ds, tr_idx, cfg, True, seed, rank, world, cfg.batch_size, True)
    qz = _ShardedLoader(quiz_ds, sp.quiz, cfg, True, seed + 7 + 1000 * rank, 0, 1, qb, True)
    te = _ShardedLoader(test_ds, np.arange(len(test_ds)), cfg, False, 0, 0, 1, cfg.eval_batch_size, False)
    qe = _ShardedLoader(quiz_ds, sp.quiz, cfg, False, 0, 0, 1, cfg.eval_batch_size, False)
    se = _ShardedLoader(quiz_ds, sp.select, cfg, False, 0, 0, 1, cfg.eval_batch_size, False) if len(sp.select) else None
    import hashlib

    ident = hashlib.sha256(repr((os.path.realpath(cfg.root), cfg.dataset, len(train_raw), len(test_raw))).encode()
                           + np.asarray(sp.labels).tobytes() + tr_idx.tobytes()).hexdigest()[:16]
    return DataBundle(tr, qz, te, num_classes, 3, size, len(tr_idx), len(sp.quiz), len(test_ds), sp.quiz, identity=ident,
                      quiz_eval=qe, regime=sp if audited(cfg) else None, select_eval=se)
