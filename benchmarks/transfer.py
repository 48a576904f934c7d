"""Do presets travel? Every preset, unchanged (no re-tuning), on data it was not tuned on, beside the best
hand-crafted rule of its source regime, also transferred unchanged (issue 25, item 5).

Settings (Fashion-MNIST, teacher trained on each setting's own given labels, a clean quiz of 20 per class; every
noisy setting has 8,000 training images — 6.75× fewer than the regimes — so each also tests the schedule's size):

* ``subset8k``   a seeded 8,000-image subset of the preset's own regime (same noise kind and rate)
* ``pair20`` / ``pair45``   pair-flip noise at 20 % / 45 %
* ``confusion30``   30 % of every look-alike class mistaken for its look-alike (``data.noise_kind=confusion``:
                    T-shirt/top ↔ shirt, pullover ↔ coat, sandal → sneaker → ankle boot)
* ``pair30-54k``   the other way in size: the whole 54,000-image training split with 30 % pair-flip (the
                   ``noisy-pair30`` regime's data and teacher; for a preset tuned on 8,000 images, 6.75× more)
* ``scarce50`` / ``scarce300``   for a preset of the ``scarce`` regime (clean labels, few of them): the scarce
                 regime's recipe (batch 32, 40 epochs, a teacher trained on the whole clean split, a 20-per-class
                 quiz) with 50 or 300 labelled images per class instead of its 100 — half and three times its data
* ``userfile``   a user's own labels: ``data.noisy_labels`` (a CIFAR-N style ``.pt`` dict written here, seeded:
                 25 % of the images relabelled by a random row-stochastic confusion matrix, neither uniform nor a
                 pair map) and ``data.trusted`` (20 clean images per class, which become the quiz)

Records go to ``benchmarks/results/accuracy_transfer.json``, one per run: ``{setting, source_regime, method, role:
"preset" | "rule", seed, test_top1, quiz_top1, meta_steps, config_sha, command, commit, …}``::

    python benchmarks/transfer.py --preset noisy-pair30 --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402
import records  # noqa: E402

RECORDS = "accuracy_transfer.json"
SIZE = 8000
SETTINGS = ("subset8k", "pair20", "pair45", "confusion30", "userfile", "pair30-54k", "scarce50", "scarce300")
SCARCE = {"scarce50": 50, "scarce300": 300}  # labelled images per class, in the scarce regime's recipe
USER_NOISE, USER_SEED = 0.25, 2025


def user_label_files(folder: Path, clean, num_classes: int = 10, write: bool = True) -> tuple[str, str]:
    """The user's label file and trusted file (``lkd_ray.data.label_files.write_example_labels``, seeded: 25 % of
    the labels redrawn from a peaked confusion matrix, 20 clean images per class trusted), as checkout-relative
    paths."""
    from lkd_ray.data.label_files import write_example_labels

    labels, trusted = write_example_labels(folder, clean, num_classes, USER_NOISE, 20, USER_SEED, write)
    return _rel(Path(labels)), _rel(Path(trusted))


def _rel(path: Path) -> str:
    """Inside the checkout: relative to its root (commands run from there), so a config names the same file on
    every machine."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def setting_sections(setting: str, source_regime: str, files: tuple[str, str] | None = None) -> dict:
    """The config sections of a transfer setting (the preset and the rule then set the loss): the 8,000-image noisy
    settings train 12 epochs with the recipe's batch; the scarce ones take the scarce regime's whole recipe."""
    if setting in SCARCE:
        regime = accuracy.REGIMES["scarce"]
        return {**{k: dict(v) for k, v in regime.items()},
                "data": {**regime["data"], "labels_per_class": SCARCE[setting]}}
    return {"optim": {"epochs": 12}, "data": setting_data(setting, source_regime, files)}


def setting_data(setting: str, source_regime: str, files: tuple[str, str] | None = None) -> dict:
    """The data section of a noisy transfer setting."""
    base = {"train_subset": SIZE, "quiz_per_class": 20}
    if setting == "subset8k":
        src = dict(accuracy.REGIMES[source_regime].get("data", {}))
        src.pop("labels_per_class", None)  # scarce's subset is its own size; the 8,000 images are the point here
        return {**src, **base}
    if setting in ("pair20", "pair45"):
        return {**base, "label_noise": int(setting[4:]) / 100, "noise_kind": "pairflip"}
    if setting == "confusion30":
        return {**base, "label_noise": 0.3, "noise_kind": "confusion"}
    if setting == "pair30-54k":
        return dict(accuracy.REGIMES["noisy-pair30"]["data"])
    if setting == "userfile":
        if files is None:
            raise ValueError("the userfile setting needs its label files (user_label_files)")
        return {"train_subset": SIZE, "noisy_labels": files[0], "trusted": files[1]}
    raise ValueError(f"unknown transfer setting {setting!r}; valid: {', '.join(SETTINGS)}")


def field_tuned(regime: str, tuning: list[dict]) -> bool:
    """Whether every trial of every hand-crafted family of the regime's field suite (its bases, the KD-side
    families and each rule on the tuned bases) is recorded."""
    return any(r["regime"] == regime for r in tuning) and not accuracy.field_untuned(regime, tuning)


FIELD_BEST = "rule-best"  # --rule rule-best: the field suite's best hand-crafted loss of the source regime


def rule_of(source_regime: str, results: Path, field: bool = False) -> tuple[str, dict]:
    """The best hand-crafted loss of the source regime, as its records pick it. A recorded command must build the
    same runs whatever was recorded after it, so the suite is part of the command: ``field`` (``--rule rule-best``)
    takes the field suite's ``rule-best`` and needs every hand-crafted family of that suite recorded; without it, the
    regimes benchmark's best tuned row by quiz — except for a regime only the field suite measures, whose rule can
    only be the field suite's (it is then taken once that suite is tuned whole, and refused before)."""
    tuning = json.loads((results / accuracy.FIELD_TUNING).read_text()) if (results / accuracy.FIELD_TUNING).is_file() else []
    if field or source_regime in accuracy.FIELD_ONLY:
        if not field_tuned(source_regime, tuning):
            untuned = accuracy.field_untuned(source_regime, tuning) or {"(every family)": "0 of ?"}
            raise accuracy.BenchmarkError(
                f"the best rule of {source_regime}'s field suite is not picked yet: not tuned whole: "
                f"{', '.join(f'{f} {n}' for f, n in untuned.items())}; run its `benchmarks/accuracy.py --regime "
                f"{source_regime} --suite field --tune …` stages first")
        trial, best = accuracy._trial_of(source_regime, "rule-best", tuning, "field")
        return f"{best['family']}[{trial.name}]", trial.sections
    recs = [r for r in json.loads((results / accuracy.RECORDS).read_text()) if r["regime"] == source_regime]
    best = accuracy.best_tuned(recs)
    tuning = json.loads((results / accuracy.TUNING).read_text())
    family = best[:-len("-tuned")]
    pick = accuracy.tuning_pick(tuning, source_regime, family)
    trial = next(t for t in accuracy.family_trials(source_regime, family, tuning) if t.name == pick["trial"])
    return f"{family}[{trial.name}]", trial.sections


def named_rule(label: str, source_regime: str, results: Path) -> tuple[str, dict]:
    """A field rule by its trial label, ``family[setting,base=kd|dist]``, on the source regime's tuned KD and DIST
    (the regimes benchmark's picks): a hand-crafted rule transferred beside the preset before the field suite has
    picked the regime's best one (``--rule``)."""
    from lkd_ray.search_spaces import HANDCRAFTED, RULE_GRIDS, rule_trials

    family, _, name = label.partition("[")
    if family not in RULE_GRIDS or not name.endswith("]"):
        raise accuracy.BenchmarkError(f"--rule takes FAMILY[SETTING] of a field rule ({', '.join(RULE_GRIDS)}), "
                                      f"e.g. agree[rule=agree,base=dist]; got {label!r}")
    tuning = json.loads((results / accuracy.TUNING).read_text())
    bases = {on: next(t for t in HANDCRAFTED[on] if t.name == accuracy.tuning_pick(tuning, source_regime, on)["trial"])
             for on in ("kd", "dist")}
    trial = next((t for t in rule_trials(family, bases) if t.name == name[:-1]), None)
    if trial is None:
        raise accuracy.BenchmarkError(f"--rule {label!r}: no such setting; valid: "
                                      f"{', '.join(t.name for t in rule_trials(family, bases))}")
    return f"{family}[{trial.name}]", trial.sections


def plan(args) -> list[dict]:
    from lkd_ray.config import PRESETS, build_config
    from lkd_ray.data import load_fashion_mnist

    candidate = None  # REGIME:METHOD — a field row's tuned setting, transferred as a preset before it ships as one
    if ":" in args.preset:
        source, _, method = args.preset.partition(":")
        field = Path(args.results) / accuracy.FIELD_TUNING
        tuning = json.loads(field.read_text()) if field.is_file() else []
        if source not in accuracy.REGIMES or not method.endswith("-tuned"):
            raise accuracy.BenchmarkError(f"--preset {args.preset!r}: give a preset name or REGIME:<family>-tuned")
        candidate = accuracy._trial_of(source, method[:-len("-tuned")], tuning, "field")[0].sections
    elif args.preset not in PRESETS:
        raise accuracy.BenchmarkError(f"unknown preset {args.preset!r}; valid: {', '.join(PRESETS)} or REGIME:METHOD")
    else:
        source = PRESETS[args.preset]["source"]["regime"]
    rule = getattr(args, "rule", None)
    rule_name, rule_sections = (named_rule(rule, source, Path(args.results)) if rule and rule != FIELD_BEST
                                else rule_of(source, Path(args.results), field=rule == FIELD_BEST))
    files = None
    if "userfile" in args.settings:
        clean = load_fashion_mnist(None, args.cache_dir)["train"][1]
        files = user_label_files(Path(args.out) / "files", clean, write=not getattr(args, "plan_only", False))
    tasks = []
    for setting in args.settings:
        sections_of_setting = setting_sections(setting, source, files)
        for seed in args.seeds:
            roles = ([("preset", f"preset:{args.preset}", candidate or {}, None if candidate else args.preset)]
                     if not getattr(args, "rule_only", False) else [])
            rule_role = [] if getattr(args, "preset_only", False) else [("rule", rule_name, rule_sections, None)]
            for role, method, sections, preset in roles + rule_role:
                named = role == "rule" and getattr(args, "rule", None)  # a named rule's runs get folders of their own
                slug = "".join(c if c.isalnum() else "-" for c in args.rule).strip("-") if named else ""
                name = f"{setting}-{args.preset.replace(':', '-')}-{role}{'-' + slug if slug else ''}-s{seed}"
                merged = accuracy.merge(accuracy.COMMON, sections_of_setting, sections,
                                        {"run": {"seed": seed, "name": name, "progress": False, "cache_dir": args.cache_dir}})
                cfg = build_config("fashion_mnist", preset=preset, **merged)
                tasks.append({"regime": setting, "setting": setting, "source_regime": source, "method": method,
                              "role": role, "preset": args.preset, "seed": seed, "out": str(Path(args.out) / name),
                              "config": cfg.to_dict(), "threads": args.threads})
    return tasks


def prepare(config: dict) -> dict:
    """The setting's teacher, trained on its own given labels (seed 0, as every run uses), and its output cache."""
    from lkd_ray.config import Config
    from lkd_ray.data import build_data
    from lkd_ray.train.run import build_run
    from lkd_ray.train.teacher import prepare_teacher

    import torch

    torch.set_num_threads(1)  # seeded teachers are reproducible at one fixed thread count (accuracy.prepare)
    cfg = Config.model_validate(config)
    cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"method": "kd", "ce_rule": "plain"}),
                                 "run": cfg.run.model_copy(update={"seed": 0})})
    data = build_data(cfg.data, 0, cache_dir=cfg.run.cache_dir)
    teacher, info = prepare_teacher(cfg, data)
    build_run(cfg, data=data, teacher=teacher, teacher_info=info, log=lambda *_: None)
    return info


def parser() -> argparse.ArgumentParser:  # its own function: benchmarks/replan.py parses recorded commands with it
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", required=True)
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rule", help="the rule transferred beside the preset: rule-best (the source regime's field-suite "
                    "pick over every hand-crafted family), or a field rule FAMILY[SETTING] on the source regime's tuned KD "
                    "and DIST; default: the source regime's best tuned row of the regimes benchmark (the field suite's "
                    "pick for a regime only it measures)")
    ap.add_argument("--rule-only", action="store_true", help="run the rule rows only (the preset's are recorded)")
    ap.add_argument("--preset-only", action="store_true", help="run the preset rows only (the rule's are recorded)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--other-jobs", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "transfer"))
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "lkd_ray"))
    ap.add_argument("--results", default=str(accuracy.RESULTS))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    results = Path(args.results)
    try:
        tasks = plan(args)
        recorded = json.loads((results / RECORDS).read_text()) if (results / RECORDS).is_file() else []
        for t in tasks:  # the records are keyed by setting and role, not by regime and method alone
            t["method"] = f"{t['role']}|{t['preset']}|{t['method']}"
        todo = accuracy.check_against(tasks, recorded, results / "configs.json")
    except (accuracy.BenchmarkError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(tasks)} runs asked, {len(tasks) - len(todo)} already recorded, {len(todo)} to run → {results / RECORDS}",
          flush=True)
    if not todo:
        return 0
    records.keep_configs([t["config"] for t in todo], results / "configs.json")
    teachers = {}
    for setting in dict.fromkeys(t["setting"] for t in todo):  # each setting's teacher (and its output cache) once
        info = prepare(next(t["config"] for t in todo if t["setting"] == setting))
        teachers[setting] = {"key": info.get("key"), "test_top1": info.get("test_top1")}
        print(f"{setting}: teacher {info.get('key')} test top-1 {info.get('test_top1')}", flush=True)
        # a setting's preset and rule rows are compared pairwise: they must share its teacher (accuracy.on_other_teacher)
        err = accuracy.teacher_conflict_error(
            accuracy.on_other_teacher([r for r in recorded if r.get("setting") == setting], teachers[setting]),
            f"transfer setting {setting}", teachers[setting], args.cache_dir)
        if err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    prov = {**records.provenance(jobs_beside=min(args.jobs, len(todo)) - 1 + args.other_jobs), "threads": args.threads}
    for t in todo:
        t["provenance"] = {**prov, "teacher": teachers[t["setting"]]}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futs = [pool.submit(accuracy.run_one, t) for t in todo]
        for i, f in enumerate(as_completed(futs), 1):
            r = f.result()
            for k in ("setting", "source_regime", "role", "preset"):
                r[k] = next(t[k] for t in todo if t["method"] == r["method"] and t["seed"] == r["seed"] and t["regime"] == r["regime"])
            records.append(results / RECORDS, [r])
            print(f"[{i}/{len(todo)} {time.perf_counter() - t0:.0f}s] {r['regime']:>12} {r['method']:>40} seed {r['seed']}: "
                  f"test {r['test_top1']:.2f}  quiz {r['quiz_top1']:.2f}  meta-steps {r.get('meta_steps')}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
