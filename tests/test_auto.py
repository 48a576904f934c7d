"""`python -m lkd_ray auto`: the plan and pick (no Ray), an end-to-end search on Fashion-MNIST through the real local
Ray, a search killed with SIGKILL and re-run (finished trials are not run again), and bad input stopped before any
trial with exit 2 (storage: 3)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lkd_ray import auto_plan as plan
from lkd_ray import search_spaces
from lkd_ray.config import ConfigError, build_config
from lkd_ray.search_spaces import Trial
from lkd_ray.storage import StorageError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "data.train_subset=600", "--set", "data.batch_size=64", "--set", "model.teacher_epochs=1", "--epochs", "1"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("auto-cache"))  # one tiny teacher for every test here


# --------------------------------------------------------------------------- the plan, without Ray
def test_families_come_from_the_registries_and_a_later_family_brings_its_bases(monkeypatch):
    st = plan.resolve_families(None)
    assert (st.hand, st.rules, st.on_pick, st.notes) == (list(search_spaces.HANDCRAFTED), list(search_spaces.RULE_GRIDS),
                                                          list(search_spaces.ON_PICK), [])
    st = plan.resolve_families(["lkd-sample-dist", "ls"])
    assert st.hand == ["dist", "ls"] and st.on_pick == ["lkd-sample-dist"] and "dist added" in st.notes[0]
    # a rule sits on every rule base: the bases missing are added to stage 1, in registry order, each with a note
    st = plan.resolve_families(["gce", "ls", "lkd-rule"])
    assert st.hand == [f for f in search_spaces.HANDCRAFTED if f in (*search_spaces.RULE_BASES, "ls")]
    assert st.rules == ["gce"] and st.on_pick == ["lkd-rule"]
    assert [n.split(":")[-1].strip() for n in st.notes] == [f"{b} added to stage 1" for b in search_spaces.RULE_BASES]
    # a family the lead adds to a registry is searched with no change to auto
    monkeypatch.setitem(search_spaces.HANDCRAFTED, "new", [Trial("new", "tau=1", {"loss": {"method": "dist", "tau": 1.0}})])
    monkeypatch.setitem(search_spaces.RULE_GRIDS, "newrule", [("rule=agree", {"ce_rule": "agree"})])
    st = plan.resolve_families(None)
    assert "new" in st.hand and "newrule" in st.rules
    assert [t.label for t in plan.stage1_trials(["new"], None)] == ["new[tau=1]"]
    with pytest.raises(plan.AutoInputError, match="unknown families \\['nope'\\].*valid families are"):
        plan.resolve_families(["nope"])


def _row(label, quiz, stage=1, sel=None, cal=None, loss=0.5):
    fam, setting = label[:-1].split("[", 1)
    sections = next((t.sections for t in search_spaces.HANDCRAFTED.get(fam, []) if t.name == setting),
                    {"loss": {"method": "dist" if "base=dist" in setting else "kd", "tau": 4.0, "w_ce": 0.5}})
    return {"label": label, "family": fam, "setting": setting, "sections": sections, "stage": stage, "quiz_top1": quiz,
            "quiz_loss": loss, "epochs": 2, "budget_epochs": 2,
            **({"select_top1": sel, "select_loss_cal": cal} if sel is not None else {})}


def test_cap_spreads_over_the_grid_and_a_learned_family_starts_from_its_base_pick():
    kd = search_spaces.HANDCRAFTED["kd"]
    assert plan.capped(kd, 2) == [kd[0], kd[-1]] and len(plan.capped(kd, 5)) == 5 and plan.capped(kd, None) == kd
    assert plan.capped(kd, 1) == [kd[7]]
    rows = [_row("dist[tau=1]", 80.0), _row("dist[tau=4]", 81.0), _row("kd[alpha=0.1,tau=1]", 90.0)]
    trials, bases, notes = plan.stage3_trials(["lkd-sample-dist", "lkd-sample"], 2, rows, search_spaces.pick)
    assert set(bases.values()) == {"dist[tau=4]", "kd[alpha=0.1,tau=1]"} and not notes
    assert all(bases[t.label] == ("dist[tau=4]" if t.family == "lkd-sample-dist" else "kd[alpha=0.1,tau=1]") for t in trials)
    assert {t.sections["loss"]["tau"] for t in trials if t.family == "lkd-sample-dist"} == {4.0}
    assert len(trials) == 4 and len(plan.planned_on_pick_trials(["lkd-sample-dist", "lkd-sample"], 2)) == 4
    trials, bases, notes = plan.stage3_trials(["lkd-sample"], 2, rows[:2], search_spaces.pick)
    assert not trials and "lkd-sample skipped" in notes[0]


def test_three_stages_rules_sit_on_the_kd_and_dist_picks_and_lkd_rule_on_the_best_of_stages_1_and_2():
    s1 = [_row("kd[alpha=0.5,tau=4]", 84.0), _row("kd[alpha=0.9,tau=2]", 85.0), _row("dist[tau=1]", 86.0),
          _row("dist[tau=8]", 83.0), _row("ls[eps=0.1]", 70.0)]
    trials, base_of, notes = plan.stage2_trials(["gce", "agree"], None, s1, search_spaces.pick)
    assert not notes and len(trials) == 2 * (len(search_spaces.RULE_GRIDS["gce"]) + len(search_spaces.RULE_GRIDS["agree"]))
    for t in trials:  # each rule setting on the kd pick and on the dist pick: their losses, the rule's fields on top
        on = "kd[alpha=0.9,tau=2]" if t.name.endswith("base=kd") else "dist[tau=1]"
        assert base_of[t.label] == on
        base_loss = next(r for r in s1 if r["label"] == on)["sections"]["loss"]
        assert {k: v for k, v in t.sections["loss"].items() if k in base_loss} == base_loss and t.sections["loss"]["ce_rule"]
    assert plan.stage_counts(plan.resolve_families(["gce", "agree"]), None)[1] == len(trials)
    assert plan.stage_counts(plan.resolve_families(["gce"]), 1) == [2, 1, 0]  # the cap is per family, over both bases
    # lkd-rule: a residual on the best pick over stages 1 AND 2 (here a rule on the dist pick)
    gce = [dict(_row(t.label, 86.5 if t.label == "gce[q=0.5,base=dist]" else 60.0, stage=2),
                sections=t.sections) for t in trials if t.family == "gce"]
    l3, b3, n3 = plan.stage3_trials(["lkd-rule", "lkd-sample"], 1, s1 + gce, search_spaces.pick)
    rule = next(t for t in trials if t.label == "gce[q=0.5,base=dist]")
    lr = [t for t in l3 if t.family == "lkd-rule"]
    assert len(lr) == 1 and b3[lr[0].label] == "gce[q=0.5,base=dist]" and not n3
    assert lr[0].sections["loss"]["ce_rule"] == "gce" and lr[0].sections["loss"]["gce_q"] == 0.5
    assert lr[0].sections["lossnet"]["base"] == "dist" and lr[0].sections["loss"]["tau"] == rule.sections["loss"]["tau"]
    assert b3[next(t for t in l3 if t.family == "lkd-sample").label] == "kd[alpha=0.9,tau=2]"  # its own base: stage 1's kd
    # rule-weights: the same best pick, its CE and distillation weights over the grid, its own pair left out
    rw, brw, nrw = plan.stage3_trials(["rule-weights"], None, s1 + gce, search_spaces.pick)
    assert set(brw.values()) == {"gce[q=0.5,base=dist]"} and not nrw
    pairs = {(t.sections["loss"]["w_ce"], t.sections["loss"]["w_logit"]) for t in rw}
    own = (rule.sections["loss"].get("w_ce", 1.0), rule.sections["loss"].get("w_logit", 1.0))
    grid = {(c, w) for c in search_spaces.RULE_WEIGHTS["w_ce"] for w in search_spaces.RULE_WEIGHTS["w_logit"]}
    assert pairs == grid - {own} and len(rw) == len(grid) - (own in grid)
    assert all({k: v for k, v in t.sections["loss"].items() if k not in ("w_ce", "w_logit")} ==
               {k: v for k, v in rule.sections["loss"].items() if k not in ("w_ce", "w_logit")} for t in rw)
    assert "rule-weights" in plan.resolve_families(None).on_pick
    with pytest.raises(plan.AutoInputError, match="start from a tuned hand-crafted loss"):
        plan.resolve_families(["rule-weights"])
    # the best overall is a loss the network cannot sit on (CE with label smoothing): the best one it can, with a note
    top_ls = [dict(s1[-1], quiz_top1=99.0)]
    l3, b3, n3 = plan.stage3_trials(["lkd-rule"], 1, s1[:-1] + top_ls + gce, search_spaces.pick)
    assert set(b3.values()) == {"gce[q=0.5,base=dist]"} and "ls[eps=0.1], cannot be its base" in n3[0]
    _, brw, nrw = plan.stage3_trials(["rule-weights"], 1, s1[:-1] + top_ls + gce, search_spaces.pick)
    assert set(brw.values()) == {"gce[q=0.5,base=dist]"} and "ls[eps=0.1], cannot be its base" in nrw[0]
    # ramp: the best pick with its weights and temperature ramped over the search's epochs (it needs them), the rest
    # of the loss the pick's; on a pick with no KD or DIST term (the ls top) the best pick it can sit on, with a note
    rp, brp, nrp = plan.stage3_trials(["ramp"], None, s1 + gce, search_spaces.pick, epochs=7)
    assert set(brp.values()) == {"gce[q=0.5,base=dist]"} and not nrp and len(rp) == 4
    assert {(t.sections["loss"]["ramp_weight"], t.sections["loss"]["ramp_tau"]) for t in rp} == \
        {(w, t) for w in search_spaces.RAMP["ramp_weight"] for t in search_spaces.RAMP["ramp_tau"]}
    assert all(t.sections["loss"]["ramp_epochs"] == 7 and {k: v for k, v in t.sections["loss"].items() if
               not k.startswith("ramp_")} == rule.sections["loss"] for t in rp)
    _, brp, nrp = plan.stage3_trials(["ramp"], 1, s1[:-1] + top_ls + gce, search_spaces.pick, epochs=7)
    assert set(brp.values()) == {"gce[q=0.5,base=dist]"} and "ls[eps=0.1], cannot be its base" in nrp[0]
    with pytest.raises(TypeError, match="run's epochs"):
        plan.stage3_trials(["ramp"], None, s1 + gce, search_spaces.pick)
    assert plan.stage_counts(plan.resolve_families(["dist", "ramp", "lkd-rule-capped"]), None, 7)[2] == 4 + 8
    # lkd-rule-capped: lkd-rule's residual on the same pick, at 2 or 3 meta-steps per epoch with no floor
    cp, bcp, _ = plan.stage3_trials(["lkd-rule-capped"], None, s1 + gce, search_spaces.pick)
    assert set(bcp.values()) == {"gce[q=0.5,base=dist]"}
    assert {t.sections["meta"]["meta_steps_per_epoch"] for t in cp} == {2.0, 3.0}
    assert {t.sections["meta"]["min_meta_steps"] for t in cp} == {0}
    # no finished dist: the rules sit on kd alone, and say so; nothing to sit on: skipped
    trials, base_of, notes = plan.stage2_trials(["gce"], None, s1[:2], search_spaces.pick)
    assert set(base_of.values()) == {"kd[alpha=0.9,tau=2]"} and "not run on dist" in notes[0]
    trials, base_of, notes = plan.stage2_trials(["gce"], None, s1[-1:], search_spaces.pick)
    assert not trials and "gce skipped" in notes[0]


def test_the_selection_split_picks_bases_and_winner_when_select_per_class_is_set():
    # on the quiz, kd[alpha=0.9,tau=2] and dist[tau=8] lead; on the selection split, the others do
    s1 = [_row("kd[alpha=0.5,tau=4]", 84.0, sel=90.0, cal=0.30), _row("kd[alpha=0.9,tau=2]", 85.0, sel=80.0, cal=0.50),
          _row("dist[tau=1]", 80.0, sel=91.0, cal=0.32), _row("dist[tau=8]", 86.0, sel=85.0, cal=0.40)]
    n_select = 50 * 10
    choose = plan.picker(n_select)
    trials, base_of, _ = plan.stage2_trials(["relabel"], None, s1, choose)
    assert set(base_of.values()) == {"kd[alpha=0.5,tau=4]", "dist[tau=1]"}
    assert set(plan.stage2_trials(["relabel"], None, s1, plan.picker(None))[1].values()) == {"kd[alpha=0.9,tau=2]", "dist[tau=8]"}
    # the winner: within one SE of the best select top-1 (91 %, ±1.28 pt on 500 images), the lowest calibrated loss
    win, why = plan.pick_with_reason(s1, n_select)
    assert win["label"] == "kd[alpha=0.5,tau=4]" and "lowest calibrated select loss" in why and "of the 2 finished" in why
    assert plan.pick_with_reason(s1)[0]["label"] == "dist[tau=8]"
    assert plan.pick_split(n_select)["picked_on"] == "selection" and "500 images" in plan.pick_split(n_select)["reason"]
    assert plan.pick_split(None)["picked_on"] == "quiz" and "select_per_class is unset" in plan.pick_split(None)["reason"]
    from lkd_ray.auto_report import trials_table

    table = trials_table(s1, win["label"])
    assert "select top-1" in table and "select loss (cal)" in table and "0.3" in table.splitlines()[2]
    assert "select top-1" not in trials_table([_row("dist[tau=1]", 80.0)])


def test_the_progress_line_names_what_the_search_would_ship_on_its_own_split():
    from lkd_ray.distributed.auto import _Progress

    s1 = [_row("kd[alpha=0.5,tau=4]", 84.0, sel=90.0, cal=0.30), _row("dist[tau=8]", 86.0, sel=85.0, cal=0.40)]
    lines: list[str] = []
    p = _Progress(4, s1[:1], lines.append, plan.picker(500), "selection")
    p.start()
    p.finish(s1[1])  # higher quiz, lower select: the selection pick stays kd
    assert lines[-1] == ("[auto] 2/4 trials done, 0 running, 2 left; best so far kd[alpha=0.5,tau=4] select 90.00% "
                         "(quiz 84.00%)")
    q: list[str] = []
    p = _Progress(4, s1[:1], q.append)  # no selection split: the quiz ranks
    p.finish(s1[1])
    assert q[-1].endswith("best so far dist[tau=8] quiz 86.00%")
    p.finish(_row("dist[tau=1]", 99.0))  # a row without select metrics never breaks the line
    assert q[-1].endswith("best so far dist[tau=1] quiz 99.00%")


def test_a_trial_is_exactly_its_familys_setting_and_its_sha_ignores_where_it_writes():
    base = build_config("fashion_mnist", loss={"method": "kd", "w_ce": 0.0, "tau": 8.0}).to_dict()
    t = search_spaces.HANDCRAFTED["dist"][0]
    cfg = plan.trial_config(base, t, 3, 7)
    assert cfg["loss"]["method"] == "dist" and cfg["loss"]["w_ce"] == 1.0 and cfg["loss"]["tau"] == t.sections["loss"]["tau"]
    assert cfg["optim"]["epochs"] == 3 and cfg["run"]["seed"] == 7 and base["optim"]["epochs"] == 4
    moved = json.loads(json.dumps(cfg))
    moved["run"]["cache_dir"], moved["run"]["name"] = "/elsewhere", "other"
    assert plan.config_sha(moved) == plan.config_sha(cfg)
    assert plan.config_sha(plan.trial_config(base, t, 4, 7)) != plan.config_sha(cfg)


def test_pick_is_search_spaces_pick_over_finished_trials_and_says_why():
    rows = [{"label": "a[x]", "family": "a", "quiz_top1": 90.0, "quiz_loss": 0.3, "epochs": 2, "budget_epochs": 2, "quiz_size": 500},
            {"label": "b[x]", "family": "b", "quiz_top1": 95.0, "quiz_loss": 0.2, "epochs": 1, "budget_epochs": 2},  # cut short
            {"label": "c[x]", "family": "c", "quiz_top1": None, "error": "TrainingDiverged: boom"},
            {"label": "d[x]", "family": "d", "quiz_top1": 90.0, "quiz_loss": 0.25, "epochs": 2, "budget_epochs": 2, "quiz_size": 500}]
    win, why = plan.pick_with_reason(rows)
    assert win["label"] == "d[x]" and "tied on quiz top-1 with a[x]" in why and "2 SE" in why and "of 2 finished" in why
    with pytest.raises(plan.AutoError, match="no trial finished"):
        plan.pick_with_reason(rows[1:3])


def test_storage_must_outlive_a_submitted_job(monkeypatch):
    monkeypatch.delenv("LKD_STORAGE", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert plan.resolve_storage(None) == "runs" and plan.resolve_storage("s3://b/p") == "s3://b/p"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(plan.AutoInputError, match="pass --storage"):
        plan.resolve_storage(None)
    monkeypatch.setenv("LKD_STORAGE", "s3://b/q")
    assert plan.resolve_storage(None) == "s3://b/q"


def test_checks_say_what_to_do_and_map_to_exit_codes():
    import numpy as np

    from lkd_ray.models.teacher import TeacherLoadError

    with pytest.raises(plan.AutoInputError, match="no usable quiz split.*data.quiz_per_class"):
        plan.check_quiz(np.arange(10) % 10, 10)
    with pytest.raises(plan.AutoInputError, match="no usable quiz split"):
        plan.check_quiz(np.zeros(100, dtype=int), 10)  # one class only
    plan.check_quiz(np.arange(50) % 10, 10)
    plan.check_quiz(None, 10, 50)  # a streamed quiz: only its size is known
    with pytest.raises(plan.AutoInputError, match="it holds 49 images"):
        plan.check_quiz(None, 10, 49)
    with pytest.raises(plan.AutoInputError, match="data.trusted"):
        plan.check_labels_source({"noisy_labels": "labels.json", "trusted": None})
    with pytest.raises(plan.AutoInputError, match="predicts 5 classes but the labels have 10"):
        plan.check_teacher_classes(5, 10, 9, "t.pt")
    with pytest.raises(plan.AutoInputError, match="budget too small.*7 trials \\(4 \\+ 2 \\+ 1 over the 3 stages.*raise --time-budget"):
        plan.check_budget(11.0, [4, 2, 1], 2, 3, 1.0)  # (2 + 1 + 1 rounds of 2 trials) × 3 epochs × 1 s = 12 s > 11 s
    plan.check_budget(12.0, [4, 2, 1], 2, 3, 1.0)
    assert [plan.exit_code(e) for e in (plan.AutoInputError("x"), ConfigError("x"), TeacherLoadError("t", "x", "y"),
                                         plan.AutoStorageError("x"), StorageError("x"), plan.AutoError("x"),
                                         RuntimeError("x"))] == [2, 2, 2, 3, 3, 1, None]


# --------------------------------------------------------------------------- through the real local Ray
@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_search_runs_every_family_ships_a_loadable_best_config_and_reports_a_failed_trial(
        tmp_path, cache_dir, fashion_available, local_ray, monkeypatch, capsys):
    """Stage 1: dist, kd (brought by the rule) and a family added to the registry at run time whose trial diverges (its
    error is a row; the search goes on); stage 2: a field rule on the kd and dist picks (capped to one setting);
    stage 3: the learned DIST family on the dist pick, and lkd-rule, rule-weights and ramp on the best of stages 1
    and 2: 8 trials, 1 epoch each, 2 at a time. The config sets a clean selection split: every pick is made on it."""
    from lkd_ray.cli import main

    monkeypatch.setitem(search_spaces.HANDCRAFTED, "boom", [Trial("boom", "lr=1e30", {"loss": {"method": "ce"},
                                                                                       "optim": {"lr": 1e30}})])
    store = tmp_path / "store"
    code = main(["auto", *TINY, "--set", f"run.cache_dir={cache_dir}", "--set", "data.select_per_class=10",
                 "--storage", str(store), "--name", "e2e",
                 "--families", "dist", "boom", "lkd-sample-dist", "agree", "lkd-rule", "rule-weights", "ramp", "--trials", "1", "--max-concurrent", "2",
                 "--cpus-per-trial", "1", "--seed", "3", "--time-budget", "3000"])
    out = capsys.readouterr().out
    assert code == 0, out
    d = store / "e2e"
    rows = json.loads((d / "trials.json").read_text())
    by = {r["label"]: r for r in rows}
    assert [(r["stage"], r["label"]) for r in rows[:-2]] == [
        (1, "kd[alpha=0.5,tau=8]"), (1, "dist[tau=2]"), (1, "boom[lr=1e30]"), (2, "agree[rule=agree_soft,base=kd]"),
        (3, "lkd-sample-dist[lock=none,every=80,lr=0.01]"), (3, "lkd-rule[lock=none,per_epoch=8,lr=0.01]")]
    assert "TrainingDiverged" in by["boom[lr=1e30]"]["error"] and by["boom[lr=1e30]"]["quiz_top1"] is None
    done = [r for r in rows if r["family"] != "boom"]
    assert all(r["quiz_top1"] is not None and r["epochs"] == 1 and r["wall_s"] > 0 for r in done)
    assert all(r["select_top1"] is not None and r["select_loss_cal"] > 0 and r["select_size"] == 100 for r in done)
    choose = lambda rows: search_spaces.pick_on_selection(rows, 10 * 10)  # noqa: E731 - 10 per class, 10 classes
    assert by["agree[rule=agree_soft,base=kd]"]["base"] == "kd[alpha=0.5,tau=8]"
    assert by["lkd-sample-dist[lock=none,every=80,lr=0.01]"]["base"] == "dist[tau=2]"
    lkd_rule = by["lkd-rule[lock=none,per_epoch=8,lr=0.01]"]  # on the best of stages 1 and 2, its rule included
    assert lkd_rule["base"] == choose([r for r in done if r["stage"] < 3])["label"]
    assert lkd_rule["sections"]["loss"].get("ce_rule") == by[lkd_rule["base"]]["sections"]["loss"].get("ce_rule")
    reweighed, ramp = rows[-2:]  # rule-weights on the same pick: the grid's setting the cap keeps, built on that pick
    base_trial = Trial(by[lkd_rule["base"]]["family"], by[lkd_rule["base"]]["setting"], by[lkd_rule["base"]]["sections"])
    assert reweighed["stage"] == 3 and reweighed["base"] == lkd_rule["base"] and reweighed["quiz_top1"] is not None
    assert reweighed["label"] == plan.capped(search_spaces.rule_weight_trials(base_trial), 1)[0].label
    # ramp on the same pick, over the search's epochs (1 here, not the config's 4); it ran to its end through Ray
    assert ramp["stage"] == 3 and ramp["base"] == lkd_rule["base"] and ramp["quiz_top1"] is not None
    assert ramp["label"] == plan.capped(search_spaces.ramp_trials(base_trial, 1), 1)[0].label
    assert ramp["sections"]["loss"]["ramp_epochs"] == 1
    pick = json.loads((d / "pick.json").read_text())
    win = by[pick["pick"]]
    assert win["label"] == choose(done)["label"] and pick["split"]["picked_on"] == "selection"
    assert pick["split"]["n_select"] == 100 and "select top-1" in out and "picked on: the selection split" in out
    assert pick["stage2_bases"]["agree"] == "kd[alpha=0.5,tau=8]" and pick["stages"]["2"] == ["agree"]
    # best_config.yaml goes through the config loader unchanged: the user's config with the pick's loss, full epochs
    best = build_config("fashion_mnist", d / "best_config.yaml")
    user = TINY[1:-2:2] + [f"run.cache_dir={cache_dir}", "data.select_per_class=10"]
    trial_cfg = plan.trial_config(build_config("fashion_mnist", overrides=user).to_dict(),
                                  Trial(win["family"], win["setting"], win["sections"]), 1, 3)
    for section in ("loss", "lossnet", "meta", "data", "model"):
        assert best.to_dict()[section] == trial_cfg[section], section
    assert best.optim.epochs == 4 and best.run.seed == 0  # the config's own, not the search's trial budget and seed
    groups = by["lkd-sample-dist[lock=none,every=80,lr=0.01]"]["per_sample"]["w_ce"]  # what the learned loss did, by teacher–label agreement
    assert groups["teacher agrees"]["n"] + groups["teacher disagrees"]["n"] == 600 and "per_sample" not in rows[0]
    for f in ("trials.csv", "summary.txt", "quiz_per_family.png", "winner_curve.png", "per_sample.png"):
        assert (d / f).stat().st_size > 0, f
    assert "[auto] 7/8 trials done, 0 running, 0 left, 1 failed; best so far" in out
    assert "time budget 3000 s" in out and pick["budget"]["seed"] == 3
    # a search where no trial finishes still writes its table of errors, and exits 1 with where to look
    code = main(["auto", *TINY, "--set", f"run.cache_dir={cache_dir}", "--storage", str(store), "--name", "fails",
                 "--families", "boom"])
    err = capsys.readouterr().err
    assert code == 1 and "no trial of search 'fails' finished" in err and "trials.csv" in err
    assert "TrainingDiverged" in json.loads((store / "fails" / "trials.json").read_text())[0]["error"]
    assert not (store / "fails" / "best_config.yaml").exists()
    assert f"pick: {pick['pick']} has the lowest calibrated select loss" in out and (d / "summary.txt").read_text().strip() in out


# --------------------------------------------------------------------------- killed and re-run
def _auto_cmd(store: Path, cache: str) -> list[str]:
    return [sys.executable, "-m", "lkd_ray", "auto", "--set", "data.train_subset=1200", "--set", "data.batch_size=64",
            "--set", "model.teacher_epochs=1", "--set", f"run.cache_dir={cache}", "--epochs", "2", "--storage", str(store),
            "--name", "kill", "--families", "dist", "--trials", "3", "--max-concurrent", "1"]


@pytest.mark.slow
def test_search_killed_with_sigkill_resumes_without_rerunning_finished_trials(tmp_path, cache_dir, fashion_available):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    store = tmp_path / "store"
    trials_dir = store / "kill" / "trials"
    proc = subprocess.Popen(_auto_cmd(store, cache_dir), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (trials_dir.is_dir() and any(trials_dir.glob("*.json"))):
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the search, its Ray cluster and its running trial, mid-way
        proc.wait(30)
    finished = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in trials_dir.glob("*.json")}
    assert 1 <= len(finished) < 3, finished.keys()
    again = subprocess.run(_auto_cmd(store, cache_dir), cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{len(finished)} already finished" in again.stdout
    for name, (mtime, data) in finished.items():  # not run again: the stored result is untouched
        p = trials_dir / name
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    rows = json.loads((store / "kill" / "trials.json").read_text())
    assert len(rows) == 3 and all(r["quiz_top1"] is not None and not r.get("error") for r in rows)
    assert len(list(trials_dir.glob("*.json"))) == 3
    # the second run's Tune grid held only the trials that were missing
    second = sorted((store / "kill" / "tune").glob("stage1-*"), key=lambda p: p.stat().st_mtime)[-1]
    assert len([p for p in second.iterdir() if p.is_dir() and p.name.startswith("auto_trial")]) == 3 - len(finished)


def _readme_commands(block: str) -> list[list[str]]:
    """The shell commands of a marked README block, continuation lines joined, split as the shell would."""
    import re
    import shlex

    text = (ROOT / "README.md").read_text()
    body = re.search(rf"<!-- readme:{block} -->\n```bash\n(.*?)```", text, re.S)
    assert body, f"README.md has no block {block!r}"
    return [shlex.split(c) for c in body.group(1).replace("\\\n", " ").splitlines() if c.strip()]


@pytest.mark.slow
def test_the_readme_runs_auto_on_a_users_own_label_file_in_one_command(tmp_path, cache_dir, fashion_available):
    """The README's two lines as a new user types them (in a fresh folder; only the budget made tiny): the label
    files are written, read back, and the search picks on half of the trusted subset and ships a config naming them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    make, auto = _readme_commands("auto-own-labels")
    assert make[:4] == [".venv/bin/python", "-m", "lkd_ray", "example-labels"] and auto[3] == "auto"
    fast = ["--cache-dir", cache_dir]
    out = subprocess.run([sys.executable, *make[1:], *fast], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "of them wrong (25." in out.stdout and (tmp_path / "my_labels" / "user_trusted.csv").is_file()
    tiny = ["--set", "data.train_subset=1200", "--set", "data.batch_size=64", "--set", "model.teacher_epochs=1",
            "--set", f"run.cache_dir={cache_dir}", "--epochs", "1", "--trials", "1", "--families", "dist", "agree",
            "--max-concurrent", "1"]
    run = subprocess.run([sys.executable, *auto[1:], *tiny], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    d = tmp_path / "runs" / "my-labels"
    pick = json.loads((d / "pick.json").read_text())
    assert pick["split"]["picked_on"] == "selection" and pick["split"]["n_select"] == 100
    best = yaml.safe_load((d / "best_config.yaml").read_text())
    assert best["data"]["noisy_labels"] == "my_labels/user_labels.pt" and best["data"]["trusted"] == "my_labels/user_trusted.csv"
    rows = json.loads((d / "trials.json").read_text())
    assert {"dist", "agree"} <= {r["family"] for r in rows} and all(r.get("select_size") == 100 for r in rows)
    # the trusted images are the quiz and the selection split, 10 per class each, and the student never trains on them
    assert all(r.get("quiz_size") == 100 for r in rows)


# --------------------------------------------------------------------------- bad input, before any trial
def _run_main(args: list[str]) -> tuple[int, str]:
    from lkd_ray.cli import main

    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["auto", *args])
    return code, err.getvalue()


@pytest.mark.slow
def test_bad_input_stops_before_any_trial_with_one_line(tmp_path, cache_dir, fashion_available):
    import torch

    from lkd_ray.models.registry import build_model

    ray = pytest.importorskip("ray")
    base = [*TINY, "--set", f"run.cache_dir={cache_dir}", "--families", "dist"]
    store = tmp_path / "store"
    # no quiz split to pick on: a held-out share too small for ten classes
    code, err = _run_main([*base, "--set", "data.quiz_fraction=0.0005", "--storage", str(store)])
    assert code == 2 and "no usable quiz split: it holds 30 images" in err and "data.quiz_per_class" in err and err.count("\n") == 1
    # a teacher with other classes than the labels'
    weights = tmp_path / "t5.pt"
    torch.save(build_model("cnn_teacher", 5, 1).state_dict(), weights)
    code, err = _run_main([*base, "--set", f"model.teacher_weights={weights}", "--storage", str(store)])
    assert code == 2 and "the teacher does not fit these labels" in err and "5 classes" in err
    # storage that cannot be written: a folder under a plain file
    (tmp_path / "file").write_text("x")
    code, err = _run_main([*base, "--storage", str(tmp_path / "file" / "store")])
    assert code == 3 and "cannot be used" in err and "choose another --storage" in err
    # an S3 endpoint nobody answers: exit 3 before any trial
    from tests.conftest import free_port

    code, err = _run_main([*base, "--storage", "s3://lkd-auto/x", "--endpoint-url", f"http://127.0.0.1:{free_port()}"])
    assert code == 3 and "cannot be used" in err and err.count("\n") == 1
    # a time budget that cannot fit the families asked (measured KD epoch × rounds)
    code, err = _run_main([*TINY, "--set", f"run.cache_dir={cache_dir}", "--storage", str(store), "--time-budget", "0.5"])
    assert code == 2 and "budget too small for the families asked" in err and "raise --time-budget" in err
    assert not ray.is_initialized() and not (store / "auto" / "trials").exists()  # no Ray, no trial


def test_both_commands_take_the_same_flags_and_exit_2_on_a_bad_family(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in ([sys.executable, "-m", "lkd_ray", "auto"], [sys.executable, "jobs/auto_loss.py"]):
        out = subprocess.run([*cmd, "--families", "kd", "nope", "--storage", str(tmp_path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.strip().startswith("error: unknown families ['nope']"), out.stderr
        valid = [*search_spaces.HANDCRAFTED, *search_spaces.RULE_GRIDS, *search_spaces.ON_PICK]
        assert f"valid families are {', '.join(valid)}" in out.stderr and "agree" in valid and "lkd-rule" in valid


def test_benchmark_record_sets_the_pick_beside_the_best_trial_in_hindsight():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_auto", ROOT / "benchmarks" / "auto.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = lambda label, q, t, **kw: {"label": label, "family": label.split("[")[0], "stage": 1, "quiz_top1": q,  # noqa: E731
                                     "quiz_loss": 0.5, "test_top1": t, "epochs": 2, "budget_epochs": 2, "wall_s": 10.0, **kw}
    rows = [row("kd[a]", 80.0, 79.0), row("dist[b]", 82.0, 78.0), row("ls[c]", 70.0, 90.0, epochs=1),  # ls cut short
            row("wsl[d]", 75.0, 81.0)]
    res = {"rows": rows, "winner": rows[1], "budget": {"epochs": 2}, "wall_s": 60.0, "why": "best quiz", "stage2_bases": {},
           "teacher": {"key": "t1", "test_top1": 89.5, "build_s": 3.0}}
    rec = bench.make_record("noisy-pair30", 100, res, None, 2, "abc")
    assert rec["teacher"] == {"key": "t1", "test_top1": 89.5}  # which teacher the search ran on
    assert (rec["picked"], rec["picked_test_top1"], rec["best_trial"], rec["best_trial_test_top1"]) == \
        ("dist[b]", 78.0, "wsl[d]", 81.0)
    assert rec["trials"] == 4 and rec["trials_finished"] == 3 and rec["trials_per_hour"] == 180.0
    rec = bench.make_record("noisy-pair30", 100, res, {"dist[b]": [85.0, 87.0], "wsl[d]": [86.0]}, 2, "abc")
    assert rec["picked_test_top1"] == 86.0 and rec["best_trial_test_top1"] == 86.0 and rec["test_from"] == "full re-runs"
    assert {"setting", "search_seed", "budget", "picked", "picked_test_top1", "best_trial", "best_trial_test_top1",
            "trials", "wall_s", "concurrent", "config_sha"} <= set(rec)


def test_a_family_setting_that_does_not_fit_the_config_is_bad_input_before_any_trial():
    from lkd_ray.distributed.auto import _specs

    # the user's per-sample network sets a per-sample KD weight; a setting with no KD term leaves it dead, which the
    # config refuses: the search says so before any trial instead of failing inside one
    base = build_config("fashion_mnist", lossnet={"kind": "sample", "sample_outputs": ["w_kd"]}).to_dict()
    trial = Trial("x", "w0", {"loss": {"method": "lkd", "w_logit": 0.0}})
    with pytest.raises(plan.AutoInputError, match=r"x\[w0\] does not fit your config .*w_kd.*leave x out of --families"):
        _specs([trial], 1, base, plan.AutoOptions())
