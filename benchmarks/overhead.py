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
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

from _util import write  # noqa: E402
from lkd_ray.config import build_config  # noqa: E402
from lkd_ray.data import build_data, cycle  # noqa: E402
from lkd_ray.models import build_model  # noqa: E402
from lkd_ray.train import Trainer  # noqa: E402


def time_steps(cfg, teacher, data, steps: int) -> float:
    tr = Trainer(cfg, teacher, data, log=False)
    it = cycle(data.train)
    for _ in range(3):  # warm-up (allocations, first meta-step imports)
        tr.train_step(*next(it))
    t = time.perf_counter()
    for _ in range(steps):
        tr.train_step(*next(it))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    base = build_config("fashion_mnist", data={"train_subset": 20000})
    data = build_data(base.data)
    teacher = build_model(base.model.teacher, 10, 1).eval()  # timing only: weights do not change the cost
    grid = [("default", {})] + [(f"meta_every={m},scope={s},backend={b}", {"meta_every": m, "scope": s, "backend": b})
                                for m, s, b in itertools.product([1, 5, 10, 20], ["full", "head"], ["higher", "torch.func"])]
    times: dict[str, list[float]] = {"kd": []} | {name: [] for name, _ in grid}
    kd = base.model_copy(deep=True)
    kd.loss.method = "kd"
    for rep in range(args.reps):
        # KD is timed at the start and at the end of each rep (its mean is the rep's reference), and the
        # settings run in a different order each rep, so slow drifts of the machine do not favour any of them.
        kd_first = time_steps(kd, teacher, data, args.steps)
        for name, meta in random.Random(rep).sample(grid, len(grid)):
            c = base.model_copy(deep=True)
            for k, v in meta.items():
                setattr(c.meta, k, v)
            times[name].append(time_steps(c, teacher, data, args.steps))
        times["kd"].append((kd_first + time_steps(kd, teacher, data, args.steps)) / 2)
        print(f"rep {rep}: kd {times['kd'][-1]:.2f}s", flush=True)
    kd_med = statistics.median(times["kd"])
    records = []
    for name, _ in grid:
        ratios = [t / k for t, k in zip(times[name], times["kd"])]
        records.append({"config": name, "lkd_over_kd": statistics.median(times[name]) / kd_med,
                        "spread": [min(ratios), max(ratios)], "seconds": times[name]})
        print(f"{name:45} {records[-1]['lkd_over_kd']:.2f}x  (per-rep {min(ratios):.2f}–{max(ratios):.2f})")
    d = base.meta
    write("overhead.json", {"steps": args.steps, "reps": args.reps, "pair": f"{base.model.teacher}->{base.model.student}",
                            "batch_size": base.data.batch_size, "kd_seconds": times["kd"],
                            "default_meta": {"meta_every": d.meta_every, "scope": d.scope, "backend": d.backend},
                            "records": records})


if __name__ == "__main__":
    main()
