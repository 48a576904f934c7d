"""What ``python -m lkd_ray auto`` searches and how it picks, without Ray: the families (looked up in
``search_spaces``' registries, so a family added there is searched with no change here), each trial's config and
identity, the checks that stop bad input before any trial, and the pick with its reason.

Stage 1 runs every hand-crafted family of ``search_spaces.HANDCRAFTED`` asked for; stage 2 runs every learned
family of ``search_spaces.LEARNED`` on the stage-1 quiz pick of its base family (``"*"``: the best hand-crafted pick
of all), as ``benchmarks/accuracy.py`` tunes them. Every trial gets the same budget (``--epochs``); ``--trials``
caps each family at that many settings, spread evenly over its grid.
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
    return list(search_spaces.HANDCRAFTED) + list(search_spaces.LEARNED)


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
                   help=f"only these families (default: all: {', '.join(all_families())}); a learned family brings its base family")
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
def resolve_families(asked: list[str] | None) -> tuple[list[str], list[str], list[str]]:
    """(hand-crafted families for stage 1, learned families for stage 2, notes). A learned family brings the
    hand-crafted family it starts from."""
    hand, learned = search_spaces.HANDCRAFTED, search_spaces.LEARNED
    if not asked:
        return list(hand), list(learned), []
    unknown = [f for f in asked if f not in hand and f not in learned]
    if unknown:
        raise AutoInputError(f"unknown families {unknown}: valid families are {', '.join(all_families())}")
    stage2 = [f for f in learned if f in asked]
    stage1 = [f for f in hand if f in asked]
    notes = []
    for f in stage2:
        base = learned[f].base
        if base != "*" and base not in stage1:
            stage1.append(base)
            notes.append(f"{f} starts from the tuned {base}: {base} added to stage 1")
    if not stage1:
        raise AutoInputError(f"the learned families {stage2} start from a tuned hand-crafted loss: add one of "
                             f"{', '.join(hand)} to --families")
    stage1 = [f for f in hand if f in stage1]  # registry order
    return stage1, stage2, notes


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


def stage2_count(families: list[str], cap: int | None) -> int:
    """How many stage-2 trials will run (the grids' sizes do not depend on the base)."""
    return sum(len(capped(search_spaces.LEARNED[f].build(None), cap)) for f in families)


def stage2_trials(families: list[str], cap: int | None, finished: list[dict]) -> tuple[list[search_spaces.Trial], dict, list[str]]:
    """The learned families' trials on their bases' quiz picks (``finished``: stage-1 results); also
    {learned family: base trial label} and notes for families skipped because their base has no finished trial."""
    out, bases, notes = [], {}, []
    for f in families:
        base_family = search_spaces.LEARNED[f].base
        rows = [r for r in finished if base_family in ("*", r["family"])]
        if not rows:
            notes.append(f"{f} skipped: no finished {base_family if base_family != '*' else 'hand-crafted'} trial to start from")
            continue
        best = search_spaces.pick(rows)
        base = next(t for t in search_spaces.HANDCRAFTED[best["family"]] if t.label == best["label"])
        bases[f] = base.label
        out += capped(search_spaces.LEARNED[f].build(base), cap)
    return out, bases, notes


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


def estimate_search_s(n1: int, n2: int, max_concurrent: int, epochs: int, epoch_s: float) -> float:
    """A lower bound on the search's wall time: rounds of ``max_concurrent`` trials per stage, each trial
    ``epochs`` epochs at the measured KD epoch time (the learned families' meta-steps only add to it)."""
    rounds = math.ceil(n1 / max_concurrent) + math.ceil(n2 / max_concurrent)
    return rounds * epochs * epoch_s


def check_budget(time_budget_s: float | None, n1: int, n2: int, max_concurrent: int, epochs: int, epoch_s: float) -> None:
    if time_budget_s is None:
        return
    need = estimate_search_s(n1, n2, max_concurrent, epochs, epoch_s)
    if need > time_budget_s:
        raise AutoInputError(
            f"budget too small for the families asked: {n1 + n2} trials of {epochs} epochs, {max_concurrent} at a time, need "
            f"at least {need:.0f} s (a KD epoch measured at {epoch_s:.1f} s) and --time-budget leaves {time_budget_s:.0f} s "
            f"for them: "
            f"raise --time-budget, or lower --trials/--epochs, or name fewer --families")


# --------------------------------------------------------------------------- the pick
def finished(results: list[dict]) -> list[dict]:
    """Trials that ran their whole budget without error (only these are ranked: the same budget for all)."""
    return [r for r in results if not r.get("error") and r.get("quiz_top1") is not None
            and r.get("epochs") == r.get("budget_epochs")]


def pick_with_reason(results: list[dict]) -> tuple[dict, str]:
    """``search_spaces.pick`` over the finished trials (in plan order), and why, in one sentence."""
    done = finished(results)
    if not done:
        raise AutoError("no trial finished, so there is nothing to ship: see the trial table for their errors")
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


def progress_line(total: int, done: int, running: int, failed: int, best: dict | None) -> str:
    left = max(0, total - done - running - failed)
    b = f"best so far {best['label']} quiz {best['quiz_top1']:.2f}%" if best else "no trial finished yet"
    fail = f", {failed} failed" if failed else ""
    return f"[auto] {done}/{total} trials done, {running} running, {left} left{fail}; {b}"
