"""Is early stopping (ASHA) sound for the loss search? Measured on the recorded tuning trials of the benchmark
regimes: does a trial's quiz top-1 after a fraction of its epochs rank the trials as their last epoch does?

For each regime and each rung (a quarter, a half, three quarters of the epochs): the Spearman rank correlation
of quiz top-1 at the rung with the final quiz top-1 over every tuning trial, and whether successive halving at
that rung (keep the top third, ASHA's default reduction factor 3) would have kept the trial that is best at the
end. ``auto`` stops trials early only where every regime keeps its final best at that rung. No training: the
curves are in the records (``curve`` of ``accuracy_regimes_tuning.json`` and ``accuracy_field_tuning.json``)::

    python benchmarks/early_stop.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNGS = (0.25, 0.5, 0.75)
KEEP = 1 / 3  # ASHA's reduction factor 3


def _ranks(xs: list[float]) -> list[float]:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def at_rung(curve: list[dict], frac: float) -> float:
    """Quiz top-1 at the epoch that ends the first ``frac`` of the run (at least epoch 1)."""
    epochs = len(curve)
    return curve[max(1, round(frac * epochs)) - 1]["quiz_top1"]


def soundness(trials: list[dict]) -> list[dict]:
    out = []
    for regime in dict.fromkeys(t["regime"] for t in trials):
        ts = [t for t in trials if t["regime"] == regime and t.get("curve")]
        if len(ts) < 6:
            continue
        final = [t["curve"][-1]["quiz_top1"] for t in ts]
        best = max(range(len(ts)), key=lambda i: final[i])
        for frac in RUNGS:
            early = [at_rung(t["curve"], frac) for t in ts]
            keep = sorted(range(len(ts)), key=lambda i: -early[i])[:max(1, round(KEEP * len(ts)))]
            out.append({"regime": regime, "rung": frac, "trials": len(ts), "spearman": spearman(early, final),
                        "keeps_best": best in keep, "best_rank_at_rung": sorted(range(len(ts)), key=lambda i: -early[i]).index(best) + 1})
    return out


def load_trials(results: Path = RESULTS) -> list[dict]:
    out = []
    for name in ("accuracy_regimes_tuning.json", "accuracy_field_tuning.json"):
        p = results / name
        if p.is_file():
            out += json.loads(p.read_text())
    return out


def sound_rung(rows: list[dict]) -> float | None:
    """The earliest rung at which successive halving keeps every regime's final best (None: no rung is sound)."""
    for frac in RUNGS:
        at = [r for r in rows if r["rung"] == frac]
        if at and all(r["keeps_best"] for r in at):
            return frac
    return None


def table(results: Path = RESULTS) -> str:
    rows = soundness(load_trials(results))
    if not rows:
        return "_No tuning curves recorded yet._\n"
    lines = ["| regime | trials | rung (share of epochs) | Spearman ρ (rung vs last epoch, quiz top-1) | final best's rank at the rung "
             "| kept by halving (top ⅓)? |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['regime']} | {r['trials']} | {r['rung']:g} | {r['spearman']:.2f} | {r['best_rank_at_rung']} | "
                     f"{'yes' if r['keeps_best'] else 'no'} |")
    rung = sound_rung(rows)
    verdict = (f"Successive halving at {rung:g} of the epochs keeps every regime's final best." if rung is not None else
               "No rung keeps every regime's final best: early stopping is not sound for this search, and every trial "
               "runs to its end.")
    return "\n".join(lines) + "\n\n" + verdict + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
