"""``python -m lkd_ray auto``: tune every family of ``search_spaces`` on the user's data with Ray Tune and ship the
pick — on the quiz, or on the clean selection split when the config sets one (what ``benchmarks/accuracy.py --tune``
does for the benchmark, as one resumable command).

The driver checks the input, prepares the teacher once (and its output cache), stores the teacher's weights at
``<storage>/<name>/teacher.pt`` so every trial on any node loads the same one, then runs stage 1 (every hand-crafted
family), stage 2 (every field rule on the tuned KD and DIST) and stage 3 (every learned family, and rule-weights, on
its base's pick) as Tune grids: one function trial per setting, each a single-process run with its own CPU/GPU share, ``--max-concurrent`` at a time. A trial that finishes writes its
result to ``<storage>/<name>/trials/<label>-<config sha>.json`` before it returns; a re-run with the same ``--name``
reads those and runs only what is missing (a trial killed half-way runs again from its start).
"""
from __future__ import annotations

import functools
import io
import os
import sys
import time
from typing import Any

from .. import auto_plan as plan
from .. import auto_report as report
from ..errors import one_line
from ..errors import report as report_error
from pydantic import ValidationError

from ..config import Config, _explain, build_config, with_absolute_paths
from ..search_spaces import Trial
from ..storage import StorageError, open_storage, safe_key

SELECT_METRICS = ("select_top1", "select_loss", "select_loss_cal")  # a trial's selection-split metrics, when it has one


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


# --------------------------------------------------------------------------- one trial (a Tune function trainable)
def per_sample_groups(trainer, teacher, max_images: int = 10000) -> dict | None:
    """What a per-sample loss network learned, at the end of training, on (up to ``max_images``) training images
    grouped by whether the teacher's top class agrees with the given label (and, where the data set knows it,
    whether the label was flipped): {output: {group: {n, mean, q10, q50, q90}}}. None for other losses."""
    import torch

    net = getattr(trainer.lossnets, "logit", None) if trainer.lossnets is not None else None
    loader = trainer.data.train
    if net is None or not hasattr(net, "per_sample") or teacher is None or not hasattr(loader, "images"):
        return None
    n = min(len(loader.labels), max_images)
    x, y = loader.images[:n], loader.labels[:n]
    trainer.bundle.eval()
    with torch.no_grad():
        chunks = [(trainer.bundle(x[i:i + 1024].to(trainer.device)).logits.float(),
                   teacher.to(trainer.device)(x[i:i + 1024].to(trainer.device)).float()) for i in range(0, n, 1024)]
        zs, zt = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
        yy = y.to(trainer.device)
        outs = net.per_sample(zs, zt, yy, trainer.student_state())
    trainer.bundle.train()
    agree = (zt.argmax(1) == yy).cpu()
    groups = {"teacher agrees": agree, "teacher disagrees": ~agree}
    regime = trainer.data.regime
    if regime is not None and getattr(regime, "flipped", None) is not None:
        flipped = torch.from_numpy(regime.flipped[loader.ids[:n]])
        if flipped.any():
            groups |= {"label kept": ~flipped, "label flipped": flipped}
    out = {}
    for k, v in outs.items():
        v = v.detach().float().cpu()
        out[k] = {g: {"n": int(m.sum()), **({"mean": float(v[m].mean()), "q10": float(v[m].quantile(0.1)),
                                              "q50": float(v[m].quantile(0.5)), "q90": float(v[m].quantile(0.9))}
                                             if m.any() else {})} for g, m in groups.items()}
    return out


def auto_trial(config: dict, ctx: dict) -> None:
    """One setting: a single-process run on the shared teacher and its output cache; reports every epoch to Tune
    and stores its result before it returns. A result already stored is reported, not re-run."""
    import torch
    from ray import tune

    spec = ctx["trials"][config["label"]]
    store = open_storage(ctx["storage"], ctx["endpoint_url"])
    key = safe_key(ctx["name"], "trials", f"{plan.slug(spec['label'])}-{spec['sha']}.json")
    if store.exists(key):
        res = store.get_json(key)
        tune.report({"epoch": res["epochs"], "quiz_top1": res["quiz_top1"], "quiz_loss": res["quiz_loss"], "resumed": True})
        return
    torch.set_num_threads(max(1, int(ctx["cpus_per_trial"])))
    from ..data import build_data
    from ..losses import METHODS
    from ..models.registry import build_model
    from ..models.teacher import load_weights
    from ..train import build_run
    from ..train.outputs import Callback

    class Report(Callback):
        def on_epoch_end(self, rec) -> None:
            m = rec.metrics
            tune.report({"epoch": rec.epoch, "quiz_top1": m["quiz_top1"], "quiz_loss": m["quiz_loss"],
                         "test_top1": m["test_top1"], **{k: m[k] for k in SELECT_METRICS if k in m}})

    cfg = Config.model_validate(spec["config"])
    t0 = time.perf_counter()
    data = build_data(cfg.data, cfg.run.seed, cache_dir=cfg.run.cache_dir)
    teacher = None
    if METHODS[cfg.loss.method].needs_teacher:
        teacher = build_model(cfg.model.teacher, data.num_classes, data.in_channels)
        load_weights(teacher, store.get_torch(safe_key(ctx["name"], "teacher.pt")), cfg.model.teacher, "search's teacher")
        teacher.eval().requires_grad_(False)
    cache = open_storage(ctx["cache_uri"], ctx["endpoint_url"])
    run = build_run(cfg, data=data, teacher=teacher, teacher_info=dict(ctx["teacher_info"]), cache_storage=cache,
                    log=lambda *_: None)
    res = run.fit(None, callbacks=[Report()], progress=False)
    last = res["history"][-1]
    per_sample = per_sample_groups(res["_trainer"], teacher)
    store.put_json(key, {**{k: spec[k] for k in ("label", "family", "setting", "stage", "sha", "base", "sections")},
                         "quiz_top1": res["quiz_top1"], "quiz_loss": last.get("quiz_loss"), "test_top1": res["test_top1"],
                         **{k: res[k] for k in SELECT_METRICS if k in res},
                         "select_size": len(data.select_eval.labels) if getattr(data, "select_eval", None) is not None
                         and hasattr(data.select_eval, "labels") else None,
                         "epochs": res["epochs"], "budget_epochs": cfg.optim.epochs, "wall_s": time.perf_counter() - t0,
                         "fit_s": res["wall_s"], "meta_s": res.get("meta_s"), "quiz_size": data.quiz_size,
                         "curve": [{"epoch": h["epoch"], "quiz_top1": h["quiz_top1"], "quiz_loss": h.get("quiz_loss"),
                                    "test_top1": h["test_top1"], "train_loss": h.get("train_loss")} for h in res["history"]],
                         **({"per_sample": per_sample} if per_sample else {})})


# --------------------------------------------------------------------------- the driver
class _Progress:
    """One line for the whole search each time a trial starts, finishes or fails; "best so far" is ranked by the
    search's own pick rule (the selection split's when the config sets one, so the line names what would ship)."""

    def __init__(self, total: int, done: list[dict], log, choose=None, split: str = "quiz"):
        self.total, self.done, self.running, self.failed, self.log = total, len(done), 0, 0, log
        self.choose, self.split = choose or plan.search_spaces.pick, split
        self.rows = list(plan.finished(done))
        self.best = self._best()

    def _best(self) -> dict | None:
        if not self.rows:
            return None
        try:
            return self.choose(self.rows)
        except ValueError:  # a row without the split's metrics (an older stored trial): rank on the quiz
            return plan.search_spaces.pick(self.rows)

    def start(self) -> None:
        self.running += 1
        self.show()

    def finish(self, row: dict | None) -> None:
        self.running = max(0, self.running - 1)
        if row is None:
            self.failed += 1
        else:
            self.done += 1
            self.rows.append(row)
            self.best = self._best()
        self.show()

    def skip(self, n: int) -> None:
        self.total -= n

    def show(self) -> None:
        self.log(plan.progress_line(self.total, self.done, self.running, self.failed, self.best, self.split))


def _tune_callback(progress: _Progress, specs: dict[str, dict]):
    from ray.tune import Callback

    class ProgressCallback(Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            progress.start()

        def on_trial_complete(self, iteration, trials, trial, **info):
            r = trial.last_result or {}
            spec = specs[trial.config["label"]]
            progress.finish({"label": spec["label"], "quiz_top1": r["quiz_top1"], "quiz_loss": r.get("quiz_loss"),
                             **{k: r[k] for k in SELECT_METRICS if r.get(k) is not None}}
                            if r.get("quiz_top1") is not None else None)

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.finish(None)

    return ProgressCallback()


def _run_stage(stage: int, trials: list[Trial], ctx: dict, storage, opts: plan.AutoOptions, progress: _Progress,
               time_left: float | None, log) -> dict[str, str]:
    """Run the trials not yet stored as one Tune grid; return {label: error} of those that failed."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter honours verbose=0: our progress line only
    from ray import tune

    specs = {label: s for label, s in ctx["trials"].items() if s["stage"] == stage}
    stored = set(storage.list(safe_key(opts.name, "trials")))
    todo = [t for t in trials if safe_key(opts.name, "trials", f"{plan.slug(t.label)}-{specs[t.label]['sha']}.json")
            not in stored]
    if not todo:
        return {}
    fs, base_path = storage.arrow_fs()
    trainable = tune.with_resources(tune.with_parameters(auto_trial, ctx=ctx),
                                    {"CPU": opts.cpus_per_trial, "GPU": opts.gpus_per_trial})
    tuner = tune.Tuner(
        trainable, param_space={"label": tune.grid_search([t.label for t in todo])},
        tune_config=tune.TuneConfig(max_concurrent_trials=opts.max_concurrent, time_budget_s=time_left),
        run_config=tune.RunConfig(name=f"stage{stage}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}",
                                  storage_path=f"{base_path}/{safe_key(opts.name)}/tune", storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                  callbacks=[_tune_callback(progress, specs)]))
    grid = tuner.fit()
    errors = {}
    for r in grid:
        if r.error is not None:
            errors[r.config["label"]] = _error_line(r.error)
    return errors


def _error_line(e: BaseException) -> str:
    inner = getattr(e, "cause", None) or e
    lines = [ln for ln in str(inner).splitlines() if ln.strip()]
    return f"{type(inner).__name__}: {lines[-1] if lines else ''}"[:300]


def _specs(trials: list[Trial], stage: int, base_cfg: dict, opts: plan.AutoOptions, bases: dict | None = None) -> dict:
    """Each trial's spec (config, identity, stage; ``bases``: {trial label: the label of the pick it sits on})."""
    out = {}
    for t in trials:
        cfg = plan.trial_config(base_cfg, t, opts.epochs, opts.seed)
        cfg["run"]["name"] = safe_key(f"{opts.name}-{plan.slug(t.label)}")[:128]
        try:  # a family whose setting does not fit this config is bad input, found before any trial
            Config.model_validate(cfg)
        except ValidationError as e:
            raise plan.AutoInputError(f"{t.label} does not fit your config ({_explain(e).replace(chr(10), ' ')}): "
                                      f"change the config, or leave {t.family} out of --families") from None
        out[t.label] = {"label": t.label, "family": t.family, "setting": t.name, "stage": stage, "config": cfg,
                        "sha": plan.config_sha(cfg), "sections": t.sections,
                        "base": (bases or {}).get(t.label)}
    return out


def _stored_results(storage, name: str, specs: dict) -> list[dict]:
    """The stored results of this search's trials, in plan order (results of other configs are ignored)."""
    have = set(storage.list(safe_key(name, "trials")))
    out = []
    for s in specs.values():
        key = safe_key(name, "trials", f"{plan.slug(s['label'])}-{s['sha']}.json")
        if key in have:
            out.append(storage.get_json(key))
    return out


def prepare(cfg: Config, storage, name: str, endpoint_url: str | None, log) -> tuple[dict, Any]:
    """Checks on the data and the teacher, then the teacher once (stored for the trials) and its output cache.
    Returns (teacher info, the KD run built on it: for timing)."""
    import torch

    from ..data import build_data
    from ..models.teacher import TeacherLoadError
    from ..train import build_run
    from ..train.teacher import prepare_teacher

    plan.check_labels_source(cfg.data.model_dump())
    data = build_data(cfg.data, cfg.run.seed, cache_dir=cfg.run.cache_dir)
    quiz = data.quiz_eval or data.quiz
    quiz_labels = getattr(quiz, "labels", None)  # streamed data sets hold no label tensor: count what they say
    plan.check_quiz(quiz_labels.numpy() if hasattr(quiz_labels, "numpy") else quiz_labels, data.num_classes, data.quiz_size)
    kd = cfg.model_copy(deep=True)
    kd.loss.method = "kd"
    try:
        teacher, info = prepare_teacher(kd, data, log=log)
    except TeacherLoadError as e:
        raise plan.AutoInputError(f"the teacher does not fit these labels: {e}") from None
    with torch.no_grad():
        out = teacher(torch.zeros(2, data.in_channels, data.image_size, data.image_size)).shape[1]
    train_labels = getattr(data.train, "labels", None)
    max_label = int(train_labels.max()) if train_labels is not None and len(train_labels) else data.num_classes - 1
    plan.check_teacher_classes(out, data.num_classes, max_label, cfg.model.teacher_weights or "trained here")
    buf = io.BytesIO()
    torch.save(teacher.state_dict(), buf)
    storage.put_bytes(safe_key(name, "teacher.pt"), buf.getvalue())
    info = {k: v for k, v in info.items() if k not in ("curve", "recipe")}
    cache = open_storage(_join(storage.uri, safe_key(name), "cache"), endpoint_url)
    run = build_run(kd, data=data, teacher=teacher, teacher_info=info, cache_storage=cache, log=log)
    return info, run


def epoch_seconds(run, steps: int = 10) -> float:
    """A KD epoch's wall time, measured on ``steps`` batches and one evaluation (the budget check's unit)."""
    tr = run.trainer
    it = iter(tr.data.train)
    n = min(steps, len(tr.data.train))
    tr.train_step(next(it))  # warm-up
    t0 = time.perf_counter()
    for _ in range(n - 1):
        tr.train_step(next(it))
    per = (time.perf_counter() - t0) / max(1, n - 1)
    t0 = time.perf_counter()
    tr.evaluate()
    return per * len(tr.data.train) + (time.perf_counter() - t0)


def run_auto(cfg: Config, opts: plan.AutoOptions, log=print) -> dict[str, Any]:
    """The whole search; returns the summary (pick, why, rows, where the outputs are)."""
    from .launch import init_ray

    t_start = time.perf_counter()
    st = plan.resolve_families(opts.families)
    notes = list(st.notes)
    try:
        storage = open_storage(opts.storage, opts.endpoint_url)
        storage.check()
    except StorageError as e:
        raise plan.AutoStorageError(f"storage {opts.storage!r} cannot be used: {e}") from None
    user_cfg = cfg.to_dict()
    cfg = with_absolute_paths(cfg)  # workers and trials run in other working directories
    cfg.run.progress = False
    base = cfg.to_dict()
    s1 = plan.stage1_trials(st.hand, opts.trials)
    specs = _specs(s1, 1, base, opts)
    # the later stages' settings, on placeholder bases, must fit the config too: known before stage 1
    _specs(plan.planned_rule_trials(st.rules, opts.trials), 2, base, opts)
    epochs = opts.epochs or cfg.optim.epochs
    _specs(plan.planned_on_pick_trials(st.on_pick, opts.trials, epochs), 3, base, opts)
    counts = plan.stage_counts(st, opts.trials, epochs)
    for n in notes:
        log(f"[auto] {n}")
    info, kd_run = prepare(cfg, storage, opts.name, opts.endpoint_url, log)
    n_select = cfg.data.select_per_class * kd_run.trainer.data.num_classes if cfg.data.select_per_class else None
    choose = plan.picker(n_select)
    if opts.time_budget_s is not None:
        epoch_s = epoch_seconds(kd_run)  # what is left after the teacher, for the trials
        plan.check_budget(opts.time_budget_s - (time.perf_counter() - t_start), counts, opts.max_concurrent, epochs, epoch_s)
    del kd_run
    budget = {"epochs": epochs, "trials_per_family": opts.trials, "time_budget_s": opts.time_budget_s,
              "max_concurrent": opts.max_concurrent, "cpus_per_trial": opts.cpus_per_trial,
              "gpus_per_trial": opts.gpus_per_trial, "seed": base["run"]["seed"] if opts.seed is None else opts.seed}
    ctx = {"trials": specs, "storage": storage.uri, "endpoint_url": opts.endpoint_url, "name": safe_key(opts.name),
           "cache_uri": _join(storage.uri, safe_key(opts.name), "cache"), "teacher_info": info,
           "cpus_per_trial": opts.cpus_per_trial}
    init_ray()
    done1 = _stored_results(storage, opts.name, specs)
    log(f"[auto] search {opts.name!r}: stage 1 {counts[0]} trials of {', '.join(st.hand)}; stage 2 {counts[1]} trials of "
        f"{', '.join(st.rules) or 'none'}; stage 3 {counts[2]} trials of {', '.join(st.on_pick) or 'none'}; {epochs} "
        f"epochs each, {opts.max_concurrent} at a time; picks on the {plan.pick_split(n_select)['picked_on']} split; "
        f"{len(done1)} already finished")
    progress = _Progress(sum(counts), done1, log, choose, plan.pick_split(n_select)["picked_on"])
    progress.show()
    deadline = t_start + opts.time_budget_s if opts.time_budget_s else None
    errors = _run_stage(1, s1, ctx, storage, opts, progress, None if deadline is None else deadline - time.perf_counter(), log)
    bases: dict[str, str] = {}
    later = ((2, st.rules, plan.stage2_trials), (3, st.on_pick, functools.partial(plan.stage3_trials, epochs=epochs)))
    for stage, fams, build in later:  # each on the picks of the stages before it
        results = _stored_results(storage, opts.name, specs)
        trials, base_of, skipped = build(fams, opts.trials, plan.finished(results), choose)
        notes += skipped
        progress.skip(counts[stage - 1] - len(trials))
        if not trials:
            continue
        for f in dict.fromkeys(t.family for t in trials):  # {family: the pick(s) it sits on}
            on = list(dict.fromkeys(base_of[t.label] for t in trials if t.family == f))
            bases[f] = on[0] if len(on) == 1 else on
        new = _specs(trials, stage, base, opts, base_of)
        ctx["trials"] = specs = {**specs, **new}
        progress.done += len(_stored_results(storage, opts.name, new))
        left = None if deadline is None else deadline - time.perf_counter()
        if left is not None and left <= 0:
            notes.append(f"stage {stage} not run: --time-budget {opts.time_budget_s:.0f} s spent before it")
            continue
        errors |= _run_stage(stage, trials, ctx, storage, opts, progress, left, log)
    results = _stored_results(storage, opts.name, specs)
    have = {r["label"] for r in results}
    for label, s in specs.items():  # failed or cut-off trials are rows too, with their error
        if label not in have:
            results.append({**{k: s[k] for k in ("label", "family", "setting", "stage", "sha", "base", "sections")},
                            "quiz_top1": None, "quiz_loss": None, "wall_s": None, "epochs": None,
                            "budget_epochs": s["config"]["optim"]["epochs"],
                            "error": errors.get(label, "did not run to its end (time budget or interrupted)")})
    order = list(specs)
    results.sort(key=lambda r: order.index(r["label"]))
    plan.add_costs(results)
    if not plan.finished(results):  # nothing to ship: the table of errors is still the answer
        where = _join(storage.uri, safe_key(opts.name))
        report.write_table(storage, safe_key(opts.name), results)
        log(report.trials_table(results))
        raise plan.AutoError(f"no trial of search {opts.name!r} finished, so there is nothing to ship: their errors are "
                             f"in {where}/trials.csv; fix the cause and re-run the same command (it resumes)")
    win, why = plan.pick_with_reason(results, n_select)
    summary = {"name": opts.name, "pick": win["label"], "why": why, "split": plan.pick_split(n_select), "notes": notes,
               "budget": budget, "teacher": info, "stages": {"1": st.hand, "2": st.rules, "3": st.on_pick},
               "stage2_bases": bases, "wall_s": time.perf_counter() - t_start,
               "storage": _join(storage.uri, safe_key(opts.name))}
    outputs = report.write_outputs(storage, safe_key(opts.name), results, win, summary,
                                   plan.best_config_yaml(user_cfg, win, opts.name, why, budget))
    return {**summary, "rows": results, "winner": win, "outputs": outputs}


def main(args) -> int:
    """The command: flags → config → search → console summary; bad input exits 2 (3: storage) before any trial."""
    try:
        opts = plan.options_from_args(args)
        cfg = build_config(args.recipe, args.config, args.overrides, preset=args.preset)
        res = run_auto(cfg, opts)
    except Exception as e:  # noqa: BLE001 - mapped to exit codes in one place (lkd_ray.errors)
        code = plan.exit_code(e)
        if code is None:
            raise
        if report_error(e, getattr(args, "debug", False)) is None:  # a search with nothing to ship: its own line
            print(f"error: {one_line(e)}", file=sys.stderr)
        return code
    print(report.console_summary(res["rows"], res))
    return 0

