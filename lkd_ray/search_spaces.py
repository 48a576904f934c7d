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
from typing import Any, Callable


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


def _dist_wce_trials() -> list[Trial]:
    """DIST's τ crossed with the CE weight (KD's grid has α; DIST's own grid never lowered its CE term)."""
    return [Trial("dist-wce", f"tau={_num(t)},w_ce={_num(w)}", {"loss": {"method": "dist", "tau": t, "w_ce": w}})
            for t in (1.0, 2.0, 4.0, 8.0) for w in (0.0, 0.5, 1.0)]


HANDCRAFTED: dict[str, list[Trial]] = {
    "kd": _kd_trials(),
    "dkd": [Trial("dkd", f"beta={_num(b)}", {"loss": {"method": "dkd", "dkd_alpha": 1.0, "dkd_beta": b, "tau": 4.0}})
            for b in (1.0, 2.0, 4.0, 8.0)],
    "dist": [Trial("dist", f"tau={_num(t)}", {"loss": {"method": "dist", "tau": t}}) for t in (1.0, 2.0, 4.0, 8.0)],
    "ls": [Trial("ls", f"eps={_num(e)}", {"loss": {"method": "ce", "label_smoothing": e}}) for e in (0.05, 0.1, 0.2, 0.3)],
    "wsl": [Trial("wsl", f"tau={_num(t)},w={_num(w)}", {"loss": {"method": "wsl", "tau": t, "w_logit": w}})
            for t in (1.0, 2.0, 4.0, 8.0) for w in (1.0, 2.25)],
    "dist-wce": _dist_wce_trials(),
}


# --------------------------------------------------------------------------- the noisy-label field's rules
RULE_GRIDS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    # family: [(name, loss fields)], each crossed with the distillation base (the regime's tuned KD and DIST)
    "agree": [("rule=agree", {"ce_rule": "agree"}), ("rule=agree_soft", {"ce_rule": "agree_soft"})],
    "relabel": [("rule=relabel", {"ce_rule": "relabel"})],
    "gce": [(f"q={_num(q)}", {"ce_rule": "gce", "gce_q": q}) for q in (0.3, 0.5, 0.7, 0.9)],            # Zhang & Sabuncu 2018
    "sce": [(f"a={_num(a)},b={_num(b)}", {"ce_rule": "sce", "sce_alpha": a, "sce_beta": b})            # Wang et al. 2019
            for a in (0.1, 1.0) for b in (0.1, 1.0)],
    "boot": [(f"{k},beta={_num(b)}", {"ce_rule": f"boot_{k}", "boot_beta": b})                          # Reed et al. 2015
             for k in ("soft", "hard") for b in (0.8, 0.95)],
    "small-loss": [(f"rate={_num(r)}", {"ce_rule": "small_loss", "forget_rate": r, "forget_ramp_epochs": 2})  # Co-teaching's
                   for r in (0.1, 0.2, 0.3, 0.4)],
}
RULE_FAMILIES = tuple(RULE_GRIDS)


def base_loss(base: Trial) -> dict[str, Any]:
    """A tuned KD or DIST trial's loss, its label term at weight ≥ the base's (a KD pick with α = 1 has no CE term
    for a rule to act on: the rule then enters at weight 1, as the per-sample grid does)."""
    loss = dict(base.sections["loss"])
    if loss.get("w_ce", 1.0) == 0:
        loss["w_ce"] = 1.0
    return loss


def rule_trials(family: str, bases: dict[str, Trial]) -> list[Trial]:
    """A field rule's grid on every distillation base given (``{"kd": tuned KD trial, "dist": tuned DIST trial}``)."""
    if family not in RULE_GRIDS:
        raise ValueError(f"unknown rule family {family!r}; valid: {', '.join(RULE_GRIDS)}")
    out = []
    for on, base in bases.items():
        for name, fields in RULE_GRIDS[family]:
            out.append(Trial(family, f"{name},base={on}", {"loss": {**base_loss(base), **fields}}))
    return out


RULE_WEIGHTS = {"w_ce": (0.5, 1.0, 2.0), "w_logit": (0.0, 0.5, 1.0)}


def rule_weight_trials(rule: Trial) -> list[Trial]:
    """The regime's best rule with its two term weights tuned: CE weight ∈ {0.5, 1, 2} × distillation weight ∈
    {0, 0.5, 1}, the rule's own pair left out (that trial is the rule). The field's grids fix these weights at the
    base's; on noisy-pair45-8k the learned residual spent its meta-steps on exactly this — CE at its upper bound, the
    distillation term nearly off — so the hand-written reweighting is a baseline the learned loss must beat, not a
    finding it may claim. A CE weight of 2 with no distillation is the rule at twice the step on its CE: it measures
    the recipe's step size as much as the loss, which is why both 1 and 2 are in the grid."""
    loss = dict(rule.sections["loss"])
    if loss.get("method") not in ("kd", "dist"):
        raise ValueError(f"rule-weights reweighs a rule's CE and KD or DIST terms: a {loss.get('method')!r} pick has "
                         "no such pair")
    own = (loss.get("w_ce", 1.0), loss.get("w_logit", 1.0))
    return [Trial("rule-weights", f"w_ce={_num(c)},w_logit={_num(w)}", {"loss": {**loss, "w_ce": c, "w_logit": w}})
            for c in RULE_WEIGHTS["w_ce"] for w in RULE_WEIGHTS["w_logit"] if (c, w) != own]


RAMP = {"ramp_weight": (1.5, 2.0), "ramp_tau": (1.0, 2.0)}


def ramp_trials(rule: Trial, epochs: int) -> list[Trial]:
    """The regime's best rule with a linear ramp over the whole run (``loss.ramp_epochs`` = ``epochs``) of its CE and
    distillation weights to ×{1.5, 2} and its temperature to ×{1, 2} (DIST: the inter-class term's). On scarce the
    learned residual's outputs grew from the rule to about ×2 over training, and its network frozen at the end
    values from the first step did worse than the rule: the path was the finding, so the path written by hand is a
    baseline it must beat."""
    loss = dict(rule.sections["loss"])
    if loss.get("method") not in ("kd", "dist"):
        raise ValueError(f"a ramp schedules a kd or dist loss's weights and temperature: a {loss.get('method')!r} pick "
                         "has none")
    return [Trial("ramp", f"w={_num(w)},tau={_num(t)}", {"loss": {**loss, "ramp_epochs": epochs, "ramp_weight": w,
                                                                   "ramp_tau": t}})
            for w in RAMP["ramp_weight"] for t in RAMP["ramp_tau"]]


DISAGREE_WEIGHTS = (0.0, 0.25, 0.5, 0.75)


def disagree_weight_trials(best: Trial) -> list[Trial]:
    """The best hand-crafted loss with its label term scaled by κ ∈ {0, 0.25, 0.5, 0.75} where the teacher's top
    class is not the given label (``loss.disagree_weight``; κ = 1 is the loss itself). On noisy-pair45-8k the learned
    residual on the reweighted relabel rule gave its relabelled images about three-quarters of the CE weight of the images the
    teacher confirms, and beat every hand-crafted loss: that weighting, written by hand, is a baseline it must beat."""
    loss = dict(best.sections["loss"])
    if loss.get("method") in (None, "ce"):
        raise ValueError(f"disagree-weight weighs samples by the teacher's top class: a {loss.get('method')!r} pick "
                         "has no teacher")
    if loss.get("ce_rule") == "agree":
        raise ValueError("disagree-weight on the agree rule: its label term is already 0 where the teacher disagrees")
    return [Trial("disagree-weight", f"kappa={_num(k)}", {"loss": {**loss, "disagree_weight": k}})
            for k in DISAGREE_WEIGHTS]


def lkd_rule_capped_trials(rule: Trial) -> list[Trial]:
    """``lkd_rule_trials`` within the cost bar on small data too: 2 or 3 meta-steps per epoch and no floor, so a
    meta-step (about four student steps) comes at most every ~20 student steps on 8,000 images (62 steps an epoch:
    ≤ 1.2× KD) and far less often on larger data — where the full grid's 8 per epoch costs ~1.4× on 8,000 images."""
    return lkd_rule_trials(rule, per_epoch=(2, 3), min_steps=0, family="lkd-rule-capped")


def lkd_rule_trials(rule: Trial, per_epoch: tuple[int, ...] = (4, 8), min_steps: int = 40,
                    family: str = "lkd-rule", scope: str = "full") -> list[Trial]:
    """The per-sample loss network as a residual on the regime's best hand-crafted loss (its rule included): at
    φ₀ it *is* that loss, so it can only gain what the meta-gradient finds beyond the rule. Its distillation base
    is the rule's (KD or DIST); grid: lock none or norm × meta-steps per epoch ∈ {4, 8} × meta lr ∈ {1e-3, 1e-2} —
    the schedule in units of the data (``meta.meta_steps_per_epoch``), so a preset keeps it on data of any size,
    and at least 40 meta-steps a run (a floor for short runs: 4 per epoch × 12 epochs is above it).
    ``scope="head"`` (``lkd_head_trials``) unrolls the classifier only, on detached features."""
    loss = dict(rule.sections["loss"])
    method = loss.get("method", "lkd")
    if method not in ("kd", "dist"):
        raise ValueError(f"the per-sample network weighs CE and KD or DIST: a {method!r} pick cannot be its base")
    loss["method"] = "lkd"
    if loss.get("w_ce", 1.0) == 0:
        loss["w_ce"] = 1.0
    # a base with its distillation term off (a reweighted rule): only the CE weight can move, so only it is learned
    outputs = {} if loss.get("w_logit", 1.0) else {"sample_outputs": ["w_ce"]}
    out = []
    for lock in ("none", "norm"):
        for n in per_epoch:
            for lr in (1e-3, 1e-2):
                lossnet = {"kind": "sample", "base": method, "lock": lock, "trust": None, "lock_scope": "batch", **outputs}
                meta = {"meta_steps_per_epoch": float(n), "min_meta_steps": min_steps, "lr": lr}
                if scope != "full":  # the full scope is the default: configs recorded before this field stay as they were
                    meta["scope"] = scope
                out.append(Trial(family, f"lock={lock},per_epoch={n},lr={_num(lr)}",
                                 {"loss": copy.deepcopy(loss), "lossnet": lossnet, "meta": meta}))
    return out


def lkd_head_trials(rule: Trial, family: str = "lkd-rule-head") -> list[Trial]:
    """``lkd_rule_trials``' grid with the meta-step unrolled through the classifier head only (``meta.scope=head``:
    the student's features computed once without a graph, the virtual SGD step and the quiz loss through the last
    layer). It prices a meta-step at about one student step instead of about four, which is what brings the
    full grid's 8 meta-steps per epoch under the cost bar on 8,000 images (measured: BENCHMARKS.md); what it may
    lose is the part of the meta-gradient that runs through the feature extractor."""
    return lkd_rule_trials(rule, family=family, scope="head")


META_BATCH = 32  # the small-meta-batch families' unroll and quiz batch (images)


def lkd_small_batch_trials(rule: Trial, family: str = "lkd-rule-b32", n: int = META_BATCH) -> list[Trial]:
    """``lkd_rule_trials``' grid with each meta-step on ``n`` images: the unroll on the first ``n`` of the student's
    batch (``meta.unroll_batch_size``) and a quiz batch of ``n`` (``data.quiz_batch_size``). The meta-gradient still
    runs through the whole student, as at full cost, but a meta-step costs about a quarter of one on 128 + 128 images
    (measured: BENCHMARKS.md) — the other way under the cost bar beside ``lkd_head_trials``, trading a noisier
    meta-gradient for the feature extractor's part of it."""
    out = []
    for t in lkd_rule_trials(rule, family=family):
        sections = copy.deepcopy(t.sections)
        sections["meta"]["unroll_batch_size"] = n
        sections["data"] = {**sections.get("data", {}), "quiz_batch_size": n}
        out.append(Trial(family, t.name, sections))
    return out


def lkd_early_trials(best: Trial, family: str = "lkd-best-early") -> list[Trial]:
    """``lkd_rule_trials``' most-adapting schedule (8 meta-steps per epoch), its meta-steps in the first epochs only
    (``meta.freeze_after_epoch`` ∈ {4, 6} of 12; the network's weighting then stays as learned), meant to bring the
    ~1.4× KD of 8 per epoch on 8,000 images under the cost bar (measured on noisy-pair45-8k: still over it,
    BENCHMARKS.md). Grid: lock none or norm × freeze × meta lr ∈ {1e-2, 3e-2} (the higher rate for the fewer steps)."""
    by_lock = {t.sections["lossnet"]["lock"]: t for t in lkd_rule_trials(best, per_epoch=(8,), min_steps=0, family=family)}
    out = []
    for lock, t in by_lock.items():  # the trials of one lock differ only in the meta lr, set here
        for freeze in (4, 6):
            for lr in (1e-2, 3e-2):
                sections = copy.deepcopy(t.sections)
                sections["meta"].update(lr=lr, freeze_after_epoch=freeze)
                out.append(Trial(family, f"lock={lock},freeze={freeze},lr={_num(lr)}", sections))
    return out


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


@dataclass(frozen=True)
class OnPick:
    """A family whose trials are built on a tuned hand-crafted trial (``base``: the family whose pick it starts
    from; ``"*"``: the best hand-crafted pick of every family run). ``build`` raises ValueError for a pick it cannot
    sit on (a searcher then takes the best pick it can)."""
    base: str
    build: Callable[..., list[Trial]]
    over_run: bool = False  # build(pick, epochs): a schedule over the whole run needs the run's epochs

    def trials(self, pick: Trial | None, epochs: int | None = None) -> list[Trial]:
        if not self.over_run:
            return self.build(pick)
        if not epochs:
            raise TypeError("this family schedules over the whole run: give the run's epochs")
        return self.build(pick, epochs)


LEARNED: dict[str, OnPick] = {
    "lkd-sample": OnPick("kd", lkd_sample_trials),
    "lkd-sample-dist": OnPick("dist", lkd_sample_dist_trials),
    "lkd-rule": OnPick("*", lkd_rule_trials),  # the residual on the best hand-crafted loss, field rules included
    "lkd-rule-capped": OnPick("*", lkd_rule_capped_trials),  # … with meta-steps few enough for the cost bar on small data
}
# Every family built on a pick: the learned ones, the best loss's own CE and distillation weights tuned — the
# hand-crafted reweighting that beat the learned residual on noisy-pair45-8k —, its label term scaled where the
# teacher disagrees (what the residual on that reweighting then learned) and its weights and temperature ramped over
# the run (what the residual learned on scarce): a search that offers the residual offers what it found too (the
# learned loss must beat them, not claim them).
ON_PICK: dict[str, OnPick] = {**LEARNED, "rule-weights": OnPick("*", rule_weight_trials),
                               "disagree-weight": OnPick("*", disagree_weight_trials),
                               "ramp": OnPick("*", ramp_trials, over_run=True)}
# The field's rules (issue 25) run after the hand-crafted families they sit on: each on the tuned KD and the tuned
# DIST (``rule_trials(family, {"kd": pick, "dist": pick})``); a learned family with base "*" starts from the best
# pick over the hand-crafted families and these rules.
RULE_BASES = ("kd", "dist")


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


def selection_band(top1: float, n: int) -> float:
    """One binomial standard error of an accuracy of ``top1`` % on ``n`` images, in points: settings closer than
    this to the best sit within the selection split's noise."""
    p = min(max(top1 / 100.0, 0.0), 1.0)
    return 100.0 * (p * (1 - p) / max(n, 1)) ** 0.5


def pick_on_selection(results: list[dict[str, Any]], n_select: int) -> dict[str, Any]:
    """The winning trial on the clean selection split (disjoint from the meta-objective's quiz, so learned and
    hand-crafted losses are ranked alike on data neither trained on): among the trials within one binomial SE of
    the best ``select_top1``, the lowest calibrated selection loss (``select_loss_cal``: a setting cannot lead by
    confidence); then grid order. Trials without selection metrics are refused, not ranked."""
    if not results:
        raise ValueError("no trial results to pick from")
    missing = [r.get("trial", i) for i, r in enumerate(results) if r.get("select_top1") is None or r.get("select_loss_cal") is None]
    if missing:
        raise ValueError(f"trials {missing} have no selection-split metrics (data.select_per_class unset when they ran)")
    best = max(r["select_top1"] for r in results)
    band = selection_band(best, n_select)
    tied = [(i, r) for i, r in enumerate(results) if r["select_top1"] >= best - band]
    return min(tied, key=lambda ir: (ir[1]["select_loss_cal"], ir[0]))[1]
