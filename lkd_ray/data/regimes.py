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

from dataclasses import dataclass, field

import numpy as np

from ..errors import BadInput
from .split import stratified_split

NOISE_KINDS = ("symmetric", "pairflip", "confusion")
# Look-alike classes, the confusions annotators make (class → the class it is mistaken for)
FASHION_CONFUSION = {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 9}  # T-shirt/top ↔ shirt, pullover ↔ coat, sandal → sneaker → ankle boot
DEFAULT_CONFUSION = {"fashion_mnist": FASHION_CONFUSION}


def pairflip_target(y: np.ndarray, num_classes: int) -> np.ndarray:
    """The fixed class confusion map of pair-flip noise (Han et al., NeurIPS 2018): class c → c + 1 (mod C)."""
    return (np.asarray(y) + 1) % num_classes


def apply_label_noise(labels: np.ndarray, rate: float, kind: str, num_classes: int, seed: int,
                      confusion: dict[int, int] | None = None) -> np.ndarray:
    """A copy of ``labels`` with exactly round(rate·n_c) labels of every class c flipped, chosen by ``seed``:
    ``symmetric`` to a uniformly drawn *other* class, ``pairflip`` to ``pairflip_target``, ``confusion`` to
    ``confusion[c]`` for the classes the map names (the others stay clean)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; valid: {', '.join(NOISE_KINDS)}")
    if not 0 <= rate < 1:
        raise ValueError(f"label noise rate must be in [0, 1), got {rate}")
    if kind == "confusion":
        if not confusion:
            raise BadInput("data.noise_kind=confusion", "no class map", "give data.confusion_map")
        bad = sorted(c for pair in confusion.items() for c in pair if not 0 <= c < num_classes)
        if bad:
            raise BadInput(f"data.confusion_map={confusion}", f"names classes {bad} outside 0..{num_classes - 1}",
                           "map classes of this data set")
    labels = np.asarray(labels)
    out = labels.copy()
    if rate == 0:
        return out
    rng = np.random.default_rng([seed, 0x401E])
    for c in np.unique(labels):
        if kind == "confusion" and int(c) not in confusion:
            continue
        idx = np.flatnonzero(labels == c)
        flip = rng.choice(idx, size=int(round(rate * len(idx))), replace=False)
        if kind == "pairflip":
            out[flip] = pairflip_target(labels[flip], num_classes)
        elif kind == "confusion":
            out[flip] = confusion[int(c)]
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
    select: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # the clean selection split (disjoint from the quiz), if asked

    @property
    def flipped(self) -> np.ndarray:
        return self.labels != self.clean


def regime_split(clean: np.ndarray, num_classes: int, quiz_fraction: float, split_seed: int, *,
                 label_noise: float = 0.0, noise_kind: str = "symmetric", labels_per_class: int | None = None,
                 quiz_per_class: int | None = None, train_subset: int | None = None, noise_seed: int | None = None,
                 confusion: dict[int, int] | None = None, given: np.ndarray | None = None,
                 trusted: tuple[np.ndarray, np.ndarray] | None = None,
                 select_per_class: int | None = None) -> RegimeSplit:
    """The run's splits and labels, a pure function of its arguments (so every rank and the teacher agree).

    ``given``: the user's own label of every training image (replaces label noise); ``trusted``: (indices, clean
    labels) of a trusted subset, which is held out as the quiz instead of a stratified split. The selection
    split (``select_per_class``) is drawn from what is held out besides the quiz, so no pick is made on the data
    the meta-step trains on."""
    clean = np.asarray(clean).copy()
    if trusted is not None:
        t_idx, t_lab = trusted
        clean[t_idx] = t_lab  # the trusted labels are the clean ones there
        mask = np.ones(len(clean), bool)
        mask[t_idx] = False
        pool, held_out = np.flatnonzero(mask), np.sort(t_idx)
    else:
        pool, held_out = stratified_split(clean, quiz_fraction, split_seed)
    if train_subset is not None:  # a quick-run knob: fewer images for the teacher and the student alike
        pool = np.sort(np.random.default_rng(split_seed + 1).choice(pool, min(train_subset, len(pool)), replace=False))
    labels = clean.copy()
    if given is not None:
        labels[pool] = np.asarray(given)[pool]
    elif label_noise > 0:
        labels[pool] = apply_label_noise(clean[pool], label_noise, noise_kind, num_classes,
                                         split_seed if noise_seed is None else noise_seed, confusion)
    student = pool
    if labels_per_class is not None:  # stratified by the labels the user has (the given ones)
        student = per_class_subset(pool, labels, labels_per_class, split_seed + 2, "data.labels_per_class",
                                   " in the training split")
    select = np.zeros(0, dtype=np.int64)
    if select_per_class is not None and quiz_per_class is None:  # the quiz is what the selection split leaves
        select = per_class_subset(held_out, clean, select_per_class, split_seed + 4, "data.select_per_class",
                                  " in the held-out split", f", or raise data.quiz_fraction (now {quiz_fraction:g})")
        held_out = np.setdiff1d(held_out, select)
    quiz = held_out
    if quiz_per_class is not None:
        quiz = per_class_subset(held_out, clean, quiz_per_class, split_seed + 3, "data.quiz_per_class",
                                " in the held-out split", f", or raise data.quiz_fraction (now {quiz_fraction:g})")
        if select_per_class is not None:  # drawn after the quiz, from the rest: the quiz is the same with or without it
            select = per_class_subset(np.setdiff1d(held_out, quiz), clean, select_per_class, split_seed + 4,
                                      "data.select_per_class", " in the held-out split beside the quiz",
                                      f", or lower data.quiz_per_class (now {quiz_per_class})")
    return RegimeSplit(student, pool, quiz, labels, clean, select)


def label_table_parquet(table: dict[str, np.ndarray]) -> bytes:
    """The label audit (``DataBundle.label_table``) as one Parquet file: id, label (as trained on), clean_label,
    flipped, student (in the student's training set), quiz (in the trusted quiz split)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({k: pa.array(np.asarray(v)) for k, v in table.items()}), buf)
    return buf.getvalue()
