"""What every benchmark record carries so a reader can tell what ran: the command, the git commit (and
whether the tree was dirty), the machine (cores, CPU, Python, torch, Ray), when it ran, how many jobs ran
beside it and the machine's load, and the run's full config — by sha, with the config itself kept in
``results/configs.json``.

Records are appended, never edited: a row that is wrong is re-run or dropped (and the drop said). Dropping has
its own command, which removes whole rows only and logs what it removed, why, by which command and at which commit
in ``results/dropped.json`` (the rows themselves stay in git history)::

    python benchmarks/records.py drop accuracy_regimes.json --where regime=noisy-sym40 method=lkd-sample-tuned \
        --reason "the per-sample CE output was dead (its KD pick had no CE term)"

A provenance flag that a broken check wrote wrong (``dirty``; nothing else) is corrected the same way, logged with
the old values in ``results/corrected.json``::

    python benchmarks/records.py correct accuracy_regimes.json --where commit=537c0f1... --set dirty=null \
        --reason "the dirty check of that commit ran git where its pathspecs matched nothing"
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = RESULTS / "configs.json"
DROPPED = "dropped.json"
CORRECTED = "corrected.json"
# What a correction may set: provenance flags only, to the values they can hold (None: not known). A measurement or
# a config is never corrected: its row is re-run or dropped.
CORRECTABLE: dict[str, tuple] = {"dirty": (True, False, None)}


def _git(*args: str, cwd: Path | None = None) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, timeout=10,
                              cwd=cwd or Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def commit() -> dict[str, Any]:
    """HEAD of the checkout these scripts run from, and whether tracked code differs from it."""
    root = Path(__file__).resolve().parent.parent  # pathspecs are relative to the working directory: the repo root
    head = _git("rev-parse", "HEAD", cwd=root)
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", "lkd_ray", "benchmarks/*.py", "jobs", cwd=root)
    return {"commit": head, "dirty": bool(dirty) if dirty is not None else None}


def machine() -> dict[str, Any]:
    import torch

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray_version,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def load_1m() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def command() -> str:
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def provenance(jobs_beside: int) -> dict[str, Any]:
    """The fields every record carries (besides its config sha and its measurements)."""
    return {"command": command(), **commit(), "machine": machine(), "jobs_beside": jobs_beside}


def config_sha(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


LOCK_TIMEOUT_S = 600.0  # a read-modify-write takes well under a second; ten minutes means a stuck writer


# Config fields added after records were first made, each at the value that reproduces what ran before it existed.
# A config holding one of them at that value is the same run as one without the field: a new field does not turn
# every earlier record into a different config.
NEUTRAL: dict[tuple[str, str], Any] = {
    ("run", "log_every"): 50,
    ("loss", "ce_rule"): "plain", ("loss", "gce_q"): 0.7, ("loss", "sce_alpha"): 0.1, ("loss", "sce_beta"): 1.0,
    ("loss", "boot_beta"): 0.95, ("loss", "forget_rate"): 0.2, ("loss", "forget_ramp_epochs"): 2,
    ("loss", "disagree_weight"): 1.0, ("loss", "ramp_epochs"): 0, ("loss", "ramp_weight"): 1.0, ("loss", "ramp_tau"): 1.0,
    ("meta", "meta_steps_per_epoch"): None, ("meta", "min_meta_steps"): 0, ("meta", "unroll_batch_size"): None,
    ("data", "confusion_map"): None, ("data", "noise_seed"): None, ("data", "noisy_labels"): None,
    ("data", "noisy_labels_key"): "worse_label", ("data", "trusted"): None, ("data", "select_per_class"): None,
}


def without_neutral(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` less the fields of ``NEUTRAL`` that hold their neutral value."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for (section, field), value in NEUTRAL.items():
        if isinstance(out.get(section), dict) and field in out[section] and out[section][field] == value:
            del out[section][field]
    return out


def config_identity(config: dict[str, Any]) -> str:
    """What makes two configs the same run: the sha of the config without its neutral fields (``NEUTRAL``)."""
    return config_sha(without_neutral(config))


@contextlib.contextmanager
def locked(path: Path, timeout: float | None = None):
    """Hold an exclusive lock on ``path``'s lock file for a read-modify-write: two benchmarks appending to the same
    records (or the same config store) at once would otherwise each write back the file without the other's rows.
    A lock still held after ``timeout`` seconds stops the writer with the lock file's name instead of waiting forever."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_suffix(path.suffix + ".lock")
    wait = LOCK_TIMEOUT_S if timeout is None else timeout
    try:
        with FileLock(lock, timeout=wait):
            yield
    except Timeout:
        raise TimeoutError(f"{lock} is still held by another writer after {wait:.0f} s; wait for that benchmark to "
                           "finish (or, if none runs, delete the lock file) and run again") from None


def keep_configs(configs: list[dict[str, Any]], path: Path = CONFIGS) -> list[str]:
    """Add configs to the committed store (sha → config); returns their shas."""
    with locked(path):
        store = json.loads(path.read_text()) if path.is_file() else {}
        shas = []
        for c in configs:
            sha = config_sha(c)
            store.setdefault(sha, c)
            shas.append(sha)
        write_json(path, dict(sorted(store.items())))
    return shas


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float, allow_nan=False) + "\n")
    tmp.replace(path)


def append(path: Path, records: list[dict[str, Any]]) -> None:
    """Append records to a JSON list file (atomic rewrite, under the file's lock)."""
    with locked(path):
        old = json.loads(path.read_text()) if path.is_file() else []
        write_json(path, old + records)


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two nested configs: ``section.field: old → new``."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} → {vb!r}")
    return out


def paired(recs: list[dict[str, Any]], method: str, ref: str, key: str = "test_top1") -> dict | None:
    """Mean paired difference (method − ref over the runs both have), its standard error, the worst and best pair.
    A run is a (student seed, noise draw) pair: the field suite's finals run every seed on two noise draws, and a
    pairing on the seed alone would keep one draw per seed and pair it with the other's."""
    a = {(r["seed"], r.get("noise_draw", 0)): r[key] for r in recs if r["method"] == method}
    b = {(r["seed"], r.get("noise_draw", 0)): r[key] for r in recs if r["method"] == ref}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    return {"mean": statistics.mean(d), "se": statistics.stdev(d) / math.sqrt(len(d)), "n": len(d), "worst": min(d),
            "best": max(d)}


def _matches(row: dict[str, Any], where: dict[str, str]) -> bool:
    """Every ``field=value`` holds; values compare as text, so ``seed=3`` matches the number 3."""
    return all(k in row and str(row[k]) == v for k, v in where.items())


def drop(path: Path, where: dict[str, str], reason: str) -> list[dict[str, Any]]:
    """Remove the rows of ``path`` that match every ``where`` condition and log the drop beside it; returns the rows.

    A drop is refused without a reason or without a condition (it would empty the file), and when nothing matches
    (a typo in a field name must not look like a drop that happened)."""
    if not reason.strip():
        raise ValueError("a drop needs --reason: say why these rows do not say what ran")
    if not where:
        raise ValueError("a drop needs at least one --where field=value")
    with locked(path):
        rows = json.loads(path.read_text()) if path.is_file() else []
        gone = [r for r in rows if _matches(r, where)]
        if not gone:
            raise ValueError(f"no row of {path.name} matches {where}; nothing dropped")
        write_json(path, [r for r in rows if not _matches(r, where)])
    log = path.parent / DROPPED
    append(log, [{"file": path.name, "where": where, "rows": len(gone),
                  "keys": sorted({tuple(str(r.get(k)) for k in ("regime", "method", "seed")) for r in gone}),
                  "config_shas": sorted({r["config_sha"] for r in gone if "config_sha" in r}),
                  "reason": reason, "dropped": now(), "command": command(), **commit()}])
    return gone


def _table(obj: Any) -> list[dict[str, Any]]:
    """The rows of a records file: the file itself (a list) or its ``rows`` (cost.json)."""
    return obj["rows"] if isinstance(obj, dict) else obj


def correct(path: Path, where: dict[str, str], field: str, value: Any, reason: str) -> list[dict[str, Any]]:
    """Set ``field`` (a provenance flag in ``CORRECTABLE``) to ``value`` in the rows of ``path`` that match every
    ``where`` condition and log the correction, with the values it replaced, in ``results/corrected.json``; returns
    the rows as they were. Refused without a reason or a condition, for any other field or value, and when no row
    matches or every match already holds the value (a correction logged twice would say it happened twice)."""
    if not reason.strip():
        raise ValueError("a correction needs --reason: say why the recorded value is wrong")
    if not where:
        raise ValueError("a correction needs at least one --where field=value")
    if field not in CORRECTABLE:
        raise ValueError(f"{field!r} cannot be corrected (only {', '.join(CORRECTABLE)}): a wrong measurement or "
                         "config is re-run or dropped, never edited")
    if not any(value is v for v in CORRECTABLE[field]):
        raise ValueError(f"{field} takes {' / '.join(json.dumps(v) for v in CORRECTABLE[field])}, got {json.dumps(value)}")
    with locked(path):
        obj = json.loads(path.read_text()) if path.is_file() else []
        hit = [r for r in _table(obj) if _matches(r, where)]
        if not hit:
            raise ValueError(f"no row of {path.name} matches {where}; nothing corrected")
        if all(field in r and r[field] is value for r in hit):
            raise ValueError(f"every row of {path.name} matching {where} already has {field}={json.dumps(value)}")
        before = [dict(r) for r in hit]
        for r in hit:
            r[field] = value
        write_json(path, obj)
    old = sorted({json.dumps(r.get(field, "<absent>")) for r in before})
    append(path.parent / CORRECTED, [{
        "file": path.name, "where": where, "rows": len(hit), "field": field,
        "old": {v: sum(json.dumps(r.get(field, "<absent>")) == v for r in before) for v in old}, "new": value,
        "keys": sorted({tuple(str(r.get(k)) for k in ("regime", "method", "seed", "setting")) for r in before}),
        "reason": reason, "corrected": now(), "command": command(), **commit()}])
    return before


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Drop whole benchmark rows, or correct a provenance flag, with the reason "
                                             "logged in results/dropped.json or results/corrected.json.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drop", help="remove the rows matching every --where and log it")
    c = sub.add_parser("correct", help=f"set a provenance flag ({', '.join(CORRECTABLE)}) of the rows matching every "
                                       "--where and log it with the old values")
    c.add_argument("--set", dest="assign", required=True, metavar="FIELD=JSON", help="e.g. dirty=null")
    for p in (d, c):
        p.add_argument("file", help="a records file in --results, e.g. accuracy_regimes.json")
        p.add_argument("--where", nargs="+", required=True, metavar="FIELD=VALUE")
        p.add_argument("--reason", required=True)
        p.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    bad = [w for w in args.where if "=" not in w]
    if bad:
        ap.error(f"--where takes FIELD=VALUE, got {bad}")
    path = Path(args.results) / args.file
    if not path.is_file():
        ap.error(f"{path} does not exist")
    where = dict(w.split("=", 1) for w in args.where)
    try:
        if args.cmd == "drop":
            gone = drop(path, where, args.reason)
            print(f"dropped {len(gone)} row(s) from {path}; logged in {path.parent / DROPPED}")
            return 0
        field, _, text = args.assign.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"--set takes FIELD=JSON (true, false or null), got {args.assign!r}") from None
        rows = correct(path, where, field, value, args.reason)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"corrected {field} in {len(rows)} row(s) of {path}; logged in {path.parent / CORRECTED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
