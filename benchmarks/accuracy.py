"""Test top-1 of every distillation method on real data (Fashion-MNIST), several seeds, one recipe.

One cached teacher (trained once with this project, seed 0), the offline recipe's small CNN student,
the same seeds for every method. Each (method, seed) run is the single-process trainer and writes its
own folder (metrics.jsonl, TensorBoard, result.json and, for LKD, the loss-network versions) under
``--out``; a finished run is reused, so an interrupted benchmark resumes where it stopped.

    .venv/bin/python benchmarks/accuracy.py [--seeds 0 1 2 3 4] [--jobs 2] [--epochs 4]

Writes ``benchmarks/results/accuracy.json``: a list of records {method, seed, test_top1, wall_s,
epochs, quiz_top1, curve}, where ``curve`` holds quiz and test top-1 per epoch (the training-curve
figure reads it). ``--variant NAME --set a.b=v`` runs an extra LKD setting on top of LKD full at meta_every=10
(the quiz-split ablations);
its records carry ``method = "lkd-NAME"``. Summaries go to ``accuracy_summary.json``.
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

# method label → config sections on top of the fashion_mnist recipe
METHODS: dict[str, dict] = {
    "ce": {"loss": {"method": "ce"}},
    "kd": {"loss": {"method": "kd"}},
    "dkd": {"loss": {"method": "dkd"}},
    "dist": {"loss": {"method": "dist"}},
    # The LKD rows pin meta_every=10 (the default when they were run); the shipped default,
    # meta_every=40, is the variant "me40" (BENCHMARKS.md, "Choosing the defaults").
    "lkd-full": {"loss": {"method": "lkd"}, "meta": {"scope": "full", "meta_every": 10}},
    "lkd-head": {"loss": {"method": "lkd"}, "meta": {"scope": "head", "meta_every": 10}},
}


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


def run_one(method: str, sections: dict, overrides: list[str], seed: int, epochs: int, out_root: str, threads: int) -> dict:
    """One training run in a fresh process; returns its record (or reads it back if already done)."""
    import torch

    from lkd_ray.config import build_config
    from lkd_ray.data import build_data
    from lkd_ray.train import Trainer
    from lkd_ray.train.teacher import prepare_teacher

    out = Path(out_root) / f"{method}-s{seed}"
    result_path = out / "result.json"
    if not result_path.is_file():
        torch.set_num_threads(threads)
        cfg = build_config("fashion_mnist", overrides=overrides,
                           **_merge(sections, {"optim": {"epochs": epochs}, "run": {"seed": seed, "name": f"{method}-s{seed}", "progress": False}}))
        data = build_data(cfg.data, seed, cache_dir=cfg.run.cache_dir)
        teacher = None
        if cfg.loss.method != "ce":
            tcfg = cfg.model_copy(deep=True)
            tcfg.run.seed = 0  # one teacher for every run
            teacher, _ = prepare_teacher(tcfg, data, log=lambda *_: None)
        if out.exists():  # a run that died half-way: start it again from scratch
            shutil.rmtree(out)
        Trainer(cfg, teacher, data, out_dir=out).fit()
    res = json.loads(result_path.read_text())
    curve = [{"epoch": h["epoch"], "quiz_top1": h["quiz_top1"], "test_top1": h["test_top1"]} for h in res["history"]]
    return {"method": method, "seed": seed, "test_top1": res["test_top1"], "wall_s": res["wall_s"], "epochs": res["epochs"],
            "quiz_top1": res["quiz_top1"], "meta_s": res["meta_s"], "curve": curve}


def paired(records: list[dict], method: str, ref: str, key: str = "test_top1") -> dict | None:
    """Mean paired difference (method − ref over shared seeds) and its standard error."""
    a = {r["seed"]: r[key] for r in records if r["method"] == method}
    b = {r["seed"]: r[key] for r in records if r["method"] == ref}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    return {"mean": statistics.mean(d), "se": statistics.stdev(d) / math.sqrt(len(d)), "n": len(d)}


def summarise(records: list[dict]) -> list[dict]:
    rows = []
    methods = list(dict.fromkeys(r["method"] for r in records))
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        acc = [r["test_top1"] for r in rs]
        quiz = [r["quiz_top1"] for r in rs]
        rows.append({"method": m, "n": len(rs), "test_mean": statistics.mean(acc),
                     "test_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "quiz_mean": statistics.mean(quiz), "wall_s_median": statistics.median(r["wall_s"] for r in rs),
                     "vs_kd": paired(records, m, "kd") if m != "kd" else None,
                     "vs_kd_quiz": paired(records, m, "kd", "quiz_top1") if m != "kd" else None})
    return rows


def table(rows: list[dict], teacher: dict) -> str:
    kd_wall = next((r["wall_s_median"] for r in rows if r["method"] == "kd"), None)
    lines = [f"teacher cnn_teacher: test top-1 {teacher.get('test_top1', float('nan')):.2f}%",
             "| method | seeds | test top-1 (mean ± std) | Δ vs KD (paired, ± SE) | quiz top-1 | Δ quiz vs KD | wall s (median) | wall / KD |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda d: f"{d['mean']:+.2f} ± {d['se']:.2f}" if d else "—"  # noqa: E731
    for r in rows:
        ratio = f"{r['wall_s_median'] / kd_wall:.2f}" if kd_wall else "—"
        lines.append(f"| {r['method']} | {r['n']} | {r['test_mean']:.2f} ± {r['test_std']:.2f} | {fmt(r['vs_kd'])} | "
                     f"{r['quiz_mean']:.2f} | {fmt(r['vs_kd_quiz'])} | {r['wall_s_median']:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--epochs", type=int, default=4, help="epochs for every method (the recipe's 4 by default)")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel (each with --threads torch threads)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "runs" / "accuracy"), help="folder for the per-run outputs")
    ap.add_argument("--variant", help="name of an extra LKD setting given by --set (records: method lkd-NAME)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--report", action="store_true", help="print the table from the existing results file; run nothing")
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "accuracy.json"))
    args = ap.parse_args()

    from _util import machine

    results_path = Path(args.results)
    if args.report:
        summary = json.loads((results_path.parent / "accuracy_summary.json").read_text())
        print(table(summarise(json.loads(results_path.read_text())), summary["teacher"]))
        return

    from lkd_ray.config import build_config
    from lkd_ray.data import build_data
    from lkd_ray.train.teacher import prepare_teacher

    jobs: list[tuple[str, dict, list[str]]] = []
    if args.variant:
        if not args.overrides:
            ap.error("--variant needs the setting it names, given with --set")
        jobs.append((f"lkd-{args.variant}", {"loss": {"method": "lkd"}, "meta": {"meta_every": 10}}, args.overrides))
    else:
        jobs += [(m, METHODS[m], []) for m in args.methods]
    for _, sections, overrides in jobs:  # validate every config before any work
        build_config("fashion_mnist", overrides=overrides, **sections)

    base = build_config("fashion_mnist", run={"seed": 0})
    data = build_data(base.data, 0, cache_dir=base.run.cache_dir)
    _, teacher = prepare_teacher(base, data)  # trained once (about 4 min here) and cached
    del data

    old = json.loads(results_path.read_text()) if results_path.is_file() else []
    names = {m for m, _, _ in jobs}
    keep = [r for r in old if not (r["method"] in names and r["seed"] in args.seeds)]
    records: list[dict] = []
    tasks = [(m, s, o, seed) for seed in args.seeds for m, s, o in jobs]  # seed-major: partial results stay balanced
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futs = {pool.submit(run_one, m, s, o, seed, args.epochs, args.out, args.threads): (m, seed) for m, s, o, seed in tasks}
        for i, f in enumerate(as_completed(futs), 1):
            r = f.result()
            records.append(r)
            print(f"[{i}/{len(tasks)} {time.perf_counter() - t0:.0f}s] {r['method']:>10} seed {r['seed']}: "
                  f"test {r['test_top1']:.2f}  quiz {r['quiz_top1']:.2f}  ({r['wall_s']:.0f}s)", flush=True)
    order = {m: i for i, m in enumerate(list(METHODS) + sorted(names))}
    allrec = sorted(keep + records, key=lambda r: (order.get(r["method"], 99), r["method"], r["seed"]))
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(allrec, indent=1) + "\n")
    rows = summarise(allrec)
    summary_path = results_path.parent / "accuracy_summary.json"
    prev = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    commands = list(dict.fromkeys(prev.get("commands", [prev["command"]] if "command" in prev else []) + [" ".join(["python", *sys.argv])]))
    summary = {"machine": machine(), "commands": commands, "teacher": teacher,
               "recipe": "fashion_mnist (cnn_teacher -> cnn_student)", "jobs_in_parallel": args.jobs,
               "threads_per_job": args.threads, "rows": rows}
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    for m, _, _ in jobs:  # the loss-network versions of the first seed: what `python -m lkd_ray plot` draws
        src = Path(args.out) / f"{m}-s{args.seeds[0]}" / "lossnet"
        if m.startswith("lkd") and src.is_dir():
            dst = results_path.parent / "lossnet" / m
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst / "lossnet")
            shutil.copy2(src.parent / "result.json", dst / "result.json")  # the run's config, for versions without one
    print(table(rows, teacher))


if __name__ == "__main__":
    main()
