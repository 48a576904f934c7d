"""Test top-1 of every distillation method on real data (Fashion-MNIST), paired seeds, one recipe.

Two horizons, the same code path:

* ``--horizon short``: the offline recipe as shipped — cnn_teacher trained 5 epochs, the student 4
  epochs. Records: ``benchmarks/results/accuracy.json``.
* ``--horizon long``: a teacher trained until it stops improving (30 epochs, ≥ 90 % test), the
  student 12 epochs on the full training split. Records: ``benchmarks/results/accuracy_long.json``.

Both use the teacher-output cache with every distinct view (exact: the student sees the live
augmentation's views and the teacher's logits for them, without the teacher's forward pass).
Every (method, seed) is a single-process run in its own folder under ``--out``; finished runs are
reused, so an interrupted benchmark resumes. Records: {method, seed, test_top1, quiz_top1, wall_s,
epochs, curve, …}; ``method`` is ``ce``, ``kd``, ``dkd``, ``dist``, ``control`` (KD with one
meta-learned weight), ``lkd`` (``loss.method=lkd`` with no other override: the shipped default) and
``lkd-<variant>`` for everything else (``--variant NAME --set a.b=v``). ``--reuse RUN_METHOD``
makes a variant start from the loss network learned by RUN_METHOD on ``--learn-seed`` and keep it
frozen (learn on some seeds, reuse on others). Settings are chosen on the quiz split only.

    .venv/bin/python benchmarks/accuracy.py --horizon long                     # ce kd dkd dist control lkd
    .venv/bin/python benchmarks/accuracy.py --horizon long --variant norm --set lossnet.lock=norm
    .venv/bin/python benchmarks/accuracy.py --horizon long --variant es-learn --seeds 100 \\
        --set meta.estimator=es --set meta.es_particles=8
    .venv/bin/python benchmarks/accuracy.py --horizon long --variant es --reuse lkd-es-learn --learn-seed 100
    .venv/bin/python benchmarks/accuracy.py --report
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BASE_METHODS: dict[str, dict] = {m: {"loss": {"method": m}} for m in ("ce", "kd", "dkd", "dist", "control", "lkd")}
HORIZONS: dict[str, dict] = {
    "short": {"optim": {"epochs": 4}, "model": {"teacher_epochs": 5, "teacher_cache": True}},
    "long": {"optim": {"epochs": 12}, "model": {"teacher_epochs": 30, "teacher_cache": True}},
}
RESULTS = Path(__file__).resolve().parent / "results"


def results_path(horizon: str) -> Path:
    return RESULTS / ("accuracy.json" if horizon == "short" else "accuracy_long.json")


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            out.setdefault(k, {}).update(v)
    return out


def build_cfg(method: str, sections: dict, overrides: list[str], horizon: str, seed: int, out_root: str):
    from lkd_ray.config import build_config

    return build_config("fashion_mnist", overrides=overrides,
                        **_merge(HORIZONS[horizon], sections,
                                 {"run": {"seed": seed, "name": f"{method}-s{seed}", "progress": False,
                                          "cache_dir": str(ROOT / ".cache" / "lkd_ray")}}))


def run_one(method: str, sections: dict, overrides: list[str], horizon: str, seed: int, out_root: str, threads: int) -> dict:
    """One training run in a fresh process; returns its record (or reads it back if already done)."""
    import torch

    from lkd_ray.train import build_run
    from lkd_ray.train.teacher import prepare_teacher

    out = Path(out_root) / f"{method}-s{seed}"
    result_path = out / "result.json"
    if not result_path.is_file():
        torch.set_num_threads(threads)
        cfg = build_cfg(method, sections, overrides, horizon, seed, out_root)
        from lkd_ray.data import build_data

        data = build_data(cfg.data, seed, cache_dir=cfg.run.cache_dir)
        teacher, info = None, None
        if cfg.loss.method != "ce":
            tcfg = cfg.model_copy(deep=True)
            tcfg.run.seed = 0  # one teacher for every run
            teacher, info = prepare_teacher(tcfg, data, log=lambda *_: None)
        if out.exists():  # a run that died half-way: start it again from scratch
            shutil.rmtree(out)
        build_run(cfg, data=data, teacher=teacher, teacher_info=info, log=lambda *_: None).fit(out, progress=False)
    res = json.loads(result_path.read_text())
    curve = [{"epoch": h["epoch"], "quiz_top1": h["quiz_top1"], "test_top1": h["test_top1"]} for h in res["history"]]
    rec = {"method": method, "seed": seed, "test_top1": res["test_top1"], "quiz_top1": res["quiz_top1"],
           "wall_s": res["wall_s"], "epochs": res["epochs"], "meta_s": res["meta_s"], "curve": curve,
           "lossnet_version": res.get("lossnet_version")}
    if res.get("particles"):
        rec["particles"] = res["particles"]
    return rec


def paired(records: list[dict], method: str, ref: str, key: str = "test_top1") -> dict | None:
    """Mean paired difference (method − ref over shared seeds) and its standard error."""
    a = {r["seed"]: r[key] for r in records if r["method"] == method}
    b = {r["seed"]: r[key] for r in records if r["method"] == ref}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    return {"mean": statistics.mean(d), "se": statistics.stdev(d) / math.sqrt(len(d)), "n": len(d), "worst": min(d)}


def teacher_cache_accuracy(records: list[dict], horizon: str) -> dict | None:
    """The cache's accuracy side: cached − live teacher, paired by seed, for every method M that has an
    ``M-live`` row (KD, and LKD as it was shipped when the live runs were made)."""
    out = {}
    methods = {r["method"] for r in records}
    for base in sorted(m[:-len("-live")] for m in methods if m.endswith("-live") and m[:-len("-live")] in methods):
        d = paired(records, base, f"{base}-live")
        if d:
            out[base] = {**d, "cached_minus_live": d["mean"]}
    if not out:
        return None
    path = RESULTS / "teacher_cache.json"
    prev = json.loads(path.read_text()) if path.is_file() else {}
    prev["accuracy"] = {"horizon": horizon, "metric": "test top-1, cached minus live teacher, same seed", **out}
    if "kd" in out:
        prev["accuracy_diff_kd"], prev["accuracy_diff_kd_se"] = out["kd"]["mean"], out["kd"]["se"]
    path.write_text(json.dumps(prev, indent=1, default=float) + "\n")
    return prev["accuracy"]


def summarise(records: list[dict]) -> list[dict]:
    rows = []
    for m in list(dict.fromkeys(r["method"] for r in records)):
        rs = [r for r in records if r["method"] == m]
        acc = [r["test_top1"] for r in rs]
        quiz = [r["quiz_top1"] for r in rs]
        rows.append({"method": m, "n": len(rs), "seeds": sorted(r["seed"] for r in rs), "test_mean": statistics.mean(acc),
                     "test_std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "test_worst": min(acc),
                     "quiz_mean": statistics.mean(quiz), "quiz_worst": min(quiz),
                     "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                     "vs_kd": paired(records, m, "kd") if m != "kd" else None,
                     "vs_kd_quiz": paired(records, m, "kd", "quiz_top1") if m != "kd" else None})
    return rows


def table(rows: list[dict], teacher: dict | None) -> str:
    kd_wall = next((r["wall_s_median"] for r in rows if r["method"] == "kd"), None)
    lines = []
    if teacher:
        lines.append(f"teacher cnn_teacher: test top-1 {teacher.get('test_top1', float('nan')):.2f}% "
                     f"({teacher.get('epochs')} epochs)")
    lines += ["| method | seeds | test top-1 (mean ± std) | worst seed | Δ vs KD (paired ± SE) | worst Δ | quiz top-1 | "
              "Δ quiz vs KD | wall s (median) | wall / KD |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda d: f"{d['mean']:+.2f} ± {d['se']:.2f}" if d else "—"  # noqa: E731
    for r in rows:
        ratio = f"{r['wall_s_median'] / kd_wall:.2f}" if kd_wall else "—"
        worst = f"{r['vs_kd']['worst']:+.2f}" if r["vs_kd"] else "—"
        lines.append(f"| {r['method']} | {r['n']} | {r['test_mean']:.2f} ± {r['test_std']:.2f} | {r['test_worst']:.2f} | "
                     f"{fmt(r['vs_kd'])} | {worst} | {r['quiz_mean']:.2f} | {fmt(r['vs_kd_quiz'])} | "
                     f"{r['wall_s_median']:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--horizon", choices=list(HORIZONS), default="long")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=list(BASE_METHODS), choices=list(BASE_METHODS))
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with --threads torch threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="folder for the per-run outputs (default runs/accuracy_<horizon>)")
    ap.add_argument("--variant", help="name of an extra setting given by --set (records: method <base>-NAME)")
    ap.add_argument("--base", default="lkd", choices=["lkd", "control", "kd"], help="the method a --variant changes")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--reuse", metavar="METHOD", help="start the variant from METHOD's learned loss network (frozen)")
    ap.add_argument("--learn-seed", type=int, default=100, help="seed of the --reuse METHOD run to take the loss from")
    ap.add_argument("--report", action="store_true", help="print the tables from the existing results; run nothing")
    args = ap.parse_args()

    from _util import machine

    out_root = args.out or str(ROOT / "runs" / f"accuracy_{args.horizon}")
    path = results_path(args.horizon)
    summary_path = path.with_name(path.stem + "_summary.json")
    if args.report:
        for h in HORIZONS:
            p = results_path(h)
            if p.is_file():
                s = p.with_name(p.stem + "_summary.json")
                teacher = json.loads(s.read_text()).get("teacher") if s.is_file() else None
                recs = json.loads(p.read_text())
                print(f"\n## {h} horizon ({p.name})\n" + table(summarise(recs), teacher))
                tc = teacher_cache_accuracy(recs, h)
                if tc:
                    print("teacher-output cache, cached − live: " + ", ".join(
                        f"{b} {v['mean']:+.2f} ± {v['se']:.2f} (n={v['n']})" for b, v in tc.items() if isinstance(v, dict)))
        return

    from lkd_ray.config import build_config
    from lkd_ray.data import build_data
    from lkd_ray.train.teacher import prepare_teacher

    jobs: list[tuple[str, dict, list[str]]] = []
    if args.variant:
        sections: dict = {"loss": {"method": args.base}}
        if args.reuse:
            src = Path(out_root) / f"{args.reuse}-s{args.learn_seed}"
            if not (src / "result.json").is_file():
                ap.error(f"--reuse {args.reuse}: {src} has not finished; run that variant on --seeds {args.learn_seed} first")
            sections["lossnet"] = {"init_from": str(src), "frozen": True}
            learned = json.loads((src / "result.json").read_text())["config"]
            sections["lossnet"].update({k: learned["lossnet"][k] for k in ("inputs", "hidden", "activation", "base", "lock",
                                                                            "trust", "state_inputs")})
        if not args.overrides and not args.reuse:
            ap.error("--variant needs the setting it names, given with --set (or --reuse)")
        jobs.append((f"{args.base}-{args.variant}", sections, args.overrides))
    else:
        jobs += [(m, BASE_METHODS[m], []) for m in args.methods]
    for name, sections, overrides in jobs:  # validate every config before any work
        build_cfg(name, sections, overrides, args.horizon, 0, out_root)

    base = build_config("fashion_mnist", **_merge(HORIZONS[args.horizon], {"run": {"seed": 0, "cache_dir": str(ROOT / ".cache" / "lkd_ray")}}))
    data = build_data(base.data, 0, cache_dir=base.run.cache_dir)
    _, teacher = prepare_teacher(base, data)  # trained once and cached; every run reads the same teacher
    from lkd_ray.train.run import build_run

    build_run(base.model_copy(update={"loss": base.loss.model_copy(update={"method": "kd"})}), data=data,
              log=print)  # builds the teacher-output cache once, before the parallel runs read it
    del data

    old = json.loads(path.read_text()) if path.is_file() else []
    names = {m for m, _, _ in jobs}
    keep = [r for r in old if not (r["method"] in names and r["seed"] in args.seeds)]
    records: list[dict] = []
    tasks = [(m, s, o, seed) for seed in args.seeds for m, s, o in jobs]  # seed-major: partial results stay balanced
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futs = {pool.submit(run_one, m, s, o, args.horizon, seed, out_root, args.threads): (m, seed) for m, s, o, seed in tasks}
        for i, f in enumerate(as_completed(futs), 1):
            r = f.result()
            records.append(r)
            print(f"[{i}/{len(tasks)} {time.perf_counter() - t0:.0f}s] {r['method']:>14} seed {r['seed']}: "
                  f"test {r['test_top1']:.2f}  quiz {r['quiz_top1']:.2f}  ({r['wall_s']:.0f}s)", flush=True)
    order = {m: i for i, m in enumerate(BASE_METHODS)}
    allrec = sorted(keep + records, key=lambda r: (order.get(r["method"], 99), r["method"], r["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(allrec, indent=1) + "\n")
    rows = summarise(allrec)
    prev = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    cmd = " ".join(["python", *sys.argv])
    summary = {"machine": machine(), "commands": list(dict.fromkeys(prev.get("commands", []) + [cmd])), "teacher": teacher,
               "recipe": f"fashion_mnist (cnn_teacher -> cnn_student), horizon {args.horizon}: {HORIZONS[args.horizon]}",
               "jobs_in_parallel": args.jobs, "threads_per_job": args.threads, "rows": rows}
    summary_path.write_text(json.dumps(summary, indent=1, default=float) + "\n")
    for m, _, _ in jobs:  # the loss-network versions of the first seed: what `python -m lkd_ray plot` draws
        src = Path(out_root) / f"{m}-s{args.seeds[0]}" / "lossnet"
        if m.startswith(("lkd", "control")) and src.is_dir():
            dst = RESULTS / ("lossnet" if args.horizon == "short" else "lossnet_long") / m
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst / "lossnet")
            shutil.copy2(src.parent / "result.json", dst / "result.json")
    print(table(rows, teacher))
    teacher_cache_accuracy(allrec, args.horizon)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
