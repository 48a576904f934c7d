"""The noisy-label field's data side and its benchmark plumbing: a selection split disjoint from the quiz (the
quiz unchanged by it), noise draws, class-confusion noise, the user's own label files, the meta-schedule in units
of the data, picks on the selection split, and configs that stay the same run when a field is added later."""
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lkd_ray.config import ConfigError, MetaCfg, build_config
from lkd_ray.data.label_files import load_noisy_labels, load_trusted
from lkd_ray.errors import BadInput
from lkd_ray.data.regimes import FASHION_CONFUSION, apply_label_noise, regime_split
from lkd_ray.search_spaces import HANDCRAFTED, RULE_GRIDS, lkd_rule_trials, pick_on_selection, rule_trials, selection_band
from lkd_ray.train.run import meta_schedule

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def _labels(n_per=120, k=10):
    return np.repeat(np.arange(k), n_per)


# --------------------------------------------------------------------------- splits and noise
def test_the_selection_split_is_clean_disjoint_from_quiz_and_training_and_leaves_the_quiz_as_it_was():
    clean = _labels()
    kw = dict(label_noise=0.3, noise_kind="pairflip", quiz_per_class=5)
    plain = regime_split(clean, 10, 0.2, 0, **kw)
    with_sel = regime_split(clean, 10, 0.2, 0, select_per_class=7, **kw)
    np.testing.assert_array_equal(plain.quiz, with_sel.quiz)
    np.testing.assert_array_equal(plain.labels, with_sel.labels)
    np.testing.assert_array_equal(plain.student, with_sel.student)
    sel = with_sel.select
    assert len(sel) == 70 and np.bincount(clean[sel], minlength=10).tolist() == [7] * 10
    assert not set(sel) & set(with_sel.quiz) and not set(sel) & set(with_sel.teacher)
    assert (with_sel.labels[sel] == clean[sel]).all()
    # without a quiz size, the quiz is what the selection split leaves of the held-out pool
    whole = regime_split(clean, 10, 0.2, 0, select_per_class=7)
    assert not set(whole.select) & set(whole.quiz) and len(whole.quiz) == 240 - 70


def test_a_noise_draw_changes_which_labels_flip_not_how_many_and_draw_none_is_the_regime_s_own():
    clean = _labels()
    own = regime_split(clean, 10, 0.2, 0, label_noise=0.3, noise_kind="symmetric")
    same = regime_split(clean, 10, 0.2, 0, label_noise=0.3, noise_kind="symmetric", noise_seed=0)
    other = regime_split(clean, 10, 0.2, 0, label_noise=0.3, noise_kind="symmetric", noise_seed=1)
    np.testing.assert_array_equal(own.labels, same.labels)
    assert own.flipped.sum() == other.flipped.sum() and (own.flipped != other.flipped).any()
    np.testing.assert_array_equal(own.quiz, other.quiz)


def test_confusion_noise_flips_only_the_mapped_classes_to_their_look_alikes():
    clean = _labels(100)
    noisy = apply_label_noise(clean, 0.3, "confusion", 10, seed=2, confusion=FASHION_CONFUSION)
    for c in range(10):
        m = clean == c
        if c in FASHION_CONFUSION:
            assert (noisy[m] != c).sum() == 30 and set(noisy[m][noisy[m] != c]) == {FASHION_CONFUSION[c]}
        else:
            assert (noisy[m] == c).all()
    with pytest.raises(BadInput, match="outside"):
        apply_label_noise(clean, 0.3, "confusion", 10, seed=2, confusion={0: 12})


def test_config_checks_the_label_inputs():
    with pytest.raises(ConfigError, match="confusion_map"):
        build_config("fashion_mnist", overrides=["data.label_noise=0.3", "data.noise_kind=pairflip"],
                     data={"confusion_map": {0: 6}})
    with pytest.raises(ConfigError, match="other classes"):
        build_config("fashion_mnist", data={"noise_kind": "confusion", "label_noise": 0.3, "confusion_map": {3: 3}})
    with pytest.raises(ConfigError, match="label_noise"):
        build_config("fashion_mnist", overrides=["data.noisy_labels=/x.npy", "data.label_noise=0.2"])
    with pytest.raises(ConfigError, match="quiz_per_class"):
        build_config("fashion_mnist", overrides=["data.trusted=/x.csv", "data.quiz_per_class=10"])


# --------------------------------------------------------------------------- the user's own label files
def test_noisy_labels_load_from_npy_csv_and_a_cifar_n_pt_dict(tmp_path):
    y = np.arange(50) % 10
    np.save(tmp_path / "l.npy", y)
    (tmp_path / "l.csv").write_text("label\n" + "\n".join(map(str, y)) + "\n")
    torch.save({"worse_label": y.copy(), "aggre_label": (y + 1) % 10, "clean_label": y.copy()}, tmp_path / "side.pt")
    for f in ("l.npy", "l.csv", "side.pt"):
        np.testing.assert_array_equal(load_noisy_labels(str(tmp_path / f), 50, 10), y)
    np.testing.assert_array_equal(load_noisy_labels(str(tmp_path / "side.pt"), 50, 10, key="aggre_label"), (y + 1) % 10)


@pytest.mark.parametrize("case,match", [
    ("short", "has 49 labels, the training set has 50"), ("class", "label 10 at index 3 is not a class"),
    ("missing", "no such file"), ("key", "has no array 'worse_label'"), ("text", "line 3 is 'x'")])
def test_a_bad_noisy_label_file_names_itself_and_what_to_do(tmp_path, case, match):
    y = np.arange(50) % 10
    path = tmp_path / "l.npy"
    if case == "short":
        np.save(path, y[:49])
    elif case == "class":
        y[3] = 10
        np.save(path, y)
    elif case == "key":
        path = tmp_path / "l.pt"
        torch.save({"aggre_label": y}, path)
    elif case == "text":
        path = tmp_path / "l.txt"
        path.write_text("1\n2\nx\n")
    with pytest.raises(BadInput, match=match) as e:
        load_noisy_labels(str(path), 50, 10)
    assert e.value.input == f"data.noisy_labels={path}" and str(path) in str(e.value)


def test_a_trusted_subset_becomes_the_quiz_and_is_never_trained_on(tmp_path):
    clean = _labels(30)
    given = clean.copy()
    given[::3] = (given[::3] + 1) % 10
    idx = np.concatenate([np.flatnonzero(clean == c)[:4] for c in range(10)])
    (tmp_path / "t.csv").write_text("index,label\n" + "".join(f"{i},{clean[i]}\n" for i in idx))
    t_idx, t_lab = load_trusted(str(tmp_path / "t.csv"), len(clean), 10)
    sp = regime_split(clean, 10, 0.1, 0, given=given, trusted=(t_idx, t_lab), select_per_class=2)
    assert set(sp.quiz) | set(sp.select) == set(idx) and not set(sp.quiz) & set(sp.select)
    assert not set(idx) & set(sp.teacher)
    np.testing.assert_array_equal(sp.labels[sp.teacher], given[sp.teacher])
    np.testing.assert_array_equal(sp.labels[idx], clean[idx])
    (tmp_path / "dup.csv").write_text(f"{idx[0]},1\n{idx[0]},1\n")
    with pytest.raises(BadInput, match="given 2 times"):
        load_trusted(str(tmp_path / "dup.csv"), len(clean), 10)
    (tmp_path / "cls.csv").write_text("index,label\n3,1\n4,12\n")
    with pytest.raises(BadInput, match="label 12 at index 4 is not a class"):
        load_trusted(str(tmp_path / "cls.csv"), len(clean), 10)
    (tmp_path / "far.csv").write_text("999,1\n")
    with pytest.raises(BadInput, match="outside the training set"):
        load_trusted(str(tmp_path / "far.csv"), len(clean), 10)


# --------------------------------------------------------------------------- the meta-schedule in units of the data
def test_the_meta_schedule_keeps_meta_steps_per_epoch_on_data_of_any_size():
    m = MetaCfg(meta_steps_per_epoch=4, min_meta_steps=40)
    big, why_big = meta_schedule(m, 379, 12)  # Fashion's noisy regimes: 379 steps an epoch
    small, why_small = meta_schedule(m, 56, 12)  # a data set 7× smaller
    assert big.meta_every == 95 and small.meta_every == 14
    assert 379 * 12 // 95 == 47 and 56 * 12 // 14 == 48  # the same meta-steps per epoch, whatever the size
    assert "shortened" not in why_big and "(47 meta-steps in 12 epochs)" in why_big
    short, why_short = meta_schedule(m, 56, 3)  # a short run: the floor shortens the interval
    assert short.meta_every == 4 and "at least 40" in why_short
    plain, why = meta_schedule(MetaCfg(meta_every=80), 56, 12)
    assert plain.meta_every == 80 and why is None
    # frozen after 3 epochs: the floor and the count are over the epochs that adapt, and the log says so
    early, why_early = meta_schedule(MetaCfg(meta_steps_per_epoch=4, min_meta_steps=20, freeze_after_epoch=3), 56, 12)
    assert early.meta_every == 56 * 3 // 20 == 8 and "(21 meta-steps in the first 3 of 12 epochs (frozen after))" in why_early
    late, why_late = meta_schedule(MetaCfg(meta_steps_per_epoch=4, freeze_after_epoch=20), 56, 12)  # past the run: no change
    assert late.meta_every == 14 and "(48 meta-steps in 12 epochs)" in why_late


# --------------------------------------------------------------------------- families and picks
def test_every_field_family_is_on_both_bases_and_the_learned_residual_starts_from_the_pick():
    bases = {"kd": HANDCRAFTED["kd"][15], "dist": HANDCRAFTED["dist"][0]}  # α = 1: no CE term of its own
    for family, grid in RULE_GRIDS.items():
        ts = rule_trials(family, bases)
        assert len(ts) == 2 * len(grid) and {t.sections["loss"]["method"] for t in ts} == {"kd", "dist"}
        assert all(t.sections["loss"]["w_ce"] == 1.0 for t in ts if t.sections["loss"]["method"] == "kd")
    assert {t.name for t in HANDCRAFTED["dist-wce"]} >= {"tau=1,w_ce=0", "tau=8,w_ce=0.5"}
    pick = rule_trials("agree", bases)[-1]
    for t in lkd_rule_trials(pick):
        assert t.sections["loss"]["ce_rule"] == pick.sections["loss"]["ce_rule"]
        assert t.sections["lossnet"]["base"] == pick.sections["loss"]["method"] and t.sections["loss"]["method"] == "lkd"


def test_the_selection_pick_breaks_ties_within_the_split_s_noise_on_the_calibrated_loss():
    rows = [{"trial": "a", "select_top1": 86.0, "select_loss_cal": 0.40},
            {"trial": "b", "select_top1": 85.0, "select_loss_cal": 0.35},  # within one SE (≈1.55 pt on 500 images)
            {"trial": "c", "select_top1": 83.0, "select_loss_cal": 0.10}]  # outside it
    assert selection_band(86.0, 500) == pytest.approx(100 * (0.86 * 0.14 / 500) ** 0.5)
    assert pick_on_selection(rows, 500)["trial"] == "b"
    assert pick_on_selection(rows, 100000)["trial"] == "a"  # a large split: no ties
    with pytest.raises(ValueError, match="no selection-split metrics"):
        pick_on_selection(rows + [{"trial": "d", "select_top1": 90.0}], 500)


def test_a_config_field_added_later_at_its_neutral_value_is_the_same_run():
    import records

    cfg = build_config("fashion_mnist").to_dict()
    old = {k: dict(v) for k, v in cfg.items()}
    for section, field in records.NEUTRAL:
        old[section].pop(field, None)
    assert records.config_sha(old) != records.config_sha(cfg)
    assert records.config_identity(old) == records.config_identity(cfg)
    changed = {k: dict(v) for k, v in cfg.items()}
    changed["loss"]["ce_rule"] = "agree"
    assert records.config_identity(changed) != records.config_identity(cfg)
    # every neutral value is the field's default today (else an old record would silently mean another run)
    for (section, field), value in records.NEUTRAL.items():
        assert cfg[section][field] == value, (section, field)


# --------------------------------------------------------------------------- the benchmark's plans (nothing trains)
def _field_tuning_rows(regime="noisy-pair30"):
    """Tuning rows of the field suite's KD and DIST families and every rule family, as the benchmark records them
    (selection metrics made up here: the plan only reads which trial won)."""
    import accuracy as acc

    rows = []
    for fam in ("kd", "dist"):
        for i, t in enumerate(acc.family_trials(regime, fam, [], "field")):
            rows.append({"regime": regime, "family": fam, "trial": t.name, "seed": 100, "select_top1": 80.0 + 5 * (i == 2),
                         "select_loss_cal": 0.5})
    for fam in acc.HANDCRAFTED_FIELD:
        if fam in ("kd", "dist"):
            continue
        for t in acc.family_trials(regime, fam, rows, "field"):
            rows.append({"regime": regime, "family": fam, "trial": t.name, "seed": 100, "select_top1": 79.0,
                         "select_loss_cal": 0.5})
    for fam in acc.RULES:
        for t in acc.family_trials(regime, fam, rows, "field"):
            win = fam == "agree" and t.name == "rule=agree,base=dist"
            rows.append({"regime": regime, "family": fam, "trial": t.name, "seed": 100, "select_top1": 86.0 if win else 79.0,
                         "select_loss_cal": 0.4 if win else 0.5})
    return rows


def test_the_field_plan_tunes_rules_on_the_tuned_bases_and_the_learned_residual_on_the_best_rule(tmp_path):
    import argparse

    import accuracy as acc

    rows = _field_tuning_rows()
    kd_pick = acc.tuning_pick(rows, "noisy-pair30", "kd", "field")["trial"]
    dist_pick = acc.tuning_pick(rows, "noisy-pair30", "dist", "field")["trial"]
    agree = acc.family_trials("noisy-pair30", "agree", rows, "field")
    kd_trial = next(t for t in acc.family_trials("noisy-pair30", "kd", [], "field") if t.name == kd_pick)
    assert {t.sections["loss"]["tau"] for t in agree if "base=kd" in t.name} == {kd_trial.sections["loss"]["tau"]}
    assert dist_pick == "tau=4" and {t.sections["loss"]["tau"] for t in agree if "base=dist" in t.name} == {4.0}
    args = argparse.Namespace(regime="noisy-pair30", tune=None, tune_seed=100, suite="field", out=str(tmp_path),
                              cache_dir=str(tmp_path), threads=1, variant=None, overrides=[], seeds=[0, 1], noise_draws=[0, 1],
                              methods=["rule-best-tuned", "lkd-rule-tuned", "dist-tuned"])
    rows += [{"regime": "noisy-pair30", "family": "lkd-rule", "trial": t.name, "seed": 100, "select_top1": 85.0,
              "select_loss_cal": 0.45} for t in acc.family_trials("noisy-pair30", "lkd-rule", rows, "field")]
    tasks, target = acc.plan(args, rows)
    assert target == acc.FIELD_RECORDS and len(tasks) == 3 * 2 * 2
    best = [t for t in tasks if t["method"] == "rule-best-tuned"]
    assert all(t["config"]["loss"]["ce_rule"] == "agree" and t["config"]["loss"]["method"] == "dist" for t in best)
    learned = [t for t in tasks if t["method"] == "lkd-rule-tuned"]
    assert all(t["config"]["loss"]["ce_rule"] == "agree" and t["config"]["lossnet"]["base"] == "dist" for t in learned)
    assert {t["config"]["data"]["noise_seed"] for t in tasks} == {None, 1} and {t["noise_draw"] for t in tasks} == {0, 1}
    assert all(t["config"]["data"]["select_per_class"] == 50 for t in tasks)
    with pytest.raises(acc.BenchmarkError, match="every family"):
        acc.tuning_pick([r for r in rows if r["family"] != "sce"], "noisy-pair30", "rule-best", "field")


def test_transfer_runs_every_preset_unchanged_beside_its_source_regime_s_best_rule(tmp_path):
    import argparse

    import transfer

    args = argparse.Namespace(preset="noisy-pair30", settings=list(transfer.SETTINGS), seeds=[0], out=str(tmp_path),
                              cache_dir=str(tmp_path), results=str(ROOT / "benchmarks" / "results"), threads=1)
    tasks = transfer.plan(args)
    assert len(tasks) == 2 * len(transfer.SETTINGS)
    from lkd_ray.config import PRESETS

    for t in tasks:
        data = t["config"]["data"]
        if t["setting"] == "pair30-54k":  # the whole split, as the noisy-pair30 regime trains on
            assert data["train_subset"] is None and (data["label_noise"], data["noise_kind"]) == (0.3, "pairflip")
        elif t["setting"] in ("scarce50", "scarce300"):  # the scarce recipe with half or three times its labels
            assert data["labels_per_class"] == int(t["setting"][6:]) and data["label_noise"] == 0
            assert (data["batch_size"], t["config"]["optim"]["epochs"], data["quiz_per_class"]) == (32, 40, 20)
        else:
            assert data["train_subset"] == transfer.SIZE and t["config"]["optim"]["epochs"] == 12
        if t["role"] == "preset":  # unchanged: every field the preset sets
            for section, fields in PRESETS["noisy-pair30"]["sections"].items():
                assert all(t["config"][section][k] == v for k, v in fields.items())
    user = [t for t in tasks if t["setting"] == "userfile"][0]["config"]["data"]
    y = load_noisy_labels(user["noisy_labels"], 60000, 10)
    from lkd_ray.data import load_fashion_mnist

    clean = load_fashion_mnist(None, str(tmp_path))["train"][1]
    assert 0.22 < (y != clean).mean() < 0.28  # 25 % relabelled, not by a uniform or a pair map
    idx, lab = load_trusted(user["trusted"], 60000, 10)
    assert len(idx) == 200 and (lab == clean[idx]).all()


def test_the_field_and_transfer_tables_come_from_the_records(tmp_path):
    import json

    import report_field

    rows = [{**r, "quiz_top1": 80.0, "test_top1": 79.0} for r in _field_tuning_rows()]
    (tmp_path / "accuracy_field_tuning.json").write_text(json.dumps(rows))
    text = report_field.field_tuning(tmp_path)
    assert "**agree[rule=agree,base=dist]**" in text and "| agree | 4 | rule=agree,base=dist | 86.00 |" in text
    finals = []
    for seed in range(3):
        for draw in (0, 1):
            finals.append({"regime": "noisy-pair30", "method": "rule-best-tuned", "seed": seed, "noise_draw": draw,
                           "test_top1": 86.0 + seed, "select_top1": 85.0})
            finals.append({"regime": "noisy-pair30", "method": "lkd-rule-tuned", "seed": seed, "noise_draw": draw,
                           "test_top1": 87.0 + seed + 0.1 * draw, "select_top1": 85.5})
    (tmp_path / "accuracy_field.json").write_text(json.dumps(finals))
    text = report_field.field_finals(tmp_path)
    d = [1.0, 1.1] * 3  # paired over (seed, draw): mean 1.05, SE = stdev/√6
    se = float(np.std(d, ddof=1) / np.sqrt(6))
    assert f"| lkd-rule-tuned | 6 (3 × 2) | 88.05 ± 0.90 | +1.05 ± {se:.2f} | +1.00 | 85.50 | yes | yes |" in text
    tr = [{"preset": "noisy-pair30", "setting": "pair20", "role": role, "seed": s, "method": f"{role}|noisy-pair30|agree[x]",
           "test_top1": 80.0 + s + (0.5 if role == "rule" else 0.0), "meta_steps": 47 if role == "preset" else None}
          for s in range(3) for role in ("preset", "rule")]
    (tmp_path / "accuracy_transfer.json").write_text(json.dumps(tr))
    assert "| `noisy-pair30` | pair20 | agree[x] | 3 | 81.00 | 81.50 | -0.50 ± 0.00 | -0.50 | 47 | no |" in \
        report_field.transfer(tmp_path)


def test_early_stopping_soundness_is_read_off_the_recorded_curves():
    import early_stop

    assert early_stop._ranks([3.0, 1.0, 3.0, 2.0]) == [2.5, 0.0, 2.5, 1.0]
    assert early_stop.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert early_stop.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # six trials whose order at a quarter of the run is the reverse of the end: halving there drops the final best
    trials = [{"regime": "r", "curve": [{"quiz_top1": 50 - i}, {"quiz_top1": 60 - i}, {"quiz_top1": 70 + i}, {"quiz_top1": 80 + i}]}
              for i in range(6)]
    rows = early_stop.soundness(trials)
    quarter = next(r for r in rows if r["rung"] == 0.25)
    assert quarter["spearman"] == pytest.approx(-1.0) and not quarter["keeps_best"] and quarter["best_rank_at_rung"] == 6
    assert next(r for r in rows if r["rung"] == 0.75)["keeps_best"] and early_stop.sound_rung(rows) == 0.75


def test_transfer_can_name_a_field_rule_on_the_source_regime_s_tuned_bases(tmp_path):
    import argparse

    import accuracy
    import transfer

    args = argparse.Namespace(preset="noisy-pair30", settings=["pair20"], seeds=[0], out=str(tmp_path), cache_dir=str(tmp_path),
                              results=str(ROOT / "benchmarks" / "results"), threads=1,
                              rule="agree[rule=agree,base=dist]", rule_only=True)
    tasks = transfer.plan(args)
    tuning = __import__("json").loads((ROOT / "benchmarks" / "results" / accuracy.TUNING).read_text())
    dist_tau = float(accuracy.tuning_pick(tuning, "noisy-pair30", "dist")["trial"].split("=")[1])
    assert [t["role"] for t in tasks] == ["rule"] and tasks[0]["method"] == "agree[rule=agree,base=dist]"
    loss = tasks[0]["config"]["loss"]
    assert (loss["method"], loss["ce_rule"], loss["tau"]) == ("dist", "agree", dist_tau)
    assert "agree" in tasks[0]["out"] and tasks[0]["out"] != str(tmp_path / "pair20-noisy-pair30-rule-s0")
    with pytest.raises(accuracy.BenchmarkError, match="no such setting"):
        transfer.plan(argparse.Namespace(**{**vars(args), "rule": "agree[rule=agree,base=wsl]"}))


def test_the_field_only_regime_plans_on_its_own_data_and_is_refused_by_the_regimes_suite(tmp_path):
    import accuracy

    argv = ["--regime", "noisy-pair45-8k", "--tune", "kd", "--cache-dir", str(tmp_path), "--out", str(tmp_path)]
    with pytest.raises(accuracy.BenchmarkError, match="field suite only"):
        accuracy.plan(accuracy.parser().parse_args(argv), [])
    tasks, target = accuracy.plan(accuracy.parser().parse_args([*argv, "--suite", "field"]), [])
    data = tasks[0]["config"]["data"]
    assert target == accuracy.FIELD_TUNING and len(tasks) == len(__import__("lkd_ray.search_spaces").search_spaces.HANDCRAFTED["kd"])
    assert (data["label_noise"], data["noise_kind"], data["train_subset"], data["quiz_per_class"], data["select_per_class"]) == \
        (0.45, "pairflip", 8000, 20, 50)


def test_the_capped_residual_keeps_the_rule_and_fewer_meta_steps_so_small_data_stays_within_the_cost_bar():
    from lkd_ray.search_spaces import Trial, lkd_rule_capped_trials, lkd_rule_trials, rule_trials
    from lkd_ray.train.run import meta_schedule
    from lkd_ray.config import build_config

    rule = rule_trials("relabel", {"dist": Trial("dist", "tau=2", {"loss": {"method": "dist", "tau": 2.0}})})[0]
    capped, full = lkd_rule_capped_trials(rule), lkd_rule_trials(rule)
    assert len(capped) == len(full) == 8 and {t.family for t in capped} == {"lkd-rule-capped"}
    assert {t.sections["meta"]["meta_steps_per_epoch"] for t in capped} == {2.0, 3.0}
    assert all(t.sections["loss"] == full[0].sections["loss"] for t in capped)  # the same residual on the same rule
    for t, steps, every in ((capped[-1], 62, 21), (capped[-1], 421, 140)):  # 3 per epoch: no floor lifts it
        cfg = build_config("fashion_mnist", **t.sections)
        assert meta_schedule(cfg.meta, steps, 12)[0].meta_every == every
    assert meta_schedule(build_config("fashion_mnist", **full[-1].sections).meta, 62, 12)[0].meta_every == 8


def test_a_half_tuned_field_suite_names_no_best_rule_for_transfer():
    """transfer.rule_of takes the field suite's rule-best only once every hand-crafted family's trials are recorded,
    so a transfer command's rule does not change while that suite runs (replan checks the records against it)."""
    import transfer

    rows = json.loads((ROOT / "benchmarks" / "results" / "accuracy_field_tuning.json").read_text())
    assert transfer.field_tuned("noisy-pair45-8k", rows)  # its field suite ran whole
    sce = next(i for i, r in enumerate(rows) if r["regime"] == "noisy-pair45-8k" and r["family"] == "sce")
    assert not transfer.field_tuned("noisy-pair45-8k", rows[:sce] + rows[sce + 1:])  # one rule trial missing
    assert not transfer.field_tuned("noisy-pair45-8k", [r for r in rows if r["family"] != "dist"])  # no base: no rules
    assert not transfer.field_tuned("full", [r for r in rows if r["regime"] != "full"])  # nothing recorded


def test_rule_weights_tunes_the_best_rule_s_two_weights_and_never_becomes_the_rule_it_starts_from():
    """rule-weights is the picked rule with its CE and distillation weights on a grid (the rule's own pair left out),
    planned after the rule is picked; a winning rule-weights trial does not change rule-best (so the residual's base
    and every recorded command stay what they were); a pick with no CE/distillation pair is refused by name."""
    import argparse

    import accuracy as acc

    from lkd_ray.search_spaces import RULE_WEIGHTS, Trial, rule_weight_trials

    rows = _field_tuning_rows()
    rule, _ = acc._trial_of("noisy-pair30", "rule-best", rows, "field")
    trials = acc.family_trials("noisy-pair30", "rule-weights", rows, "field")
    from lkd_ray.config import LossCfg

    own = tuple(rule.sections["loss"].get(k, LossCfg.model_fields[k].default) for k in ("w_ce", "w_logit"))  # the config's
    pairs = {(t.sections["loss"]["w_ce"], t.sections["loss"]["w_logit"]) for t in trials}
    assert len(trials) == 8 and own not in pairs and pairs | {own} == {(c, w) for c in RULE_WEIGHTS["w_ce"]
                                                                      for w in RULE_WEIGHTS["w_logit"]}
    for t in trials:  # everything but the two weights is the rule's
        assert {k: v for k, v in t.sections["loss"].items() if k not in ("w_ce", "w_logit")} == \
            {k: v for k, v in rule.sections["loss"].items() if k not in ("w_ce", "w_logit")}
    rows += [{"regime": "noisy-pair30", "family": "rule-weights", "trial": t.name, "seed": 100, "select_top1": 99.0,
              "select_loss_cal": 0.1} for t in trials]
    assert acc._trial_of("noisy-pair30", "rule-best", rows, "field")[0].name == rule.name
    assert acc.field_untuned("noisy-pair30", rows) == {}
    args = argparse.Namespace(regime="noisy-pair30", tune=None, tune_seed=100, suite="field", out="/tmp/x", cache_dir="/tmp/x",
                              threads=1, variant=None, overrides=[], seeds=[0], noise_draws=[0], methods=["rule-weights-tuned"])
    (task,), _ = acc.plan(args, rows)
    assert task["tuned_from"]["family"] == "rule-weights" and task["config"]["loss"]["ce_rule"] == "agree"
    with pytest.raises(ValueError, match="'ce' pick has no such pair"):
        rule_weight_trials(Trial("ls", "eps=0.1", {"loss": {"method": "ce", "label_smoothing": 0.1}}))


def test_lkd_best_is_the_residual_on_the_reweighted_rule_where_that_beats_the_rule_and_refused_where_it_does_not():
    import argparse

    import accuracy as acc

    rows = _field_tuning_rows()
    with pytest.raises(acc.NotTunedYet, match="--tune rule-weights"):
        acc.family_trials("noisy-pair30", "lkd-best", rows, "field")
    rule, _ = acc._trial_of("noisy-pair30", "rule-best", rows, "field")
    weights = acc.family_trials("noisy-pair30", "rule-weights", rows, "field")
    losing = [{"regime": "noisy-pair30", "family": "rule-weights", "trial": t.name, "seed": 100, "select_top1": 70.0,
               "select_loss_cal": 0.9} for t in weights]
    with pytest.raises(acc.BenchmarkError, match="is the rule itself .*run lkd-rule"):
        acc.family_trials("noisy-pair30", "lkd-best", rows + losing, "field")
    win = next(t for t in weights if t.name == "w_ce=1,w_logit=0")
    winning = [dict(r, select_top1=99.0, select_loss_cal=0.1) if r["trial"] == win.name else r for r in losing]
    best = acc.family_trials("noisy-pair30", "lkd-best", rows + winning, "field")
    residual = acc.family_trials("noisy-pair30", "lkd-rule", rows + winning, "field")
    assert {t.family for t in best} == {"lkd-best"} and [t.name for t in best] == [t.name for t in residual]
    for b, r in zip(best, residual):  # the same grid on the reweighted rule: only the base's weights differ
        assert b.sections["loss"] == {**r.sections["loss"], "w_ce": 1.0, "w_logit": 0.0}
        assert b.sections["lossnet"] == {**r.sections["lossnet"], "sample_outputs": ["w_ce"]}  # the term off: CE's weight only
        assert b.sections["meta"] == r.sections["meta"] and "sample_outputs" not in r.sections["lossnet"]
    assert rule.sections["loss"]["ce_rule"] == best[0].sections["loss"]["ce_rule"] == "agree"
    # disagree-weight: the best of the whole set (the reweighted rule, or the rule), its label term scaled where the
    # teacher disagrees; refused on the agree rule (already 0 there)
    for extra in (winning, losing):
        with pytest.raises(acc.BenchmarkError, match="agree rule: its label term is already 0"):
            acc.family_trials("noisy-pair30", "disagree-weight", rows + extra, "field")
    relabel = [dict(r, select_top1=99.5, select_loss_cal=0.05) if r["trial"] == "rule=relabel,base=dist" else r for r in rows]
    on = acc.family_trials("noisy-pair30", "rule-weights", relabel, "field")
    for won in (None, "w_ce=2,w_logit=0.5"):
        extra = [{"regime": "noisy-pair30", "family": "rule-weights", "trial": t.name, "seed": 100,
                  "select_top1": 99.9 if t.name == won else 70.0, "select_loss_cal": 0.01 if t.name == won else 0.9} for t in on]
        base = next((t for t in on if t.name == won), None) or acc._trial_of("noisy-pair30", "rule-best", relabel, "field")[0]
        dw = acc.family_trials("noisy-pair30", "disagree-weight", relabel + extra, "field")
        assert [t.sections["loss"]["disagree_weight"] for t in dw] == [0.0, 0.25, 0.5, 0.75] and base.sections["loss"]["ce_rule"] == "relabel"
        assert all({**t.sections["loss"], "disagree_weight": 1.0} == {**base.sections["loss"], "disagree_weight": 1.0} for t in dw)
    early = acc.family_trials("noisy-pair30", "lkd-best-early", rows + winning, "field")
    assert len(early) == 8 and {t.family for t in early} == {"lkd-best-early"}
    assert {(t.sections["lossnet"]["lock"], t.sections["meta"]["freeze_after_epoch"], t.sections["meta"]["lr"]) for t in early} == \
        {(lock, f, lr) for lock in ("none", "norm") for f in (4, 6) for lr in (1e-2, 3e-2)}
    assert all(t.sections["meta"]["meta_steps_per_epoch"] == 8 and t.sections["loss"] == best[0].sections["loss"]
               and t.sections["lossnet"]["sample_outputs"] == ["w_ce"] for t in early)
    capped = acc.family_trials("noisy-pair30", "lkd-best-capped", rows + winning, "field")
    rule_capped = acc.family_trials("noisy-pair30", "lkd-rule-capped", rows + winning, "field")
    assert {t.family for t in capped} == {"lkd-best-capped"} and [t.name for t in capped] == [t.name for t in rule_capped]
    assert all(c.sections["meta"] == r.sections["meta"] and c.sections["loss"]["w_logit"] == 0.0
               for c, r in zip(capped, rule_capped))
    # the head-scope families: the same grids, on the same bases, with only the meta-step's scope changed
    for fam, same in (("lkd-best-head", best), ("lkd-rule-head", residual)):
        head = acc.family_trials("noisy-pair30", fam, rows + winning, "field")
        assert {t.family for t in head} == {fam} and [t.name for t in head] == [t.name for t in same]
        for h, s in zip(head, same):
            assert h.sections["meta"] == {**s.sections["meta"], "scope": "head"} and "scope" not in s.sections["meta"]
            assert (h.sections["loss"], h.sections["lossnet"]) == (s.sections["loss"], s.sections["lossnet"])
    for fam, same in (("lkd-best-b32", best), ("lkd-rule-b32", residual)):  # … or only the meta-step's batches
        small = acc.family_trials("noisy-pair30", fam, rows + winning, "field")
        assert {t.family for t in small} == {fam} and [t.name for t in small] == [t.name for t in same]
        for m, s in zip(small, same):
            assert m.sections["meta"] == {**s.sections["meta"], "unroll_batch_size": 32}
            assert m.sections["data"] == {"quiz_batch_size": 32} and "data" not in s.sections
            assert (m.sections["loss"], m.sections["lossnet"]) == (s.sections["loss"], s.sections["lossnet"])
    tuned = rows + winning + [{"regime": "noisy-pair30", "family": "lkd-best", "trial": t.name, "seed": 100,
                               "select_top1": 90.0, "select_loss_cal": 0.3} for t in best]
    args = argparse.Namespace(regime="noisy-pair30", tune=None, tune_seed=100, suite="field", out="/tmp/x", cache_dir="/tmp/x",
                              threads=1, variant=None, overrides=[], seeds=[0], noise_draws=[0], methods=["lkd-best-tuned"])
    (task,), _ = acc.plan(args, tuned)
    assert task["config"]["loss"]["w_logit"] == 0.0 and task["config"]["lossnet"]["kind"] == "sample"


def test_a_best_loss_with_no_ce_and_distillation_pair_leaves_the_residual_and_reweighting_on_the_best_they_can_sit_on():
    """Where label smoothing (or DKD, WSL) wins the regime, rule-best stays that loss, and the families built on it
    start from the best KD- or DIST-based pick instead — as ``lkd_ray auto``'s stage 3 does."""
    import accuracy as acc

    rows = _field_tuning_rows()
    for r in rows:
        if r["family"] == "ls" and r["trial"] == "eps=0.1":
            r.update(select_top1=99.0, select_loss_cal=0.1)
    best, pick = acc._trial_of("noisy-pair30", "rule-best", rows, "field")
    assert pick["family"] == "ls" and best.sections["loss"]["method"] == "ce"
    for fam in ("rule-weights", "lkd-rule", "lkd-rule-capped"):
        trials = acc.family_trials("noisy-pair30", fam, rows, "field")
        assert trials and all(t.sections["loss"]["ce_rule"] == "agree" for t in trials), fam  # the best rule, on dist
        assert all(t.sections["loss"]["tau"] == 4.0 for t in trials), fam
    assert all(t.sections["lossnet"]["base"] == "dist" for t in acc.family_trials("noisy-pair30", "lkd-rule", rows, "field"))


def test_a_transfer_command_s_rule_does_not_change_when_the_field_suite_finishes(tmp_path):
    """The suite a transfer's rule comes from is in the command: without --rule, a regime of the regimes benchmark
    transfers that benchmark's best tuned row even once its field suite is tuned whole (so recorded commands keep
    re-planning); --rule rule-best takes the field suite's pick and refuses a half-tuned suite; a regime only the
    field suite measures takes that suite's pick either way."""
    import argparse
    import shutil

    import accuracy
    import transfer

    src = ROOT / "benchmarks" / "results"
    for name in (accuracy.RECORDS, accuracy.TUNING):
        shutil.copy(src / name, tmp_path / name)
    rows = _field_tuning_rows()  # noisy-pair30 tuned whole (agree on DIST wins)
    (tmp_path / accuracy.FIELD_TUNING).write_text(json.dumps(rows))
    regimes_best = accuracy.best_tuned([r for r in json.loads((src / accuracy.RECORDS).read_text())
                                        if r["regime"] == "noisy-pair30"])
    name, _ = transfer.rule_of("noisy-pair30", tmp_path)
    assert name.startswith(regimes_best[:-len("-tuned")] + "[")
    assert transfer.rule_of("noisy-pair30", tmp_path, field=True)[0] == "agree[rule=agree,base=dist]"
    args = argparse.Namespace(preset="noisy-pair30", settings=["pair20"], seeds=[0], out=str(tmp_path / "o"),
                              cache_dir=str(tmp_path), results=str(tmp_path), threads=1, rule="rule-best", rule_only=True)
    (task,) = transfer.plan(args)
    assert task["method"] == "agree[rule=agree,base=dist]" and task["config"]["loss"]["ce_rule"] == "agree"
    (tmp_path / accuracy.FIELD_TUNING).write_text(json.dumps([r for r in rows if r["family"] != "sce"]))
    with pytest.raises(accuracy.BenchmarkError, match="not tuned whole: sce 0 of 8"):
        transfer.plan(args)
    assert transfer.rule_of("noisy-pair30", tmp_path)[0] == name  # the default does not read the field suite
    with pytest.raises(accuracy.BenchmarkError, match="noisy-pair45-8k's field suite is not picked yet"):
        transfer.rule_of("noisy-pair45-8k", tmp_path)


def test_only_an_untuned_base_reads_as_not_tuned_yet_and_a_grid_that_changed_is_named():
    """field_untuned says "0 of ?" only where a rule's base has no tuning trials; a recorded pick that is not in its
    family's grid any more (a grid edited after tuning) stops it with the family, the pick and what to do."""
    import accuracy

    rows = _field_tuning_rows()
    assert accuracy.field_untuned("noisy-pair30", [r for r in rows if r["family"] != "dist"]) == \
        {"dist": "0 of 4", **{f: "0 of ?" for f in accuracy.RULES}}
    dist_pick = accuracy.tuning_pick(rows, "noisy-pair30", "dist", "field")["trial"]
    edited = [{**r, "trial": "tau=3"} if r["family"] == "dist" and r["trial"] == dist_pick else r for r in rows]
    with pytest.raises(accuracy.BenchmarkError, match=r"dist pick 'tau=3' is not in that family's grid"):
        accuracy.field_untuned("noisy-pair30", edited)


def test_the_ramp_family_ramps_the_best_rule_over_the_regime_s_whole_run():
    """``ramp``: the best rule (a KD- or DIST-based pick) with its weights and temperature ramped linearly over the
    regime's own epochs (scarce trains 40, the others the recipe's), a 2 × 2 grid; everything else is the rule's."""
    import accuracy as acc

    from lkd_ray.search_spaces import RAMP

    rows = _field_tuning_rows()
    rule, _ = acc._trial_of("noisy-pair30", "rule-best", rows, "field")
    trials = acc.family_trials("noisy-pair30", "ramp", rows, "field")
    assert acc.regime_epochs("scarce") == 40 and acc.regime_epochs("noisy-pair30") == 12
    assert {(t.sections["loss"]["ramp_weight"], t.sections["loss"]["ramp_tau"]) for t in trials} == \
        {(w, tau) for w in RAMP["ramp_weight"] for tau in RAMP["ramp_tau"]}
    for t in trials:
        assert t.family == "ramp" and t.sections["loss"]["ramp_epochs"] == 12
        assert {k: v for k, v in t.sections["loss"].items() if not k.startswith("ramp_")} == rule.sections["loss"]
