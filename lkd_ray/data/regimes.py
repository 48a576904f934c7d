"""Which images and which labels a run trains on: the held-out quiz split, label noise, a scarce
labelled subset for the student and a small trusted quiz set — one seeded, auditable function of
the clean training labels, shared by every data path (in memory, torchvision folders).

    clean labels ──stratified_split(quiz_fraction)──▶ train pool │ held-out pool (clean labels, never trained on)
    train pool ──label_noise / noise_kind──▶ the given labels (the teacher trains on the whole pool with them)
    train pool ──labels_per_class──▶ the student's subset        held-out pool ──quiz_per_class──▶ the quiz

The quiz always keeps its clean labels (it is the trusted set the meta-objective sees), and it never
overlaps the student's or the teacher's training images.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import BadInput
from .split import stratified_split

NOISE_KINDS = ("symmetric", "pairflip")


def pairflip_target(y: np.ndarray, num_classes: int) -> np.ndarray:
    """The fixed class confusion map of pair-flip noise (Han et al., NeurIPS 2018): class c → c + 1 (mod C)."""
    return (np.asarray(y) + 1) % num_classes


def apply_label_noise(labels: np.ndarray, rate: float, kind: str, num_classes: int, seed: int) -> np.ndarray:
    """A copy of ``labels`` with exactly round(rate·n_c) labels of every class c flipped, chosen by ``seed``:
    ``symmetric`` to a uniformly drawn *other* class, ``pairflip`` to ``pairflip_target``."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_KINDS)}")
    if not 0 <= rate < 1:
        raise ValueError(f"label noise rate must be in [0, 1), got {rate}")
    labels = np.asarray(labels)
    out = labels.copy()
    if rate == 0:
        return out
    rng = np.random.default_rng([seed, 0x401E])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        flip = rng.choice(idx, size=int(round(rate * len(idx))), replace=False)
        if kind == "pairflip":
            out[flip] = pairflip_target(labels[flip], num_classes)
        else:  # a uniform draw over the C − 1 other classes
            out[flip] = (labels[flip] + rng.integers(1, num_classes, size=len(flip))) % num_classes
    return out


def per_class_subset(idx: np.ndarray, labels: np.ndarray, k: int, seed: int, what: str, pool: str = "", more: str = "") -> np.ndarray:
    """Sorted: k entries of ``idx`` per class of ``labels[idx]``, drawn by ``seed``. Too few images in a class is
    bad input (``BadInput`` naming the field ``what`` and the largest value that fits)."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels[idx], return_counts=True)
    if len(counts) and counts.min() < k:
        c = classes[counts.argmin()]
        raise BadInput(f"{what}={k}", f"class {c} has only {counts.min()} image(s){pool} to draw {k} per class from",
                       f"set {what} to at most {counts.min()}{more}")
    out = []
    for c in classes:
        members = idx[labels[idx] == c]
        out.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(out))


@dataclass(frozen=True)
class RegimeSplit:
    """Index sets into the original training set, and the labels training sees."""

    student: np.ndarray   # the student's training images
    teacher: np.ndarray   # the teacher's training images (the whole train pool)
    quiz: np.ndarray      # the trusted quiz split (clean labels)
    labels: np.ndarray    # the given label of every training image (noisy where label_noise > 0; clean in the quiz)
    clean: np.ndarray     # the original labels

    @property
    def flipped(self) -> np.ndarray:
        return self.labels != self.clean


def regime_split(clean: np.ndarray, num_classes: int, quiz_fraction: float, split_seed: int, *,
                 label_noise: float = 0.0, noise_kind: str = "symmetric", labels_per_class: int | None = None,
                 quiz_per_class: int | None = None, train_subset: int | None = None) -> RegimeSplit:
    """The run's splits and labels, a pure function of its arguments (so every rank and the teacher agree)."""
    clean = np.asarray(clean)
    pool, held_out = stratified_split(clean, quiz_fraction, split_seed)
    if train_subset is not None:  # a quick-run knob: fewer images for the teacher and the student alike
        pool = np.sort(np.random.default_rng(split_seed + 1).choice(pool, min(train_subset, len(pool)), replace=False))
    labels = clean.copy()
    if label_noise > 0:
        labels[pool] = apply_label_noise(clean[pool], label_noise, noise_kind, num_classes, split_seed)
    student = pool
    if labels_per_class is not None:  # stratified by the labels the user has (the given ones)
        student = per_class_subset(pool, labels, labels_per_class, split_seed + 2, "data.labels_per_class",
                                   " in the training split")
    quiz = held_out
    if quiz_per_class is not None:
        quiz = per_class_subset(held_out, clean, quiz_per_class, split_seed + 3, "data.quiz_per_class",
                                " in the held-out split", f", or raise data.quiz_fraction (now {quiz_fraction:g})")
    return RegimeSplit(student, pool, quiz, labels, clean)


def label_table_parquet(table: dict[str, np.ndarray]) -> bytes:
    """The label audit (``DataBundle.label_table``) as one Parquet file: id, label (as trained on), clean_label,
    flipped, student (in the student's training set), quiz (in the trusted quiz split)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({k: pa.array(np.asarray(v)) for k, v in table.items()}), buf)
    return buf.getvalue()
