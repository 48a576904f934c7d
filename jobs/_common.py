"""Flags every job shares, and the one code path from flags to a finished distributed run.

Config is built and validated here, before Ray or any storage is touched: a typo costs a second.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python jobs/x.py` from a checkout / ray working_dir

from lkd_ray.config import PRESETS, ConfigError, build_config  # noqa: E402
from lkd_ray.storage import OUTAGE_ENV, StorageError  # noqa: E402


EXIT_CONFIG, EXIT_STORAGE, EXIT_LOSSNET = 2, 3, 4  # bad config or run-name conflict; storage; the loss network's record


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
    return p


def smoke_overrides(num_classes: int, image_size: int, channels: int = 3) -> dict:
    return {"data": {"dataset": "synthetic", "root": None, "num_classes_override": num_classes, "image_size": image_size,
                     "channels": channels, "synthetic_size": 64, "batch_size": 4, "eval_batch_size": 16, "num_workers": 0},
            "optim": {"epochs": 1, "schedule": "constant", "milestones": []},
            "meta": {"meta_every": 4, "snapshot_every": 4}, "model": {"teacher_weights": "random"},
            "run": {"bf16": False, "channels_last": False, "progress": False}}


def build(args, extra: dict | None = None, smoke: dict | None = None):
    """Config from recipe → file → job extras → --smoke → --set; exits 2 with the reason if invalid."""
    sections: dict = {}
    for part in (extra or {}), (smoke if args.smoke else {}) or {}:
        for k, v in part.items():
            sections.setdefault(k, {}).update(v)
    try:
        return build_config(args.recipe, args.config, args.overrides, preset=args.preset, **sections)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


def resolve_storage(args) -> str:
    """--storage, else $LKD_STORAGE, else ./runs — except under `ray job submit`, whose working directory is a
    temporary copy that Ray deletes when the job ends: there a run must name persistent storage."""
    if args.storage:
        return args.storage
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        print("error: under `ray job submit` the job's working directory is a temporary copy that Ray deletes, so results "
              "written to ./runs would be lost: pass --storage s3://bucket/prefix (or an absolute path on storage every node "
              "shares), or set LKD_STORAGE in the job's runtime_env", file=sys.stderr)
        raise SystemExit(2)
    return "runs"


_ARROW_MARKERS = ("AWS Error", "curlCode")  # how pyarrow's S3 OSErrors (Ray Train's checkpoint storage) say so


def _causes(e: BaseException):
    """``e`` and what it wraps — explicit causes only (``raise … from``, Ray's task and Train's worker/controller
    wrappers), never the exception that was being handled when it was raised (``__context__``): an error raised
    while handling a storage error is not a storage error."""
    seen, stack = set(), [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        nested = [x.__cause__, getattr(x, "cause", None), getattr(x, "_base_exc", None),
                  getattr(x, "controller_failure", None), *(getattr(x, "worker_failures", None) or {}).values()]
        stack += [y for y in nested if isinstance(y, BaseException)]


def _first_line(x: BaseException) -> str:
    """The first line of what was raised, not of Ray's wrapper: an actor call's error arrives as
    ``RayTaskError(Cls)``, an instance of ``Cls`` too, whose text starts with the task's name, pid and colour codes."""
    inner = getattr(x, "cause", None)
    if isinstance(inner, BaseException) and isinstance(x, type(inner)):
        x = inner
    return str(x).splitlines()[0]


def failure_cause(e: BaseException) -> tuple[str, str] | None:
    """``("storage", message)`` for our ``StorageError`` or pyarrow's S3 ``OSError`` behind a failure,
    ``("lossnet", message)`` for a LossNetServer that could not persist its state, however deep Ray wrapped
    them (found by type); None for anything else."""
    from lkd_ray.distributed.lossnet_server import LossNetPersistError

    arrow = None
    for x in _causes(e):
        if isinstance(x, LossNetPersistError):
            return "lossnet", _first_line(x)
        if isinstance(x, StorageError):
            return "storage", _first_line(x)
        if arrow is None and isinstance(x, OSError) and any(m in str(x) for m in _ARROW_MARKERS):
            arrow = str(x).splitlines()[0]
    if arrow is not None:
        return "storage", f"Ray Train could not reach its checkpoint storage ({arrow})"
    return None


def storage_cause(e: BaseException) -> str | None:
    cause = failure_cause(e)
    return cause[1] if cause and cause[0] == "storage" else None


def outage_bound(args) -> float | None:
    """``--storage-outage-s``, exported so every storage client of this process and of the run uses it."""
    v = getattr(args, "storage_outage_s", None)
    if v is None:
        return None
    if not (v >= 0 and v != float("inf")):
        print(f"error: --storage-outage-s {v}: give a finite number of seconds ≥ 0", file=sys.stderr)
        raise SystemExit(2)
    os.environ[OUTAGE_ENV] = str(v)
    return v


def launch(cfg, args, **extra_opts) -> dict:
    from lkd_ray.distributed.launch import LaunchOptions, RunConflict, run_distributed

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
    try:
        return run_distributed(cfg, opts)
    except RunConflict as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except StorageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3)
    except Exception as e:  # a worker's or the server's failure arrives wrapped by Ray
        cause = failure_cause(e)
        if cause is None:
            raise
        kind, msg = cause
        if kind == "lossnet":
            print(f"error: {msg} — the run stopped so that no loss-network version goes unrecorded; this is not a "
                  "storage outage (see the LossNetServer's log in Ray's logs), and rerunning resumes from the last "
                  "checkpoint and the newest saved version", file=sys.stderr)
            raise SystemExit(EXIT_LOSSNET)
        hint = "" if "rerun" in msg else " (the run resumes from its last checkpoint: rerun the same command once storage is reachable)"
        print(f"error: storage failed during the run: {msg}{hint}", file=sys.stderr)
        raise SystemExit(EXIT_STORAGE)


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
