"""What LKD costs over KD on this machine, three ways, always measured side by side in one run.

* **settings** (default): wall time of ``--steps`` student steps of the single-process trainer for
  each named setting, with a KD run timed between every two settings; a setting's ratio is its time
  over the mean of its two KD neighbours, reported as the median over reps and the min–max spread.
  Every setting keeps the other shipped defaults (snapshots included), so ``default`` is exactly
  what ``loss.method=lkd`` costs. Records: ``overhead.json``.
* **--units**: the cost of one meta-step per estimator in student forward+backward passes (the unit:
  one CE step of the student on the same batch, no teacher). Records: ``meta_cost.json``.
* **--teacher-cache**: KD and LKD step time with the live teacher and with the teacher-output cache
  (FKD). Records: the ``speed`` part of ``teacher_cache.json``.

Real Fashion-MNIST batches of 128, cnn_teacher → cnn_student (the offline recipe).

    .venv/bin/python benchmarks/overhead.py [--steps 800] [--reps 3] [--configs default control ...]
    .venv/bin/python benchmarks/overhead.py --units
    .venv/bin/python benchmarks/overhead.py --teacher-cache
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch  # noqa: E402

from _util import write  # noqa: E402
from lkd_ray.config import build_config, parse_override  # noqa: E402
from lkd_ray.data import build_data, cycle  # noqa: E402
from lkd_ray.models import build_model  # noqa: E402
from lkd_ray.train import build_run  # noqa: E402

# name → overrides on top of the shipped LKD defaults
SETTINGS: dict[str, list[str]] = {
    "default": [],
    "kind=sample": ["lossnet.kind=sample"],
    "kind=sample,lock=none,meta_every=10": ["lossnet.kind=sample", "lossnet.lock=none", "meta.meta_every=10"],
    "control": ["loss.method=control"],
    "lock=norm": ["lossnet.lock=norm"],
    "lock=nontarget": ["lossnet.lock=nontarget"],
    "lock=norm,quiz=calibrated": ["lossnet.lock=norm", "meta.quiz_objective=calibrated"],
    "implicit,lock=norm,quiz=calibrated": ["meta.estimator=implicit", "lossnet.lock=norm", "meta.quiz_objective=calibrated"],
    "estimator=implicit": ["meta.estimator=implicit"],
    "estimator=implicit,neumann_steps=10": ["meta.estimator=implicit", "meta.neumann_steps=10"],
    "unroll_steps=2": ["meta.unroll_steps=2"],
    "meta_every=10": ["meta.meta_every=10"],
    "meta_every=20": ["meta.meta_every=20"],
    "scope=head": ["meta.scope=head"],
    "frozen (reuse)": ["lossnet.frozen=true"],
}


def _sections(overrides: list[str]) -> dict:
    out: dict = {}
    for o in overrides:
        for sec, vals in parse_override(o).items():
            out.setdefault(sec, {}).update(vals)
    return out


def make_cfg(base_sections: dict, overrides: list[str], artifact: str | None = None):
    sections = {**{k: dict(v) for k, v in base_sections.items()}}
    for sec, vals in _sections(overrides).items():
        sections.setdefault(sec, {}).update(vals)
    if sections.get("lossnet", {}).get("frozen"):
        sections["lossnet"]["init_from"] = artifact
    return build_config("fashion_mnist", **sections)


def trainer_for(cfg, teacher, data):
    return build_run(cfg, data=data, teacher=teacher, teacher_info={"key": "overhead"}, log=lambda *_: None).trainer


def time_steps(cfg, teacher, data, steps: int) -> float:
    tr = trainer_for(cfg, teacher, data)
    it = cycle(tr.data.train)
    for _ in range(3):  # warm-up (allocations, first meta-step imports)
        tr.train_step(next(it))
    t = time.perf_counter()
    for _ in range(steps):
        tr.train_step(next(it))
    return time.perf_counter() - t


def learned_artifact(base_sections: dict, teacher, data, folder: str) -> str:
    """A loss network to reuse (what ``lossnet.frozen`` costs is independent of what φ holds)."""
    cfg = make_cfg(base_sections, ["meta.meta_every=2", "optim.epochs=1"])
    tr = trainer_for(cfg, teacher, data)
    it = cycle(tr.data.train)
    for _ in range(10):
        tr.train_step(next(it))
    from lkd_ray.meta.versions import VersionStore
    from lkd_ray.storage import open_storage

    VersionStore(open_storage(folder), "lossnet").save(tr.meta.version(), {"lossnets": tr.lossnets.state_dict(),
                                                                               "config": cfg.to_dict()})
    return folder


def settings_mode(args, base_sections, teacher, data) -> None:
    names = args.configs or list(SETTINGS)
    unknown = set(names) - set(SETTINGS)
    if unknown:
        raise SystemExit(f"unknown settings {sorted(unknown)}; valid: {', '.join(SETTINGS)}")
    for name in names:  # a window must hold enough meta-steps for their cost to show at its true rate
        every = make_cfg(base_sections, SETTINGS[name]).meta.meta_every
        if args.steps < 20 * every:
            raise SystemExit(f"--steps {args.steps} holds fewer than 20 meta-steps of {name!r} (meta_every {every}): "
                             f"use --steps {20 * every} or more")
    with tempfile.TemporaryDirectory() as tmp:
        artifact = learned_artifact(base_sections, teacher, data, tmp)
        kd = make_cfg(base_sections, ["loss.method=kd"])
        seconds: dict[str, list[float]] = {n: [] for n in names}
        ratios: dict[str, list[float]] = {n: [] for n in names}
        kd_all: list[float] = []
        for rep in range(args.reps):
            order = random.Random(rep).sample(names, len(names))
            kd_prev = time_steps(kd, teacher, data, args.steps)
            kd_all.append(kd_prev)
            for name in order:
                t = time_steps(make_cfg(base_sections, SETTINGS[name], artifact), teacher, data, args.steps)
                kd_next = time_steps(kd, teacher, data, args.steps)
                kd_all.append(kd_next)
                seconds[name].append(t)
                ratios[name].append(t / ((kd_prev + kd_next) / 2))
                kd_prev = kd_next
            print(f"rep {rep}: kd {kd_all[-1]:.2f}s / {args.steps} steps", flush=True)
    default = make_cfg(base_sections, []).meta
    records = []
    for name in names:
        r = ratios[name]
        records.append({"config": name, "overrides": SETTINGS[name], "lkd_over_kd": statistics.median(r),
                        "spread": [min(r), max(r)], "ratios": r, "seconds": seconds[name], "steps": args.steps,
                        "reps": args.reps, "kd_reference": "neighbours"})
        print(f"{name:40} {records[-1]['lkd_over_kd']:.2f}x  (per-rep {min(r):.2f}–{max(r):.2f})")
    write("overhead.json", {"pair": "cnn_teacher->cnn_student", "batch_size": 128, "kd_seconds": kd_all,
                            "default_meta": {"estimator": default.estimator, "meta_every": default.meta_every,
                                             "scope": default.scope, "backend": default.backend}, "records": records},
          **provenance_args(args), configs=[make_cfg(base_sections, SETTINGS[n], artifact).to_dict() for n in names])


def units_mode(args, base_sections, teacher, data) -> None:
    """Meta-step time per estimator over one student forward+backward (CE, no teacher) on the same batch."""
    est = {"unroll (k=1)": ["meta.estimator=unroll"], "unroll (k=2)": ["meta.estimator=unroll", "meta.unroll_steps=2"],
           "implicit (K=5)": ["meta.estimator=implicit", "meta.neumann_steps=5"],
           "implicit (K=10)": ["meta.estimator=implicit", "meta.neumann_steps=10"],
           "unroll (k=1), lock=norm": ["meta.estimator=unroll", "lossnet.lock=norm"],
           "implicit (K=5), lock=norm": ["meta.estimator=implicit", "lossnet.lock=norm"],
           "unroll (k=1), lock=norm, quiz=calibrated": ["meta.estimator=unroll", "lossnet.lock=norm",
                                                        "meta.quiz_objective=calibrated"]}
    from lkd_ray.meta import MetaBatch
    from lkd_ray.losses import TeacherOutputs

    ce = trainer_for(make_cfg(base_sections, ["loss.method=ce"]), None, data)
    it = cycle(ce.data.train)
    batch = next(it)
    x, y = batch.x, batch.y

    def student_pass() -> float:
        t = time.perf_counter()
        out = ce.student(x)
        loss = torch.nn.functional.cross_entropy(out.logits, y)
        ce.optimizer.zero_grad()
        loss.backward()
        return time.perf_counter() - t

    rows = []
    for rep in range(args.reps):
        unit = statistics.median(student_pass() for _ in range(20))
        for name, ov in est.items():
            tr = trainer_for(make_cfg(base_sections, ov + ["meta.p_snapshot=0"]), teacher, data)
            tr.train_step(batch)  # momentum buffers exist, as in training
            t_out = tr.teacher.outputs(x, batch) or TeacherOutputs(None)
            mb = MetaBatch(x, y, t_out.logits, t_out.features)
            times = []
            for _ in range(6):
                t = time.perf_counter()
                tr.meta.meta_update(tr, mb, tr.student_state())
                times.append(time.perf_counter() - t)
            rows.append({"estimator": name, "rep": rep, "meta_step_s": statistics.median(times), "unit_s": unit,
                         "units": statistics.median(times) / unit})
        print(f"rep {rep}: one student forward+backward {unit * 1e3:.1f} ms", flush=True)
    out = []
    for name in est:
        u = [r["units"] for r in rows if r["estimator"] == name]
        out.append({"estimator": name, "units_median": statistics.median(u), "units_spread": [min(u), max(u)],
                    "meta_step_ms_median": 1e3 * statistics.median(r["meta_step_s"] for r in rows if r["estimator"] == name)})
        print(f"{name:28} {out[-1]['units_median']:.1f} student passes per meta-step (per-rep {min(u):.1f}–{max(u):.1f})")
    write("meta_cost.json", {"pair": "cnn_teacher->cnn_student", "batch_size": 128, "unit": "one CE forward+backward of the student",
                             "estimators": out, "es": "no meta-step: es_particles students train side by side "
                                                      "(cost = es_particles × a KD run)", "rows": rows},
          **provenance_args(args), configs=[make_cfg(base_sections, ov + ["meta.p_snapshot=0"]).to_dict() for ov in est.values()])


def teacher_cache_mode(args, base_sections, teacher, data) -> None:
    rows = {k: [] for k in ("kd_live", "kd_cached", "lkd_live", "lkd_cached")}
    with tempfile.TemporaryDirectory() as tmp:
        # every distinct view (50), as the accuracy benchmark caches them
        cached_sections = {**base_sections, "model": {"teacher_cache": True, "teacher_cache_views": 0},
                           "run": {"cache_dir": tmp, "progress": False}}
        cached_data = build_data(make_cfg(cached_sections, []).data)  # the cache attaches to its own loader
        trainer_for(make_cfg(cached_sections, ["loss.method=kd"]), teacher, cached_data)  # build the cache once, untimed
        for rep in range(args.reps):
            for key, sec, ov, d in (("kd_live", base_sections, ["loss.method=kd"], data),
                                    ("kd_cached", cached_sections, ["loss.method=kd"], cached_data),
                                    ("lkd_live", base_sections, [], data), ("lkd_cached", cached_sections, [], cached_data)):
                rows[key].append(time_steps(make_cfg(sec, ov), teacher, d, args.steps))
            print(f"rep {rep}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in rows.items()), flush=True)
    kd = [a / b for a, b in zip(rows["kd_live"], rows["kd_cached"])]
    lkd = [a / b for a, b in zip(rows["lkd_live"], rows["lkd_cached"])]
    speed = {"steps": args.steps, "reps": args.reps, "seconds": rows, "kd_step_speedup": statistics.median(kd),
             "kd_step_speedup_spread": [min(kd), max(kd)], "lkd_step_speedup": statistics.median(lkd),
             "lkd_step_speedup_spread": [min(lkd), max(lkd)]}
    print(f"teacher-output cache: KD steps {speed['kd_step_speedup']:.2f}x faster (per-rep {min(kd):.2f}–{max(kd):.2f}), "
          f"LKD {speed['lkd_step_speedup']:.2f}x")
    write("teacher_cache.json", {"views": "all (50)", "speed": speed, "kd_step_speedup": speed["kd_step_speedup"]},
          **provenance_args(args), configs=[make_cfg(cached_sections, ["loss.method=kd"]).to_dict()])


def provenance_args(args) -> dict:
    return {"jobs_beside": args.jobs_beside, "started": args.started, "load_start": args.load_start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=800, help="student steps per measurement (≥ 20 meta-steps of each setting)")
    ap.add_argument("--jobs-beside", type=int, default=0, help="other jobs running on the machine meanwhile (recorded)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--configs", nargs="+", metavar="NAME", help=f"settings to time (default all): {', '.join(SETTINGS)}")
    ap.add_argument("--units", action="store_true", help="meta-step cost per estimator in student forward+backward passes")
    ap.add_argument("--teacher-cache", action="store_true", help="KD/LKD step time with and without the teacher-output cache")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()
    from records import load_1m, now

    args.started, args.load_start = now(), load_1m()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    base_sections = {"data": {"train_subset": 20000}, "run": {"progress": False}}
    data = build_data(build_config("fashion_mnist", **base_sections).data)
    teacher = build_model("cnn_teacher", 10, 1).eval()  # timing only: weights do not change the cost
    if args.units:
        units_mode(args, base_sections, teacher, data)
    elif args.teacher_cache:
        teacher_cache_mode(args, base_sections, teacher, data)
    else:
        settings_mode(args, base_sections, teacher, data)


if __name__ == "__main__":
    main()
