"""What ``python -m lkd_ray auto`` searches and how it picks, without Ray: the families (looked up in
``search_spaces``' registries, so a family added there is searched with no change here), each trial's config and
identity, the checks that stop bad input before any trial, and the pick with its reason.

Stage 1 runs every hand-crafted family of ``search_spaces.HANDCRAFTED`` asked for; stage 2 every field rule of
``search_spaces.RULE_GRIDS`` on the stage-1 picks of each of ``search_spaces.RULE_BASES`` (the tuned KD and DIST);
stage 3 every family of ``search_spaces.ON_PICK`` (the learned ones, ``rule-weights``, ``disagree-weight``, ``ramp``) on the
pick of its base family (``"*"``: the best pick of stages 1 and 2), as ``benchmarks/accuracy.py --suite field``
chains them. Every pick is made on the clean selection split when the config sets ``data.select_per_class``
(``search_spaces.pick_on_selection``), else on the quiz split. Every trial gets the same budget (``--epochs``); ``--trials`` caps each family at that many settings, spread evenly
over its grid.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from . import search_spaces
from .config import ConfigError
from .errors import InputError, StorageFailure, UserError, explain
from .storage import StorageError

MIN_QUIZ_PER_CLASS = 5  # a pick on fewer quiz images per class than this is decided by a handful of images


# --------------------------------------------------------------------------- errors and exit codes
class AutoError(UserError):
    """A search that cannot start or produced nothing to ship; ``exit_code`` says how the command exits."""
    exit_code = 1


class AutoInputError(AutoError, InputError, ValueError):
    """Bad input found before any trial ran (data, teacher, budget, families): exit 2."""
    exit_code = 2


class AutoStorageError(AutoError, StorageFailure):
    """The search's storage cannot be reached or written: exit 3."""
    exit_code = 3


def exit_code(e: BaseException) -> int | None:
    """What ``auto`` exits with: the project's one classification (``lkd_ray.errors.explain``: bad input 2, storage
    3), or 1 for a search that ran and has nothing to ship; None: not a failure the user can act on (re-raise)."""
    f = explain(e)
    if f is not None:
        return f.code
    return e.exit_code if isinstance(e, AutoError) else None


# --------------------------------------------------------------------------- options
@dataclass
class AutoOptions:
    name: str = "auto"
    storage: str = "runs"
    endpoint_url: str | None = None
    trials: int | None = None           # at most this many settings per family (None: the family's whole grid)
    epochs: int | None = None           # every trial's epochs (None: the config's optim.epochs)
    families: list[str] | None = None   # None: every registered family
    time_budget_s: float | None = None
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    seed: int | None = None             # the trials' run.seed (None: the config's)
    extra: dict[str, Any] = field(default_factory=dict)


def all_families() -> list[str]:
    return list(search_spaces.HANDCRAFTED) + list(search_spaces.RULE_GRIDS) + list(search_spaces.ON_PICK)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags ``python -m lkd_ray auto`` and ``jobs/auto_loss.py`` share."""
    p.add_argument("--recipe", default="fashion_mnist", help="base recipe")
    p.add_argument("--debug", action="store_true", help="show the traceback of a reported failure (bad input exits 2, "
                   "storage 3)")
    p.add_argument("--preset", default=None, help="loss settings applied before --config/--set (the search replaces the loss)")
    p.add_argument("--config", help="YAML with sections model/data/optim/loss/lossnet/meta/run (your data, your teacher)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--storage", default=None,
                   help="local folder or s3://bucket/prefix: results go to <storage>/<name>/ (default $LKD_STORAGE, else "
                        "./runs; required under `ray job submit`, whose working directory Ray deletes)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--name", default="auto", help="search name; re-run with the same name to resume (finished trials are kept)")
    p.add_argument("--trials", type=int, default=None, help="at most this many settings per family, spread over its grid (default: all)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every trial (default: the config's optim.epochs); "
                   "best_config.yaml keeps the config's epochs")
    p.add_argument("--families", nargs="+", default=None, metavar="FAMILY",
                   help=f"only these families (default: all: {', '.join(all_families())}); a rule or stage-3 family "
                        "(learned, rule-weights, disagree-weight) brings the hand-crafted families it starts from")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="the whole search's wall time; refused before any trial if it cannot fit every trial asked")
    p.add_argument("--max-concurrent", type=int, default=2, help="trials running at once")
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="the trials' seed (default: the config's run.seed)")


def options_from_args(args) -> AutoOptions:
    for flag, v, lo in (("--trials", args.trials, 1), ("--epochs", args.epochs, 1), ("--max-concurrent", args.max_concurrent, 1)):
        if v is not None and v < lo:
            raise AutoInputError(f"{flag} {v}: give at least {lo}")
    if args.time_budget is not None and not (args.time_budget > 0 and math.isfinite(args.time_budget)):
        raise AutoInputError(f"--time-budget {args.time_budget}: give a positive number of seconds")
    if args.cpus_per_trial <= 0 or args.gpus_per_trial < 0:
        raise AutoInputError("--cpus-per-trial must be > 0 and --gpus-per-trial ≥ 0")
    return AutoOptions(name=args.name, storage=resolve_storage(args.storage), endpoint_url=args.endpoint_url, trials=args.trials,
                       epochs=args.epochs, families=args.families, time_budget_s=args.time_budget,
                       max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
                       gpus_per_trial=args.gpus_per_trial, seed=args.seed)


def resolve_storage(storage: str | None) -> str:
    """--storage, else $LKD_STORAGE, else ./runs — except under `ray job submit`, whose working directory Ray
    deletes when the job ends: there the search must name storage that outlives it."""
    import os

    if storage:
        return storage
    if os.environ.get("LKD_STORAGE"):
        return os.environ["LKD_STORAGE"]
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        raise AutoInputError("under `ray job submit` the job's working directory is deleted when it ends, so ./runs would "
                             "lose the search: pass --storage s3://bucket/prefix (or a path every node shares)")
    return "runs"


# --------------------------------------------------------------------------- families and trials
@dataclass
class Stages:
    """The families of each stage (registry order) and the notes on what was added."""
    hand: list[str]
    rules: list[str]
    on_pick: list[str]  # stage 3: the learned families and rule-weights, each on a pick of stages 1 and 2
    notes: list[str] = field(default_factory=list)


def resolve_families(asked: list[str] | None) -> Stages:
    """The three stages' families. A rule family brings the hand-crafted families it sits on (``RULE_BASES``), a
    stage-3 family the hand-crafted family it starts from; each addition is a note."""
    hand, rules, on_pick = search_spaces.HANDCRAFTED, search_spaces.RULE_GRIDS, search_spaces.ON_PICK
    if not asked:
        return Stages(list(hand), list(rules), list(on_pick))
    unknown = [f for f in asked if f not in hand and f not in rules and f not in on_pick]
    if unknown:
        raise AutoInputError(f"unknown families {unknown}: valid families are {', '.join(all_families())}")
    stage2 = [f for f in rules if f in asked]
    stage3 = [f for f in on_pick if f in asked]
    stage1 = [f for f in hand if f in asked]
    notes = []
    needs = [(f, b) for f in stage2 for b in search_spaces.RULE_BASES] + \
            [(f, on_pick[f].base) for f in stage3 if on_pick[f].base != "*"]
    for f, base in needs:
        if base not in stage1:
            stage1.append(base)
            notes.append(f"{f} starts from the tuned {base}: {base} added to stage 1")
    if not stage1:
        raise AutoInputError(f"the families {stage3} start from a tuned hand-crafted loss: add one of "
                             f"{', '.join(hand)} to --families")
    return Stages([f for f in hand if f in stage1], stage2, stage3, notes)  # registry order


def capped(trials: list[search_spaces.Trial], n: int | None) -> list[search_spaces.Trial]:
    """At most ``n`` trials, evenly spaced over the grid (its first and, for n ≥ 2, its last setting)."""
    if n is None or n >= len(trials):
        return list(trials)
    if n == 1:
        return [trials[(len(trials) - 1) // 2]]
    idx = sorted({round(i * (len(trials) - 1) / (n - 1)) for i in range(n)})
    return [trials[i] for i in idx]


def stage1_trials(families: list[str], cap: int | None) -> list[search_spaces.Trial]:
    return [t for f in families for t in capped(search_spaces.HANDCRAFTED[f], cap)]


def _placeholder(family: str) -> search_spaces.Trial:
    """A hand-crafted trial to build a later stage's grid on before its base is tuned (the grids' sizes and fields
    do not depend on the base's values): the family's first setting; ``"*"``: the first rule base's."""
    return search_spaces.HANDCRAFTED[search_spaces.RULE_BASES[0] if family == "*" else family][0]


def planned_rule_trials(families: list[str], cap: int | None) -> list[search_spaces.Trial]:
    """Stage 2's trials on placeholder bases: their count and their fit to the config, known before stage 1."""
    bases = {on: _placeholder(on) for on in search_spaces.RULE_BASES}
    return [t for f in families for t in capped(search_spaces.rule_trials(f, bases), cap)]


def planned_on_pick_trials(families: list[str], cap: int | None, epochs: int | None = None) -> list[search_spaces.Trial]:
    """Stage 3's trials on placeholder bases (see ``planned_rule_trials``); ``epochs``: each trial's (a schedule over
    the run, ``ramp``, needs them)."""
    on_pick = search_spaces.ON_PICK
    return [t for f in families for t in capped(on_pick[f].trials(_placeholder(on_pick[f].base), epochs), cap)]


def stage_counts(st: Stages, cap: int | None, epochs: int | None = None) -> list[int]:
    """How many trials each stage will run (at most: a later stage skips a family whose base has no finished trial)."""
    return [len(stage1_trials(st.hand, cap)), len(planned_rule_trials(st.rules, cap)),
            len(planned_on_pick_trials(st.on_pick, cap, epochs))]


def as_trial(row: dict) -> search_spaces.Trial:
    """A finished trial's result as the trial it ran (its family, setting and sections are stored with it)."""
    return search_spaces.Trial(row["family"], row["setting"], row["sections"])


def stage2_trials(families: list[str], cap: int | None, finished: list[dict],
                  choose) -> tuple[list[search_spaces.Trial], dict, list[str]]:
    """The rule families' trials on the stage-1 picks of each rule base (``choose``: the pick, see ``picker``);
    also {trial label: its base's label} and notes (a missing base is left out; no base at all skips the stage)."""
    bases, notes = {}, []
    for on in search_spaces.RULE_BASES:
        rows = [r for r in finished if r["family"] == on]
        if rows:
            bases[on] = as_trial(choose(rows))
    if families and len(bases) < len(search_spaces.RULE_BASES):
        gone = [on for on in search_spaces.RULE_BASES if on not in bases]
        notes.append(f"{', '.join(families)} {'skipped' if not bases else 'not run on ' + ', '.join(gone)}: no finished "
                     f"{' or '.join(gone)} trial to start from")
    if not bases:
        return [], {}, notes
    out, base_of = [], {}
    for f in families:
        for on, b in bases.items():  # which base each setting sits on, as rule_trials names it
            base_of |= {t.label: b.label for t in search_spaces.rule_trials(f, {on: b})}
        out += capped(search_spaces.rule_trials(f, bases), cap)
    return out, {t.label: base_of[t.label] for t in out}, notes


def stage3_trials(families: list[str], cap: int | None, finished: list[dict],
                  choose, epochs: int | None = None) -> tuple[list[search_spaces.Trial], dict, list[str]]:
    """Stage 3's trials (the learned families, rule-weights, disagree-weight, ramp) on the pick of their base family
    (``"*"``: the best pick over every finished trial of stages 1 and 2 that the family can sit on); also {trial
    label: its base's label} and notes. ``epochs``: each trial's (the ramp rises over the whole run)."""
    out, base_of, notes = [], {}, []
    for f in families:
        fam = search_spaces.ON_PICK[f]
        rows = [r for r in finished if r.get("stage", 1) in (1, 2) and fam.base in ("*", r["family"])]
        if not rows:
            notes.append(f"{f} skipped: no finished {fam.base if fam.base != '*' else 'stage-1 or stage-2'} "
                         f"trial to start from")
            continue
        best = choose(rows)
        try:
            trials = fam.trials(as_trial(best), epochs)
        except ValueError as e:  # the best pick is a loss this family cannot sit on: the best one it can
            fits = [r for r in rows if _builds(fam, r, epochs)]
            if not fits:
                notes.append(f"{f} skipped: no finished trial it can start from ({e})")
                continue
            alt = choose(fits)
            notes.append(f"{f} starts from {alt['label']}, the best pick it can sit on: the best overall, "
                         f"{best['label']}, cannot be its base ({e})")
            best, trials = alt, fam.trials(as_trial(alt), epochs)
        for t in capped(trials, cap):
            out.append(t)
            base_of[t.label] = best["label"]
    return out, base_of, notes


def _builds(fam: search_spaces.OnPick, row: dict, epochs: int | None) -> bool:
    try:
        fam.trials(as_trial(row), epochs)
        return True
    except ValueError:
        return False


def trial_config(base: dict, trial: search_spaces.Trial, epochs: int | None, seed: int | None) -> dict:
    """The full config one trial runs: the user's config with the trial's sections, the search's epochs and seed.
    The loss sections are replaced, not merged: a trial is its family's setting, not the user's loss plus it."""
    d = apply_sections(base, trial.sections)
    d["optim"]["epochs"] = epochs or d["optim"]["epochs"]
    if seed is not None:
        d["run"]["seed"] = seed
    d["run"]["progress"] = False
    return d


REPLACED = ("loss", "lossnet", "meta")  # what a trial sets whole: the user's values there are not merged in


def apply_sections(cfg: dict, sections: dict) -> dict:
    """``cfg`` (a full config dict) with a trial's sections: loss, lossnet and meta start from their defaults (a
    trial is exactly its family's setting), any other section is merged."""
    from .config import Config

    d = copy.deepcopy(cfg)
    defaults = Config().to_dict()
    for section, values in sections.items():
        start = defaults[section] if section in REPLACED else d.get(section, {})
        d[section] = {**start, **copy.deepcopy(values)}
    return d


def config_sha(cfg: dict) -> str:
    """A trial's identity: its config minus what does not change its result (where it writes, progress)."""
    d = copy.deepcopy(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("progress", "out_dir", "cache_dir", "threads", "name")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def slug(label: str) -> str:
    """A trial label as a storage key part: kd[alpha=0.5,tau=4] → kd_alpha0.5_tau4."""
    return label.replace("[", "_").replace("]", "").replace("=", "").replace(",", "_")


# --------------------------------------------------------------------------- checks before any trial
def check_quiz(quiz_labels, num_classes: int, quiz_size: int | None = None) -> None:
    """The pick is made on the quiz split: it must hold every class, at least MIN_QUIZ_PER_CLASS images each on
    average, or the search has nothing sound to pick on (``quiz_labels`` None: only the count is known)."""
    import numpy as np

    if quiz_labels is None:
        n, present = quiz_size or 0, num_classes
    else:
        y = np.asarray(quiz_labels)
        n, present = len(y), len(np.unique(y))
    if n < MIN_QUIZ_PER_CLASS * num_classes or present < num_classes:
        raise AutoInputError(
            f"no usable quiz split: it holds {n} images of {present} of the {num_classes} classes, and the pick needs "
            f"every class and at least {MIN_QUIZ_PER_CLASS * num_classes} images ({MIN_QUIZ_PER_CLASS} per class): give a "
            f"trusted subset (data.trusted where available) or a larger held-out split (data.quiz_fraction, "
            f"data.quiz_per_class)")


def check_labels_source(data_cfg: dict) -> None:
    """Labels the user does not trust cannot be their own quiz: without a trusted subset the held-out split would
    be drawn from the same untrusted labels (``data.noisy_labels`` without ``data.trusted``)."""
    if data_cfg.get("noisy_labels") and not data_cfg.get("trusted"):
        raise AutoInputError(
            "data.noisy_labels is given without data.trusted: the quiz split would carry the labels you do not trust, so "
            "no pick on it can be trusted either: give data.trusted (indices and clean labels of a small trusted subset)")


def check_teacher_classes(teacher_classes: int, num_classes: int, max_label: int, where: str) -> None:
    if teacher_classes != num_classes or max_label >= teacher_classes:
        raise AutoInputError(
            f"the teacher ({where}) predicts {teacher_classes} classes but the labels have {num_classes} (largest label "
            f"{max_label}): give a teacher trained on these classes (model.teacher_weights), or leave it unset to train one "
            f"on your labels once")


def estimate_search_s(counts: list[int], max_concurrent: int, epochs: int, epoch_s: float) -> float:
    """A lower bound on the search's wall time: rounds of ``max_concurrent`` trials per stage (``counts``: each
    stage's trials; a stage starts when the one before it ends), each trial ``epochs`` epochs at the measured KD epoch
    time (the learned families' meta-steps only add to it)."""
    rounds = sum(math.ceil(n / max_concurrent) for n in counts)
    return rounds * epochs * epoch_s


def check_budget(time_budget_s: float | None, counts: list[int], max_concurrent: int, epochs: int, epoch_s: float) -> None:
    if time_budget_s is None:
        return
    need = estimate_search_s(counts, max_concurrent, epochs, epoch_s)
    if need > time_budget_s:
        per = " + ".join(str(n) for n in counts)
        raise AutoInputError(
            f"budget too small for the families asked: {sum(counts)} trials ({per} over the {len(counts)} stages) of "
            f"{epochs} epochs, {max_concurrent} at a time, need at least {need:.0f} s (a KD epoch measured at "
            f"{epoch_s:.1f} s) and --time-budget leaves {time_budget_s:.0f} s for them: "
            f"raise --time-budget, or lower --trials/--epochs, or name fewer --families")


# --------------------------------------------------------------------------- the pick
def finished(results: list[dict]) -> list[dict]:
    """Trials that ran their whole budget without error (only these are ranked: the same budget for all)."""
    return [r for r in results if not r.get("error") and r.get("quiz_top1") is not None
            and r.get("epochs") == r.get("budget_epochs")]


def picker(n_select: int | None):
    """The one pick rule of a search, for its bases and its winner: the clean selection split's
    (``search_spaces.pick_on_selection``) when the config sets ``data.select_per_class`` (``n_select``: its images),
    else the quiz split's (``search_spaces.pick``)."""
    if n_select:
        return lambda rows: search_spaces.pick_on_selection(rows, n_select)
    return search_spaces.pick


def pick_split(n_select: int | None) -> dict:
    """Which split picked and why, for pick.json."""
    if n_select:
        return {"picked_on": "selection", "n_select": n_select,
                "reason": f"data.select_per_class is set: every pick (the rules' and learned families' bases, the winner) is "
                          f"made on the clean selection split of {n_select} images, disjoint from the quiz that the learned "
                          f"losses' meta-step trains on (search_spaces.pick_on_selection: within one binomial SE of the best "
                          f"select top-1, the lowest calibrated select loss)"}
    return {"picked_on": "quiz", "n_select": None,
            "reason": "data.select_per_class is unset: every pick is made on the quiz split (search_spaces.pick: best quiz "
                      "top-1, then quiz loss); set data.select_per_class for a split no learned loss trains on"}


def pick_with_reason(results: list[dict], n_select: int | None = None) -> tuple[dict, str]:
    """The search's pick over the finished trials (in plan order; ``picker(n_select)``), and why, in one sentence."""
    done = finished(results)
    if not done:
        raise AutoError("no trial finished, so there is nothing to ship: see the trial table for their errors")
    if n_select:
        return _selection_reason(done, n_select)
    win = search_spaces.pick(done)
    others = sorted((r for r in done if r is not win), key=lambda r: (-r["quiz_top1"], r.get("quiz_loss") or 0.0))
    why = (f"{win['label']} has the best quiz top-1 ({win['quiz_top1']:.2f}%, quiz loss {win.get('quiz_loss') or float('nan'):.4f}) "
           f"of {len(done)} finished trials")
    if others:
        r = others[0]
        gap = win["quiz_top1"] - r["quiz_top1"]
        why += (f"; the runner-up {r['label']} is {gap:.2f} pt below" if gap > 0 else
                f"; tied on quiz top-1 with {r['label']}, it wins on the lower quiz loss (or the grid's order)")
    n_quiz = win.get("quiz_size")
    if n_quiz and others:
        se = 100.0 * math.sqrt(max(win["quiz_top1"] / 100 * (1 - win["quiz_top1"] / 100), 1e-9) / n_quiz)
        if win["quiz_top1"] - others[0]["quiz_top1"] < 2 * se:
            why += f" (within 2 SE of the quiz split's noise, ±{se:.2f} pt on {n_quiz} images)"
    return win, why


def _selection_reason(done: list[dict], n_select: int) -> tuple[dict, str]:
    try:
        win = search_spaces.pick_on_selection(done, n_select)
    except ValueError as e:
        raise AutoError(f"cannot pick on the selection split: {e}; re-run the search (the config sets "
                        f"data.select_per_class, so new trials report it)") from None
    best = max(r["select_top1"] for r in done)
    band = search_spaces.selection_band(best, n_select)
    tied = [r for r in done if r["select_top1"] >= best - band]
    why = (f"{win['label']} has the lowest calibrated select loss ({win['select_loss_cal']:.4f}, select top-1 "
           f"{win['select_top1']:.2f}%) of the {len(tied)} finished trials within one SE (±{band:.2f} pt on {n_select} "
           f"selection images) of the best select top-1 ({best:.2f}%), of {len(done)} finished trials")
    others = sorted((r for r in tied if r is not win), key=lambda r: r["select_loss_cal"])
    if others:
        why += f"; the runner-up {others[0]['label']} has {others[0]['select_loss_cal']:.4f}"
    return win, why


def add_costs(results: list[dict]) -> None:
    """Each trial's wall time against the median finished KD trial's (None without one)."""
    import statistics

    kd = [r["wall_s"] for r in finished(results) if r["family"] == "kd" and r.get("wall_s")]
    ref = statistics.median(kd) if kd else None
    for r in results:
        r["cost_vs_kd"] = round(r["wall_s"] / ref, 3) if ref and r.get("wall_s") else None


def best_config_yaml(user_cfg: dict, win: dict, name: str, why: str, budget: dict) -> str:
    """The user's config with the winning loss, as ``lkd_ray train --config`` and the jobs read it (a full config:
    any recipe under it is overridden); its epochs are the config's, not the search's shorter trial budget."""
    import yaml

    d = apply_sections(user_cfg, win["sections"])
    d["run"]["name"] = f"{name}-best"
    head = (f"# Picked by `lkd_ray auto` search {name!r}: {win['label']}\n# {why}\n"
            f"# Trials ran {budget['epochs']} epochs each; this config keeps your {d['optim']['epochs']} epochs.\n")
    return head + yaml.safe_dump(d, sort_keys=False)


def progress_line(total: int, done: int, running: int, failed: int, best: dict | None, split: str = "quiz") -> str:
    """The search's one progress line; ``best`` is what the search's pick rule ranks first so far, shown with the
    accuracy on the split that picks (``split``: quiz or selection)."""
    left = max(0, total - done - running - failed)
    if best is None:
        b = "no trial finished yet"
    elif split == "selection" and best.get("select_top1") is not None:
        b = f"best so far {best['label']} select {best['select_top1']:.2f}% (quiz {best['quiz_top1']:.2f}%)"
    else:
        b = f"best so far {best['label']} quiz {best['quiz_top1']:.2f}%"
    fail = f", {failed} failed" if failed else ""
    return f"[auto] {done}/{total} trials done, {running} running, {left} left{fail}; {b}"
