"""LKD's wall time over KD's at equal steps, for meta_every × scope × backend, on this machine.

Times ``--steps`` student steps of the single-process trainer on real Fashion-MNIST batches with
the offline recipe's small CNN pair; KD and every LKD setting are measured in interleaved reps so
machine noise hits all of them alike. Every setting keeps the other shipped defaults (snapshots
included: recorded every ``snapshot_every`` steps, drawn with ``p_snapshot``), so ``default`` is
exactly what a user gets. Reports the median ratio and its spread (min–max over reps).

    .venv/bin/python benchmarks/overhead.py [--steps 200] [--reps 5]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

from _util import RESULTS, write  # noqa: E402
from lkd_ray.config import build_config  # noqa: E402
from lkd_ray.data import build_data, cycle  # noqa: E402
from lkd_ray.models import build_model  # noqa: E402
from lkd_ray.train import build_run  # noqa: E402


def time_steps(cfg, teacher, data, steps: int) -> float:
    tr = build_run(cfg, data=data, teacher=teacher, teacher_info={"key": "overhead"}, log=lambda *_: None).trainer
    it = cycle(data.train)
    for _ in range(3):  # warm-up (allocations, first meta-step imports)
        tr.train_step(next(it))
    t = time.perf_counter()
    for _ in range(steps):
        tr.train_step(next(it))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--configs", nargs="+", metavar="NAME",
                    help="measure only these settings (names as in the table, e.g. default); KD is then timed between "
                         "every two settings, and their records replace the same names in overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    base = build_config("fashion_mnist", data={"train_subset": 20000})
    data = build_data(base.data)
    teacher = build_model(base.model.teacher, 10, 1).eval()  # timing only: weights do not change the cost
    grid = [("default", {})] + [(f"meta_every={m},scope={s},backend={b}", {"meta_every": m, "scope": s, "backend": b})
                                for m, s, b in itertools.product([1, 5, 10, 20, 40], ["full", "head"], ["higher", "torch.func"])]
    if args.configs:
        unknown = set(args.configs) - {n for n, _ in grid}
        if unknown:
            ap.error(f"unknown settings {sorted(unknown)}; valid: {', '.join(n for n, _ in grid)}")
        grid = [(n, m) for n, m in grid if n in args.configs]
    kd = base.model_copy(deep=True)
    kd.loss.method = "kd"
    seconds: dict[str, list[float]] = {name: [] for name, _ in grid}
    ratios: dict[str, list[float]] = {name: [] for name, _ in grid}
    kd_all: list[float] = []
    for rep in range(args.reps):
        # Settings run in a different order each rep. Full grid: KD is timed at the start and end of the
        # rep and their mean is every setting's reference. --configs: KD runs between every two settings
        # and each setting is compared with the mean of its two neighbours (drifts cancel better).
        order = random.Random(rep).sample(grid, len(grid))
        kd_prev = time_steps(kd, teacher, data, args.steps)
        kd_all.append(kd_prev)
        pending = []
        for name, meta in order:
            c = base.model_copy(deep=True)
            for k, v in meta.items():
                setattr(c.meta, k, v)
            t = time_steps(c, teacher, data, args.steps)
            seconds[name].append(t)
            if args.configs:
                kd_next = time_steps(kd, teacher, data, args.steps)
                kd_all.append(kd_next)
                ratios[name].append(t / ((kd_prev + kd_next) / 2))
                kd_prev = kd_next
            else:
                pending.append((name, t))
        if not args.configs:
            kd_end = time_steps(kd, teacher, data, args.steps)
            kd_all.append(kd_end)
            ref = (kd_prev + kd_end) / 2
            for name, t in pending:
                ratios[name].append(t / ref)
        print(f"rep {rep}: kd {kd_all[-1]:.2f}s", flush=True)
    d = base.meta
    records = []
    for name, _ in grid:
        r = ratios[name]
        records.append({"config": name, "lkd_over_kd": statistics.median(r), "spread": [min(r), max(r)], "ratios": r,
                        "seconds": seconds[name], "steps": args.steps, "reps": args.reps,
                        "kd_reference": "neighbours" if args.configs else "rep start/end",
                        "command": " ".join(["python", *sys.argv]),
                        **({"meta": {"meta_every": d.meta_every, "scope": d.scope, "backend": d.backend}} if name == "default" else {})})
        print(f"{name:45} {records[-1]['lkd_over_kd']:.2f}x  (per-rep {min(r):.2f}–{max(r):.2f})")
    if args.configs and (RESULTS / "overhead.json").is_file():
        measured = {r["config"] for r in records}
        prev = json.loads((RESULTS / "overhead.json").read_text())
        old = prev.get("records", [])
        for r in old:  # records written before they carried how they were measured
            for k, v in (("steps", prev.get("steps")), ("reps", prev.get("reps")), ("command", prev.get("command")),
                         ("kd_reference", "rep start/end (ratio of medians)")):
                r.setdefault(k, v)
        records = [r for r in old if r["config"] not in measured] + records
        order = {n: i for i, (n, _) in enumerate([("default", {})] + [(f"meta_every={m},scope={s},backend={b}", {})
                 for m, s, b in itertools.product([1, 5, 10, 20, 40], ["full", "head"], ["higher", "torch.func"])])}
        records.sort(key=lambda r: order.get(r["config"], 999))
    write("overhead.json", {"pair": f"{base.model.teacher}->{base.model.student}", "batch_size": base.data.batch_size,
                            "kd_seconds_last_run": kd_all,
                            "default_meta": {"meta_every": d.meta_every, "scope": d.scope, "backend": d.backend},
                            "records": records})


if __name__ == "__main__":
    main()
