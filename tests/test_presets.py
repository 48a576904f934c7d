"""Regime presets: each is exactly what its records pick — among the tuned methods (learned or hand-crafted) whose
whole run was measured within issue 15's cost bar (1.25× KD's: a preset must meet it; an unmeasured cost is unknown,
never within it), the one with the best mean quiz top-1 over the regime's seeds, with that method's tuned setting (rebuilt here from the records by the same rules
the benchmark uses) — it reaches the config through the CLI and the jobs, and an unknown name is refused."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lkd_ray.config import PRESETS, ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _accuracy():
    """The benchmark's own rules (tuning pick, trial grids), so the test checks the preset, not a copy of them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "benchmarks" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_there_is_a_preset_and_each_names_its_source():
    assert PRESETS, "the regimes benchmark ships at least one preset"
    for name, p in PRESETS.items():
        assert set(p) == {"source", "sections", "summary"}, name
        assert set(p["sections"]) <= {"loss", "lossnet", "meta"}, "a preset sets the loss only; the data stay the user's"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_is_what_its_records_pick(name):
    src = PRESETS[name]["source"]
    field = src.get("suite") == "field"  # issue 25's presets: picked from the field suite's records by its rule
    acc = _accuracy()
    finals = json.loads((RESULTS / (acc.FIELD_RECORDS if field else "accuracy_regimes.json")).read_text())
    from benchmarks.report import field_preset_pick, preset_pick

    best, why = (field_preset_pick if field else preset_pick)(finals, src["regime"])
    assert src["method"] == best, f"{name}: the preset says {src['method']}; the records: {best} ({why})"
    tuning = json.loads((RESULTS / (acc.FIELD_TUNING if field else "accuracy_regimes_tuning.json")).read_text())
    family = best[:-len("-tuned")]
    if field:
        trial, chosen = acc._trial_of(src["regime"], family, tuning, "field")
    else:
        chosen = acc.tuning_pick(tuning, src["regime"], family)
        trial = next(t for t in acc.family_trials(src["regime"], family, tuning) if t.name == chosen["trial"])
    assert src["trial"] == chosen["trial"], f"{name}: tuning picks {chosen['trial']}, the preset says {src['trial']}"
    preset = {k: dict(v) for k, v in PRESETS[name]["sections"].items()}
    if "meta_steps_per_epoch" in preset.get("meta", {}) and "meta_every" in trial.sections.get("meta", {}):
        # stored in units of the data, tuned in steps: the same run on its regime
        from lkd_ray.data.bundle import split_for
        from lkd_ray.data import load_fashion_mnist
        from lkd_ray.train.run import meta_schedule

        cfg = acc.build_cfg(src["regime"], PRESETS[name]["sections"], [], 0, "p", str(ROOT / ".cache" / "lkd_ray"))
        steps = len(split_for(cfg.data, load_fashion_mnist(None)["train"][1], 10).student) // cfg.data.batch_size
        resolved, _ = meta_schedule(cfg.meta, steps, cfg.optim.epochs)
        assert resolved.meta_every == trial.sections["meta"]["meta_every"], (steps, resolved.meta_every)
        preset["meta"].pop("meta_steps_per_epoch")
        preset["meta"]["meta_every"] = resolved.meta_every
    assert preset == trial.sections


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_preset_reaches_the_config_and_later_settings_override_it(name):
    sections = PRESETS[name]["sections"]
    cfg = build_config("fashion_mnist", preset=name)
    for section, fields in sections.items():
        for k, v in fields.items():
            assert getattr(getattr(cfg, section), k) == v, (section, k)
    again = build_config("fashion_mnist", preset=name, overrides=["run.seed=7", "loss.tau=3.5"])
    assert again.run.seed == 7 and again.loss.tau == 3.5 and again.loss.method == cfg.loss.method


def test_an_unknown_preset_is_refused_with_the_valid_names():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; valid presets: "):
        build_config("fashion_mnist", preset="nope")
    r = subprocess.run([sys.executable, "-m", "lkd_ray", "train", "--preset", "nope"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--preset" in r.stderr and "invalid choice" in r.stderr


def test_the_jobs_take_a_preset():
    name = sorted(PRESETS)[0]
    sys.path.insert(0, str(ROOT / "jobs"))
    try:
        import _common
    finally:
        sys.path.pop(0)
    args = _common.parser("t", "fashion_mnist").parse_args(["--preset", name, "--set", "run.seed=3"])
    cfg = _common.build(args)
    assert cfg.loss.method == PRESETS[name]["sections"]["loss"]["method"] and cfg.run.seed == 3


def test_the_preset_pick_passes_over_a_cost_above_the_bar_and_stops_at_an_unmeasured_one(tmp_path, monkeypatch):
    """On records written here: the best quiz over the bar is passed over; the best quiz with no cost record is not
    counted as within the bar (it once read as 0×): the pick stops and says what to measure."""
    from benchmarks import report

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    finals = [{"regime": "scarce", "method": m, "seed": s, "quiz_top1": q}
              for m, q in (("a-tuned", 83.0), ("b-tuned", 82.0), ("c-tuned", 81.0), ("kd", 90.0)) for s in range(5)]
    finals += [{"regime": "scarce", "method": "d-tuned", "seed": s, "quiz_top1": 95.0} for s in range(4)]  # 4 seeds

    def cost(**ratios):
        (tmp_path / "cost.json").write_text(json.dumps({"rows": [{"setting": f"scarce:{m}-tuned", "ratios": [r]}
                                                                   for m, r in ratios.items()]}))

    cost(a=1.4, b=1.1, c=1.0)
    assert report.preset_pick(finals, "scarce")[0] == "b-tuned"
    cost(a=1.4, c=1.0)  # b's cost unknown: neither b nor the cheaper c is the pick until b is measured
    best, why = report.preset_pick(finals, "scarce")
    assert best is None and "b-tuned" in why and "cost.py --setting scarce:b-tuned" in why and "a-tuned (1.40×" in why
    cost(a=1.3, b=1.3, c=1.3)
    assert report.preset_pick(finals, "scarce") == (None, "no tuned method of scarce with 5 seeds is within the cost bar")


def test_a_field_regime_ships_the_learned_row_only_when_it_wins_on_test_else_the_rule(tmp_path, monkeypatch):
    """Issue 25's rule on records written here: a learned row with the best selection top-1 ships only if it beats
    rule-best-tuned by ≥ 0.5 at ≥ 2 SE on test (paired over seeds × draws) and is within the cost bar."""
    from benchmarks import report

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    (tmp_path / "cost.json").write_text(json.dumps({"rows": [{"setting": f"r:{m}", "ratios": [x]} for m, x in
                                                             (("lkd-rule-tuned", 1.2), ("rule-best-tuned", 1.0))]}))

    def finals(gain: float, noise: float) -> list[dict]:
        out = []
        for s in range(5):
            for d in (0, 1):
                base = 60.0 + s + d
                out.append({"regime": "r", "method": "rule-best-tuned", "seed": s, "noise_draw": d, "test_top1": base,
                            "select_top1": 61.0})
                out.append({"regime": "r", "method": "lkd-rule-tuned", "seed": s, "noise_draw": d,
                            "test_top1": base + gain + (noise if (s + d) % 2 else -noise), "select_top1": 63.0})
        return out

    gate = {"ok": True}
    monkeypatch.setattr(report, "transfer_gate", lambda regime, m: (gate["ok"], "as measured"))  # its own test below
    assert report.field_preset_pick(finals(1.0, 0.1), "r")[0] == "lkd-rule-tuned"
    gate["ok"] = False  # a win on its own data that does not travel: the rule ships
    best, why = report.field_preset_pick(finals(1.0, 0.1), "r")
    assert best == "rule-best-tuned" and "lkd-rule-tuned (transferred unchanged: as measured)" in why
    gate["ok"] = None  # not measured: the pick stops and says what to run
    best, why = report.field_preset_pick(finals(1.0, 0.1), "r")
    assert best is None and "benchmarks/transfer.py --preset r" in why
    gate["ok"] = True
    best, why = report.field_preset_pick(finals(0.3, 0.1), "r")  # below +0.5: the rule ships
    assert best == "rule-best-tuned" and "lkd-rule-tuned (test +0.30" in why and "not a win" in why
    assert report.field_preset_pick(finals(0.6, 2.0), "r")[0] == "rule-best-tuned"  # +0.6 but within 2 SE
    # a hand-crafted row above the rule on the selection split (here a reweighting, +0.8 on test): the learned row
    # must beat *it* by the bar — +0.2 over it is not a win, so the reweighting ships
    (tmp_path / "cost.json").write_text(json.dumps({"rows": [{"setting": f"r:{m}", "ratios": [x]} for m, x in
                                                             (("lkd-rule-tuned", 1.2), ("rule-best-tuned", 1.0),
                                                              ("rule-weights-tuned", 1.0))]}))
    rw = [dict(r, method="rule-weights-tuned", test_top1=r["test_top1"] + 0.8, select_top1=62.0)
          for r in finals(0.0, 0.0) if r["method"] == "rule-best-tuned"]
    best, why = report.field_preset_pick(finals(1.0, 0.1) + rw, "r")
    assert best == "rule-weights-tuned" and "lkd-rule-tuned (test +0.20" in why and "vs rule-weights-tuned: not a win" in why
    assert report.field_preset_pick(finals(1.5, 0.1) + rw, "r")[0] == "lkd-rule-tuned"  # +0.7 over it: a win
    (tmp_path / "cost.json").write_text(json.dumps({"rows": [{"setting": "r:lkd-rule-tuned", "ratios": [1.3]}]}))
    best, why = report.field_preset_pick(finals(1.0, 0.1), "r")  # over the cost bar; the rule's cost unmeasured
    assert best is None and "lkd-rule-tuned (1.30× > 1.25)" in why and "cost.py --setting r:rule-best-tuned" in why


def test_the_transfer_gate_reads_the_presets_transfer_runs_against_the_regimes_best_rule():
    """On the committed records: noisy-pair45-8k's capped residual, transferred unchanged, falls more than 0.2 pt
    below the transferred relabel rule in at least one setting, so the gate holds it back (the rule ships)."""
    from benchmarks import report

    ok, how = report.transfer_gate("noisy-pair45-8k", "lkd-rule-capped-tuned")
    assert ok is False and "below the transferred rule by more than 0.2 pt" in how
    # lkd-best's transfer runs hold every field lkd-rule's trial sets (the same grid point, on the reweighted rule, with
    # more fields set): they are not lkd-rule's runs, which were never transferred
    assert report.transfer_gate("noisy-pair45-8k", "lkd-best-tuned")[0] is not None
    assert report.transfer_gate("noisy-pair45-8k", "lkd-rule-tuned") == (None, "not transferred")
    ok, how = report.transfer_gate("scarce", "lkd-rule-capped-tuned")  # scarce's learned preset travels to 50 and 300 labels
    assert ok is True and "in 2 settings" in how


def test_the_field_preset_pick_is_the_tuning_pick_s_rule_within_the_selection_split_s_noise(tmp_path, monkeypatch):
    """Rows within one binomial SE of the best eligible selection top-1 sit within the split's noise: the lowest
    calibrated selection loss ships (as every tuning pick is made), a row below the band does not even with a lower
    loss, and the best hand-crafted row a learned row must beat is picked the same way."""
    from benchmarks import report
    from lkd_ray.search_spaces import selection_band

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    band = selection_band(69.5, 500)  # noisy-pair45-8k: 50 selection images per class, 10 classes
    assert 2.0 < band < 2.1

    def rows(method, test, select, cal):
        return [{"regime": "noisy-pair45-8k", "method": method, "seed": s, "noise_draw": d, "test_top1": test + s + d,
                 "select_top1": select, "select_loss_cal": cal} for s in range(5) for d in (0, 1)]

    (tmp_path / "cost.json").write_text(json.dumps({"rows": [{"setting": f"noisy-pair45-8k:{m}-tuned", "ratios": [1.0]}
                                                             for m in ("a", "b", "c", "lkd-x")]}))
    finals = rows("a-tuned", 69.0, 69.5, 0.96) + rows("b-tuned", 69.1, 69.5 - band + 0.01, 0.95) \
        + rows("c-tuned", 70.0, 69.5 - band - 0.01, 0.90)
    best, why = report.field_preset_pick(finals, "noisy-pair45-8k")
    assert best == "b-tuned" and "lowest calibrated selection loss (0.9500; a-tuned 0.9600)" in why
    assert report.best_handcrafted(finals, "noisy-pair45-8k") == "b-tuned"
    monkeypatch.setattr(report, "transfer_gate", lambda regime, m: (True, "as measured"))
    # a learned row with the best selection top-1: +0.6 over a (the strict maximum) but only +0.5 over b, the
    # band's pick, each at SE 0: a win over b by the bar too; at +0.4 over b it is not, and b ships
    won = finals + rows("lkd-x-tuned", 69.6, 72.0, 0.99)
    assert report.field_preset_pick(won, "noisy-pair45-8k")[0] == "lkd-x-tuned"
    lost = finals + rows("lkd-x-tuned", 69.5, 72.0, 0.99)
    best, why = report.field_preset_pick(lost, "noisy-pair45-8k")
    assert best == "b-tuned" and "lkd-x-tuned (test +0.40 ± 0.00 vs b-tuned: not a win)" in why
    # a row in the band whose cost is unmeasured stops the pick only if it could ship (a lower calibrated loss)
    (tmp_path / "cost.json").write_text(json.dumps({"rows": [{"setting": "noisy-pair45-8k:a-tuned", "ratios": [1.0]}]}))
    best, why = report.field_preset_pick(finals, "noisy-pair45-8k")
    assert best is None and "cost.py --setting noisy-pair45-8k:b-tuned" in why
    worse_b = [dict(r, select_loss_cal=0.97) if r["method"] == "b-tuned" else r for r in finals]
    assert report.field_preset_pick(worse_b, "noisy-pair45-8k")[0] == "a-tuned"
