"""What the report and the figures both read: the regimes in their published order with a line on each, the
per-sample rows that get a figure, and each method's row over its seeds with the tuned pick a user would ship (its own
module, so ``report`` and ``figures`` do not import each other)."""
from __future__ import annotations

import statistics

REGIME_ORDER = ("noisy-sym40", "noisy-pair30", "scarce", "full")
REGIME_TEXT = {
    "full": "full, clean training split (54 000 images), student 12 epochs",
    "scarce": "100 labelled images per class for the student (teacher: the full split), 20-per-class clean quiz, 40 epochs",
    "noisy-sym40": "40 % symmetric label noise on the training split (teacher trained on it too), 50-per-class clean quiz, 12 epochs",
    "noisy-pair30": "30 % pair-flip label noise (class c → c + 1) on the training split (teacher too), 50-per-class clean quiz, 12 epochs",
    "noisy-pair45-8k": "45 % pair-flip label noise on 8,000 training images (teacher too), 20-per-class clean quiz, 12 epochs",
}
PER_SAMPLE = {"lkd-sample-tuned": "", "lkd-sample-dist-tuned": "_dist"}  # the per-sample tuned rows → figure suffix


def rows(recs: list[dict]) -> list[dict]:
    out = []
    for m in dict.fromkeys(r["method"] for r in recs):
        rs = [r for r in recs if r["method"] == m]
        t, q = [r["test_top1"] for r in rs], [r["quiz_top1"] for r in rs]
        out.append({"method": m, "n": len(rs), "test": statistics.mean(t), "std": statistics.stdev(t) if len(t) > 1 else 0.0,
                    "worst": min(t), "quiz": statistics.mean(q), "wall": statistics.median(r["wall_s"] for r in rs)})
    return out


def best_tuned(recs: list[dict]) -> str | None:
    """The tuned hand-crafted loss a user would ship: the best mean quiz top-1 over the seeds (not test)."""
    cands = [r for r in rows(recs) if r["method"].endswith("-tuned") and not r["method"].startswith("lkd")]
    return max(cands, key=lambda r: r["quiz"])["method"] if cands else None
