"""Test top-1 of every distillation method on real data (Fashion-MNIST), per data regime, paired seeds,
against baselines tuned as carefully as the learned loss.

Regimes (cnn_teacher → cnn_student; the teacher trained 30 epochs once per regime and shared by every
method; its logits come from the teacher-output cache with every distinct view of the augmentation):

* ``full``: the whole training split minus a 10 % quiz split; student 12 epochs.
* ``scarce``: the student sees 100 labelled images per class (batch 32, 40 epochs); the quiz is 20 clean
  images per class; the teacher is the ``full`` one (trained on the whole training split).
* ``noisy-sym40`` / ``noisy-pair30``: 40 % symmetric / 30 % pair-flip label noise on the whole training split
* ``noisy-pair45-8k``: 45 % pair-flip on 8,000 training images (the field suite only: ``--suite field``)
  (the teacher is trained on the same noisy labels); a clean quiz of 50 images per class; student 12 epochs.

Three stages, each a command (records in ``benchmarks/results/``, every one with its config sha, command,
commit, machine, timestamps and the jobs beside it; configs in ``configs.json``):

    python benchmarks/accuracy.py --regime noisy-sym40 --tune kd dkd dist ls wsl     # tuning seed 100 → accuracy_regimes_tuning.json
    python benchmarks/accuracy.py --regime noisy-sym40 --tune lkd-sample              # the per-sample LKD grid on the tuned KD
    python benchmarks/accuracy.py --regime noisy-sym40 --tune lkd-sample-dist         # … and on the tuned DIST (cost-capped)
    python benchmarks/accuracy.py --regime noisy-sym40 --methods ce kd dkd dist control lkd kd-tuned ...   # seeds 0-4
    python benchmarks/accuracy.py --regime noisy-sym40 --variant sample --set lossnet.kind=sample
    python benchmarks/accuracy.py --report

``method`` is ``ce``, ``kd``, ``dkd``, ``dist``, ``control``, ``lkd`` (``loss.method=lkd``, no override: the
shipped default), ``<family>-tuned`` (the tuning trial with the best quiz top-1 on the tuning seed) and
``lkd-<variant>`` for everything else. Settings are chosen on the quiz split only; test is reported.
A (regime, method, seed) already recorded is not run again; a run folder or a record whose config differs
from what the command builds stops the benchmark (exit 2) with the differences.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import records  # noqa: E402

COMMON: dict = {"model": {"teacher_epochs": 30, "teacher_cache": True}}
REGIMES: dict[str, dict] = {
    "full": {"optim": {"epochs": 12}},
    "scarce": {"data": {"labels_per_class": 100, "quiz_per_class": 20, "batch_size": 32},
               "model": {"teacher_batch_size": 128}, "optim": {"epochs": 40}},
    "noisy-sym40": {"data": {"label_noise": 0.4, "noise_kind": "symmetric", "quiz_per_class": 50}, "optim": {"epochs": 12}},
    "noisy-pair30": {"data": {"label_noise": 0.3, "noise_kind": "pairflip", "quiz_per_class": 50}, "optim": {"epochs": 12}},
    # Co-teaching's Pair-45 % (Han et al. 2018) on 8,000 training images: the field suite's heavy-noise regime, where
    # the teacher is trained on those labels too and is weak, so the rules that trust it are tested (issue 25).
    "noisy-pair45-8k": {"data": {"label_noise": 0.45, "noise_kind": "pairflip", "train_subset": 8000, "quiz_per_class": 20},
                        "optim": {"epochs": 12}},
}
BASE_METHODS = ("ce", "kd", "dkd", "dist", "control", "lkd")
TUNED = ("kd", "dkd", "dist", "ls", "wsl", "lkd-sample", "lkd-sample-dist")
TUNE_SEED = 100
RESULTS = records.RESULTS
RECORDS, TUNING = "accuracy_regimes.json", "accuracy_regimes_tuning.json"

# The field suite (issue 25): the noisy-label field's rules as tuned families beside the KD ones, every pick made on
# a clean selection split disjoint from the meta-objective's quiz (search_spaces.pick_on_selection), the learned
# loss as a residual on the regime's best rule, and finals over noise draws as well as student seeds.
FIELD_RECORDS, FIELD_TUNING = "accuracy_field.json", "accuracy_field_tuning.json"
# Teachers the records ran on (0.4 MB each): a retrained one is another teacher (``teacher_conflicts``).
KEPT_TEACHERS = ROOT / "benchmarks" / "artifacts" / "teachers"
SELECT = {"full": 50, "scarce": 20, "noisy-sym40": 50, "noisy-pair30": 50, "noisy-pair45-8k": 50}  # clean images per class, beside the quiz
HANDCRAFTED_FIELD = ("kd", "dkd", "dist", "ls", "wsl", "dist-wce")
RULES = ("agree", "relabel", "gce", "sce", "boot", "small-loss")
# rule-weights: the best rule's CE and distillation weights tuned after it is picked (never a candidate for
# rule-best, so the residual's base and every recorded command stay what they were)
# lkd-best: the residual on the best hand-crafted loss of the whole set, rule-weights included — where the
# reweighting beats the rule (noisy-pair45-8k), the learned loss must find something beyond *it*
# disagree-weight: the best of the whole set with its label term scaled where the teacher disagrees (what lkd-best
# learned on noisy-pair45-8k, written by hand)
# lkd-best-early: lkd-best's schedule in the first epochs only, to bring its cost under the bar
# lkd-rule-head, lkd-best-head: lkd-rule's and lkd-best's grids with the meta-step through the classifier head only
# (about one student step a meta-step instead of about four); lkd-rule-b32, lkd-best-b32: the same grids with each
# meta-step on 32 images (unroll and quiz batch) through the whole student; ramp: the best rule with a linear ramp of
# its weights and temperature over the run (what the learned residual did on scarce, written by hand)
FIELD_TUNED = HANDCRAFTED_FIELD + RULES + ("rule-weights", "lkd-rule", "lkd-rule-capped", "lkd-best", "lkd-best-capped",
                                           "disagree-weight", "lkd-best-early", "lkd-rule-head", "lkd-best-head",
                                           "lkd-rule-b32", "lkd-best-b32", "ramp")
FIELD_ONLY = ("noisy-pair45-8k",)  # regimes added for the field suite: the regimes suite's records never had them


class BenchmarkError(RuntimeError):
    """A mismatch between what the command asks and what is recorded; exits 2 with the reason."""


class NotTunedYet(BenchmarkError):
    """A family's tuning pick was asked for before any of its trials is recorded (a suite still running)."""


def merge(*parts: dict) -> dict:
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            out.setdefault(k, {}).update(v)
    return out


def build_cfg(regime: str, sections: dict, overrides: list[str], seed: int, name: str, cache_dir: str,
              suite: str = "regimes", noise_draw: int = 0):
    from lkd_ray.config import build_config

    extra = {}
    if suite == "field":
        extra = {"data": {"select_per_class": SELECT[regime], **({"noise_seed": noise_draw} if noise_draw else {})}}
    return build_config("fashion_mnist", overrides=overrides,
                        **merge(COMMON, REGIMES[regime], extra, sections,
                                {"run": {"seed": seed, "name": name, "progress": False, "cache_dir": cache_dir}}))


# --------------------------------------------------------------------------- one run
def per_sample_summary(trainer, teacher) -> dict | None:
    """What a per-sample loss network learned, on the student's training images at the end of training: its
    outputs on samples whose label was flipped vs kept, and where the teacher agrees with the label or not."""
    import torch

    net = getattr(trainer.lossnets, "logit", None) if trainer.lossnets is not None else None
    if net is None or not hasattr(net, "per_sample"):
        return None
    data = trainer.data
    loader = data.train
    x, y, ids = loader.images, loader.labels, loader.ids
    if loader.teacher_logits is not None:  # the un-augmented view from the cache (centre crop, no flip)
        pad = loader.augment.pad
        centre = (pad * (2 * pad + 1) + pad) * 2
        slot = centre if loader.cached_views is None else None
        z_t = loader.teacher_logits[:, slot] if slot is not None else None
    else:
        z_t = None
    trainer.bundle.eval()
    outs: dict[str, list] = {}
    with torch.no_grad():
        zs = torch.cat([trainer.bundle(x[i:i + 1024]).logits.float() for i in range(0, len(y), 1024)])
        if z_t is None:
            z_t = torch.cat([teacher(x[i:i + 1024]).float() for i in range(0, len(y), 1024)])
        o = net.per_sample(zs, z_t, y, trainer.student_state())
        if getattr(net, "rule", None) is not None:  # what the learned loss does beside the rule it started from
            ce = torch.nn.functional.cross_entropy(zs, y, reduction="none").clamp_min(1e-12)
            o["rule_w"] = net.rule.per_sample(zs, y, z_t, net.epoch) / ce  # the rule's own weight on each sample's CE
            o["w_ce_x_rule"] = o["w_ce"] * o["rule_w"]                      # … and with the learned weight on it
    trainer.bundle.train()
    regime = data.regime
    flipped = torch.from_numpy(regime.flipped[ids]) if regime is not None else torch.zeros(len(y), dtype=torch.bool)
    agree = z_t.argmax(1) == y
    groups = {"clean": ~flipped, "flipped": flipped, "agree": agree, "disagree": ~agree}
    for k, v in o.items():
        outs[k] = {g: {"n": int(m.sum()), "mean": float(v[m].mean()) if m.any() else None,
                       "q10": float(v[m].quantile(0.1)) if m.any() else None,
                       "q50": float(v[m].quantile(0.5)) if m.any() else None,
                       "q90": float(v[m].quantile(0.9)) if m.any() else None} for g, m in groups.items()}
    return outs


def run_one(task: dict) -> dict:
    """One training run in a fresh process. Writes ``provenance.json`` before and ``result.json`` after, in its
    folder; returns the record (from those files, so a finished run's record is exactly what ran)."""
    import torch

    out = Path(task["out"])
    result_path = out / "result.json"
    if not result_path.is_file():
        torch.set_num_threads(task["threads"])
        from lkd_ray.config import Config
        from lkd_ray.data import build_data
        from lkd_ray.train import build_run
        from lkd_ray.train.teacher import prepare_teacher

        cfg = Config.model_validate(task["config"])
        out.mkdir(parents=True, exist_ok=True)
        records.write_json(out / "provenance.json", {**task["provenance"], "started": records.now(),
                                                     "load_1m_start": records.load_1m()})
        data = build_data(cfg.data, cfg.run.seed, cache_dir=cfg.run.cache_dir)
        teacher, info = None, None
        if cfg.loss.method != "ce":
            tcfg = cfg.model_copy(deep=True)
            tcfg.run.seed = 0  # one teacher per regime
            teacher, info = prepare_teacher(tcfg, data, log=lambda *_: None)
        run = build_run(cfg, data=data, teacher=teacher, teacher_info=info, log=lambda *_: None)
        res = run.fit(out, progress=False)
        summary = per_sample_summary(res["_trainer"], teacher)
        if summary is not None:
            records.write_json(out / "per_sample.json", summary)
        prov = json.loads((out / "provenance.json").read_text())
        records.write_json(out / "provenance.json", {**prov, "finished": records.now(), "load_1m_end": records.load_1m()})
    return record_from(out, task)


def record_from(out: Path, task: dict) -> dict:
    res = json.loads((out / "result.json").read_text())
    prov = json.loads((out / "provenance.json").read_text())
    last = res["history"][-1] if res["history"] else {}
    rec = {"regime": task["regime"], "method": task["method"], "seed": res["seed"], "test_top1": res["test_top1"],
           "quiz_top1": res["quiz_top1"], "quiz_loss": last.get("quiz_loss"), "wall_s": res["wall_s"],
           "epochs": res["epochs"], "config_sha": records.config_sha(res["config"]), **prov,
           "curve": [{"epoch": h["epoch"], "quiz_top1": h["quiz_top1"], "test_top1": h["test_top1"]} for h in res["history"]],
           "lossnet_version": res.get("lossnet_version"), "meta_s": res.get("meta_s")}
    for k in ("select_top1", "select_loss", "select_loss_cal"):
        if k in res:
            rec[k] = res[k]
    if isinstance(res.get("meta"), dict) and "accepted" in res["meta"]:
        rec["meta_steps"] = res["meta"]["accepted"]  # meta-steps applied in the whole run
    for k in ("trial", "family", "tuned_from", "noise_draw", "suite"):
        if k in task:
            rec[k] = task[k]
    if (out / "per_sample.json").is_file():
        rec["per_sample"] = json.loads((out / "per_sample.json").read_text())
    if res.get("particles"):
        rec["particles"] = res["particles"]
    return rec


# --------------------------------------------------------------------------- statistics and tables
paired = records.paired


def summarise(recs: list[dict], ref: str = "kd") -> list[dict]:
    rows = []
    for m in list(dict.fromkeys(r["method"] for r in recs)):
        rs = [r for r in recs if r["method"] == m]
        acc, quiz = [r["test_top1"] for r in rs], [r["quiz_top1"] for r in rs]
        rows.append({"method": m, "n": len(rs), "seeds": sorted(r["seed"] for r in rs), "test_mean": statistics.mean(acc),
                     "test_std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "test_worst": min(acc),
                     "quiz_mean": statistics.mean(quiz), "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                     "vs_ref": paired(recs, m, ref) if m != ref else None,
                     "vs_ref_quiz": paired(recs, m, ref, "quiz_top1") if m != ref else None})
    return rows


def best_tuned(recs: list[dict]) -> str | None:
    """The hand-crafted ``-tuned`` method with the best mean quiz top-1 (what a user picking on quiz would ship)."""
    tuned = [r for r in summarise(recs) if r["method"].endswith("-tuned") and not r["method"].startswith("lkd")]
    return max(tuned, key=lambda r: r["quiz_mean"])["method"] if tuned else None


def table(recs: list[dict], ref: str = "kd") -> str:
    fmt = lambda d: f"{d['mean']:+.2f} ± {d['se']:.2f}" if d else "—"  # noqa: E731
    lines = [f"| method | seeds | test top-1 (mean ± std) | worst seed | Δ test vs {ref} (paired ± SE) | worst Δ | quiz top-1 | "
             f"Δ quiz vs {ref} |", "|---|---|---|---|---|---|---|---|"]
    for r in summarise(recs, ref):
        worst = f"{r['vs_ref']['worst']:+.2f}" if r["vs_ref"] else "—"
        lines.append(f"| {r['method']} | {r['n']} | {r['test_mean']:.2f} ± {r['test_std']:.2f} | {r['test_worst']:.2f} | "
                     f"{fmt(r['vs_ref'])} | {worst} | {r['quiz_mean']:.2f} | {fmt(r['vs_ref_quiz'])} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- planning
def tuning_pick(tuning: list[dict], regime: str, family: str, suite: str = "regimes") -> dict:
    from lkd_ray.search_spaces import pick, pick_on_selection

    families = HANDCRAFTED_FIELD + RULES if family == "rule-best" else (family,)
    rows = [r for r in tuning if r["regime"] == regime and r["family"] in families]
    if not rows:
        raise NotTunedYet(f"{family}-tuned in regime {regime}: no tuning trials recorded; run "
                             f"`benchmarks/accuracy.py --regime {regime} --tune {family}"
                             f"{' --suite field' if suite == 'field' else ''}` first")
    if suite == "field":
        missing = sorted(set(families) - {r["family"] for r in rows})
        if family == "rule-best" and missing:
            raise BenchmarkError(f"the best hand-crafted loss of {regime} is picked over every family; {missing} "
                                 "have no tuning trials yet")
        return pick_on_selection(rows, SELECT[regime] * 10)
    return pick(rows)


def _trial_of(regime: str, family: str, tuning: list[dict], suite: str):
    """The tuned trial of ``family`` (``rule-best``: the best over every hand-crafted family of the field suite)."""
    best = tuning_pick(tuning, regime, family, suite)
    fam = best["family"]
    grid = family_trials(regime, fam, tuning, suite)
    trial = next((t for t in grid if t.name == best["trial"]), None)
    if trial is None:
        raise BenchmarkError(f"{regime}: the recorded {fam} pick {best['trial']!r} is not in that family's grid now "
                             f"({', '.join(t.name for t in grid)}): the grid changed after it was tuned; re-tune the "
                             "family, or drop its old tuning records (benchmarks/records.py drop) and say why")
    return trial, best


# the field families whose picks are a KD or DIST loss: what rule-weights and the residual can sit on
ON_KD_OR_DIST = ("kd", "dist", "dist-wce") + RULES


def on_best_pick(regime: str, tuning: list[dict], build):
    """The field suite's best hand-crafted loss (``rule-best``) as the trial a family built on it starts from; where
    ``build`` cannot sit on it (label smoothing, DKD or WSL won: no CE and KD-or-DIST pair to weigh), the best pick
    over the families it can — what ``lkd_ray auto``'s stage 3 does, so both search the same thing."""
    trial, _ = _trial_of(regime, "rule-best", tuning, "field")
    try:
        build(trial)
        return trial
    except ValueError:
        pass
    from lkd_ray.search_spaces import pick_on_selection

    # rule-best was picked, so KD and DIST (and every rule on them) are tuned: these rows are never empty
    best = pick_on_selection([r for r in tuning if r["regime"] == regime and r["family"] in ON_KD_OR_DIST],
                             SELECT[regime] * 10)
    return next(t for t in family_trials(regime, best["family"], tuning, "field") if t.name == best["trial"])


def regime_epochs(regime: str) -> int:
    """The student's epochs in ``regime`` (its own, or the recipe's)."""
    from lkd_ray.config import build_config

    return REGIMES[regime].get("optim", {}).get("epochs") or build_config("fashion_mnist").optim.epochs


def whole_set_best(regime: str, tuning: list[dict]):
    """The best hand-crafted loss of the whole field set by the selection pick — the rule rule-weights sat on, or
    rule-weights' pick where that beats it — and whether it is that rule."""
    from lkd_ray.search_spaces import pick_on_selection, rule_weight_trials

    rule = on_best_pick(regime, tuning, rule_weight_trials)  # what rule-weights sat on
    weights = [r for r in tuning if r["regime"] == regime and r["family"] == "rule-weights"]
    if not weights:
        raise NotTunedYet(f"the best of {regime}'s whole hand-crafted set: rule-weights has no tuning trials; run "
                          f"`benchmarks/accuracy.py --regime {regime} --suite field --tune rule-weights` first")
    rule_row = next(r for r in tuning if r["regime"] == regime and r["family"] == rule.family and r["trial"] == rule.name)
    best = pick_on_selection([rule_row, *weights], SELECT[regime] * 10)
    if best is rule_row:
        return rule, True
    return next(t for t in family_trials(regime, "rule-weights", tuning, "field") if t.name == best["trial"]), False


def best_of_all(regime: str, tuning: list[dict]):
    """``whole_set_best`` for ``lkd-best``; refused where it is the rule itself: that would be ``lkd-rule`` again."""
    best, is_rule = whole_set_best(regime, tuning)
    if is_rule:
        raise BenchmarkError(f"{regime}: the best hand-crafted loss of the whole set is the rule itself "
                             f"({best.label}); lkd-best would be lkd-rule's runs again: run lkd-rule")
    return best


def field_untuned(regime: str, tuning: list[dict]) -> dict[str, str]:
    """The hand-crafted families of the regime's field suite whose trials are not all recorded: family → how many
    are ("0 of ?" where its bases are not tuned yet, so its trials cannot even be listed). Empty: the suite's best
    hand-crafted loss can be picked."""
    done = {(r["family"], r["trial"]) for r in tuning if r["regime"] == regime and r.get("suite", "field") == "field"}
    out = {}
    for family in HANDCRAFTED_FIELD + RULES:
        try:
            names = [t.name for t in family_trials(regime, family, tuning, "field")]
        except NotTunedYet:  # its bases are not tuned yet; anything else is a real fault and is raised
            out[family] = "0 of ?"
            continue
        have = sum((family, n) in done for n in names)
        if have < len(names):
            out[family] = f"{have} of {len(names)}"
    return out


def family_trials(regime: str, family: str, tuning: list[dict], suite: str = "regimes"):
    from lkd_ray.search_spaces import (HANDCRAFTED, RULE_GRIDS, disagree_weight_trials, lkd_early_trials, lkd_head_trials,
                                       lkd_rule_capped_trials, lkd_small_batch_trials, ramp_trials, lkd_rule_trials, lkd_sample_dist_trials, lkd_sample_trials,
                                       rule_trials, rule_weight_trials)

    if suite == "field":
        if family in RULE_GRIDS:  # a field rule on the regime's tuned KD and DIST
            return rule_trials(family, {on: _trial_of(regime, on, tuning, suite)[0] for on in ("kd", "dist")})
        if family == "rule-weights":  # the best rule, its CE and distillation weights tuned
            return rule_weight_trials(on_best_pick(regime, tuning, rule_weight_trials))
        if family == "lkd-rule":  # the learned loss as a residual on the best hand-crafted loss
            return lkd_rule_trials(on_best_pick(regime, tuning, lkd_rule_trials))
        if family == "lkd-rule-capped":  # … with fewer meta-steps: within the cost bar on small data too
            return lkd_rule_capped_trials(on_best_pick(regime, tuning, lkd_rule_capped_trials))
        if family == "lkd-rule-head":  # … with the meta-step through the classifier head only
            return lkd_head_trials(on_best_pick(regime, tuning, lkd_head_trials))
        if family == "lkd-best-head":
            return lkd_head_trials(best_of_all(regime, tuning), family="lkd-best-head")
        if family == "ramp":  # the best rule, its weights and temperature ramped over the whole run
            def on_rule(trial):
                return ramp_trials(trial, regime_epochs(regime))
            return on_rule(on_best_pick(regime, tuning, on_rule))
        if family == "lkd-rule-b32":  # … with each meta-step on 32 images, through the whole student
            return lkd_small_batch_trials(on_best_pick(regime, tuning, lkd_small_batch_trials))
        if family == "lkd-best-b32":
            return lkd_small_batch_trials(best_of_all(regime, tuning), family="lkd-best-b32")
        if family == "lkd-best":  # … on the best of the whole hand-crafted set, the rule's reweighting included
            return lkd_rule_trials(best_of_all(regime, tuning), family="lkd-best")
        if family == "lkd-best-capped":  # … with lkd-rule-capped's schedule
            return lkd_rule_trials(best_of_all(regime, tuning), per_epoch=(2, 3), min_steps=0, family="lkd-best-capped")
        if family == "lkd-best-early":  # … lkd-best's schedule in the first epochs only
            return lkd_early_trials(best_of_all(regime, tuning))
        if family == "disagree-weight":  # the best of the whole set, its label term scaled where the teacher disagrees
            try:
                return disagree_weight_trials(whole_set_best(regime, tuning)[0])
            except ValueError as e:
                raise BenchmarkError(f"{regime}: {e}") from e
        if family not in HANDCRAFTED_FIELD:
            raise BenchmarkError(f"unknown field tuning family {family!r}; valid: {', '.join(FIELD_TUNED)}")
        return HANDCRAFTED[family]
    if family in ("lkd-sample", "lkd-sample-dist"):  # the per-sample network on its tuned base: KD's, or DIST's
        on = "kd" if family == "lkd-sample" else "dist"
        pick = tuning_pick(tuning, regime, on)
        base = next(t for t in HANDCRAFTED[on] if t.name == pick["trial"])
        return lkd_sample_trials(base) if on == "kd" else lkd_sample_dist_trials(base)
    if family not in HANDCRAFTED:
        raise BenchmarkError(f"unknown tuning family {family!r}; valid: {', '.join(TUNED)}")
    return HANDCRAFTED[family]


def plan(args, tuning: list[dict]) -> tuple[list[dict], str]:
    """Every run the command asks for, as tasks with their full config; and the records file they go to."""
    out_root = Path(args.out) / args.regime
    tasks: list[dict] = []

    suite = getattr(args, "suite", "regimes")
    if suite != "field" and args.regime in FIELD_ONLY:
        raise BenchmarkError(f"regime {args.regime} is measured by the field suite only: add --suite field")
    if suite == "field":
        out_root = Path(args.out) / "field" / args.regime

    def add(method: str, sections: dict, overrides: list[str], seed: int, folder: Path, draw: int = 0, **extra):
        cfg = build_cfg(args.regime, sections, overrides, seed, folder.name, args.cache_dir, suite, draw)
        if suite == "field":
            extra = {**extra, "suite": suite, "noise_draw": draw}
        tasks.append({"regime": args.regime, "method": method, "seed": seed, "out": str(folder), "config": cfg.to_dict(),
                      "threads": args.threads, **extra})

    if args.tune:
        for family in args.tune:
            for t in family_trials(args.regime, family, tuning, suite):
                slug = t.name.replace("=", "").replace(",", "_")
                add(f"{family}[{t.name}]", t.sections, [], args.tune_seed, out_root / "tune" / f"{family}-{slug}-s{args.tune_seed}",
                    family=family, trial=t.name)
        return tasks, FIELD_TUNING if suite == "field" else TUNING
    if suite == "field":
        _plan_field_finals(args, tuning, out_root, add)
        return tasks, FIELD_RECORDS
    jobs: list[tuple[str, dict, list[str], dict]] = []
    if args.variant:
        if not args.overrides:
            raise BenchmarkError("--variant needs the setting it names, given with --set")
        jobs.append((f"lkd-{args.variant}", {"loss": {"method": "lkd"}}, args.overrides, {}))
    for m in args.methods or []:
        if m in BASE_METHODS:
            jobs.append((m, {"loss": {"method": m}}, [], {}))
        elif m.endswith("-tuned") and m[:-len("-tuned")] in TUNED:
            family = m[:-len("-tuned")]
            best = tuning_pick(tuning, args.regime, family)
            trial = next(t for t in family_trials(args.regime, family, tuning) if t.name == best["trial"])
            jobs.append((m, trial.sections, [], {"tuned_from": {"family": family, "trial": trial.name,
                                                                    "quiz_top1": best["quiz_top1"], "seed": best["seed"],
                                                                    "trials": sum(1 for r in tuning if r["regime"] == args.regime
                                                                                  and r["family"] == family)}}))
        else:
            raise BenchmarkError(f"unknown method {m!r}: use {', '.join(BASE_METHODS)}, <family>-tuned for a family in "
                                 f"{', '.join(TUNED)}, or --variant NAME --set ...")
    for seed in args.seeds:  # seed-major: partial results stay balanced
        for name, sections, overrides, extra in jobs:
            add(name, sections, overrides, seed, out_root / f"{name}-s{seed}", **extra)
    return tasks, RECORDS


def _plan_field_finals(args, tuning: list[dict], out_root: Path, add) -> None:
    """Finals of the field suite: every asked method over the student seeds × the noise draws (draw 0 is the
    regime's own noise; each other draw has its own labels and its own teacher)."""
    jobs = []
    for m in args.methods or []:
        if m in BASE_METHODS:
            jobs.append((m, {"loss": {"method": m}}, [], {}))
        elif m.endswith("-tuned") and m[:-len("-tuned")] in FIELD_TUNED + ("rule-best",):
            family = m[:-len("-tuned")]
            trial, best = _trial_of(args.regime, family, tuning, "field")
            jobs.append((m, trial.sections, [], {"tuned_from": {
                "family": best["family"], "trial": trial.name, "select_top1": best["select_top1"],
                "select_loss_cal": best["select_loss_cal"], "seed": best["seed"],
                "trials": sum(1 for r in tuning if r["regime"] == args.regime and r["family"] == best["family"])}}))
        else:
            raise BenchmarkError(f"unknown field method {m!r}: use {', '.join(BASE_METHODS)} or <family>-tuned for a "
                                 f"family in {', '.join(FIELD_TUNED + ('rule-best',))}")
    if args.variant:  # a hand-crafted variant (its --set names another method) is recorded as hc-NAME, not lkd-NAME
        hand = any(o.startswith("loss.method=") and o.split("=", 1)[1] != "lkd" for o in args.overrides)
        jobs.append((f"{'hc' if hand else 'lkd'}-{args.variant}", {"loss": {"method": "lkd"}}, args.overrides, {}))
    for draw in args.noise_draws:
        for seed in args.seeds:
            for name, sections, overrides, extra in jobs:
                add(name, sections, overrides, seed, out_root / f"{name}-s{seed}-d{draw}", draw, **extra)


def check_against(tasks: list[dict], recorded: list[dict], store_path: Path = records.CONFIGS) -> list[dict]:
    """Tasks still to run. A run folder or record that holds another config for the same name is an error."""
    todo = []
    for t in tasks:
        sha = records.config_sha(t["config"])
        done = [r for r in recorded if r["regime"] == t["regime"] and r["method"] == t["method"] and r["seed"] == t["seed"]
                and r.get("noise_draw", 0) == t.get("noise_draw", 0)]
        if done:
            if done[0]["config_sha"] != sha and (records.config_identity(_stored_config(done[0]["config_sha"], store_path))
                                                 != records.config_identity(t["config"])):
                raise BenchmarkError(f"{t['regime']}/{t['method']} seed {t['seed']} is recorded with config "
                                     f"{done[0]['config_sha']}, the command builds {sha}:\n  " +
                                     "\n  ".join(records.config_diff(_stored_config(done[0]["config_sha"], store_path), t["config"])) +
                                     "\nrun it under another method name, or drop the old records (and say so)")
            continue
        res = Path(t["out"]) / "result.json"
        if res.is_file():
            old = json.loads(res.read_text())["config"]
            if records.config_identity(old) != records.config_identity(t["config"]):
                raise BenchmarkError(f"{t['out']} holds a run of another config than the command builds:\n  " +
                                     "\n  ".join(records.config_diff(old, t["config"])) +
                                     "\nuse another --out, or delete that folder to run this config")
        todo.append(t)
    return todo


def on_other_teacher(rows: list[dict], teacher: dict) -> list[dict]:
    """The rows that recorded a teacher other than ``teacher`` (rows that predate the field are not judged).

    Why: the teacher's key is its recipe's hash, not its weights, and seeded training is not bit-for-bit the same
    on another machine (``full``'s teacher came out at 91.52, 91.26 and 91.66 % on three of them). A suite that
    resumed on a retrained teacher would rank families that ran on different teachers."""
    want = (teacher.get("key"), teacher.get("test_top1"))
    return [r for r in rows if r.get("teacher") and (r["teacher"].get("key"), r["teacher"].get("test_top1")) != want]


def teacher_conflicts(recorded: list[dict], regime: str, suite: str, draw: int, teacher: dict) -> list[dict]:
    """Records of ``regime`` (same suite, same noise draw) that ran on another teacher than ``teacher``."""
    return on_other_teacher([r for r in recorded if r.get("regime") == regime and r.get("suite", "regimes") == suite
                             and r.get("noise_draw", 0) == draw], teacher)


def teacher_conflict_error(other: list[dict], what: str, teacher: dict, cache_dir: str) -> str | None:
    """What to tell the user when records of ``what`` ran on another teacher (``other``); None when none did."""
    if not other:
        return None
    seen = sorted({f"{r['teacher'].get('key')} at {r['teacher'].get('test_top1')} %" for r in other})
    return (f"{len(other)} recorded run(s) of {what} ran on teacher {', '.join(seen)}; the teacher here is "
            f"{teacher.get('key')} at {teacher.get('test_top1')} % (retrained on another machine?). Mixing them would "
            f"compare runs on different teachers: put the records' teacher in {Path(cache_dir) / 'teachers'} in place "
            f"of this one (the teachers in {KEPT_TEACHERS} are copied there only where the cache has none), or drop "
            f"those records (python benchmarks/records.py drop ... --reason ...) and re-run them")


def restore_kept_teachers(cache_dir: str, kept: Path = KEPT_TEACHERS, log=print) -> list[str]:
    """Copy the teachers kept in the repository into ``cache_dir`` where it has none of that name, so a suite
    resumes on the teacher its records ran on (``teacher_conflicts``) instead of training another. Each copy is
    atomic (a copy cut short never looks like a cached teacher)."""
    from lkd_ray.storage import atomic_write_bytes

    dest = Path(cache_dir) / "teachers"
    restored = []
    for src in sorted(kept.glob("*.pt")):
        meta = src.with_suffix(".json")
        if not meta.is_file() or (dest / src.name).is_file():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for f in (src, meta):  # weights first: the cache counts a teacher as present only with its .json
            atomic_write_bytes(dest / f.name, f.read_bytes())
        restored.append(src.name)
        log(f"teacher {src.stem}: restored from {src} into {dest} (the teacher the records ran on)")
    return restored


def _stored_config(sha: str, store_path: Path = records.CONFIGS) -> dict:
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    return store.get(sha, {})


def prepare(regime: str, cache_dir: str, suite: str = "regimes", noise_draw: int = 0) -> dict:
    """The regime's teacher (trained once, cached) and its output cache, before parallel runs read them."""
    from lkd_ray.data import build_data
    from lkd_ray.train.run import build_run
    from lkd_ray.train.teacher import prepare_teacher

    import torch

    # One thread, whoever calls: seeded training is reproducible only at a fixed thread count, and the regimes'
    # teachers were trained single-threaded (a 2-thread noisy-pair30 teacher came out at 89.07 %, not 89.30 %).
    torch.set_num_threads(1)
    cfg = build_cfg(regime, {"loss": {"method": "kd"}}, [], 0, "prepare", cache_dir, suite, noise_draw)
    data = build_data(cfg.data, 0, cache_dir=cache_dir)
    teacher, info = prepare_teacher(cfg, data)
    build_run(cfg, data=data, teacher=teacher, teacher_info=info, log=print)  # builds the teacher-output cache once
    return info


def report(results: Path, file: str = RECORDS) -> None:
    recs = json.loads((results / file).read_text()) if (results / file).is_file() else []
    for regime in REGIMES:
        rs = [r for r in recs if r["regime"] == regime]
        if rs:
            best = best_tuned(rs)
            print(f"\n## {regime}\n" + table(rs) + (f"\n\nagainst the best tuned hand-crafted loss ({best}):\n" + table(rs, best)
                                                   if best else ""))


def parser() -> argparse.ArgumentParser:  # its own function: benchmarks/replan.py parses recorded commands with it
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regime", choices=list(REGIMES), default="full")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", help=f"{', '.join(BASE_METHODS)} or <family>-tuned")
    ap.add_argument("--tune", nargs="+", metavar="FAMILY", help=f"run a family's tuning grid on --tune-seed: {', '.join(TUNED)}")
    ap.add_argument("--tune-seed", type=int, default=TUNE_SEED)
    ap.add_argument("--suite", choices=["regimes", "field"], default="regimes",
                    help="field: the noisy-label field's rules too, picks on a clean selection split (issue 25)")
    ap.add_argument("--noise-draws", type=int, nargs="+", default=[0],
                    help="field finals: label-noise draws (0: the regime's own; others: data.noise_seed, own teacher)")
    ap.add_argument("--variant", help="an LKD setting given by --set (records: method lkd-NAME)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with --threads torch threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--other-jobs", type=int, default=0,
                    help="heavy jobs outside this command running on the machine meanwhile (the records count them)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "accuracy_regimes"), help="folder for the per-run outputs")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "lkd_ray"), help="teachers and teacher-output caches")
    ap.add_argument("--results", default=str(RESULTS), help="where the records go (default benchmarks/results)")
    ap.add_argument("--report", action="store_true", help="print the tables from the records; run nothing")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    results = Path(args.results)
    if args.report:
        report(results)
        return 0
    if not (args.tune or args.methods or args.variant):
        ap.error("give --methods, --tune or --variant")
    tuning_file = FIELD_TUNING if args.suite == "field" else TUNING
    tuning = json.loads((results / tuning_file).read_text()) if (results / tuning_file).is_file() else []
    try:
        tasks, target = plan(args, tuning)
        recorded = json.loads((results / target).read_text()) if (results / target).is_file() else []
        todo = check_against(tasks, recorded, results / "configs.json")
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(tasks)} runs asked, {len(tasks) - len(todo)} already recorded, {len(todo)} to run "
          f"({args.jobs} at a time) → {results / target}", flush=True)
    if not todo:
        return 0
    records.keep_configs([t["config"] for t in todo], results / "configs.json")
    teachers = {}
    restore_kept_teachers(args.cache_dir)
    for draw in sorted({t.get("noise_draw", 0) for t in todo}):  # one teacher per noise draw, before runs read it
        info = prepare(args.regime, args.cache_dir, args.suite, draw)
        teachers[draw] = {"key": info.get("key"), "test_top1": info.get("test_top1")}
        print(f"teacher {info.get('key')} (noise draw {draw}): test top-1 {info.get('test_top1')}", flush=True)
        err = teacher_conflict_error(teacher_conflicts(tuning + recorded, args.regime, args.suite, draw, teachers[draw]),
                                     f"{args.regime} ({args.suite} suite, noise draw {draw})", teachers[draw], args.cache_dir)
        if err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    prov = {**records.provenance(jobs_beside=min(args.jobs, len(todo)) - 1 + args.other_jobs), "threads": args.threads}
    for t in todo:
        t["provenance"] = {**prov, "teacher": teachers[t.get("noise_draw", 0)]}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futs = {pool.submit(run_one, t): t for t in todo}
        for i, f in enumerate(as_completed(futs), 1):
            r = f.result()
            records.append(results / target, [r])  # one at a time: an interrupted benchmark keeps what finished
            print(f"[{i}/{len(todo)} {time.perf_counter() - t0:.0f}s] {r['method']:>28} seed {r['seed']}: "
                  f"test {r['test_top1']:.2f}  quiz {r['quiz_top1']:.2f}  ({r['wall_s']:.0f}s)", flush=True)
    if target == RECORDS:
        report(results)
    elif target == FIELD_RECORDS:
        report(results, FIELD_RECORDS)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
