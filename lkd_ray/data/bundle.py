"""The built data of a run (``DataBundle``), the normalisation constants, and which images and labels it uses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import DataCfg
from .loaders import InMemoryLoader
from ..errors import BadInput
from .regimes import DEFAULT_CONFUSION, RegimeSplit, regime_split

FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass
class DataBundle:
    train: Any
    quiz: Any
    test: Any
    num_classes: int
    in_channels: int
    image_size: int
    train_size: int
    quiz_size: int
    test_size: int
    quiz_indices: np.ndarray | None = None  # indices into the original training set
    synthetic: bool = False
    identity: str | None = None  # what the data is, for cache keys: a content hash, or the root and its index
    quiz_eval: Any = None        # the whole quiz split in a fixed order (evaluation); None: evaluate on ``quiz``
    regime: RegimeSplit | None = None  # which labels and images the run uses, when they differ from the data set's
    select_eval: Any = None      # the clean selection split (data.select_per_class), disjoint from the quiz; None: none

    def label_table(self) -> dict[str, np.ndarray] | None:
        """What a run stores so anyone can audit its labels: every image of the training pool and the quiz with
        its given and clean label and whether the student trains on it (None when nothing was changed)."""
        r = self.regime
        if r is None:
            return None
        ids = np.concatenate([r.teacher, r.quiz])
        return {"id": ids, "label": r.labels[ids], "clean_label": r.clean[ids], "flipped": r.labels[ids] != r.clean[ids],
                "student": np.isin(ids, r.student), "quiz": np.isin(ids, r.quiz)}

    def fingerprint(self) -> str:
        """A hash of the training data's identity (content for in-memory sets), computed once."""
        if self.identity is None:
            import hashlib

            h = hashlib.sha256()
            tr = self.train
            if isinstance(tr, InMemoryLoader):
                h.update(tr.images.numpy().tobytes())
                h.update(tr.labels.numpy().tobytes())
                h.update(np.asarray(tr.ids).tobytes())
            else:
                h.update(repr((type(tr).__name__, self.train_size, self.quiz_size, self.test_size)).encode())
            self.identity = h.hexdigest()[:16]
        return self.identity


def confusion_map(cfg: DataCfg) -> dict[int, int] | None:
    """The class map of ``noise_kind=confusion``: the config's, else the data set's look-alike classes."""
    if cfg.noise_kind != "confusion":
        return None
    if cfg.confusion_map is not None:
        return {int(k): int(v) for k, v in cfg.confusion_map.items()}
    if cfg.dataset not in DEFAULT_CONFUSION:
        raise BadInput("data.noise_kind=confusion", f"no look-alike classes are shipped for {cfg.dataset!r}",
                       "give data.confusion_map (source class → the class it is mistaken for)")
    return dict(DEFAULT_CONFUSION[cfg.dataset])


def split_for(cfg: DataCfg, clean_labels, num_classes: int) -> RegimeSplit:
    from .label_files import load_noisy_labels, load_trusted

    clean = np.asarray(clean_labels)
    given = load_noisy_labels(cfg.noisy_labels, len(clean), num_classes, cfg.noisy_labels_key) if cfg.noisy_labels else None
    trusted = load_trusted(cfg.trusted, len(clean), num_classes) if cfg.trusted else None
    return regime_split(clean, num_classes, cfg.quiz_fraction, cfg.split_seed, label_noise=cfg.label_noise,
                        noise_kind=cfg.noise_kind, labels_per_class=cfg.labels_per_class, quiz_per_class=cfg.quiz_per_class,
                        train_subset=cfg.train_subset, noise_seed=cfg.noise_seed, confusion=confusion_map(cfg),
                        given=given, trusted=trusted, select_per_class=cfg.select_per_class)


def relabelled(cfg: DataCfg) -> bool:
    """Runs that train on labels other than the data set's own (noise drawn here, or the user's files)."""
    return bool(cfg.label_noise or cfg.noisy_labels or cfg.trusted)


def audited(cfg: DataCfg) -> bool:
    """Runs whose labels or images differ from the data set's own: their labels are stored with the run."""
    return bool(relabelled(cfg) or cfg.labels_per_class or cfg.quiz_per_class or cfg.select_per_class)


