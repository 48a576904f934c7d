"""What LKD costs a user over KD: whole single-process runs of the same recipe, one after the other (never side by
side), in pairs whose order alternates (KD first, then LKD first, ...), each run in a fresh process as a user
starts it. Reported: the median and range of the per-pair ratio of the runs' wall time (training and the
per-epoch evaluation, as each run's ``result.json`` says) and of the whole process.

    python benchmarks/cost.py --pairs 3                                       # the embedded recipe, shipped LKD
    python benchmarks/cost.py --pairs 3 --setting noisy-sym40:lkd-sample-tuned # a regime's preset vs its KD
    python benchmarks/cost.py --pairs 3 --setting noisy-pair30:lkd-sample-every40  # a variant: its seed-0 record's config

Settings: ``lkd (default)`` on the embedded recipe (fashion_mnist, 2 epochs, cached teacher); ``<regime>:<method>``
for a method of ``benchmarks/accuracy.py`` in its regime (its config as the benchmark builds it, seed 0), against
KD in the same regime. Records: ``benchmarks/results/cost.json`` (one row per setting, replaced when re-measured).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import records  # noqa: E402

EMBEDDED = {"optim": {"epochs": 2}, "model": {"teacher_epochs": 5}}


def configs(setting: str, cache_dir: str, results: Path = records.RESULTS) -> tuple[dict, dict, str]:
    """(KD config, LKD config, recipe text) for a setting; a regime's tuning picks and records come from ``results``
    (the folder ``--results`` names, where the accuracy benchmark wrote them)."""
    from lkd_ray.config import build_config

    run = {"run": {"seed": 0, "progress": False, "cache_dir": cache_dir, "threads": 1}}
    if setting == "lkd (default)":
        kd = build_config("fashion_mnist", **{**EMBEDDED, "loss": {"method": "kd"}, **run})
        lkd = build_config("fashion_mnist", **{**EMBEDDED, "loss": {"method": "lkd"}, **run})
        return kd.to_dict(), lkd.to_dict(), "embedded fashion_mnist recipe, 2 epochs, cached teacher (5 epochs), 1 thread"
    import accuracy

    regime, _, method = setting.partition(":")
    if regime not in accuracy.REGIMES or not method:
        raise SystemExit(f"unknown setting {setting!r}: 'lkd (default)' or <regime>:<method> with a regime in "
                         f"{', '.join(accuracy.REGIMES)}")
    family = method[:-len("-tuned")] if method.endswith("-tuned") else method
    field = regime in accuracy.FIELD_ONLY or family in accuracy.FIELD_TUNED + ("rule-best",) and family not in accuracy.TUNED
    suite = "field" if field else "regimes"  # the field suite's picks come from its own tuning records
    tuning_path = Path(results) / (accuracy.FIELD_TUNING if field else accuracy.TUNING)
    tuning = json.loads(tuning_path.read_text()) if tuning_path.is_file() else []
    variant = method.startswith("lkd-") and not method.endswith("-tuned")
    args = argparse.Namespace(regime=regime, suite=suite, noise_draws=[0], out="unused", cache_dir=cache_dir, threads=1, seeds=[0], tune=None,
                              variant=None, overrides=[], methods=["kd"] if variant else ["kd", method])
    tasks, _ = accuracy.plan(args, tuning)  # plans only (``out`` names no folder the configs hold); creates nothing
    by = {t["method"]: t["config"] for t in tasks}
    if variant:  # a variant is whatever its --set said: take the config its seed-0 record ran
        by[method] = recorded_config(regime, method, cache_dir, results)
    name = method if method in by else next(m for m in by if m != "kd")
    for c in by.values():
        c["run"]["threads"] = 1
    return by["kd"], by[name], f"regime {regime} (benchmarks/accuracy.py), seed 0, 1 thread"


def recorded_config(regime: str, method: str, cache_dir: str, results: Path = records.RESULTS) -> dict:
    """The full config of ``method``'s seed-0 run in ``regime`` (from the records and the config store)."""
    recs = json.loads((Path(results) / "accuracy_regimes.json").read_text())
    rec = next((r for r in recs if r["regime"] == regime and r["method"] == method and r["seed"] == 0), None)
    if rec is None:
        raise SystemExit(f"no seed-0 record of {method!r} in regime {regime!r}: run it with benchmarks/accuracy.py first")
    import accuracy

    config = accuracy._stored_config(rec["config_sha"], Path(results) / "configs.json")
    config["run"]["cache_dir"] = cache_dir
    return config


def one_run(config: dict, out: Path) -> tuple[float, float]:
    """(the run's own wall time, the process's) for one single-process run in a fresh interpreter."""
    code = ("import json,sys; from lkd_ray.config import Config; from lkd_ray.train import build_run; "
            "cfg = Config.model_validate(json.loads(sys.argv[1])); build_run(cfg, log=lambda *_: None).fit(sys.argv[2], progress=False)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, json.dumps(config), str(out)], check=True, cwd=ROOT,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    return json.loads((out / "result.json").read_text())["wall_s"], time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--setting", action="append", default=None, help="'lkd (default)' or <regime>:<method> (repeatable)")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "lkd_ray"))
    ap.add_argument("--results", default=str(records.RESULTS))
    ap.add_argument("--jobs-beside", type=int, default=0,
                    help="other heavy jobs running on this machine meanwhile (the record says so; 0 for a quiet machine)")
    args = ap.parse_args(argv)
    if args.pairs < 3:
        ap.error("--pairs must be at least 3 (a median and a range need them)")
    results = Path(args.results)
    load_start = records.load_1m()
    rows = []
    for setting in args.setting or ["lkd (default)"]:
        kd, lkd, recipe = configs(setting, args.cache_dir, results)
        with tempfile.TemporaryDirectory() as tmp:
            one_run(kd, Path(tmp) / "warm")  # teacher, its output cache and the data in the OS cache: untimed
            kd_s, lkd_s, kd_p, lkd_p = [], [], [], []
            for i in range(args.pairs):
                order = [("kd", kd), ("lkd", lkd)] if i % 2 == 0 else [("lkd", lkd), ("kd", kd)]
                for name, c in order:
                    w, p = one_run(c, Path(tmp) / f"{name}-{i}")
                    (kd_s if name == "kd" else lkd_s).append(w)
                    (kd_p if name == "kd" else lkd_p).append(p)
                print(f"{setting} pair {i}: KD {kd_s[-1]:.1f}s, LKD {lkd_s[-1]:.1f}s → {lkd_s[-1] / kd_s[-1]:.3f}", flush=True)
        row = {"setting": setting, "recipe": recipe, "kd_s": kd_s, "lkd_s": lkd_s, "ratios": [b / a for a, b in zip(kd_s, lkd_s)],
               "process_kd_s": kd_p, "process_lkd_s": lkd_p, "process_ratios": [b / a for a, b in zip(kd_p, lkd_p)],
               "kd_config_sha": records.config_sha(kd), "lkd_config_sha": records.config_sha(lkd)}
        records.keep_configs([kd, lkd], results / "configs.json")
        rows.append(row)
        print(f"{setting}: LKD/KD median {statistics.median(row['ratios']):.3f} "
              f"(range {min(row['ratios']):.3f}–{max(row['ratios']):.3f})", flush=True)
    path = results / "cost.json"
    prov = {**records.provenance(jobs_beside=args.jobs_beside), "measured": records.now(),
            "load_1m_start": load_start, "load_1m_end": records.load_1m()}
    with records.locked(path):
        prev = json.loads(path.read_text()) if path.is_file() else {}
        kept = [r for r in prev.get("rows", []) if r["setting"] not in {r2["setting"] for r2 in rows}]
        records.write_json(path, {"rows": kept + [{**r, **prov} for r in rows]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
