"""Every published benchmark number, regenerated from the records.

BENCHMARKS.md and README.md hold generated blocks between ``<!-- report:NAME -->`` and
``<!-- /report:NAME -->``; this script rewrites each block from ``benchmarks/results/*.json`` (and draws
the figures under ``docs/figures/``). ``--check`` rewrites nothing and fails (exit 1, with a diff) when a
committed block differs from what the records give — CI runs it, so prose and tables cannot drift from
what ran.

    python -m benchmarks.report           # rewrite the blocks and redraw the figures
    python -m benchmarks.report --check   # CI: the committed text matches the records
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
DOCS = {"BENCHMARKS.md": ROOT / "BENCHMARKS.md", "README.md": ROOT / "README.md"}
BLOCK = re.compile(r"(<!-- report:(?P<name>[a-z0-9_-]+) -->\n)(?P<body>.*?)(<!-- /report:(?P=name) -->)", re.S)
REGIME_ORDER = ("noisy-sym40", "noisy-pair30", "scarce", "full")
REGIME_TEXT = {
    "full": "full, clean training split (54 000 images), student 12 epochs",
    "scarce": "100 labelled images per class for the student (teacher: the full split), 20-per-class clean quiz, 40 epochs",
    "noisy-sym40": "40 % symmetric label noise on the training split (teacher trained on it too), 50-per-class clean quiz, 12 epochs",
    "noisy-pair30": "30 % pair-flip label noise (class c → c + 1) on the training split (teacher too), 50-per-class clean quiz, 12 epochs",
}
WIN_MARGIN, TIE_MARGIN, COST_BOUND = 0.5, 0.2, 1.25  # issue 15's bars: ≥ +0.5 at ≥ 2 SE; never below −0.2; ≤ 1.25× KD


def load(name: str) -> Any:
    p = RESULTS / name
    return json.loads(p.read_text()) if p.is_file() else None


# --------------------------------------------------------------------------- statistics
def paired(recs: list[dict], a: str, b: str, key: str = "test_top1") -> dict | None:
    x = {r["seed"]: r[key] for r in recs if r["method"] == a}
    y = {r["seed"]: r[key] for r in recs if r["method"] == b}
    seeds = sorted(set(x) & set(y))
    if len(seeds) < 2:
        return None
    d = [x[s] - y[s] for s in seeds]
    return {"mean": statistics.mean(d), "se": statistics.stdev(d) / math.sqrt(len(d)), "n": len(d), "worst": min(d),
            "best": max(d)}


def rows(recs: list[dict]) -> list[dict]:
    out = []
    for m in dict.fromkeys(r["method"] for r in recs):
        rs = [r for r in recs if r["method"] == m]
        t, q = [r["test_top1"] for r in rs], [r["quiz_top1"] for r in rs]
        out.append({"method": m, "n": len(rs), "test": statistics.mean(t), "std": statistics.stdev(t) if len(t) > 1 else 0.0,
                    "worst": min(t), "quiz": statistics.mean(q), "wall": statistics.median(r["wall_s"] for r in rs)})
    return out


def best_tuned(recs: list[dict]) -> str | None:
    """The tuned hand-crafted loss a user would ship: the best mean quiz top-1 over the seeds (not test)."""
    cands = [r for r in rows(recs) if r["method"].endswith("-tuned") and not r["method"].startswith("lkd")]
    return max(cands, key=lambda r: r["quiz"])["method"] if cands else None


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


def verdicts() -> str:
    recs = load("accuracy_regimes.json") or []
    lines = ["| regime | best tuned hand-crafted (by quiz) | its test top-1 | shipped `lkd` − it | best LKD variant − it "
             "| win (≥ +0.5, ≥ 2 SE)? | within −0.2? |", "|---|---|---|---|---|---|---|"]
    for regime in REGIME_ORDER:
        rs = [r for r in recs if r["regime"] == regime]
        best = best_tuned(rs)
        if not rs or not best:
            lines.append(f"| {regime} | _not run yet_ | | | | | |")
            continue
        bt = next(r for r in rows(rs) if r["method"] == best)
        lkd = paired(rs, "lkd", best)
        variants = {m: paired(rs, m, best) for m in {r["method"] for r in rs} if m.startswith("lkd-")}
        variants = {m: d for m, d in variants.items() if d}
        vq = {m: statistics.mean(r["quiz_top1"] for r in rs if r["method"] == m) for m in variants}
        top = max(vq, key=vq.get) if vq else None  # chosen by quiz, like everything else
        cands = [d for d in (lkd, variants.get(top)) if d]
        win = any(d["mean"] >= WIN_MARGIN and d["mean"] >= 2 * d["se"] for d in cands)
        within = lkd is not None and lkd["mean"] >= -TIE_MARGIN
        lines.append(f"| {regime} | {best} | {bt['test']:.2f} | {pm(lkd)} | "
                     f"{f'{top}: ' + pm(variants[top]) if top else '—'} | {'yes' if win else 'no'} | "
                     f"{'yes' if within else 'no'} |")
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
    lines = ["| setting | recipe | pairs | LKD / KD, whole run (median) | range | whole process (median) | KD run (s) | "
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


BLOCKS: dict[str, Callable[[], str]] = {
    "verdicts": verdicts,
    "cost": cost_table,
    "cost-headline": cost_headline,
    **{f"regime-{r}": (lambda r=r: regime_table(r)) for r in REGIME_ORDER},
    **{f"tuning-{r}": (lambda r=r: tuning_table(r)) for r in REGIME_ORDER},
}


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
    args = ap.parse_args(argv)
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
        if bad:
            print(f"\n{bad} document(s) differ from the records: run `python -m benchmarks.report`", file=sys.stderr)
            return 1
        print("report: every generated block matches the records")
        return 0
    if not args.no_figures:
        from benchmarks.figures import draw_all

        for p in draw_all(RESULTS, FIGURES):
            print(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
