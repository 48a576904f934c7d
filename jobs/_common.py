"""Flags every job shares, and the one code path from flags to a finished distributed run.

Config is built and validated here, and the inputs it names (data, teacher, ...) checked, before Ray or any storage
is touched: a typo costs a second. Failures are reported by ``lkd_ray.errors`` (one line, exit 2/3/4).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python jobs/x.py` from a checkout / ray working_dir

from lkd_ray.config import PRESETS, build_config  # noqa: E402
from lkd_ray.errors import EXIT_BAD_INPUT, EXIT_RECORD, EXIT_STORAGE, BadInput, explain, user_errors  # noqa: E402
from lkd_ray.storage import OUTAGE_ENV  # noqa: E402

EXIT_CONFIG, EXIT_LOSSNET = EXIT_BAD_INPUT, EXIT_RECORD  # the names jobs used before lkd_ray.errors held them


def parser(description: str, recipe: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--storage", default=os.environ.get("LKD_STORAGE"),
                   help="local folder or s3://bucket/prefix (default: $LKD_STORAGE, else ./runs; required under `ray job submit`, "
                        "whose working directory Ray deletes)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (default: AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--storage-outage-s", type=float, default=None, metavar="SECONDS",
                   help=f"how long every storage call (ours and Ray Train's checkpoints) keeps retrying an unreachable "
                        f"S3 endpoint before the job exits with code 3 (default: ${OUTAGE_ENV}, else 60)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (DDP ranks)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--config", help="YAML with sections model/data/optim/loss/lossnet/meta/run")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="loss settings tuned for a data regime (BENCHMARKS.md, 'Regimes'); applied before --config/--set")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument("--recipe", default=recipe, help=f"base recipe (default {recipe})")
    p.add_argument("--mode", choices=["sync", "async"], default="sync", help="LossNetServer update mode")
    p.add_argument("--max-failures", type=int, default=1, help="worker-group restarts from the last checkpoint")
    p.add_argument("--json", action="store_true", help="print the full result record(s) as JSON")
    p.add_argument("--smoke", action="store_true",
                   help="tiny generated data set with the job's real shapes and an untrained teacher: checks the pipeline anywhere")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of a reported failure (bad input exits 2, storage 3, the server's record 4)")
    return p


def smoke_overrides(num_classes: int, image_size: int, channels: int = 3) -> dict:
    return {"data": {"dataset": "synthetic", "root": None, "num_classes_override": num_classes, "image_size": image_size,
                     "channels": channels, "synthetic_size": 64, "batch_size": 4, "eval_batch_size": 16, "num_workers": 0},
            "optim": {"epochs": 1, "schedule": "constant", "milestones": []},
            "meta": {"meta_every": 4, "snapshot_every": 4}, "model": {"teacher_weights": "random"},
            "run": {"bf16": False, "channels_last": False, "progress": False}}


def build(args, extra: dict | None = None, smoke: dict | None = None):
    """Config from recipe → file → job extras → --smoke → --set, and the inputs it names checked (data files, label
    ranges, regime sizes, teacher checkpoint); exits 2 with one line naming the input if anything is wrong."""
    from lkd_ray.train.inputs import check_inputs

    sections: dict = {}
    for part in (extra or {}), (smoke if args.smoke else {}) or {}:
        for k, v in part.items():
            sections.setdefault(k, {}).update(v)
    with user_errors(getattr(args, "debug", False)):
        cfg = build_config(args.recipe, args.config, args.overrides, preset=args.preset, **sections)
        check_inputs(cfg)
        return cfg


def resolve_storage(args) -> str:
    """--storage, else $LKD_STORAGE, else ./runs — except under `ray job submit`, whose working directory is a
    temporary copy that Ray deletes when the job ends: there a run must name persistent storage."""
    if args.storage:
        return args.storage
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        raise BadInput("--storage", "under `ray job submit` the job's working directory is a temporary copy that Ray "
                       "deletes, so results written to ./runs would be lost",
                       "pass --storage s3://bucket/prefix (or an absolute path on storage every node shares), or set "
                       "LKD_STORAGE in the job's runtime_env")
    return "runs"


def failure_cause(e: BaseException) -> tuple[str, str] | None:
    """``(kind, message)`` behind a failure, however deep Ray wrapped it (found by type, ``lkd_ray.errors.explain``):
    kind ``"input"`` (exit 2), ``"storage"`` (3) or ``"lossnet"`` (4, the LossNetServer could not persist its
    state); None for anything else."""
    f = explain(e)
    return (f.kind, f.message) if f else None


def storage_cause(e: BaseException) -> str | None:
    cause = failure_cause(e)
    return cause[1] if cause and cause[0] == "storage" else None


def outage_bound(args) -> float | None:
    """``--storage-outage-s``, exported so every storage client of this process and of the run uses it."""
    v = getattr(args, "storage_outage_s", None)
    if v is None:
        return None
    if not (v >= 0 and v != float("inf")):
        raise BadInput(f"--storage-outage-s {v}", "not a finite number of seconds ≥ 0", "give one, e.g. 60")
    os.environ[OUTAGE_ENV] = str(v)
    return v


def launch(cfg, args, **extra_opts) -> dict:
    """One distributed run; a failure the user can act on exits with its code and one line (``lkd_ray.errors``)."""
    with user_errors(getattr(args, "debug", False)):
        return _launch(cfg, args, **extra_opts)


def _launch(cfg, args, **extra_opts) -> dict:
    from lkd_ray.distributed.launch import LaunchOptions, run_distributed

    threads = max(1, int(args.cpus_per_worker), (os.cpu_count() or 1) // max(1, args.num_workers)) if not args.use_gpu else 4
    opts = LaunchOptions(storage=resolve_storage(args), num_workers=args.num_workers, use_gpu=args.use_gpu,
                         endpoint_url=args.endpoint_url, mode=args.mode, max_failures=args.max_failures,
                         cpus_per_worker=args.cpus_per_worker, threads_per_worker=threads,
                         storage_outage_s=outage_bound(args), **extra_opts)
    if args.smoke:
        print(f"[smoke] {cfg.run.name}: generated data with the job's real shapes and an untrained teacher — "
              "checks the pipeline, says nothing about accuracy", flush=True)
    print(f"== {cfg.run.name}: {cfg.loss.method}, {cfg.model.student} from {cfg.model.teacher}, {cfg.optim.epochs} epochs on "
          f"{cfg.data.dataset}, {args.num_workers} worker(s)", flush=True)
    return run_distributed(cfg, opts)  # a worker's or the server's failure arrives wrapped by Ray: explained by type


def run_and_report(cfg, args) -> int:
    res = launch(cfg, args)
    print(summarize(res))
    if args.json:
        dump(res)
    return 0


def summarize(res: dict) -> str:
    m = res.get("metrics", {})
    tag = " [SMOKE: generated data, untrained teacher]" if res.get("synthetic_data") else ""
    nan = float("nan")
    return (f"{res['method']}: test top-1 {m.get('test_top1') or nan:.2f}%  top-5 {m.get('test_top5') or nan:.2f}%  "
            f"epochs {m.get('epoch')}  ({res['wall_s']:.0f}s, results in {res['storage']}/{res['run']}){tag}")


def dump(res: dict) -> None:
    print(json.dumps({k: v for k, v in res.items() if k != "config"}, default=str, indent=1))
