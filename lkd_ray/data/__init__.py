"""Data sets, the held-out quiz split and loaders, built from ``DataCfg``."""
from __future__ import annotations

import numpy as np
import torch

from ..config import DataCfg
from .bundle import CIFAR_STATS, FASHION_MEAN, FASHION_STD, IMAGENET_STATS, DataBundle, audited, split_for
from .fashion import DataDamaged, DataNotFound, load_fashion_mnist
from .loaders import Batch, InMemoryLoader, cycle
from .transforms import CropFlip
from .split import stratified_split


def _to_tensor(images: np.ndarray, cfg: DataCfg) -> torch.Tensor:
    """uint8 N×H×W → normalised float N×C×S×S (zero-padded to image_size, channels repeated)."""
    x = torch.from_numpy(np.array(images, copy=True)).float().div_(255.0).sub_(FASHION_MEAN).div_(FASHION_STD)
    x = x.unsqueeze(1)
    size = cfg.image_size or 28
    if size != x.shape[-1]:
        p = size - x.shape[-1]
        if p < 0:
            raise ValueError(f"image_size {size} is smaller than the data set's 28 pixels")
        x = torch.nn.functional.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2), value=-FASHION_MEAN / FASHION_STD)
    return x.repeat(1, cfg.channels, 1, 1).contiguous()


def _in_memory(train_x, train_y, test_x, test_y, cfg: DataCfg, seed: int, rank: int, world: int, num_classes: int,
               synthetic: bool = False, pad_value: float = 0.0, role: str = "student") -> DataBundle:
    sp = split_for(cfg, train_y.numpy(), num_classes)
    tr_idx = sp.student if role == "student" else sp.teacher
    labels = torch.from_numpy(sp.labels)
    qb = min(cfg.quiz_batch_size or cfg.batch_size, len(sp.quiz))
    spec = train_augmentation(cfg, pad_value)
    tr = InMemoryLoader(train_x[tr_idx], labels[tr_idx], cfg.batch_size, True, spec, seed=seed, drop_last=True,
                        rank=rank, world_size=world, ids=tr_idx)
    # each rank draws its own quiz batches, so a sync round averages meta-gradients over different ones
    qz = InMemoryLoader(train_x[sp.quiz], labels[sp.quiz], qb, True, None, seed=seed + 7 + 1000 * rank, drop_last=True,
                        ids=sp.quiz)
    te = InMemoryLoader(test_x, test_y, cfg.eval_batch_size, False)
    qe = InMemoryLoader(train_x[sp.quiz], labels[sp.quiz], cfg.eval_batch_size, False, ids=sp.quiz)
    se = (InMemoryLoader(train_x[sp.select], labels[sp.select], cfg.eval_batch_size, False, ids=sp.select)
          if len(sp.select) else None)
    return DataBundle(tr, qz, te, num_classes, train_x.shape[1], train_x.shape[-1], len(tr_idx), len(sp.quiz),
                      len(test_y), sp.quiz, synthetic, quiz_eval=qe, regime=sp if audited(cfg) else None, select_eval=se)


def train_augmentation(cfg: DataCfg, pad_value: float = 0.0) -> CropFlip | None:
    """The recipe's training augmentation for in-memory images (None when data.augment is off)."""
    return CropFlip(pad=4 if cfg.dataset in ("cifar10", "cifar100") else 2, pad_value=pad_value) if cfg.augment else None


def synthetic_arrays(n: int, num_classes: int, channels: int, size: int, seed: int):
    """Learnable random images with the job's real shapes (for --smoke runs): class-dependent means.

    Labels use at most n/8 of the classes, so every used class has examples for the stratified
    quiz split; the models still have ``num_classes`` outputs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, max(2, min(num_classes, n // 8)), (n,), generator=g)
    protos = torch.randn(num_classes, channels, size, size, generator=torch.Generator().manual_seed(1234))
    x = 0.6 * protos[y] + torch.randn(n, channels, size, size, generator=g)
    return x, y


def _parquet(cfg: DataCfg, seed: int, rank: int, world: int, stream_train: bool) -> DataBundle:
    """Quiz and val decoded into memory; train too unless a Ray Data stream will feed it."""
    from ..storage import open_storage
    from .parquet import augmentation, decode_batch, read_meta, read_split

    fs, base = open_storage(cfg.root, cfg.endpoint_url).arrow_fs()
    meta = read_meta(fs, base)
    size = cfg.image_size or meta["image_size"]

    def load(split: str):
        d = decode_batch(read_split(fs, base, split).to_pydict(), meta, size, cfg.channels, train=False)
        return torch.from_numpy(d["x"]), torch.from_numpy(d["y"]), d["id"]

    qx, qy, qid = load("quiz")
    tx, ty, _ = load("val")
    qb = min(cfg.quiz_batch_size or cfg.batch_size, len(qy))
    if stream_train:
        train, n_train = None, meta["counts"]["train"]
    else:
        spec = augmentation(meta, size, train=True) if cfg.augment else None
        if spec is not None and not isinstance(spec, CropFlip):
            raise ValueError(f"{cfg.root}: full-size images with {type(spec).__name__} are streamed through Ray Data, not held "
                             "in memory: run the job under Ray (jobs/lkd_imagenet.py --parquet) or set data.augment=false")
        x, y, ids = load("train")
        train = InMemoryLoader(x, y, cfg.batch_size, True, spec, seed=seed, drop_last=True, rank=rank, world_size=world, ids=ids)
        n_train = len(y)
    import hashlib
    import json

    ident = hashlib.sha256((str(cfg.root) + json.dumps(meta, sort_keys=True)).encode()).hexdigest()[:16]
    return DataBundle(train, InMemoryLoader(qx, qy, qb, True, None, seed=seed + 7 + 1000 * rank, drop_last=True, ids=qid),
                      InMemoryLoader(tx, ty, cfg.eval_batch_size, False), meta["num_classes"], cfg.channels, size,
                      n_train, len(qy), len(ty), identity=ident,
                      quiz_eval=InMemoryLoader(qx, qy, cfg.eval_batch_size, False, ids=qid))


def build_data(cfg: DataCfg, seed: int = 0, rank: int = 0, world_size: int = 1, cache_dir: str = ".cache/lkd_ray",
               stream_train: bool = False, role: str = "student") -> DataBundle:
    """The run's data. ``role="teacher"``: the teacher's training set (the whole training pool with the given
    labels, whatever ``labels_per_class`` keeps for the student), same quiz and test splits."""
    if role not in ("student", "teacher"):
        raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
    if cfg.dataset == "fashion_mnist":
        raw = load_fashion_mnist(cfg.root, cache_dir)
        (trx, try_), (tex, tey) = raw["train"], raw["test"]
        return _in_memory(_to_tensor(trx, cfg), torch.from_numpy(try_), _to_tensor(tex, cfg), torch.from_numpy(tey),
                          cfg, seed, rank, world_size, 10, pad_value=-FASHION_MEAN / FASHION_STD, role=role)
    if cfg.dataset == "synthetic":
        k = cfg.num_classes_override or 10
        size = cfg.image_size or 32
        trx, try_ = synthetic_arrays(cfg.synthetic_size, k, cfg.channels, size, 1)
        tex, tey = synthetic_arrays(max(64, cfg.synthetic_size // 4), k, cfg.channels, size, 2)
        return _in_memory(trx, try_, tex, tey, cfg, seed, rank, world_size, k, synthetic=True, role=role)
    if cfg.dataset == "parquet":
        return _parquet(cfg, seed, rank, world_size, stream_train)
    from .vision import build_torchvision_data

    return build_torchvision_data(cfg, seed, rank, world_size, role)


__all__ = ["CIFAR_STATS", "IMAGENET_STATS", "FASHION_MEAN", "FASHION_STD", "Batch", "CropFlip", "train_augmentation", "DataBundle", "DataDamaged", "DataNotFound", "build_data", "cycle", "stratified_split", "InMemoryLoader", "load_fashion_mnist"]
