"""The held-out quiz split: carved out of the *training* set, stratified and seeded, so the
meta-objective never sees the test set."""
from __future__ import annotations

import numpy as np

from ..errors import BadInput


def stratified_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (train_idx, quiz_idx): each class contributes round(fraction·n_c) ≥ 1 to the quiz."""
    labels = np.asarray(labels)
    if not 0 < fraction < 1:
        raise ValueError(f"quiz fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    quiz = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            raise BadInput("data.root", f"class {c} has {len(idx)} training image(s); a stratified quiz split needs at "
                           "least 2 per class", "give every class at least 2 training images")
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        quiz.append(rng.choice(idx, size=k, replace=False))
    quiz_idx = np.sort(np.concatenate(quiz))
    mask = np.ones(len(labels), bool)
    mask[quiz_idx] = False
    return np.flatnonzero(mask), quiz_idx
