"""Wall time of a 2-worker Ray LKD epoch against the single-process trainer, same data and recipe.

Both run LKD (the shipped defaults) on the whole Fashion-MNIST training split for one epoch with the same
teacher, so each rank makes at least 5 meta-steps (210 steps per rank at meta_every 40); reps interleave so
machine noise hits both. Reported: each wall time, the meta-steps per rank, and the ratio of medians. On one
2-core machine two workers split the same cores, so this measures the distributed path's overhead, not a
speed-up.

    .venv/bin/python benchmarks/ray_epoch.py [--reps 3] [--subset N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402

from _util import write  # noqa: E402
from lkd_ray.config import build_config  # noqa: E402
from lkd_ray.data import build_data  # noqa: E402
from lkd_ray.distributed.launch import LaunchOptions, init_ray, run_distributed  # noqa: E402
from lkd_ray.train import build_run  # noqa: E402
from lkd_ray.train.teacher import prepare_teacher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--subset", type=int, default=None, help="training images (default: all 54 000)")
    ap.add_argument("--jobs-beside", type=int, default=0, help="other jobs running on the machine meanwhile (recorded)")
    args = ap.parse_args()
    from records import load_1m, now

    started, load0 = now(), load_1m()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    cfg = build_config("fashion_mnist", data={"train_subset": args.subset}, optim={"epochs": 1}, run={"progress": False})
    data = build_data(cfg.data)
    prepare_teacher(cfg, data)  # cached; both paths then load the same teacher
    per_rank = len(build_data(cfg.data, rank=0, world_size=2).train)
    meta_steps_per_rank = per_rank // cfg.meta.meta_every
    if meta_steps_per_rank < 5:
        raise SystemExit(f"{per_rank} steps per rank make {meta_steps_per_rank} meta-steps at meta_every "
                         f"{cfg.meta.meta_every}: raise --subset so each rank makes at least 5")
    init_ray()
    single, ray2 = [], []
    with tempfile.TemporaryDirectory() as store:
        for rep in range(args.reps):
            teacher, _ = prepare_teacher(cfg, data, log=lambda *_: None)
            torch.set_num_threads(os.cpu_count() or 1)
            res1 = build_run(cfg, data=data, teacher=teacher, log=lambda *_: None).fit(progress=False)
            single.append(res1["history"][-1]["epoch_s"])  # the epoch alone, as on the Ray side
            c = cfg.model_copy(deep=True)
            c.run.name = f"bench-{rep}"
            res = run_distributed(c, LaunchOptions(storage=store, num_workers=2, threads_per_worker=1, progress=False))
            ray2.append(res["metrics"]["epoch_s"])
            print(f"rep {rep}: single-process {single[-1]:.1f}s  ray 2 workers (epoch) {ray2[-1]:.1f}s  job wall "
                  f"{res['wall_s']:.1f}s  meta-steps {res['server']['rounds']}", flush=True)
    ratio = statistics.median(ray2) / statistics.median(single)
    print(f"ray 2-worker epoch / single-process epoch (medians): {ratio:.2f}")
    write("ray_epoch.json", {"subset": args.subset, "steps_per_rank": per_rank, "meta_steps_per_rank": meta_steps_per_rank,
                             "single_process_s": single, "ray_2_workers_epoch_s": ray2, "ratio_median": ratio},
          jobs_beside=args.jobs_beside, started=started, load_start=load0, configs=[cfg.to_dict()])


if __name__ == "__main__":
    main()
