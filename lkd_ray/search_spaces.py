"""Search spaces that users and the benchmarks share: each trial is a named set of config sections, so a
Tune search (``jobs/tune_lossnet.py --space handcrafted``) and ``benchmarks/accuracy.py --tune`` run the
same trials and pick by the same rule — the best quiz top-1 (never the test split).

``handcrafted``: the hand-crafted losses, each over the grid the KD literature tunes it on:
  kd    α ∈ {0.1, 0.5, 0.9, 1.0} × τ ∈ {1, 2, 4, 8}     (L = (1 − α)·CE + α·KD_τ; α = 1: the teacher alone)
  dkd   β ∈ {1, 2, 4, 8}                              (α = 1, τ = 4)
  dist  τ ∈ {1, 2, 4, 8}
  ls    CE with label smoothing ε ∈ {0.05, 0.1, 0.2, 0.3}
  wsl   τ ∈ {1, 2, 4, 8} × weight ∈ {1, 2.25}         (weighted soft labels, Zhou et al. ICLR 2021)
``lkd-sample``: the per-sample loss network on top of a base (the tuned KD's α and τ), over the lock and
the meta-step's frequency and learning rate.
``lkd-sample-dist``: the same network over DIST's distillation term (the tuned DIST's τ), on a grid capped
by the cost bar: a meta-step every 40 or 80 student steps (every 10 costs 1.40× KD's whole run, BENCHMARKS.md).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Trial:
    family: str
    name: str                    # e.g. "alpha=0.5,tau=4"
    sections: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    @property
    def label(self) -> str:
        return f"{self.family}[{self.name}]"


def _num(x: float) -> str:
    return f"{x:g}"


def _kd_trials() -> list[Trial]:
    out = []
    for alpha in (0.1, 0.5, 0.9, 1.0):
        for tau in (1.0, 2.0, 4.0, 8.0):
            out.append(Trial("kd", f"alpha={_num(alpha)},tau={_num(tau)}",
                             {"loss": {"method": "kd", "w_ce": round(1 - alpha, 6), "w_logit": alpha, "tau": tau}}))
    return out


HANDCRAFTED: dict[str, list[Trial]] = {
    "kd": _kd_trials(),
    "dkd": [Trial("dkd", f"beta={_num(b)}", {"loss": {"method": "dkd", "dkd_alpha": 1.0, "dkd_beta": b, "tau": 4.0}})
            for b in (1.0, 2.0, 4.0, 8.0)],
    "dist": [Trial("dist", f"tau={_num(t)}", {"loss": {"method": "dist", "tau": t}}) for t in (1.0, 2.0, 4.0, 8.0)],
    "ls": [Trial("ls", f"eps={_num(e)}", {"loss": {"method": "ce", "label_smoothing": e}}) for e in (0.05, 0.1, 0.2, 0.3)],
    "wsl": [Trial("wsl", f"tau={_num(t)},w={_num(w)}", {"loss": {"method": "wsl", "tau": t, "w_logit": w}})
            for t in (1.0, 2.0, 4.0, 8.0) for w in (1.0, 2.25)],
}


def lkd_sample_trials(base: Trial | None = None) -> list[Trial]:
    """The per-sample loss network on ``base`` (a tuned KD trial; None: the recipe's KD), over the lock
    (none, or the batch norm lock without a cone) × meta_every ∈ {10, 40} × meta lr ∈ {1e-3, 1e-2}.
    A KD pick with α = 1 has no CE term, and the network's per-sample CE weight multiplies it: the grid then
    starts the CE term at weight 1, so every output can move (noisy-sym40's grid ran before this, with that
    output dead: BENCHMARKS.md)."""
    base_loss = dict(base.sections["loss"]) if base is not None else {}
    base_loss["method"] = "lkd"
    if base_loss.get("w_ce", 1.0) == 0:
        base_loss["w_ce"] = 1.0
    out = []
    for lock in ("none", "norm"):
        for every in (10, 40):
            for lr in (1e-3, 1e-2):
                lossnet = {"kind": "sample", "lock": lock, "trust": None, "lock_scope": "batch"}
                out.append(Trial("lkd-sample", f"lock={lock},every={every},lr={_num(lr)}",
                                 {"loss": copy.deepcopy(base_loss), "lossnet": lossnet,
                                  "meta": {"meta_every": every, "lr": lr}}))
    return out


def lkd_sample_dist_trials(base: Trial | None = None) -> list[Trial]:
    """The per-sample loss network over DIST's term (``lossnet.base=dist``) on ``base`` (a tuned DIST trial; None:
    the recipe's τ), CE and DIST at weight 1 as the DIST method has them, over the lock (none, or the batch norm
    lock) × meta_every ∈ {40, 80} × meta lr ∈ {1e-3, 1e-2}: eight trials, the budget of ``lkd-sample``, all
    within the cost bar (a meta-step costs about four student steps; ``meta_every`` decides the cost)."""
    loss = {k: v for k, v in (base.sections["loss"] if base is not None else {}).items() if k != "method"}
    loss.update({"method": "lkd", "w_ce": 1.0, "w_logit": 1.0})
    out = []
    for lock in ("none", "norm"):
        for every in (40, 80):
            for lr in (1e-3, 1e-2):
                lossnet = {"kind": "sample", "base": "dist", "lock": lock, "trust": None, "lock_scope": "batch"}
                out.append(Trial("lkd-sample-dist", f"lock={lock},every={every},lr={_num(lr)}",
                                 {"loss": copy.deepcopy(loss), "lossnet": lossnet, "meta": {"meta_every": every, "lr": lr}}))
    return out


SPACES = {"handcrafted": lambda: [t for ts in HANDCRAFTED.values() for t in ts]}


def trials(space: str, families: list[str] | None = None) -> list[Trial]:
    if space not in SPACES:
        raise ValueError(f"unknown search space {space!r}; valid: {', '.join(SPACES)}")
    out = SPACES[space]()
    if families:
        unknown = sorted(set(families) - {t.family for t in out})
        if unknown:
            raise ValueError(f"unknown families {unknown} in space {space!r}; valid: {', '.join(HANDCRAFTED)}")
        out = [t for t in out if t.family in families]
    return out


def pick(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The winning trial result: highest ``quiz_top1``, then lowest ``quiz_loss`` (a missing one ranks after any
    measured one, never as a loss of 0), then the earliest trial (grid order) — the test split is never read."""
    if not results:
        raise ValueError("no trial results to pick from")
    return min(enumerate(results), key=lambda ir: (-ir[1]["quiz_top1"], *loss_rank(ir[1].get("quiz_loss")), ir[0]))[1]


def loss_rank(loss: float | None) -> tuple[bool, float]:
    """Sort key of a quiz loss, lower first: a missing loss after every measured one."""
    return (loss is None, 0.0 if loss is None else loss)
