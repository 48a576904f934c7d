"""The benchmark scripts themselves: their statistics against scipy, and the GPU script on tiny shapes
(so it still runs the day a GPU is lent)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_difference_and_its_standard_error_match_scipy():
    acc = _load("accuracy")
    kd = [85.2, 84.9, 85.6, 85.0, 84.7, 85.3]
    lkd = [85.6, 85.0, 86.1, 85.1, 85.2, 85.2]
    recs = [{"method": "kd", "seed": s, "test_top1": a, "quiz_top1": a, "wall_s": 1.0} for s, a in enumerate(kd)]
    recs += [{"method": "lkd-full", "seed": s, "test_top1": a, "quiz_top1": a, "wall_s": 1.1} for s, a in enumerate(lkd)]
    recs.append({"method": "lkd-full", "seed": 99, "test_top1": 0.0, "quiz_top1": 0.0, "wall_s": 1.0})  # no KD partner: not paired
    d = acc.paired(recs, "lkd-full", "kd")
    t = stats.ttest_rel(lkd, kd)
    assert d["n"] == 6
    assert d["mean"] == pytest.approx(sum(b - a for a, b in zip(kd, lkd)) / 6)
    assert d["mean"] / d["se"] == pytest.approx(t.statistic)
    rows = {r["method"]: r for r in acc.summarise(recs[:-1])}
    assert rows["kd"]["vs_ref"] is None and rows["lkd-full"]["vs_ref"]["n"] == 6
    assert rows["lkd-full"]["test_std"] == pytest.approx(stats.tstd(lkd))
    from benchmarks import report

    r = report.paired(recs, "lkd-full", "kd")  # the report's own statistics agree
    assert (r["mean"], r["se"], r["n"]) == pytest.approx((d["mean"], d["se"], d["n"]))
    # the field suite's finals: every seed on two noise draws, each paired with its own draw (not one draw per seed)
    draws = [{**r, "noise_draw": 1, "test_top1": r["test_top1"] + (5.0 if r["method"] == "kd" else 0.0)} for r in recs[:-1]]
    both = acc.paired(recs[:-1] + draws, "lkd-full", "kd")
    diffs = [b - a for a, b in zip(kd, lkd)] + [b - a - 5.0 for a, b in zip(kd, lkd)]
    assert both["n"] == 12 and both["mean"] == pytest.approx(sum(diffs) / 12)
    assert both["se"] == pytest.approx(stats.sem(diffs)) and both["worst"] == pytest.approx(min(diffs))
    from benchmarks.report_field import paired_draws

    assert paired_draws(recs[:-1] + draws, "lkd-full", "kd") == both


@pytest.mark.slow


def test_gpu_script_runs_every_setting_on_tiny_shapes():
    # the compiled mode traces the student step for real; aot_eager skips code generation to stay fast on CPU
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_core.py"), "--smoke", "--pairs", "resnet32x4->resnet8x4",
                        "--compile-backend", "aot_eager"], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    gpu = _load("gpu_core")
    for name, _ in gpu.SETTINGS:
        for mode in ("eager", "compiled"):
            assert f"resnet32x4->resnet8x4    {mode:8} {name}" in r.stdout


def test_percentiles_need_a_hundred_samples():
    util = _load("_util")
    assert util.summary([float(i) for i in range(99)])["p99"] is None
    s = util.summary([float(i) for i in reversed(range(100))])
    assert s["p99"] == pytest.approx(98.01) and s["p50"] == 49.5 and s["n"] == 100  # linear interpolation (numpy's)
    assert s["iqr"] == pytest.approx(74.25 - 24.75) and (s["min"], s["max"]) == (0.0, 99.0)


def test_a_cost_pair_runs_each_side_in_a_fresh_process_and_records_what_ran(tmp_path):
    from lkd_ray.config import build_config

    cost = _load("cost")
    sections = {"data": {"dataset": "synthetic", "synthetic_size": 128, "batch_size": 32, "image_size": 16},
                "optim": {"epochs": 1}, "run": {"progress": False, "threads": 1}}
    kd = build_config("fashion_mnist", loss={"method": "ce"}, **sections).to_dict()
    wall, proc = cost.one_run(kd, tmp_path / "kd")
    res = json.loads((tmp_path / "kd" / "result.json").read_text())
    assert res["wall_s"] == wall and proc > wall > 0 and res["config"] == kd  # the run's own time, and the process's


def test_the_cost_of_a_variant_is_measured_on_the_config_its_record_ran(tmp_path):
    """A variant (``lkd-<name>``, built by --set) has no grid to rebuild it from: cost.py takes the config of its
    seed-0 record from the config store, against the regime's KD as the accuracy benchmark builds it."""
    cost, records = _load("cost"), _load("records")
    recs = json.loads((ROOT / "benchmarks" / "results" / "accuracy_regimes.json").read_text())
    rec = next(r for r in recs if r["regime"] == "noisy-pair30" and r["method"] == "lkd-sample-every40" and r["seed"] == 0)
    kd_rec = next(r for r in recs if r["regime"] == "noisy-pair30" and r["method"] == "kd" and r["seed"] == 0)
    kd, lkd, _ = cost.configs("noisy-pair30:lkd-sample-every40", str(tmp_path))
    stored = json.loads(records.CONFIGS.read_text())[rec["config_sha"]]
    assert lkd["run"]["cache_dir"] == str(tmp_path) and lkd["meta"]["meta_every"] == 40 == stored["meta"]["meta_every"]
    assert {k: v for k, v in lkd.items() if k != "run"} == {k: v for k, v in stored.items() if k != "run"}
    kd_stored = json.loads(records.CONFIGS.read_text())[kd_rec["config_sha"]]
    assert kd["loss"]["method"] == "kd" and records.without_neutral(kd)["data"] == records.without_neutral(kd_stored)["data"]
    with pytest.raises(SystemExit, match="no seed-0 record of 'lkd-nope'"):
        cost.configs("noisy-pair30:lkd-nope", str(tmp_path))


def test_cost_reads_the_tuning_records_and_configs_from_the_results_folder_it_is_given(tmp_path):
    """`cost.py --results DIR` builds a tuned setting from DIR's tuning records and a variant from DIR's records and
    config store (it once read the repository's own folder whatever --results said, and failed for a regime whose
    tuning had been written elsewhere). DIR here holds only noisy-pair30's DIST trial at τ=8 and one variant row."""
    cost = _load("cost")
    src = ROOT / "benchmarks" / "results"
    tuning = [r for r in json.loads((src / "accuracy_regimes_tuning.json").read_text())
              if r["regime"] == "noisy-pair30" and r["method"] == "dist[tau=8]"]
    assert len(tuning) == 1
    rec = next(r for r in json.loads((src / "accuracy_regimes.json").read_text())
               if r["regime"] == "noisy-pair30" and r["method"] == "lkd-sample-every40" and r["seed"] == 0)
    store = json.loads((src / "configs.json").read_text())
    here = tmp_path / "results"
    here.mkdir()
    (here / "accuracy_regimes_tuning.json").write_text(json.dumps(tuning))
    (here / "accuracy_regimes.json").write_text(json.dumps([{**rec, "method": "lkd-only-here"}]))
    (here / "configs.json").write_text(json.dumps({rec["config_sha"]: store[rec["config_sha"]]}))
    _, dist, _ = cost.configs("noisy-pair30:dist-tuned", str(tmp_path), here)
    assert dist["loss"]["method"] == "dist" and dist["loss"]["tau"] == 8.0  # the repository's own pick is another τ
    _, lkd, _ = cost.configs("noisy-pair30:lkd-only-here", str(tmp_path), here)
    assert {k: v for k, v in lkd.items() if k != "run"} == {k: v for k, v in store[rec["config_sha"]].items() if k != "run"}
    with pytest.raises(SystemExit, match="no seed-0 record of 'lkd-only-here'"):
        cost.configs("noisy-pair30:lkd-only-here", str(tmp_path))  # not in the repository's records


def test_a_record_says_when_the_code_differed_from_its_commit(tmp_path):
    """records.commit() looks at lkd_ray/, jobs/ and benchmarks/*.py of the checkout it sits in, from any working
    directory (it once ran git from benchmarks/, where those pathspecs match nothing, and always said clean)."""
    import shutil

    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "lkd_ray").mkdir()
    shutil.copy(ROOT / "benchmarks" / "records.py", repo / "benchmarks" / "records.py")
    (repo / "lkd_ray" / "x.py").write_text("A = 1\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    spec = importlib.util.spec_from_file_location("records_copy", repo / "benchmarks" / "records.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert mod.commit() == {"commit": head, "dirty": False}
    (repo / "lkd_ray" / "x.py").write_text("A = 2\n")
    assert mod.commit() == {"commit": head, "dirty": True}


def test_two_benchmarks_appending_to_the_same_records_lose_nothing(tmp_path):
    """Two processes appending to one records file (and one config store) at once: every row and config arrives.
    Without the lock each read-modify-write can write the file back without the other's rows."""
    path, configs = tmp_path / "recs.json", tmp_path / "configs.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import records; from pathlib import Path\n"
            "for i in range(60):\n"
            "    records.append(Path(sys.argv[2]), [{'who': sys.argv[4], 'i': i}])\n"
            "    records.keep_configs([{'who': sys.argv[4], 'i': i}], Path(sys.argv[3]))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(ROOT / "benchmarks"), str(path), str(configs), who])
             for who in ("a", "b")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    rows = json.loads(path.read_text())
    assert sorted((r["who"], r["i"]) for r in rows) == [(w, i) for w in ("a", "b") for i in range(60)]
    assert len(json.loads(configs.read_text())) == 120


def test_a_records_lock_held_too_long_stops_the_writer_and_names_the_lock(tmp_path):
    """The records lock (filelock) waits a bounded time: a writer stuck elsewhere gives an error naming the lock file,
    not a benchmark hung forever at its last append."""
    records = _load("records")
    path = tmp_path / "recs.json"
    hold = ("import sys, time\nfrom filelock import FileLock\nlock = FileLock(sys.argv[1])\nlock.acquire()\n"
            "print('held', flush=True)\ntime.sleep(120)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, f"{path}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError, match=r"recs\.json\.lock is still held by another writer"):
            with records.locked(path, timeout=0.5):
                pass
    finally:
        holder.kill()
        holder.wait(30)
    records.append(path, [{"a": 1}])  # free again: the append goes through
    assert json.loads(path.read_text()) == [{"a": 1}]


def test_dropping_rows_removes_only_what_matches_and_logs_why(tmp_path):
    """The drop command (as a user runs it) removes whole matching rows, keeps the rest in order, and logs the drop
    with its reason, command and the dropped keys; a drop without a reason, or one that matches nothing, is refused
    and changes nothing."""
    recs = tmp_path / "accuracy_regimes.json"
    rows = [{"regime": g, "method": m, "seed": s, "test_top1": 80.0 + s, "config_sha": f"{g}-{m}-{s}"}
            for g in ("noisy-sym40", "scarce") for m in ("kd", "lkd-sample-tuned") for s in range(3)]
    recs.write_text(json.dumps(rows))
    cli = [sys.executable, str(ROOT / "benchmarks" / "records.py"), "drop", recs.name, "--results", str(tmp_path)]

    r = subprocess.run(cli + ["--where", "regime=noisy-sym40", "method=lkd-sample-tuned", "--reason", "dead CE output"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    left = json.loads(recs.read_text())
    assert left == [x for x in rows if not (x["regime"] == "noisy-sym40" and x["method"] == "lkd-sample-tuned")]
    (log,) = json.loads((tmp_path / "dropped.json").read_text())
    assert log["file"] == recs.name and log["rows"] == 3 and log["reason"] == "dead CE output"
    assert log["keys"] == [["noisy-sym40", "lkd-sample-tuned", str(s)] for s in range(3)]
    assert log["config_shas"] == [f"noisy-sym40-lkd-sample-tuned-{s}" for s in range(3)]
    assert "records.py drop" in log["command"] and "commit" in log

    for bad in (["--where", "regime=noisy-sym40", "method=lkd-sample-tuned", "--reason", "again"],  # nothing matches now
                ["--where", "regim=scarce", "--reason", "typo in the field"],
                ["--where", "regime=scarce", "--reason", " "]):
        r = subprocess.run(cli + bad, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "error" in r.stderr, (bad, r.stderr)
    assert json.loads(recs.read_text()) == left and len(json.loads((tmp_path / "dropped.json").read_text())) == 1


def test_a_suite_does_not_resume_on_another_teacher(tmp_path):
    """A teacher's key is its recipe, not its weights: a retrained one can score otherwise. Records of the same
    regime, suite and noise draw that ran on another teacher are named (so the benchmark stops); other regimes,
    suites or draws, and records that predate the teacher field, are not."""
    acc = _load("accuracy")
    here = {"key": "k1", "test_top1": 91.66}
    rows = [{"regime": "full", "suite": "field", "noise_draw": 0, "teacher": {"key": "k1", "test_top1": 91.26}, "seed": 0},
            {"regime": "full", "suite": "field", "noise_draw": 0, "teacher": dict(here), "seed": 1},
            {"regime": "full", "teacher": {"key": "k1", "test_top1": 91.52}, "seed": 2},  # regimes suite
            {"regime": "full", "suite": "field", "noise_draw": 1, "teacher": {"key": "k2", "test_top1": 90.0}, "seed": 3},
            {"regime": "scarce", "suite": "field", "noise_draw": 0, "teacher": {"key": "k1", "test_top1": 91.26}, "seed": 4},
            {"regime": "full", "suite": "field", "seed": 5}]  # no teacher recorded
    assert [r["seed"] for r in acc.teacher_conflicts(rows, "full", "field", 0, here)] == [0]
    assert [r["seed"] for r in acc.teacher_conflicts(rows, "full", "regimes", 0, here)] == [2]
    assert acc.teacher_conflicts(rows, "full", "field", 0, {"key": "k1", "test_top1": 91.26}) == [rows[1]]
    other = acc.teacher_conflicts(rows, "full", "field", 0, here)
    err = acc.teacher_conflict_error(other, "full (field suite, noise draw 0)", here, str(tmp_path / "c"))
    assert "1 recorded run(s) of full (field suite, noise draw 0)" in err and "k1 at 91.26 %" in err
    assert "k1 at 91.66 %" in err and str(tmp_path / "c" / "teachers") in err and "records.py drop" in err
    assert acc.teacher_conflict_error(acc.teacher_conflicts(rows, "full", "field", 1, rows[3]["teacher"]), "x",
                                      rows[3]["teacher"], "c") is None
    # the transfer benchmark judges a setting's rows the same way (its older rows recorded no teacher)
    xfer = [{"setting": "pair20", "teacher": {"key": "t", "test_top1": 80.0}}, {"setting": "pair20"},
            {"setting": "pair45", "teacher": {"key": "t", "test_top1": 70.0}}]
    assert acc.on_other_teacher([r for r in xfer if r["setting"] == "pair20"], {"key": "t", "test_top1": 80.5}) == [xfer[0]]
    assert acc.on_other_teacher([r for r in xfer if r["setting"] == "pair20"], {"key": "t", "test_top1": 80.0}) == []

    kept, cache = tmp_path / "kept", tmp_path / "cache"
    kept.mkdir()
    (kept / "t-a.pt").write_bytes(b"weights a")
    (kept / "t-a.json").write_text('{"key": "a"}')
    (kept / "t-b.pt").write_bytes(b"weights b")  # no .json: not a whole teacher, not restored
    (cache / "teachers").mkdir(parents=True)
    assert acc.restore_kept_teachers(str(cache), kept, log=lambda m: None) == ["t-a.pt"]
    assert (cache / "teachers" / "t-a.pt").read_bytes() == b"weights a"
    assert sorted(p.name for p in (cache / "teachers").iterdir()) == ["t-a.json", "t-a.pt"]
    (cache / "teachers" / "t-a.pt").write_bytes(b"the cache's own")  # a cached teacher is never overwritten
    assert acc.restore_kept_teachers(str(cache), kept, log=lambda m: None) == []
    assert (cache / "teachers" / "t-a.pt").read_bytes() == b"the cache's own"


def test_the_kept_teachers_load_as_weights_and_match_the_field_records_that_ran_on_them():
    """Each teacher kept in the repository loads with ``weights_only=True`` as the benchmark's teacher network, its
    name carries its key, and the field suite's records with that key ran on it (the same test top-1)."""
    from lkd_ray.models import load_teacher

    acc = _load("accuracy")
    kept = sorted(acc.KEPT_TEACHERS.glob("*.pt"))
    assert kept, f"no teacher kept in {acc.KEPT_TEACHERS}"
    field = json.loads((ROOT / "benchmarks" / "results" / acc.FIELD_TUNING).read_text())
    for pt in kept:
        info = json.loads(pt.with_suffix(".json").read_text())
        assert pt.stem.endswith(info["key"])
        net = load_teacher("cnn_teacher", str(pt), 10, 1)  # weights_only=True inside; a wrong shape raises
        assert not any(p.requires_grad for p in net.parameters())
        ran = [r for r in field if (r.get("teacher") or {}).get("key") == info["key"] and r.get("regime") == "full"]
        assert ran and {r["teacher"]["test_top1"] for r in ran} == {info["test_top1"]}


def test_the_benchmark_modules_import_no_circle():
    """Every import between benchmarks/*.py (top level or inside a function, `benchmarks.x` or the scripts' `import x`)
    forms no circle: report and figures once imported each other."""
    import ast

    mods = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    graph: dict[str, set[str]] = {}
    for m in mods:
        deps = set()
        for node in ast.walk(ast.parse((ROOT / "benchmarks" / f"{m}.py").read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for n in names:
                n = n.removeprefix("benchmarks.")
                if n in mods and n != m:
                    deps.add(n)
        graph[m] = deps

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += graph[n]
        return seen

    circles = sorted(m for m in mods if m in reach(m))
    assert not circles, f"benchmark modules in an import circle: {circles} ({ {m: sorted(graph[m]) for m in circles} })"


def test_every_record_re_plans_from_its_command():
    """CI: each accuracy record (final and tuning) and each cost row, planned again from its own command (nothing
    runs), builds the config its config_sha names — or the record is re-run or dropped with its reason."""
    problems = _load("replan").check(ROOT / "benchmarks" / "results")
    assert not problems, "\n".join(p[:1500] for p in problems)


def test_the_replan_check_names_a_record_whose_command_builds_another_config(tmp_path):
    """On records written here: rows planned from their command pass; a row whose stored config differs (another τ)
    is reported with the field, a row its command does not plan is named, and the script exits 1."""
    acc, replan = _load("accuracy"), _load("replan")
    command = "python benchmarks/accuracy.py --regime full --methods kd ce --seeds 0 1 --out /r --cache-dir /c"
    tasks, _ = acc.plan(acc.parser().parse_args(replan.script_args(command, "accuracy.py")), [])
    store = {acc.records.config_sha(t["config"]): t["config"] for t in tasks}
    rows = [{"regime": t["regime"], "method": t["method"], "seed": t["seed"], "command": command,
             "config_sha": acc.records.config_sha(t["config"])} for t in tasks]
    (tmp_path / "configs.json").write_text(json.dumps(store))
    (tmp_path / "accuracy_regimes.json").write_text(json.dumps(rows))
    assert replan.check(tmp_path) == []
    other = json.loads(json.dumps(tasks[0]["config"]))
    other["loss"]["tau"] = 2.5
    store[acc.records.config_sha(other)] = other
    rows[0]["config_sha"] = acc.records.config_sha(other)
    rows.append({**rows[1], "seed": 7})
    (tmp_path / "configs.json").write_text(json.dumps(store))
    (tmp_path / "accuracy_regimes.json").write_text(json.dumps(rows))
    problems = replan.check(tmp_path)
    assert len(problems) == 2 and "full/ce seed 7 is not among the runs" in problems[0]
    assert "1 record(s)" in problems[1] and "full/kd seed 0" in problems[1] and "loss.tau: 2.5 → 4.0" in problems[1]
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "replan.py"), "--results", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "loss.tau: 2.5 → 4.0" in r.stderr


def test_correcting_a_provenance_flag_changes_only_matching_rows_and_logs_the_old_values(tmp_path):
    """The correct command (as a user runs it) sets ``dirty`` in the matching rows only, in a list file and in
    cost.json's rows, and logs what it replaced, why, the command and the commit; another field, a value the flag
    cannot hold, no reason, no match or nothing to change is refused and changes nothing."""
    recs = tmp_path / "accuracy_regimes.json"
    rows = [{"regime": g, "method": "kd", "seed": s, "test_top1": 80.0, "commit": c, "dirty": False}
            for g, c in (("noisy-sym40", "aaa"), ("scarce", "bbb")) for s in range(3)]
    recs.write_text(json.dumps(rows))
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"rows": [{"setting": "x", "commit": "aaa", "dirty": False, "ratios": [1.0]},
                                         {"setting": "y", "commit": "ccc", "dirty": False, "ratios": [1.1]}]}))
    cli = [sys.executable, str(ROOT / "benchmarks" / "records.py"), "correct", "--results", str(tmp_path)]

    r = subprocess.run(cli + [recs.name, "--where", "commit=aaa", "--set", "dirty=null", "--reason", "broken check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(recs.read_text()) == [{**x, "dirty": None} if x["commit"] == "aaa" else x for x in rows]
    r = subprocess.run(cli + [cost.name, "--where", "commit=aaa", "--set", "dirty=true", "--reason", "tree held a change"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert [x["dirty"] for x in json.loads(cost.read_text())["rows"]] == [True, False]
    first, second = json.loads((tmp_path / "corrected.json").read_text())
    assert (first["file"], first["rows"], first["field"], first["old"], first["new"]) == (recs.name, 3, "dirty", {"false": 3}, None)
    assert first["reason"] == "broken check" and "records.py correct" in first["command"] and "commit" in first
    assert first["keys"] == [["noisy-sym40", "kd", str(s), "None"] for s in range(3)]
    assert (second["file"], second["rows"], second["new"], second["keys"]) == (cost.name, 1, True, [["None", "None", "None", "x"]])

    for bad in ([recs.name, "--where", "commit=aaa", "--set", "dirty=null", "--reason", "again"],  # nothing to change
                [recs.name, "--where", "commit=zzz", "--set", "dirty=true", "--reason", "no match"],
                [recs.name, "--where", "commit=bbb", "--set", "test_top1=90", "--reason", "a measurement"],
                [recs.name, "--where", "commit=bbb", "--set", "dirty=1", "--reason", "not a flag value"],
                [recs.name, "--where", "commit=bbb", "--set", "dirty=yes", "--reason", "not JSON"],
                [recs.name, "--where", "commit=bbb", "--set", "dirty=true", "--reason", " "]):
        r = subprocess.run(cli + bad, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "error" in r.stderr, (bad, r.stderr)
    assert json.loads(recs.read_text())[3:] == rows[3:] and len(json.loads((tmp_path / "corrected.json").read_text())) == 2


def test_the_server_benchmark_counts_every_submission_once(tmp_path):
    """accepted + rejected + duplicates = submitted, on the server and by the clients, with rounds that arrive out
    of order (0 true duplicates: nothing was replayed)."""
    import torch

    from lkd_ray.config import build_config
    from lkd_ray.distributed.lossnet_server import LossNetServerCore

    bench = _load("lossnet_server")
    cfg = build_config("fashion_mnist", lossnet={"hidden": [4]})
    core = LossNetServerCore(cfg, str(tmp_path), "run", "async", 1, persist=False)
    g = torch.zeros(core.opt.numel)
    client = {"submitted": 0, "accepted": 0, "rejected": 0, "duplicates": 0, "errors": 0}
    for r, base in ((1, 0), (0, 0), (3, 2), (2, 0)):  # round 0 after round 1; round 2 late and stale
        res = core.apply_batch([{"sender": "c0", "round": r, "grad": g, "base_version": base}])[0]
        client["submitted"] += 1
        client["duplicates" if res.get("duplicate") else "accepted" if res["accepted"] else "rejected"] += 1
    t = bench.tally(core.report(), [client])
    assert (t["submitted"], t["accepted"], t["rejected"], t["duplicates"], t["uncounted"]) == (4, 3, 1, 0, 0)
    assert t["client_counted"]["uncounted"] == 0 and t["client_counted"]["accepted"] == 3
