"""Every published benchmark number, regenerated from the records.

BENCHMARKS.md and README.md hold generated blocks between ``<!-- report:NAME -->`` and
``<!-- /report:NAME -->``; this script rewrites each block from ``benchmarks/results/*.json`` (and draws
the figures under ``docs/figures/``, with ``inputs.json``: a hash of the record fields each figure was drawn
from). ``--check`` rewrites nothing and fails (exit 1, with a diff) when a committed block differs from what the
records give, or a figure was drawn from other records than they give now (or is missing) — CI runs it, so
prose, tables and figures cannot drift from what ran.

    python -m benchmarks.report           # rewrite the blocks and redraw the figures
    python -m benchmarks.report --check   # CI: the committed text matches the records
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.records import paired  # noqa: E402
from benchmarks.regimes import PER_SAMPLE, REGIME_ORDER, REGIME_TEXT, best_tuned, rows  # noqa: E402,F401

from benchmarks.report_auto import BLOCKS as AUTO_BLOCKS  # noqa: E402
from benchmarks.report_field import BLOCKS as FIELD_BLOCKS, is_win, paired_draws  # noqa: E402
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
DOCS = {"BENCHMARKS.md": ROOT / "BENCHMARKS.md", "README.md": ROOT / "README.md"}
BLOCK = re.compile(r"(<!-- report:(?P<name>[a-z0-9_-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.S)
TEACHER_TEXT = {
    "full": "the clean training split (54 000 images)",
    "scarce": "the clean training split (the `full` teacher)",
    "noisy-sym40": "the training split with its 40 % symmetric label noise",
    "noisy-pair30": "the training split with its 30 % pair-flip label noise",
}
SEEDS_FOR_VERDICT = 5
WIN_MARGIN, TIE_MARGIN, COST_BOUND = 0.5, 0.2, 1.25  # issue 15's bars: ≥ +0.5 at ≥ 2 SE; never below −0.2; ≤ 1.25× KD


def load(name: str) -> Any:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


# --------------------------------------------------------------------------- statistics
def pm(d: dict | None) -> str:
    return f"{d['mean']:+.2f} ± {d['se']:.2f}" if d else "—"


# --------------------------------------------------------------------------- blocks
def regime_table(regime: str) -> str:
    recs = [r for r in (load("accuracy_regimes.json") or []) if r["regime"] == regime]
    if not recs:
        return f"_No records for `{regime}` yet._\n"
    best = best_tuned(recs)
    order = ["ce", "kd", "dkd", "dist", "control", "lkd"]
    ms = sorted(rows(recs), key=lambda r: (order.index(r["method"]) if r["method"] in order else len(order), r["method"]))
    lines = [f"| method | seeds | test top-1 (mean ± std) | worst seed | Δ vs KD (paired ± SE) | Δ vs {best or 'best tuned'} "
             "(paired ± SE) | worst Δ vs it | quiz top-1 | wall s (median) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in ms:
        vs_best = paired(recs, r["method"], best) if best and r["method"] != best else None
        worst = f"{vs_best['worst']:+.2f}" if vs_best else "—"
        vs_kd = pm(paired(recs, r["method"], "kd")) if r["method"] != "kd" else "—"
        name = f"**{r['method']}**" if r["method"] in (best, "lkd") else r["method"]
        lines.append(f"| {name} | {r['n']} | {r['test']:.2f} ± {r['std']:.2f} | {r['worst']:.2f} | {vs_kd} | {pm(vs_best)} | "
                     f"{worst} | {r['quiz']:.2f} | {r['wall']:.0f} |")
    teacher = next((r.get("teacher") for r in recs if r.get("teacher")), {}) or {}
    tuned = {r["method"]: r["tuned_from"] for r in recs if r.get("tuned_from")}
    picks = "; ".join(f"`{m}` = {t['family']}[{t['trial']}] (best of {t['trials']} on seed {t['seed']}, quiz "
                      f"{t['quiz_top1']:.2f})" for m, t in sorted(tuned.items()))
    machine = recs[0]["machine"]
    commits = sorted({r["commit"][:7] for r in recs if r.get("commit")})
    beside = sorted({r["jobs_beside"] for r in recs})
    return ("\n".join(lines) + "\n\n"
            f"Teacher `{teacher.get('key')}`: test top-1 {teacher.get('test_top1', float('nan')):.2f} %. "
            f"Best tuned hand-crafted loss by quiz: **{best}**. Tuned picks: {picks or '—'}.\n"
            f"Records: {len(recs)} runs, commit(s) {', '.join(commits)}, {machine['cores']} cores, torch {machine['torch']}, "
            f"{' or '.join(map(str, beside))} other run(s) beside each; wall times are of runs sharing the machine.\n")


def _preset_for(regime: str, suite: str = "regimes") -> tuple[str, dict] | None:
    """The preset picked from ``suite``'s records of ``regime`` (a regime can have one from each suite)."""
    from lkd_ray.config import PRESETS

    return next(((n, p) for n, p in PRESETS.items()
                 if p["source"]["regime"] == regime and p["source"].get("suite", "regimes") == suite), None)


def _cost_row(setting: str) -> dict | None:
    """The cost record of ``setting`` (``<regime>:<method>`` or ``lkd (default)``), or None if not measured."""
    return next((r for r in (load("cost.json") or {}).get("rows", []) if r["setting"] == setting), None)


def _cost_ratio(setting: str) -> float | None:
    row = _cost_row(setting)
    return statistics.median(row["ratios"]) if row else None


def preset_pick(finals: list[dict], regime: str, seeds: int = SEEDS_FOR_VERDICT) -> tuple[str | None, str]:
    """What a regime's records pick for its preset: the tuned method (learned or hand-crafted, at least ``seeds``
    seeds) with the best mean quiz top-1 whose whole run was measured within the cost bar. One measured over the bar
    is passed over; an unmeasured one stops the pick — its cost is unknown, not within the bar. Returns the method
    (None when there is none) and why."""
    rs = [r for r in finals if r["regime"] == regime and r["method"].endswith("-tuned")]
    by = {m: [r["quiz_top1"] for r in rs if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rs)}
    quiz = {m: statistics.mean(q) for m, q in by.items() if len(q) >= seeds}
    passed = []
    for m in sorted(quiz, key=quiz.get, reverse=True):
        ratio = _cost_ratio(f"{regime}:{m}")
        if ratio is None:
            after = f" after {', '.join(passed)}" if passed else ""
            return None, (f"{m} has the best quiz top-1 ({quiz[m]:.2f}) of what is left{after}, but its whole-run "
                          f"cost is not measured: run `benchmarks/cost.py --setting {regime}:{m}`")
        if ratio <= COST_BOUND:
            return m, f"best quiz top-1 ({quiz[m]:.2f}) within the cost bar ({ratio:.2f}× ≤ {COST_BOUND})"
        passed.append(f"{m} ({ratio:.2f}× > {COST_BOUND})")
    return None, f"no tuned method of {regime} with {seeds} seeds is within the cost bar"


def _selection_means(rs: list[dict], seeds: int) -> dict[str, float]:
    """Each tuned final row's mean selection top-1, for the rows with at least ``seeds`` seeds all measured on it."""
    by = {m: [r for r in rs if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rs)}
    return {m: statistics.mean(r["select_top1"] for r in x) for m, x in by.items()
            if len({r["seed"] for r in x}) >= seeds and all(r.get("select_top1") is not None for r in x)}


def best_handcrafted(rs: list[dict], regime: str, seeds: int = SEEDS_FOR_VERDICT) -> str | None:
    """The best tuned loss of the whole hand-crafted set, as the split that picks everything ranks the finals: of the
    hand-crafted final rows (not ``lkd*``) within one binomial SE of the best mean selection top-1, the lowest mean
    calibrated selection loss (``search_spaces.pick_on_selection``'s rule; by selection top-1 where it is missing)."""
    from lkd_ray.search_spaces import selection_band

    sel = {m: v for m, v in _selection_means(rs, seeds).items() if not m.startswith("lkd")}
    if not sel:
        return None
    cal, n = _calibrated_means(rs), _selection_images(regime)
    top = max(sel.values())
    band = [m for m, v in sel.items() if v >= top - (selection_band(top, n) if n else 0.0)]
    return min(band, key=lambda m: (cal.get(m, float("inf")), -sel[m]))


def _selection_images(regime: str) -> int | None:
    """The regime's selection split size (images), or None for a regime the accuracy benchmark does not define."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import accuracy

    per_class = accuracy.SELECT.get(regime)
    return per_class * 10 if per_class else None  # every benchmark data set here has ten classes


def _calibrated_means(rs: list[dict]) -> dict[str, float]:
    """Each final row's mean calibrated selection loss, for rows whose every record has it."""
    by = {m: [r.get("select_loss_cal") for r in rs if r["method"] == m] for m in dict.fromkeys(r["method"] for r in rs)}
    return {m: statistics.mean(v) for m, v in by.items() if v and None not in v}


def field_preset_pick(finals: list[dict], regime: str, seeds: int = SEEDS_FOR_VERDICT) -> tuple[str | None, str]:
    """What a field-suite regime ships (issue 25), picked as every tuning pick is (``search_spaces.pick_on_selection``):
    among its eligible tuned final rows with at least ``seeds`` seeds, those within one binomial SE of the best
    eligible mean selection top-1 (the clean split no learned loss trains on) sit within the split's noise, and of
    them the lowest mean calibrated selection loss ships (by selection top-1 where a row's records lack it). Eligible:
    whole run within the cost bar, and for a learned row a win on test by the bar (≥ +0.5 at ≥ 2 SE, paired over
    seeds × noise draws) over the best tuned loss of the whole hand-crafted set (``best_handcrafted``) and a measured
    transfer that passes ``transfer_gate``. An unmeasured cost or transfer of a row that could be in the band stops
    the pick and says what to run."""
    from lkd_ray.search_spaces import selection_band

    rs = [r for r in finals if r["regime"] == regime and r["method"].endswith("-tuned")]
    sel = _selection_means(rs, seeds)
    cal = _calibrated_means(rs)
    ref = best_handcrafted(rs, regime, seeds)
    n = _selection_images(regime)
    passed, eligible, outranked, floor = [], [], [], None
    for m in sorted(sel, key=sel.get, reverse=True):
        if floor is not None and sel[m] < floor:
            break  # below the band of the best eligible row: it could not ship
        if m.startswith("lkd"):
            d = paired_draws(rs, m, ref) if ref else None
            if not is_win(d):
                passed.append(f"{m} (test {_pm_field(d)} vs {ref}: not a win)")
                continue
        best_cal = min((cal.get(e, float("inf")) for e, _ in eligible), default=None)
        if best_cal is not None and cal.get(m, float("inf")) >= best_cal:
            outranked.append(m)  # in the band but a higher calibrated loss than an eligible row above it: cannot ship
            continue
        ratio = _cost_ratio(f"{regime}:{m}")
        if ratio is None:
            after = f" after {', '.join(passed)}" if passed else ""
            return None, (f"{m} has the best selection top-1 ({sel[m]:.2f}) of what is left{after}, but its whole-run "
                          f"cost is not measured: run `benchmarks/cost.py --setting {regime}:{m}`")
        if ratio > COST_BOUND:
            passed.append(f"{m} ({ratio:.2f}× > {COST_BOUND})")
            continue
        if m.startswith("lkd"):  # a result on one data set is not a result until it travels
            ok, how = transfer_gate(regime, m)
            if ok is None:
                return None, (f"{m} wins on {regime} within the cost bar but its transfer is not measured ({how}): ship "
                              f"it as the regime's preset and run `benchmarks/transfer.py --preset {regime}` (≥ 3 seeds)")
            if not ok:
                passed.append(f"{m} (transferred unchanged: {how})")
                continue
        eligible.append((m, ratio))
        if floor is None:
            floor = sel[m] - (selection_band(sel[m], n) if n else 0.0)
    if not eligible:
        return None, f"no tuned row of {regime} with {seeds} seeds is eligible within the cost bar ({', '.join(passed)})"
    m, ratio = min(eligible, key=lambda e: (cal.get(e[0], float("inf")), -sel[e[0]]))
    after = f"; passed over {', '.join(passed)}" if passed else ""
    top = eligible[0][0]
    others = [e for e, _ in eligible if e != m] + outranked
    if not others or m not in cal:
        how = f"best selection top-1 ({sel[m]:.2f})"
    else:
        band = ", ".join(f"{e} {cal[e]:.4f}" for e in others if e in cal)
        how = (f"lowest calibrated selection loss ({cal[m]:.4f}; {band}) of the {len(others) + 1} rows within one "
               f"binomial SE ({sel[top] - floor:.2f}) of the best eligible selection top-1 ({top}, {sel[top]:.2f}; its "
               f"own {sel[m]:.2f})")
    return m, f"{how}, within the cost bar ({ratio:.2f}× ≤ {COST_BOUND}){after}"


def field_verdicts() -> str:
    """Issue 25's verdict per field-suite regime, in words, every number from the records: the best rule, each
    learned row against it (the win bar), the best hand-crafted row in hindsight, and what the preset pick ships."""
    from benchmarks.report_field import REGIMES as FIELD_REGIMES, TIE

    finals = load("accuracy_field.json") or []
    out = []
    for regime in FIELD_REGIMES:
        rs = [r for r in finals if r["regime"] == regime and r["method"].endswith("-tuned")]
        if not any(r["method"] == "rule-best-tuned" for r in rs):
            continue
        rule = next(r for r in rs if r["method"] == "rule-best-tuned")["tuned_from"]
        learned, hand = [], []
        for m in dict.fromkeys(r["method"] for r in rs):
            if m == "rule-best-tuned":
                continue
            d = paired_draws(rs, m, "rule-best-tuned")
            if d is None:
                continue
            how = (("a win" if m.startswith("lkd") else "above by the win bar") if is_win(d)
                   else "above, short of the win bar" if d["mean"] > TIE
                   else "level, within 0.2" if d["mean"] >= -TIE else "below")
            text = f"`{m}` {_pm_field(d)} (worst pair {d['worst']:+.2f}, {d['n']} seed × draw pairs: {how})"
            (learned if m.startswith("lkd") else hand).append((d["mean"], text))
        top = best_handcrafted(rs, regime) or "rule-best-tuned"
        pick, why = field_preset_pick(finals, regime)
        parts = [f"**{regime}.** The best rule on the selection split is `{rule['family']}[{rule['trial']}]`."]
        if learned:
            parts.append("Against it on test, the learned residual: " + "; ".join(t for _, t in learned) + ".")
        if hand:
            parts.append("Other hand-crafted rows against it: " + "; ".join(t for _, t in sorted(hand, reverse=True)) + ".")
        if learned and top != "rule-best-tuned":
            vs = [f"`{m}` {_pm_field(d)} ({'a win' if is_win(d) else 'not a win'})"
                  for m in dict.fromkeys(r["method"] for r in rs) if m.startswith("lkd")
                  for d in [paired_draws(rs, m, top)]]
            parts.append(f"Against the best hand-crafted row on the selection split, `{top}`: " + "; ".join(vs) + ".")
        parts.append(f"The preset pick (`report.field_preset_pick`): **{pick or 'none yet'}** — {why}.")
        out.append(" ".join(parts))
    return "\n\n".join(out) + "\n" if out else "_No field-suite finals recorded yet._\n"


def transfer_gate(regime: str, method: str, seeds: int = 3) -> tuple[bool | None, str]:
    """Issue 25's transfer bar for a learned row of a field regime: its preset runs in the transfer records (the
    rows whose stored config runs this row's tuned setting) against the source regime's best rule, transferred too —
    in every setting, with at least ``seeds`` paired seeds, no more than 0.2 pt below the rule on test.
    None: not measured."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import accuracy

    from benchmarks.report_field import TIE

    tuning = load(accuracy.FIELD_TUNING) or []
    trial, _ = accuracy._trial_of(regime, method[:-len("-tuned")], tuning, "field")
    rule_trial, rule_best = accuracy._trial_of(regime, "rule-best", tuning, "field")
    rule_label = f"|{rule_best['family']}[{rule_trial.name}]"  # the regime's best rule, as transfer.py names it
    recs = [r for r in (load("accuracy_transfer.json") or []) if r.get("source_regime") == regime]

    from benchmarks.records import NEUTRAL
    from lkd_ray.config import build_config

    built = build_config("fashion_mnist", **trial.sections).to_dict()  # every field of what the trial runs, defaults too

    def runs_trial(r: dict) -> bool:
        """The record's loss, loss network and meta-step are exactly the trial's: a run whose config merely contains
        the trial's fields (another family's trial on the same base, with more fields set) is not it."""
        cfg = accuracy._stored_config(r["config_sha"], RESULTS / "configs.json")
        if not cfg:
            return False
        missing = object()
        for sec in ("loss", "lossnet", "meta"):
            for k, v in built[sec].items():
                got = cfg.get(sec, {}).get(k, missing)
                if got is missing:  # a field added after the run: it ran with what is now its neutral value
                    got = NEUTRAL.get((sec, k), missing)
                if got != v:
                    return False
        return True

    pre = [r for r in recs if r.get("role") == "preset" and runs_trial(r)]
    if not pre:
        return None, "not transferred"
    worst, missing = [], []
    for setting in dict.fromkeys(r["setting"] for r in pre):
        p = {r["seed"]: r["test_top1"] for r in pre if r["setting"] == setting}
        rule = {r["seed"]: r["test_top1"] for r in recs
                if r["setting"] == setting and r.get("role") == "rule" and r["method"].endswith(rule_label)}
        both = sorted(set(p) & set(rule))
        if len(both) < seeds:
            missing.append(f"{setting}: {len(both)} paired seeds")
            continue
        worst.append((statistics.mean(p[s] - rule[s] for s in both), setting))
    low = [f"{w:+.2f} on {s}" for w, s in sorted(worst) if w < -TIE]
    if low:  # one measured setting below the bar decides, whatever is still running
        return False, f"below the transferred rule by more than {TIE} pt: {', '.join(low)}"
    if missing:
        return None, ", ".join(missing)
    return True, f"within {TIE} pt of the transferred rule in {len(worst)} settings"


def _pm_field(d: dict | None) -> str:
    return f"{d['mean']:+.2f} ± {d['se']:.2f}" if d else "unpaired"


def verdicts() -> str:
    """Issue 15's bars per regime. What ships for a regime is the shipped ``lkd`` and, where one exists, the regime's
    preset (``--preset <regime>``); a win needs a learned loss among them ≥ +0.5 at ≥ 2 SE over the best tuned
    hand-crafted loss, "within" asks whether what ships stays within −0.2 of it, and the cost bar is the preset's
    whole run over KD's (≤ 1.25×). The best LKD variant by quiz is shown beside them; it is not shipped."""
    recs = load("accuracy_regimes.json") or []
    lines = ["| regime | best tuned hand-crafted (by quiz) | its test top-1 | shipped `lkd` − it | preset − it "
             "| best LKD variant − it | win (≥ +0.5, ≥ 2 SE)? | within −0.2? | preset run / KD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for regime in REGIME_ORDER:
        rs = [r for r in recs if r["regime"] == regime]
        best = best_tuned(rs)
        if not rs or not best:
            lines.append(f"| {regime} | _not run yet_ | | | | | | | |")
            continue
        bt = next(r for r in rows(rs) if r["method"] == best)
        seeds = min((r["n"] for r in rows(rs)), default=0)
        if seeds < SEEDS_FOR_VERDICT:  # a regime still running: its rows so far, no verdict
            lines.append(f"| {regime} | _incomplete: {seeds} of {SEEDS_FOR_VERDICT} seeds for some rows_ | | | | | | | |")
            continue
        lkd = paired(rs, "lkd", best)
        variants = {m: paired(rs, m, best) for m in {r["method"] for r in rs} if m.startswith("lkd-")}
        variants = {m: d for m, d in variants.items() if d}
        vq = {m: statistics.mean(r["quiz_top1"] for r in rs if r["method"] == m) for m in variants}
        top = max(vq, key=vq.get) if vq else None  # chosen by quiz, like everything else
        preset = _preset_for(regime)
        pm_, pd, ptext, cost = None, None, "no preset", "—"
        if preset:
            pm_ = preset[1]["source"]["method"]
            pd = {"mean": 0.0, "se": 0.0} if pm_ == best else paired(rs, pm_, best)
            ptext = f"`{preset[0]}` ({pm_}): " + ("it" if pm_ == best else pm(pd))
            ratio = _cost_ratio(f"{regime}:{pm_}")
            cost = (f"{ratio:.2f}× ({'≤' if ratio <= COST_BOUND else '>'} {COST_BOUND})" if ratio is not None
                    else "not measured")
        learned = [d for d in (lkd, pd if pm_ and pm_.startswith("lkd") else None) if d]
        win = any(is_win(d) for d in learned)
        shipped = pd if pd is not None else lkd
        within = shipped is not None and shipped["mean"] >= -TIE_MARGIN
        lines.append(f"| {regime} | {best} | {bt['test']:.2f} | {pm(lkd)} | {ptext} | "
                     f"{f'{top}: ' + pm(variants[top]) if top else '—'} | {'yes' if win else 'no'} | "
                     f"{('yes' if within else 'no') + (' (preset)' if pd is not None else '')} | {cost} |")
    return "\n".join(lines) + "\n"


def tuning_table(regime: str) -> str:
    recs = [r for r in (load("accuracy_regimes_tuning.json") or []) if r["regime"] == regime]
    if not recs:
        return f"_No tuning records for `{regime}` yet._\n"
    from lkd_ray.search_spaces import pick

    lines = ["| family | trials | picked (best quiz top-1) | its quiz top-1 | quiz range over the grid |", "|---|---|---|---|---|"]
    for fam in dict.fromkeys(r["family"] for r in recs):
        fr = [r for r in recs if r["family"] == fam]
        p = pick(fr)
        q = [r["quiz_top1"] for r in fr]
        lines.append(f"| {fam} | {len(fr)} | {p['trial']} | {p['quiz_top1']:.2f} | {min(q):.2f}–{max(q):.2f} |")
    return "\n".join(lines) + f"\n\nTuning seed {recs[0]['seed']}; quiz split only.\n"


def cost_table() -> str:
    rec = load("cost.json")
    if not rec:
        return "_Not measured yet._\n"
    lines = ["| setting | recipe | pairs | setting / KD, whole run (median) | range | whole process (median) | KD run (s) | "
             "measured | commit | jobs beside |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rec["rows"]:
        r, p = row["ratios"], row["process_ratios"]
        lines.append(f"| {row['setting']} | {row['recipe']} | {len(r)} | {statistics.median(r):.2f} | {min(r):.2f}–{max(r):.2f} | "
                     f"{statistics.median(p):.2f} | {statistics.median(row['kd_s']):.0f} | {row['measured'][:10]} | "
                     f"{row['commit'][:7]} | {row['jobs_beside']} |")
    return "\n".join(lines) + "\n\nCommands: " + "; ".join(sorted({f"`{r['command']}`" for r in rec["rows"]})) + "\n"


def cost_headline() -> str:
    rec = load("cost.json")
    if not rec:
        return "_Not measured yet._\n"
    row = next((r for r in rec["rows"] if r["setting"] == "lkd (default)"), rec["rows"][0])
    r = row["ratios"]
    return (f"Whole run, LKD (the shipped default) over KD, same recipe, run one after the other: "
            f"**{statistics.median(r):.2f}×** (median of {len(r)} pairs, range {min(r):.2f}–{max(r):.2f}; "
            f"{row['recipe']}).\n")


def _prov(rec: dict) -> str:
    m = rec["machine"]
    return (f"`{rec['command']}` — commit {str(rec.get('commit'))[:7]}{' (dirty)' if rec.get('dirty') else ''}, "
            f"{rec.get('finished', '')[:10]}, {m['cores']} cores, torch {m['torch']}, Ray {m.get('ray')}, "
            f"{rec['jobs_beside']} other job(s) beside it (load {rec.get('load_1m_start')} → {rec.get('load_1m_end')})")


def _ms(d: dict | None, k: str) -> str:
    v = (d or {}).get(k)
    return "—" if v is None else f"{v:.1f}"


def overhead_table() -> str:
    rec = load("overhead.json")
    if not rec:
        return "_Not measured yet._\n"
    lines = ["| setting | LKD / KD per step (median) | per-rep spread | steps per window |", "|---|---|---|---|"]
    for r in rec["records"]:
        lines.append(f"| `{r['config']}` | {r['lkd_over_kd']:.2f} | {r['spread'][0]:.2f}–{r['spread'][1]:.2f} | {r['steps']} |")
    return "\n".join(lines) + f"\n\n{_prov(rec)}.\n"


def units_table() -> str:
    rec = load("meta_cost.json")
    if not rec:
        return "_Not measured yet._\n"
    lines = ["| estimator | student passes per meta-step (median) | per-rep spread | ms (median) |", "|---|---|---|---|"]
    for r in rec["estimators"]:
        lines.append(f"| {r['estimator']} | {r['units_median']:.1f} | {r['units_spread'][0]:.1f}–{r['units_spread'][1]:.1f} | "
                     f"{r['meta_step_ms_median']:.0f} |")
    return "\n".join(lines) + f"\n\n{_prov(rec)}.\n"


def teacher_cache_table() -> str:
    rec = load("teacher_cache.json")
    if not rec:
        return "_Not measured yet._\n"
    sp = rec["speed"]
    sec = {k: statistics.median(v) for k, v in sp["seconds"].items()}
    return (f"| | live teacher (s / {sp['steps']} steps, median) | cached, {rec['views']} views (s) | speed-up (median, spread) |\n"
            f"|---|---|---|---|\n"
            f"| KD | {sec['kd_live']:.2f} | {sec['kd_cached']:.2f} | {sp['kd_step_speedup']:.2f}× "
            f"({sp['kd_step_speedup_spread'][0]:.2f}–{sp['kd_step_speedup_spread'][1]:.2f}) |\n"
            f"| LKD (default) | {sec['lkd_live']:.2f} | {sec['lkd_cached']:.2f} | {sp['lkd_step_speedup']:.2f}× "
            f"({sp['lkd_step_speedup_spread'][0]:.2f}–{sp['lkd_step_speedup_spread'][1]:.2f}) |\n\n{_prov(rec)}.\n")


def server_table() -> str:
    rec = load("lossnet_server.json")
    if not rec:
        return "_Not measured yet._\n"
    lines = ["| mode | clients | submissions/s (client side) | processed/s (server) | p50 ms | p99 ms | samples | notes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        lat = r.get("latency_ms") or r.get("submit_latency_ms")
        if r["mode"] == "sync":
            note = f"round trip; all-reduce p50 {r['allreduce_ms']['p50']:.1f} ms, added {r['added_latency_ms_p50']:.1f} ms"
            proc = f"{r['rounds_per_s']:.0f} rounds"
        elif r["mode"] == "async":
            dup = f", duplicates {r['duplicates']}" if "duplicates" in r else ""
            note = (f"submit latency (fire and forget); accepted {r['accepted']}, rejected {r['rejected']}{dup}, "
                    f"mean batch {r['mean_batch']:.1f}")
            proc = f"{r['processed_per_s']:.0f}"
        else:
            note, proc = "submit latency (fire and forget)", "—"
        lines.append(f"| {r['mode']} | {r['clients']} | {r['throughput_per_s']:.0f} | {proc} | {_ms(lat, 'p50')} | "
                     f"{_ms(lat, 'p99')} | {lat['n']} | {note} |")
    return "\n".join(lines) + f"\n\n{_prov(rec)}.\n"


def snapshot_table() -> str:
    rec = load("snapshot_pool.json")
    if not rec:
        return "_Not measured yet._\n"
    lines = ["| path | p50 ms | p99 ms | samples | p50 / raw GET |", "|---|---|---|---|---|"]
    for k, v in rec["latency_ms"].items():
        lines.append(f"| {k} | {_ms(v, 'p50')} | {_ms(v, 'p99')} | {v['n']} | {rec['ratio_to_raw_get_p50'][k]:.2f} |")
    mem = rec["memory"]
    return ("\n".join(lines) + f"\n\nObject store: {mem['object_store_snapshots']} snapshots, {mem['object_store_bytes']} of "
            f"{mem['object_store_limit']} bytes allowed. {_prov(rec)}.\n")


def ray_epoch_table() -> str:
    rec = load("ray_epoch.json")
    if not rec:
        return "_Not measured yet._\n"
    reps = " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(rec["single_process_s"], rec["ray_2_workers_epoch_s"]))
    return (f"Epoch seconds, single process / Ray 2 workers, per rep: {reps}. Ratio of medians: "
            f"**{rec['ratio_median']:.2f}×**; {rec['steps_per_rank']} steps and {rec['meta_steps_per_rank']} meta-steps per "
            f"rank. {_prov(rec)}.\n")


def teachers_table() -> str:
    recs = load("accuracy_regimes.json") or []
    tun = load("accuracy_regimes_tuning.json") or []
    lines = ["| regime | teacher (key) | test top-1 | trained on |", "|---|---|---|---|"]
    for regime in REGIME_ORDER:
        t = next((r.get("teacher") for r in recs + tun if r["regime"] == regime and r.get("teacher")), None)
        if t:
            lines.append(f"| {regime} | `{t['key']}` | {t['test_top1']:.2f} | {TEACHER_TEXT[regime]} |")
    return "\n".join(lines) + "\n"


def per_sample_text() -> str:
    recs = load("accuracy_regimes.json") or []
    lines = ["| regime | row | images | CE weight | distillation weight | temperature |", "|---|---|---|---|---|---|"]
    any_ = False
    for regime in REGIME_ORDER:
        for method in PER_SAMPLE:
            rs = [r for r in recs if r["regime"] == regime and r["method"] == method and r.get("per_sample")]
            for g in ("clean", "flipped", "agree", "disagree"):
                vals = {o: [r["per_sample"][o][g]["mean"] for r in rs if r["per_sample"][o][g]["n"]] for o in ("w_ce", "w_kd", "tau")}
                if not vals["w_ce"]:
                    continue
                any_ = True
                lines.append(f"| {regime} | {method} | {g} | "
                             + " | ".join(f"{statistics.mean(vals[o]):.2f}" for o in ("w_ce", "w_kd", "tau")) + " |")
    return ("\n".join(lines) + "\n\nMean over the seeds of each group's mean output (base: 1, 1 and the base τ). The "
            "distillation weight multiplies KD's term in `lkd-sample-tuned` and DIST's per-sample inter-class term in "
            "`lkd-sample-dist-tuned`.\n"
            if any_ else "_No per-sample runs recorded yet._\n")


def presets_table() -> str:
    """The shipped presets (lkd_ray.config.PRESETS), each with what its records say and its measured cost."""
    from lkd_ray.config import PRESETS

    if not PRESETS:
        return "_No presets shipped._\n"
    from benchmarks.report_field import paired_draws

    recs = load("accuracy_regimes.json") or []
    field = load("accuracy_field.json") or []
    lines = ["| `--preset` | regime | what it runs | test top-1 (mean ± std) | Δ vs kd, or the best rule in the field suite "
             "(paired ± SE) | quiz top-1 | whole run / KD (median, range) |", "|---|---|---|---|---|---|---|"]
    for name, p in PRESETS.items():
        src = p["source"]
        field_preset = src.get("suite") == "field"  # seeds × noise draws, against the regime's best tuned rule
        rs = [r for r in (field if field_preset else recs) if r["regime"] == src["regime"]]
        row = next((r for r in rows(rs) if r["method"] == src["method"]), None)
        c = _cost_row(f"{src['regime']}:{src['method']}")
        c_text = (f"{statistics.median(c['ratios']):.2f} ({min(c['ratios']):.2f}–{max(c['ratios']):.2f})"
                  + (f", with {c['jobs_beside']} other jobs on the machine" if c.get("jobs_beside") else "") if c
                  else "not measured")
        delta = (f"{pm(paired_draws(rs, src['method'], 'rule-best-tuned'))} vs rule-best-tuned" if field_preset
                 else pm(paired(rs, src["method"], "kd")))
        lines.append(f"| `{name}` | {src['regime']} | {src['method']} ({src['trial']}) | "
                     + (f"{row['test']:.2f} ± {row['std']:.2f} | {delta} | {row['quiz']:.2f}" if row else "— | — | —")
                     + f" | {c_text} |")
    return "\n".join(lines) + "\n"


def dropped_table() -> str:
    """Every drop logged by ``benchmarks/records.py drop``: what went, why, and when."""
    log = load("dropped.json") or []
    if not log:
        return "_No rows dropped through `benchmarks/records.py drop` yet._\n"
    lines = ["| dropped (UTC) | file | rows | which | why |", "|---|---|---|---|---|"]
    for d in log:
        which = ", ".join(f"{k}={v}" for k, v in d["where"].items())
        lines.append(f"| {d['dropped'][:16].replace('T', ' ')} | `{d['file']}` | {d['rows']} | {which} | {d['reason']} |")
    return "\n".join(lines) + "\n\nFrom `benchmarks/results/dropped.json`; the rows themselves stay in git history.\n"


def corrected_table() -> str:
    """Every provenance flag corrected through ``benchmarks/records.py correct``: which rows, from what, to what, why."""
    log = load("corrected.json") or []
    if not log:
        return "_No records corrected through `benchmarks/records.py correct` yet._\n"
    lines = ["| corrected (UTC) | file | rows | which | field: was → now | why |", "|---|---|---|---|---|---|"]
    for d in log:
        which = ", ".join(f"{k}={v[:7] if k == 'commit' else v}" for k, v in d["where"].items())
        was = ", ".join(f"{v} ×{n}" for v, n in d["old"].items())
        lines.append(f"| {d['corrected'][:16].replace('T', ' ')} | `{d['file']}` | {d['rows']} | {which} | "
                     f"`{d['field']}`: {was} → {json.dumps(d['new'])} | {d['reason']} |")
    return "\n".join(lines) + "\n\nFrom `benchmarks/results/corrected.json`, which keeps each correction's command and commit.\n"


BLOCKS: dict[str, Callable[[], str]] = {
    "dropped": dropped_table,
    "corrected": corrected_table,
    "presets": presets_table,
    "overhead": overhead_table,
    "units": units_table,
    "teacher-cache": teacher_cache_table,
    "server": server_table,
    "snapshot-pool": snapshot_table,
    "ray-epoch": ray_epoch_table,
    "teachers": teachers_table,
    "per-sample": per_sample_text,
    "verdicts": verdicts,
    "field-verdicts": field_verdicts,
    "cost": cost_table,
    "cost-headline": cost_headline,
    **{f"regime-{r}": (lambda r=r: regime_table(r)) for r in REGIME_ORDER},
    **{f"tuning-{r}": (lambda r=r: tuning_table(r)) for r in REGIME_ORDER},
    **{f"figures-{r}": (lambda r=r: figure_links(r)) for r in REGIME_ORDER},
    **FIELD_BLOCKS,
    **AUTO_BLOCKS,
}


def figure_links(regime: str) -> str:
    """Links to the figures ``benchmarks/figures.py`` draws for a regime: only those its records produce."""
    recs = [r for r in (load("accuracy_regimes.json") or []) if r["regime"] == regime]
    if not recs:
        return f"_No figures for `{regime}`: it has not run._\n"
    names = ["training_curves", "paired_vs_best"]
    names += [f"per_sample{suffix}" for m, suffix in PER_SAMPLE.items() if any(r["method"] == m and r.get("per_sample") for r in recs)]
    return "".join(f"![](docs/figures/{n}_{regime}.png)\n" for n in names)


def render(text: str, source: str) -> str:
    def sub(m: re.Match) -> str:
        name = m.group("name")
        if name not in BLOCKS:
            raise SystemExit(f"{source}: unknown report block {name!r}; known: {', '.join(BLOCKS)}")
        return m.group(1) + BLOCKS[name]() + m.group(4)

    return BLOCK.sub(sub, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail when a committed block differs from the records")
    ap.add_argument("--no-figures", action="store_true", help="rewrite the text only")
    ap.add_argument("--results", default=None, help="read the records from this folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    global RESULTS
    if args.results:
        RESULTS = Path(args.results)
        import benchmarks.report_auto as report_auto
        import benchmarks.report_field as report_field

        report_field.RESULTS = report_auto.RESULTS = RESULTS
    sys.path.insert(0, str(ROOT))
    bad = 0
    for name, path in DOCS.items():
        old = path.read_text()
        new = render(old, name)
        if args.check:
            if new != old:
                bad += 1
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{name} (committed)",
                                                           f"{name} (from the records)"))
        elif new != old:
            path.write_text(new)
            print(f"rewrote {name}")
    if args.check:
        from benchmarks.figures import check as check_figures

        stale = check_figures(RESULTS, FIGURES)
        for line in stale:
            print(line)
        if bad or stale:
            print(f"\n{bad} document(s) and {len(stale)} figure(s) differ from the records: run "
                  "`python -m benchmarks.report`", file=sys.stderr)
            return 1
        print("report: every generated block and figure matches the records")
        return 0
    if not args.no_figures:
        from benchmarks.figures import draw_all

        for p in draw_all(RESULTS, FIGURES):
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
