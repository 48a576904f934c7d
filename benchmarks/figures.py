"""The benchmark's figures, drawn from its records (``python -m benchmarks.report`` calls ``draw_all``):

* ``training_curves_<regime>.png`` and ``paired_vs_best_<regime>.png``: quiz and test top-1 per epoch for the
  main rows, and every seed's difference to the best tuned hand-crafted loss;
* ``per_sample_<regime>.png`` (``per_sample_dist_<regime>.png`` on DIST's base): what the per-sample loss network gives each training image at the end of
  training — its weight on the CE and KD terms and its temperature — for images whose label was flipped or
  kept, and where the teacher agrees with the label or not (mean over seeds, 10–90 % range);
* ``field_per_sample_<regime>.png``: the field suite's learned residual beside the rule it started from — per group
  of training images, the rule's own CE weight and the weight after the learned factor, the distillation weight and
  τ (the rule's: 1 and its base τ), one bar per learned row (``accuracy_field.json``).
"""
from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path

MAIN = ("ce", "kd", "lkd")
COLOURS = {"clean": "tab:green", "flipped": "tab:red", "agree": "tab:blue", "disagree": "tab:orange"}  # one per group, every figure


def distil_term(recs: list[dict], configs: dict) -> str:
    """What the per-sample network weighs besides CE, read from the configs the records ran (``lossnet.base``)."""
    bases = {configs.get(r.get("config_sha"), {}).get("lossnet", {}).get("base") for r in recs}
    if len(bases) != 1 or None in bases:
        raise ValueError(f"the records' configs give the distillation base(s) {sorted(map(str, bases))}, expected "
                         "exactly one: is results/configs.json complete (every record's config_sha in it)?")
    return {"kd": "KD", "dist": "DIST's inter-class term"}[bases.pop()]


def per_sample_figure(recs: list[dict], method: str, out: Path, regime: str, suffix: str = "",
                      configs: dict | None = None) -> Path | None:
    """The per-sample outputs by group; the distillation term is named from the configs the records ran
    (``lossnet.base``), so a method's name cannot mislabel it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in recs if r["method"] == method and r.get("per_sample")]
    if not rs:
        return None
    distil = distil_term(rs, configs or {})
    groups = [g for g in ("clean", "flipped", "agree", "disagree") if any(r["per_sample"]["w_ce"][g]["n"] for r in rs)]
    outputs = ("w_ce", "w_kd", "tau")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, o in zip(axes, outputs):
        for i, g in enumerate(groups):
            vals = [r["per_sample"][o][g] for r in rs if r["per_sample"][o][g]["n"]]
            mean = statistics.mean(v["mean"] for v in vals)
            lo = statistics.mean(v["q10"] for v in vals)
            hi = statistics.mean(v["q90"] for v in vals)
            ax.bar(i, mean, color=COLOURS[g], alpha=0.7)
            ax.errorbar(i, mean, yerr=[[max(mean - lo, 0.0)], [max(hi - mean, 0.0)]], color="k", capsize=4)  # mean of quantiles can sit inside the mean
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title({"w_ce": "weight on CE (base 1)", "w_kd": f"weight on {distil} (base 1)", "tau": "temperature"}[o])
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"{regime}: what {method} gives each training image at the end (mean over {len(rs)} seeds; "
                 "bars: mean, whiskers: 10–90 %)", fontsize=9)
    path = out / f"per_sample{suffix}_{regime}.png"
    from lkd_ray.plot import _savefig

    _savefig(fig, path)
    plt.close(fig)
    return path


HATCHES = ("//", None, "..", "xx", "--")  # the rule, then each learned row: told apart beside the group's colour


def with_rule_weight(recs: list[dict], configs: dict) -> list[dict]:
    """The field records with per-sample outputs, each with the rule's own CE weight beside the learned one. A residual
    whose base has no rule (``loss.ce_rule=plain``: full's best hand-crafted loss is plain DIST) records none, since
    plain CE weighs every image's CE by exactly 1: it is filled in as 1 here (a view, the records stay as they ran),
    so those rows are tabled and drawn beside their base like the rest."""
    out = []
    for r in recs:
        ps = r.get("per_sample")
        if not ps or "w_ce" not in ps:
            continue
        if "rule_w" in ps:
            out.append(r)
            continue
        config = configs.get(r.get("config_sha"), {})
        if (config.get("lossnet") or {}).get("kind") != "sample" or config.get("loss", {}).get("ce_rule", "plain") != "plain":
            continue  # not a residual on a plain base: nothing to say about its rule
        one = {g: {**v, **{k: 1.0 for k in ("mean", "q10", "q50", "q90") if v.get(k) is not None}}
               for g, v in ps["w_ce"].items()}
        out.append({**r, "per_sample": {**ps, "rule_w": one, "w_ce_x_rule": ps["w_ce"]}})
    return out


def rule_weights(rs: list[dict], configs: dict, regime: str) -> dict[str, float]:
    """The rule's own distillation weight and τ (one for all the regime's residual rows), from the configs they ran."""
    got = {(configs.get(r.get("config_sha"), {}).get("loss", {}).get("w_logit"),
            configs.get(r.get("config_sha"), {}).get("loss", {}).get("tau")) for r in rs}
    if len(got) != 1 or None in next(iter(got)):
        raise ValueError(f"the {regime} residual records' configs give (distillation weight, τ) {sorted(map(str, got))}, "
                         "expected exactly one pair: is results/configs.json complete (every record's config_sha in it)?")
    w, tau = got.pop()
    return {"w_kd": float(w), "tau": float(tau)}


def rule_weights_by_method(rs: list[dict], configs: dict, regime: str) -> dict[str, dict[str, float]]:
    """Each residual method's base (distillation weight, τ): the rule's, or the reweighted rule's for ``lkd-best``."""
    return {m: rule_weights([r for r in rs if r["method"] == m], configs, f"{regime} {m}")
            for m in dict.fromkeys(r["method"] for r in rs)}


def field_per_sample_figure(recs: list[dict], regime: str, out: Path, configs: dict) -> Path | None:
    """What each learned residual of ``regime`` gives its training images, beside what its base alone gives them:
    each base (the rule: its per-sample CE weight, its distillation weight and τ) is a hatched bar before the
    residuals that sit on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in recs if r["regime"] == regime and r.get("per_sample") and "rule_w" in r["per_sample"]]
    if not rs:
        return None
    methods = list(dict.fromkeys(r["method"] for r in rs))
    groups = [g for g in ("clean", "flipped", "agree", "disagree") if any(r["per_sample"]["w_ce"][g]["n"] for r in rs)]
    base_of = {m: (w["w_kd"], w["tau"]) for m, w in rule_weights_by_method(rs, configs, regime).items()}
    bases = list(dict.fromkeys(base_of.values()))
    bars: list[tuple[str, tuple, list[dict], bool]] = []  # (label, its base (w_kd, τ), its rows, is the base itself)
    for pair in bases:
        on = [m for m in methods if base_of[m] == pair]
        bars.append(("rule alone" if len(bases) == 1 else f"base alone (w_kd {pair[0]:g}, τ {pair[1]:g})", pair,
                     [r for r in rs if r["method"] in on], True))
        bars += [(m, pair, [r for r in rs if r["method"] == m], False) for m in on]

    def stat(rows: list[dict], o: str, g: str) -> tuple[float, float, float]:
        vals = [r["per_sample"][o][g] for r in rows if r["per_sample"][o][g]["n"]]
        return (statistics.mean(v["q50"] for v in vals), statistics.mean(v["q10"] for v in vals),
                statistics.mean(v["q90"] for v in vals))

    panels = (("CE weight on the image", "rule_w", "w_ce_x_rule"), ("distillation weight", None, "w_kd"),
              ("temperature τ", None, "tau"))
    width = 0.8 / len(bars)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (title, rule_key, learned_key) in zip(axes, panels):
        for b, (name, pair, rows, is_base) in enumerate(bars):
            for i, g in enumerate(groups):
                if is_base:
                    base = {"w_kd": pair[0], "tau": pair[1]}
                    mean, lo, hi = stat(rows, rule_key, g) if rule_key else (base[learned_key],) * 3
                else:  # the network's distillation output multiplies its base's weight: drawn as the product
                    scale = pair[0] if learned_key == "w_kd" else 1.0
                    mean, lo, hi = (scale * v for v in stat(rows, learned_key, g))
                x = i + (b - (len(bars) - 1) / 2) * width
                ax.bar(x, mean, width, color=COLOURS[g], alpha=0.35 if is_base else 0.85, hatch=HATCHES[b % len(HATCHES)],
                       edgecolor="k", linewidth=0.5, label=name if i == 0 and ax is axes[0] else None)
                ax.errorbar(x, mean, yerr=[[max(mean - lo, 0.0)], [max(hi - mean, 0.0)]], color="k", capsize=2, lw=0.8)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7, title="bars, left to right", title_fontsize=7)
    fig.suptitle(f"{regime}: the learned residual beside the loss it started from (pale), per group of training "
                 f"images at the end (median, averaged over each row's {len(rs) // len(methods)} runs; whiskers: 10–90 %)", fontsize=9)
    path = out / f"field_per_sample_{regime}.png"
    from lkd_ray.plot import _savefig

    _savefig(fig, path)
    plt.close(fig)
    return path


DRAWN = ("method", "seed", "test_top1", "curve", "per_sample", "config_sha")  # every record field a figure reads
MANIFEST = "inputs.json"  # beside the figures: what each was drawn from (``report --check`` compares it)


def _drawn(recs: list[dict]) -> list[dict]:
    return [{k: r[k] for k in DRAWN if k in r} for r in recs]


def plan(results: Path) -> list[dict]:
    """Every figure the records give: a key, the data it is drawn from (the record fields it reads and its
    settings) and how to draw it — one list for drawing and for checking, so the two cannot drift apart."""
    from lkd_ray.plot import plot_training_curves

    from benchmarks.regimes import PER_SAMPLE, REGIME_ORDER, REGIME_TEXT, best_tuned

    path = results / "accuracy_regimes.json"
    recs = json.loads(path.read_text()) if path.is_file() else []
    configs_path = results / "configs.json"
    configs = json.loads(configs_path.read_text()) if configs_path.is_file() else {}
    figs: list[dict] = []
    for regime in REGIME_ORDER:
        rs = [r for r in recs if r["regime"] == regime]
        if not rs:
            continue
        best = best_tuned(rs)
        present = {r["method"] for r in rs}
        methods = list(dict.fromkeys(m for m in (*MAIN, best, *PER_SAMPLE) if m and m in present))
        ref, title = best or "kd", f"{regime}: {REGIME_TEXT[regime]}"
        figs.append({"key": f"curves_{regime}", "data": {"methods": methods, "ref": ref, "title": title,
                                                         "records": _drawn([r for r in rs if r["method"] in {*methods, ref}])},
                     "draw": lambda out, rs=rs, methods=methods, regime=regime, ref=ref, title=title:
                         plot_training_curves(rs, out, methods, tag=f"_{regime}", ref=ref, title=title)})
        for method, suffix in PER_SAMPLE.items():
            ps = [r for r in rs if r["method"] == method and r.get("per_sample")]
            if ps:
                figs.append({"key": f"per_sample{suffix}_{regime}",
                             "data": {"method": method, "regime": regime, "distil": distil_term(ps, configs),
                                      "records": _drawn(ps)},
                             "draw": lambda out, rs=rs, method=method, regime=regime, suffix=suffix:
                                 [per_sample_figure(rs, method, out, regime, suffix, configs)]})
    field_path = results / "accuracy_field.json"
    field = with_rule_weight(json.loads(field_path.read_text()) if field_path.is_file() else [], configs)
    for regime in dict.fromkeys(r["regime"] for r in field):
        ps = [r for r in field if r["regime"] == regime]  # with_rule_weight kept the rows with a rule weight only
        if ps:
            figs.append({"key": f"field_per_sample_{regime}",
                         "data": {"regime": regime, "rule": rule_weights_by_method(ps, configs, regime),
                                  "records": _drawn(ps)},
                         "draw": lambda out, regime=regime: [field_per_sample_figure(field, regime, out, configs)]})
    return figs


def _sha(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def draw_all(results: Path, out: Path) -> list[Path]:
    """Draw every figure and write the manifest of what each was drawn from."""
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    manifest = {}
    for f in plan(results):
        drawn = f["draw"](out)
        paths += drawn
        manifest[f["key"]] = {"inputs": _sha(f["data"]), "files": sorted(p.name for p in drawn)}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / MANIFEST)
    return paths


def check(results: Path, out: Path) -> list[str]:
    """What differs between the committed figures and the records: a figure drawn from other data than the records
    give now, one the records give that was never drawn, one drawn that they no longer give, or a missing file."""
    path = out / MANIFEST
    if not path.is_file():
        return [f"{path} is missing: the figures were never drawn by `python -m benchmarks.report`"]
    manifest = json.loads(path.read_text())
    want = {f["key"]: _sha(f["data"]) for f in plan(results)}
    problems = [f"figure {k}: drawn from other records than the records give now" for k in want
                if k in manifest and manifest[k]["inputs"] != want[k]]
    problems += [f"figure {k}: the records give it, it was never drawn" for k in want if k not in manifest]
    problems += [f"figure {k}: drawn, but the records no longer give it" for k in manifest if k not in want]
    problems += [f"figure {k}: {out / name} is missing" for k, m in manifest.items() for name in m["files"]
                 if not (out / name).is_file()]
    return problems
