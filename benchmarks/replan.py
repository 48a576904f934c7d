"""Every benchmark record re-runs from its own command: the command is parsed and planned again, as the script would
plan it today (nothing runs, nothing is written), and each record's ``config_sha`` must be what the plan builds for
its row. A record that does not re-plan is re-run, or dropped with its reason (``benchmarks/records.py drop``).

Checked: ``accuracy_regimes.json``, ``accuracy_regimes_tuning.json`` and the field suite's ``accuracy_field*.json``
(``benchmarks/accuracy.py``: tuned methods re-plan from the tuning records in the same folder),
``accuracy_transfer.json`` (``benchmarks/transfer.py``; planned without writing its label files) and ``cost.json`` (``benchmarks/cost.py``: both configs of every
setting). CI runs it as a test::

    python benchmarks/replan.py              # exit 1 and the differences when a record does not re-plan
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import records  # noqa: E402

ACCURACY_FILES = ("accuracy_regimes.json", "accuracy_regimes_tuning.json", "accuracy_field.json",
                  "accuracy_field_tuning.json")


def script_args(command: str, script: str) -> list[str]:
    """The arguments a recorded command gave ``script`` (``python benchmarks/<script> ...``)."""
    argv = shlex.split(command)
    at = next((i for i, a in enumerate(argv) if Path(a).name == script), None)
    if at is None:
        raise ValueError(f"not a command of benchmarks/{script}: {command}")
    return argv[at + 1:]


def _same(got: str, built: dict, store: dict) -> bool:
    """The recorded sha is the built config's, or names a stored config that is the same run as the built one
    (``records.config_identity``: fields added later, at their neutral value, do not count)."""
    sha = records.config_sha(built)
    return got == sha or (got in store and records.config_identity(store[got]) == records.config_identity(built))


def _diff(got: str, built: dict, store: dict) -> tuple[str, ...]:
    return tuple(records.config_diff(store[got], built)) if got in store else (f"(config {got} is not in configs.json)",)


def _report(file: str, command: str, groups: dict[tuple[str, ...], list[str]]) -> list[str]:
    """One problem per command and difference: which rows, and what the command builds differently."""
    return [f"{file}: {len(rows)} record(s) of `{command}` do not re-plan to their config_sha ({', '.join(rows[:4])}"
            f"{', …' if len(rows) > 4 else ''}); recorded → built:\n    " + "\n    ".join(diff[:8])
            + ("\n    …" if len(diff) > 8 else "") for diff, rows in groups.items()]


def check_accuracy(results: Path, store: dict) -> list[str]:
    """One plan per distinct command (the config of every row it ran), then every row against it."""
    import accuracy

    tunings = {}
    for suite, name in (("regimes", accuracy.TUNING), ("field", accuracy.FIELD_TUNING)):
        path = results / name
        tunings[suite] = json.loads(path.read_text()) if path.is_file() else []
    problems = []
    for file in ACCURACY_FILES:
        path = results / file
        rows = json.loads(path.read_text()) if path.is_file() else []
        for command in dict.fromkeys(r["command"] for r in rows):
            mine = [r for r in rows if r["command"] == command]
            try:
                args = accuracy.parser().parse_args(script_args(command, "accuracy.py"))
                tasks, _ = accuracy.plan(args, tunings[args.suite])
            except (ValueError, SystemExit, accuracy.BenchmarkError) as e:
                problems.append(f"{file}: `{command}` ({len(mine)} record(s)) does not plan: {e}")
                continue
            planned = {(t["regime"], t["method"], t["seed"], t.get("noise_draw", 0)): t["config"] for t in tasks}
            groups: dict[tuple[str, ...], list[str]] = {}
            for r in mine:
                built = planned.get((r["regime"], r["method"], r["seed"], r.get("noise_draw", 0)))
                if built is None:
                    problems.append(f"{file}: {r['regime']}/{r['method']} seed {r['seed']} is not among the runs of "
                                    f"`{command}`")
                elif not _same(r["config_sha"], built, store):
                    diff = _diff(r["config_sha"], built, store)
                    groups.setdefault(diff, []).append(f"{r['regime']}/{r['method']} seed {r['seed']}")
            problems += _report(file, command, groups)
    return problems


def check_cost(results: Path, store: dict) -> list[str]:
    """Each cost row's two configs, built again by ``cost.configs`` from the setting and the command's cache folder."""
    import cost

    path = results / "cost.json"
    rows = json.loads(path.read_text()).get("rows", []) if path.is_file() else []
    problems = []
    for row in rows:
        argv = script_args(row["command"], "cost.py")
        if "--cache-dir" not in argv:
            # the default cache folder is the checkout's own: the config holds the path of the checkout that ran
            cache_dir = store.get(row["kd_config_sha"], {}).get("run", {}).get("cache_dir")
        else:
            cache_dir = argv[argv.index("--cache-dir") + 1]
        try:
            kd, lkd, _ = cost.configs(row["setting"], cache_dir, results)
        except (ValueError, SystemExit) as e:
            problems.append(f"cost.json: `{row['command']}` (setting {row['setting']}) does not plan: {e}")
            continue
        for side, built in (("kd", kd), ("lkd", lkd)):
            got = row[f"{side}_config_sha"]
            if not _same(got, built, store):
                problems += _report("cost.json", row["command"], {_diff(got, built, store): [f"{row['setting']} ({side})"]})
    return problems


def check_transfer(results: Path, store: dict) -> list[str]:
    """``accuracy_transfer.json``: one plan per distinct command of ``benchmarks/transfer.py``, every row against it."""
    import transfer

    path = results / transfer.RECORDS
    rows = json.loads(path.read_text()) if path.is_file() else []
    problems = []
    for command in dict.fromkeys(r["command"] for r in rows):
        mine = [r for r in rows if r["command"] == command]
        try:
            args = transfer.parser().parse_args(script_args(command, "transfer.py"))
            args.results, args.plan_only = str(results), True  # plan only: the label files are not written
            tasks = transfer.plan(args)
        except (ValueError, SystemExit, transfer.accuracy.BenchmarkError) as e:
            problems.append(f"{transfer.RECORDS}: `{command}` ({len(mine)} record(s)) does not plan: {e}")
            continue
        planned = {(t["setting"], t["role"], t["seed"]): t["config"] for t in tasks}
        groups: dict[tuple[str, ...], list[str]] = {}
        for r in mine:
            built = planned.get((r["setting"], r["role"], r["seed"]))
            if built is None:
                problems.append(f"{transfer.RECORDS}: {r['setting']}/{r['role']} seed {r['seed']} is not among the runs "
                                f"of `{command}`")
            elif not _same(r["config_sha"], built, store):
                groups.setdefault(_diff(r["config_sha"], built, store), []).append(f"{r['setting']}/{r['role']} seed {r['seed']}")
        problems += _report(transfer.RECORDS, command, groups)
    return problems


def check(results: Path = records.RESULTS) -> list[str]:
    """Every record that does not re-plan from its command, with the reason; empty when all do."""
    results = Path(results)
    store_path = results / "configs.json"
    store = json.loads(store_path.read_text()) if store_path.is_file() else {}
    return check_accuracy(results, store) + check_cost(results, store) + check_transfer(results, store)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(records.RESULTS), help="the records folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    problems = check(Path(args.results))
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"\n{len(problems)} group(s) of records do not re-plan from their command: re-run them, or drop them with "
              "their reason (benchmarks/records.py drop)", file=sys.stderr)
        return 1
    print("replan: every record's command re-plans to its config_sha")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
