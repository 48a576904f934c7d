"""What ``lkd_ray auto`` picks on a benchmark setting, beside the best trial in hindsight: one record per search
in ``benchmarks/results/auto.json``.

    python benchmarks/auto.py --setting noisy-pair30 --search-seed 100 --epochs 4 --trials 2 --max-concurrent 2
    python benchmarks/auto.py --setting noisy-pair30 --name-suffix sub8k --set data.train_subset=8000   # a transfer setting

A setting is a regime of ``benchmarks/accuracy.py`` (its data, teacher and epochs; ``--set`` adds a transfer
change, named by ``--name-suffix``). The search runs short trials (``--epochs``) on the search seed; then the pick
and the best trial in hindsight (the highest test top-1 among the finished short trials: what an oracle reading the
test split would have shipped) are re-run in full — the regime's epochs — on ``--final-seeds`` with the
single-process core, and their test top-1 recorded. ``--no-full`` records the short trials' test top-1 instead.
The teacher is the regime's (seed 0, the benchmark's cache), so the search and the benchmark share it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import records  # noqa: E402
from accuracy import COMMON, REGIMES, merge  # noqa: E402

RECORDS = "auto.json"


def base_config(setting: str, overrides: list[str], cache_dir: str):
    from lkd_ray.config import build_config

    return build_config("fashion_mnist", overrides=overrides,
                        **merge(COMMON, REGIMES[setting], {"run": {"seed": 0, "name": f"auto-{setting}", "progress": False,
                                                                  "cache_dir": cache_dir}}))


def full_run(trial_cfg: dict, epochs: int, seed: int, threads: int) -> float:
    """The trial's setting re-run in full (``epochs``, ``seed``) with the single-process core; its test top-1."""
    import torch

    from lkd_ray.config import Config
    from lkd_ray.data import build_data
    from lkd_ray.train import build_run
    from lkd_ray.train.teacher import prepare_teacher

    torch.set_num_threads(threads)
    d = {**trial_cfg, "optim": {**trial_cfg["optim"], "epochs": epochs}, "run": {**trial_cfg["run"], "seed": seed}}
    cfg = Config.model_validate(d)
    data = build_data(cfg.data, cfg.run.seed, cache_dir=cfg.run.cache_dir)
    teacher, info = None, None
    if cfg.loss.method != "ce":
        tcfg = cfg.model_copy(deep=True)
        tcfg.run.seed = 0  # the regime's teacher
        teacher, info = prepare_teacher(tcfg, data, log=lambda *_: None)
    run = build_run(cfg, data=data, teacher=teacher, teacher_info=info, log=lambda *_: None)
    return float(run.fit(None, progress=False)["test_top1"])


def best_in_hindsight(rows: list[dict]) -> dict:
    """The finished trial with the highest test top-1 (the earliest on a tie): what reading the test split would pick."""
    from lkd_ray.auto_plan import finished

    return max(finished(rows), key=lambda r: r["test_top1"])


def make_record(setting: str, search_seed: int, res: dict, finals: dict[str, list[float]] | None,
                concurrent: int, base_sha: str) -> dict:
    """One search as a record: the pick, the best trial in hindsight (by the short trials' test top-1), their test
    top-1 (full re-runs when ``finals`` is given: label → test top-1 per final seed), and the search's cost."""
    from lkd_ray.auto_plan import finished

    rows = res["rows"]
    done = finished(rows)
    hindsight = best_in_hindsight(rows)
    pick = res["winner"]
    mean = lambda xs: statistics.mean(xs) if xs else None  # noqa: E731
    full = finals is not None
    return {"setting": setting, "search_seed": search_seed, "budget": res["budget"], "picked": pick["label"],
            "picked_quiz_top1": pick["quiz_top1"],
            "picked_test_top1": mean(finals[pick["label"]]) if full else pick["test_top1"],
            "best_trial": hindsight["label"],
            "best_trial_test_top1": mean(finals[hindsight["label"]]) if full else hindsight["test_top1"],
            "picked_trial_test_top1": pick["test_top1"], "best_trial_trial_test_top1": hindsight["test_top1"],
            "test_from": "full re-runs" if full else "the search's short trials",
            "finals": finals, "trials": len(rows), "trials_finished": len(done),
            "trials_failed": sum(1 for r in rows if r.get("error")), "wall_s": res["wall_s"], "concurrent": concurrent,
            "trials_per_hour": round(3600 * len(done) / res["wall_s"], 2) if res["wall_s"] else None,
            "config_sha": base_sha, "stage2_bases": res.get("stage2_bases"), "why": res["why"],
            # which teacher: a retrained one can differ from the regime records' by a few tenths (seeded CPU training
            # did not reproduce across sessions), so the record says which it ran on
            "teacher": {k: (res.get("teacher") or {}).get(k) for k in ("key", "test_top1")},
            "table": [{k: r.get(k) for k in ("label", "family", "stage", "quiz_top1", "quiz_loss", "test_top1", "wall_s",
                                             "cost_vs_kd", "error")} for r in rows]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", choices=list(REGIMES), required=True)
    ap.add_argument("--name-suffix", default="", help="names a transfer change given with --set (recorded in 'setting')")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    ap.add_argument("--search-seed", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=4, help="epochs of every search trial")
    ap.add_argument("--trials", type=int, default=2, help="settings per family")
    ap.add_argument("--families", nargs="+", default=None)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--cpus-per-trial", type=float, default=1.0)
    ap.add_argument("--final-seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--no-full", action="store_true", help="record the short trials' test top-1; no full re-runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--other-jobs", type=int, default=0, help="heavy jobs running beside this search (provenance)")
    ap.add_argument("--storage", default=str(ROOT / "runs" / "auto_bench"))
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "lkd_ray"))
    ap.add_argument("--results", default=str(records.RESULTS))
    args = ap.parse_args(argv)
    from lkd_ray.auto_plan import AutoOptions, exit_code
    from lkd_ray.distributed.auto import run_auto

    setting = args.setting + (f"+{args.name_suffix}" if args.name_suffix else "")
    cfg = base_config(args.setting, args.overrides, os.path.abspath(args.cache_dir))
    name = f"{setting.replace('+', '-')}-s{args.search_seed}-e{args.epochs}-t{args.trials}-c{args.max_concurrent}"
    opts = AutoOptions(name=name, storage=args.storage, trials=args.trials, epochs=args.epochs, families=args.families,
                       max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial, seed=args.search_seed)
    try:
        res = run_auto(cfg, opts)
    except Exception as e:  # noqa: BLE001
        code = exit_code(e)
        if code is None:
            raise
        print(f"error: {e}", file=sys.stderr)
        return code
    finals = None
    if not args.no_full:
        from lkd_ray.distributed.auto import _specs
        from lkd_ray.search_spaces import Trial

        want = {res["winner"]["label"], best_in_hindsight(res["rows"])["label"]}
        finals = {}
        for label in sorted(want):
            row = next(r for r in res["rows"] if r["label"] == label)
            spec = _specs([Trial(row["family"], row["setting"], row["sections"])], row["stage"], cfg.to_dict(), opts)[label]
            t0 = time.perf_counter()
            finals[label] = [full_run(spec["config"], cfg.optim.epochs, s, args.threads) for s in args.final_seeds]
            print(f"{label}: full runs test top-1 {finals[label]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    records.keep_configs([cfg.to_dict()], Path(args.results) / "configs.json")
    rec = {**make_record(setting, args.search_seed, res, finals, args.max_concurrent, records.config_sha(cfg.to_dict())),
           **records.provenance(jobs_beside=args.other_jobs), "finished": records.now()}
    records.append(Path(args.results) / RECORDS, [rec])
    print(f"{setting}: picked {rec['picked']} (test {rec['picked_test_top1']:.2f}), best in hindsight {rec['best_trial']} "
          f"(test {rec['best_trial_test_top1']:.2f}); {rec['trials']} trials in {rec['wall_s']:.0f}s → {args.results}/{RECORDS}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
