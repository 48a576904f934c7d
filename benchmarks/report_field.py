"""The generated blocks of issue 25: the noisy-label field's tuned families, the learned loss as a residual on the
best rule, and transfer of the presets — all from the records (``accuracy_field*.json``, ``accuracy_transfer.json``).
Imports only ``records``, so ``report`` can register these blocks without an import circle."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from benchmarks.records import paired

RESULTS = Path(__file__).resolve().parent / "results"
REGIMES = ("noisy-pair30", "noisy-pair45-8k", "noisy-sym40", "scarce", "full")
WIN, TIE = 0.5, 0.2


def _load(name: str, results: Path | None = None) -> list[dict[str, Any]]:
    p = (results or RESULTS) / name
    return json.loads(p.read_text()) if p.is_file() else []


def paired_draws(recs: list[dict], method: str, ref: str, key: str = "test_top1") -> dict | None:
    """Paired difference over the (student seed, noise draw) pairs both methods have: its mean, SE, n, worst."""
    return paired(recs, method, ref, key)


def is_win(d: dict | None) -> bool:
    """Issue 15's win bar on a paired difference: at least +0.5 pt and at least 2 SE."""
    return bool(d) and d["mean"] >= WIN and d["mean"] >= 2 * d["se"]


def _pm(d: dict | None) -> str:
    return f"{d['mean']:+.2f} ± {d['se']:.2f}" if d else "—"


def field_tuning(results: Path | None = None) -> str:
    """Per regime and family: the pick on the selection split (never the quiz the meta-step trains on, never test)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import accuracy

    tuning = _load(accuracy.FIELD_TUNING, results)
    if not tuning:
        return "_No field-suite tuning recorded yet._\n"
    out = []
    for regime in REGIMES:
        rows = [r for r in tuning if r["regime"] == regime]
        if not rows:
            continue
        fams = [f for f in accuracy.FIELD_TUNED if any(r["family"] == f for r in rows)]
        lines = [f"**{regime}** (tuning seed {rows[0]['seed']}; selection split {accuracy.SELECT[regime]} clean images per "
                 "class, disjoint from the quiz)", "",
                 "| family | trials | pick | select top-1 | select loss (calibrated) | quiz top-1 | test top-1 (not used) |",
                 "|---|---|---|---|---|---|---|"]
        for f in fams:
            fr = [r for r in rows if r["family"] == f]
            p = accuracy.tuning_pick(tuning, regime, f, "field")
            lines.append(f"| {f} | {len(fr)} | {p['trial']} | {p['select_top1']:.2f} | {p['select_loss_cal']:.4f} | "
                         f"{p['quiz_top1']:.2f} | {p['test_top1']:.2f} |")
        hand = accuracy.field_untuned(regime, tuning)
        if hand:
            lines += ["", f"Not tuned whole yet (trials recorded): {', '.join(f'{f} {n}' for f, n in hand.items())} — "
                      "the best hand-crafted loss is not picked until every family is."]
        else:
            best = accuracy.tuning_pick(tuning, regime, "rule-best", "field")
            lines += ["", f"Best hand-crafted loss (over all {len(accuracy.HANDCRAFTED_FIELD + accuracy.RULES)} families): "
                      f"**{best['family']}[{best['trial']}]**."]
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _meta_cost(mr: list[dict]) -> str:
    """A learned row's median meta-steps (φ's version at the end) and median seconds its runs spent in meta-steps
    (``meta_s``: time inside the meta-step only, so it compares meta-steps across rows run beside the same jobs)."""
    steps = [r["lossnet_version"] for r in mr if r.get("lossnet_version")]
    if not steps:
        return "—"
    secs = [r["meta_s"] for r in mr if r.get("meta_s") is not None]
    return f"{statistics.median(steps):g}, {statistics.median(secs):.1f} s" if secs else f"{statistics.median(steps):g}, —"


def field_finals(results: Path | None = None) -> str:
    """Per regime: every final row over student seeds × noise draws, paired against the best hand-crafted loss."""
    recs = _load("accuracy_field.json", results)
    if not recs:
        return "_No field-suite finals recorded yet._\n"
    out = []
    for regime in REGIMES:
        rs = [r for r in recs if r["regime"] == regime]
        if not rs:
            continue
        ref = "rule-best-tuned"
        lines = [f"**{regime}**", "", "| method | runs (seeds × draws) | test top-1 (mean ± std) | Δ vs rule-best-tuned "
                 "(paired ± SE) | worst Δ | select top-1 | win (≥ +0.5 at ≥ 2 SE)? | within −0.2? | meta-steps, "
                 "meta-step s a run (medians) |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for m in dict.fromkeys(r["method"] for r in rs):
            mr = [r for r in rs if r["method"] == m]
            t = [r["test_top1"] for r in mr]
            d = paired_draws(rs, m, ref) if m != ref else None
            win = ("yes" if is_win(d) else "no") if d else "—"
            tie = ("yes" if d["mean"] >= -TIE else "no") if d else "—"
            draws = sorted({r.get("noise_draw", 0) for r in mr})
            sel = [r["select_top1"] for r in mr if r.get("select_top1") is not None]
            std = statistics.stdev(t) if len(t) > 1 else 0.0
            worst = f"{d['worst']:+.2f}" if d else "—"
            sel_mean = f"{statistics.mean(sel):.2f}" if sel else "—"
            lines.append(f"| {m} | {len(mr)} ({len({r['seed'] for r in mr})} × {len(draws)}) | {statistics.mean(t):.2f} ± "
                         f"{std:.2f} | {_pm(d)} | {worst} | {sel_mean} | {win} | {tie} | {_meta_cost(mr)} |")
        out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def transfer(results: Path | None = None) -> str:
    """Per preset and transfer setting: the preset, unchanged, against its source regime's best rule, unchanged."""
    recs = _load("accuracy_transfer.json", results)
    if not recs:
        return "_No transfer runs recorded yet._\n"
    lines = ["| preset | setting | rule transferred | seeds | preset test top-1 | rule test top-1 | "
             "preset − rule (paired ± SE) | worst seed | preset meta-steps (median) | within −0.2? |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for preset in dict.fromkeys(r["preset"] for r in recs if r["role"] == "preset"):
        source = next(r.get("source_regime") for r in recs if r["preset"] == preset)
        rules = list(dict.fromkeys(r["method"] for r in recs if r["role"] == "rule"
                                   and (r.get("source_regime") == source if source else r["preset"] == preset)))
        settings = list(dict.fromkeys(r["setting"] for r in recs if r["preset"] == preset))
        for rule_method in rules:
            for setting in settings:
                line = _transfer_row(recs, preset, setting, rule_method)
                if line:
                    lines.append(line)
    return "\n".join(lines) + "\n"


def _transfer_row(recs: list[dict], preset: str, setting: str, rule_method: str) -> str | None:
    rs = [r for r in recs if r["setting"] == setting]  # the rule's rows: any command that transferred it
    pre = {r["seed"]: r for r in rs if r["role"] == "preset" and r["preset"] == preset}
    rule = {r["seed"]: r for r in rs if r["role"] == "rule" and r["method"] == rule_method}
    seeds = sorted(set(pre) & set(rule))
    if not seeds:
        return None
    d = [pre[s]["test_top1"] - rule[s]["test_top1"] for s in seeds]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    steps = [pre[s].get("meta_steps") for s in seeds if pre[s].get("meta_steps") is not None]
    return (f"| `{preset}` | {setting} | {rule_method.split('|', 2)[-1]} | {len(seeds)} | "
            f"{statistics.mean(pre[s]['test_top1'] for s in seeds):.2f} | "
            f"{statistics.mean(rule[s]['test_top1'] for s in seeds):.2f} | {statistics.mean(d):+.2f} ± {se:.2f} | "
            f"{min(d):+.2f} | {statistics.median(steps) if steps else '—'} | {'yes' if statistics.mean(d) >= -TIE else 'no'} |")


def field_per_sample(results: Path | None = None) -> str:
    """What the learned residual does beside the rule it started from, per group of training images: the rule's own
    weight on each sample's CE, the learned weight on it, their product, and the learned distillation weight and τ."""
    from benchmarks.figures import with_rule_weight

    store = (results or RESULTS) / "configs.json"
    configs = json.loads(store.read_text()) if store.is_file() else {}
    recs = with_rule_weight(_load("accuracy_field.json", results), configs)
    if not recs:
        return "_No per-sample field runs recorded yet._\n"
    cols = ("rule_w", "w_ce", "w_ce_x_rule", "w_kd", "tau")
    lines = ["| regime | row | images | rule's CE weight | learned CE weight | learned × rule | distillation weight | τ |",
             "|---|---|---|---|---|---|---|---|"]
    fixed = []
    for regime in REGIMES:
        for m in dict.fromkeys(r["method"] for r in recs if r["regime"] == regime):
            rs = [r for r in recs if r["regime"] == regime and r["method"] == m]
            outputs = (configs.get(rs[0].get("config_sha"), {}).get("lossnet") or {}).get("sample_outputs") \
                or ["w_ce", "w_kd", "tau"]
            if set(outputs) != {"w_ce", "w_kd", "tau"}:
                fixed.append(f"{regime} {m}")
            for g in ("clean", "flipped", "agree", "disagree"):
                vals = {o: [r["per_sample"][o][g]["q50"] for r in rs if r["per_sample"][o][g]["n"]] for o in cols}
                if vals["w_ce"]:
                    cells = ["—" if o in ("w_kd", "tau") and o not in outputs else f"{statistics.mean(vals[o]):.2f}" for o in cols]
                    lines.append(f"| {regime} | {m} | {g} | " + " | ".join(cells) + " |")
    figures = "".join(f"![](docs/figures/field_per_sample_{regime}.png)\n" for regime in REGIMES
                      if any(r["regime"] == regime for r in recs))  # drawn by benchmarks/figures.py from these records
    note = (f" —: not learned (the row's base has its distillation term off, so only its CE weight is: {', '.join(fixed)})"
            if fixed else "")
    return ("\n".join(lines) + f"\n\nEach group's median, averaged over the runs (a median, not a mean: a rule's value over CE — the rule's "
            f"CE weight — is unbounded on images the student has memorised, CE → 0, as with bootstrapping on scarce "
            f"labels; φ₀: learned weights 1, τ the base's).{note}\n\n"
            + figures)


def asha(results: Path | None = None) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import early_stop

    return early_stop.table(results or RESULTS)


BLOCKS = {"asha": asha, "field-tuning": field_tuning, "field-finals": field_finals, "transfer": transfer,
          "field-per-sample": field_per_sample}
