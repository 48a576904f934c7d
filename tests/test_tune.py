"""A small Tune search on Fashion-MNIST: Optuna define-by-run + ASHA, each trial its own TorchTrainer."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from lkd_ray.config import build_config  # noqa: E402
from lkd_ray.distributed.launch import LaunchOptions  # noqa: E402
from lkd_ray.distributed.tune import INPUT_SETS, TuneOptions, define_space, overrides_from_params, run_search  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_define_by_run_space_is_conditional_and_maps_to_valid_configs():
    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    depths = set()
    for _ in range(30):
        trial = study.ask()
        define_space(trial)
        p = trial.params
        depths.add(p["lossnet.depth"])
        assert {k for k in p if k.startswith("lossnet.width")} == {f"lossnet.width{i}" for i in range(p["lossnet.depth"])}
        cfg = build_config("fashion_mnist", **overrides_from_params(p))
        assert len(cfg.lossnet.hidden) == p["lossnet.depth"] and cfg.lossnet.inputs == INPUT_SETS[p["lossnet.inputs"]]
        study.tell(trial, 0.0)
    assert depths == {1, 2, 3}


@pytest.mark.slow
def test_small_search_stops_some_trials_and_its_best_config_runs_a_job(tmp_path, fashion_available):
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        cfg = build_config("fashion_mnist", data={"train_subset": 1200, "batch_size": 64}, optim={"epochs": 3},
                           model={"teacher_epochs": 1}, run={"cache_dir": str(tmp_path / "cache"), "progress": False})
        store = tmp_path / "store"
        # reduction factor 6: past epoch 1 only a trial at the top sixth so far goes on (a chance of 1/720 that
        # none stops if the epoch-1 values came in random order; a tie with the best goes on)
        topts = TuneOptions(trials=6, max_concurrent=2, grace_epochs=1, reduction_factor=6, name="t1")
        launch = LaunchOptions(storage=str(store), cpus_per_worker=0.9)  # two trials' workers fit on 2 CPUs
        res = run_search(cfg, launch, topts, tmp_path / "out")
        rows = res["rows"]
        assert len(rows) == 6 and not any(r["error"] for r in rows)
        epochs = [r["epochs"] for r in rows]
        assert max(epochs) == 3 and min(epochs) < 3, epochs  # ASHA stopped some trials early
        assert all(r["quiz_top1"] is not None for r in rows)
        for f in ("trials.csv", "trials.json", "best_config.yaml"):
            assert (tmp_path / "out" / f).is_file() and (store / "t1" / f).is_file()
        assert json.loads((tmp_path / "out" / "trials.json").read_text())[0]["quiz_top1"] == res["best_metric"]
        best = yaml.safe_load((tmp_path / "out" / "best_config.yaml").read_text())
        assert set(best) == {"lossnet", "meta"}
        # resuming the finished search restores it instead of starting over
        again = run_search(cfg, launch, topts, tmp_path / "out2")
        assert sorted(r["trial_id"] for r in again["rows"]) == sorted(r["trial_id"] for r in rows)
    finally:
        ray.shutdown()
    # the best-config file is accepted unchanged by a job
    out = subprocess.run([sys.executable, "jobs/lkd_fashion.py", "--config", str(tmp_path / "out" / "best_config.yaml"),
                          "--methods", "lkd", "--smoke", "--storage", str(tmp_path / "job")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    results = list((tmp_path / "job").glob("*/result.json"))
    assert results
    job_cfg = json.loads(results[0].read_text())["config"]
    assert job_cfg["lossnet"]["hidden"] == best["lossnet"]["hidden"] and job_cfg["meta"]["scope"] == best["meta"]["scope"]


@pytest.mark.slow
def test_handcrafted_search_runs_every_trial_to_the_end_and_names_its_pick(tmp_path, fashion_available):
    """The hand-crafted grid through Tune (what `jobs/tune_lossnet.py --space handcrafted` runs): every trial
    gets the same budget (no early stopping), the pick is the best quiz top-1, and its config is a job's config."""
    from lkd_ray.search_spaces import HANDCRAFTED

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        cfg = build_config("fashion_mnist", data={"labels_per_class": 40, "quiz_per_class": 10, "batch_size": 40},
                           optim={"epochs": 2}, model={"teacher_epochs": 1, "teacher_batch_size": 128},
                           run={"cache_dir": str(tmp_path / "cache"), "progress": False})
        topts = TuneOptions(max_concurrent=2, name="hc", space="handcrafted", families=["dist"])
        res = run_search(cfg, LaunchOptions(storage=str(tmp_path / "store"), cpus_per_worker=0.9), topts, tmp_path / "out")
    finally:
        ray.shutdown()
    rows = res["rows"]
    assert sorted(r["param.trial"] for r in rows) == sorted(t.label for t in HANDCRAFTED["dist"])
    assert all(r["epochs"] == 2 and not r["error"] for r in rows)  # every trial ran to its last epoch
    best = max(rows, key=lambda r: (r["quiz_top1"], -(r["quiz_loss"] or 0)))
    assert res["best_params"]["trial"] == best["param.trial"] and res["best_metric"] == best["quiz_top1"]
    picked = yaml.safe_load((tmp_path / "out" / "best_config.yaml").read_text())
    assert picked == next(t.sections for t in HANDCRAFTED["dist"] if t.label == best["param.trial"])
    assert "hand-crafted loss dist[" in (tmp_path / "out" / "best_config.yaml").read_text()
    build_config("fashion_mnist", **picked)  # a valid config section set, as a job takes it


def test_the_tune_table_ranks_a_trial_without_a_quiz_loss_after_one_with_it(tmp_path):
    """Same quiz top-1: the measured quiz loss wins over a missing one (once read as a loss of 0), as in ``pick``."""
    from ray.tune import Result

    from lkd_ray.distributed.tune import write_results
    from lkd_ray.search_spaces import trials
    from lkd_ray.storage import open_storage

    a, b = (t.label for t in trials("handcrafted")[:2])
    grid = [Result(metrics={"trial_id": "t0", "quiz_top1": 81.0, "quiz_loss": None, "config/trial": a}, checkpoint=None,
                   error=None, path=str(tmp_path / "t0")),
            Result(metrics={"trial_id": "t1", "quiz_top1": 81.0, "quiz_loss": 0.4, "config/trial": b}, checkpoint=None,
                   error=None, path=str(tmp_path / "t1"))]
    out = write_results(grid, build_config("fashion_mnist"), tmp_path / "out", open_storage(str(tmp_path / "store")),
                        "s", space="handcrafted")
    assert [r["trial_id"] for r in out["rows"]] == ["t1", "t0"] and out["best_params"] == {"trial": b}
