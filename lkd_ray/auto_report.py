"""What an ``auto`` search gives back under ``<storage>/<name>/``: the trial table (CSV and JSON), the pick and why,
``best_config.yaml``, a plain-text summary (also printed) and figures (quiz top-1 per family; the winner's
learning curve; what a per-sample loss learned, by teacher–label agreement, when a learned family ran). Never reads the test split for anything it says about the pick."""
from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path
from typing import Any

COLUMNS = ["stage", "family", "setting", "quiz_top1", "quiz_loss", "select_top1", "select_loss_cal", "wall_s", "cost_vs_kd",
           "epochs", "base", "error"]


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def trials_table(rows: list[dict], winner: str | None = None) -> str:
    """The trial table, plain text: one line per trial, the winner marked; the selection split's top-1 and calibrated
    loss when the trials report them (data.select_per_class: what the pick is made on)."""
    sel = any(r.get("select_top1") is not None for r in rows)
    head = ["", "stage", "family", "setting", "quiz top-1", "quiz loss", *(["select top-1", "select loss (cal)"] if sel else []),
            "wall s", "cost vs KD", "error"]
    body = [["*" if r["label"] == winner else "", _fmt(r.get("stage")), r["family"], r["setting"], _fmt(r.get("quiz_top1")),
             _fmt(r.get("quiz_loss")), *([_fmt(r.get("select_top1")), _fmt(r.get("select_loss_cal"))] if sel else []),
             _fmt(r.get("wall_s")), _fmt(r.get("cost_vs_kd")), (r.get("error") or "")[:80]] for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def console_summary(rows: list[dict], res: dict) -> str:
    b = res["budget"]
    notes = "".join(f"\nnote: {n}" for n in res.get("notes", []))
    failed = sum(1 for r in rows if r.get("error"))
    return (f"\n{trials_table(rows, res['pick'])}\n\n"
            f"budget: {b['epochs']} epochs per trial, at most {b['trials_per_family'] or 'all'} settings per family, "
            f"{b['max_concurrent']} at a time ({b['cpus_per_trial']:g} CPU, {b['gpus_per_trial']:g} GPU each)"
            + (f", time budget {b['time_budget_s']:.0f} s" if b.get("time_budget_s") else "")
            + f"; {len(rows)} trials, {failed} failed, {res['wall_s']:.0f} s{notes}"
            + (f"\npicked on: the {res['split']['picked_on']} split ({res['split']['reason']})" if res.get("split") else "")
            + f"\npick: {res['why']}\n"
            f"best config: {res['storage']}/best_config.yaml  (python -m lkd_ray train --config best_config.yaml)")


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["label", *COLUMNS], extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def figures(rows: list[dict], winner: dict, out: Path) -> list[Path]:
    """quiz_per_family.png (every finished trial's quiz top-1 by family — select top-1 when the trials report it,
    the split the pick is made on — the pick ringed) and winner_curve.png (the winner's quiz top-1 and loss per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("quiz_top1") is not None and not r.get("error")]
    fams = list(dict.fromkeys(r["family"] for r in rows))
    key, split = ("select_top1", "select") if done and all(r.get("select_top1") is not None for r in done) else ("quiz_top1", "quiz")
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(fams) + 1.5), 3.6))
    for i, f in enumerate(fams):
        ys = [r[key] for r in done if r["family"] == f]
        ax.scatter([i] * len(ys), ys, s=18, alpha=0.8)
    for i, f in enumerate(fams):
        bad = sum(1 for r in rows if r["family"] == f and r.get("error"))
        if bad:
            ax.annotate(f"{bad} failed", (i, 0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=7, color="tab:red")
    wi = fams.index(winner["family"])
    ax.scatter([wi], [winner[key]], s=120, facecolors="none", edgecolors="k", label=f"pick: {winner['label']}")
    ax.set_xticks(range(len(fams)), fams, rotation=30, ha="right")
    ax.set_ylabel(f"{split} top-1 (%)")
    ax.set_title(f"{split} top-1 of every trial, by family")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    paths = [out / "quiz_per_family.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    curve = winner.get("curve") or []
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    ep = [c["epoch"] for c in curve]
    ax.plot(ep, [c["quiz_top1"] for c in curve], marker="o", label="quiz top-1")
    ax.set_xlabel("epoch")
    ax.set_ylabel("quiz top-1 (%)")
    ax2 = ax.twinx()
    ax2.plot(ep, [c.get("quiz_loss") for c in curve], color="tab:red", linestyle="--", label="quiz loss")
    ax2.set_ylabel("quiz loss")
    ax.set_title(f"the pick's learning curve: {winner['label']}", fontsize=9)
    fig.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, 0.9))
    fig.tight_layout()
    paths.append(out / "winner_curve.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    learned = [r for r in done if r.get("per_sample")]
    if learned:
        paths.append(per_sample_figure(winner if winner.get("per_sample") else search_pick(learned), out))
    return paths


def search_pick(rows: list[dict]) -> dict:
    from .search_spaces import pick

    return pick(rows)


def per_sample_figure(row: dict, out: Path) -> Path:
    """per_sample.png: a per-sample loss's outputs on the training images, by teacher–label agreement (and by
    flipped label where the data set knows it): median and 10–90 % range per group, one panel per output."""
    import matplotlib.pyplot as plt

    ps = row["per_sample"]
    fig, axes = plt.subplots(1, len(ps), figsize=(3.0 * len(ps), 3.2), squeeze=False)
    for ax, (k, groups) in zip(axes[0], ps.items()):
        names = [g for g, v in groups.items() if v.get("n")]
        med = [groups[g]["q50"] for g in names]
        lo = [groups[g]["q50"] - groups[g]["q10"] for g in names]
        hi = [groups[g]["q90"] - groups[g]["q50"] for g in names]
        ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=3, color="tab:blue", alpha=0.7)
        ax.set_xticks(range(len(names)), [f"{g}\n(n={groups[g]['n']})" for g in names], fontsize=7)
        ax.set_title(k, fontsize=9)
    fig.suptitle(f"what {row['label']} learned, per training image (median, 10–90 %)", fontsize=9)
    fig.tight_layout()
    path = out / "per_sample.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_table(storage, prefix: str, rows: list[dict]) -> None:
    """trials.csv and trials.json alone (a search with nothing to pick still reports its trials)."""
    from .storage import safe_key

    storage.put_bytes(safe_key(prefix, "trials.csv"), _csv(rows))
    storage.put_bytes(safe_key(prefix, "trials.json"), (json.dumps(rows, indent=1, default=str) + "\n").encode())


def write_outputs(storage, prefix: str, rows: list[dict], winner: dict, summary: dict, best_yaml: str) -> dict[str, str]:
    """Every output, each written atomically to ``<storage>/<prefix>/``; returns {what: storage key}."""
    from .storage import safe_key

    files: dict[str, bytes] = {
        "best_config.yaml": best_yaml.encode(),
        "trials.csv": _csv(rows),
        "trials.json": (json.dumps(rows, indent=1, default=str) + "\n").encode(),
        "pick.json": (json.dumps({**summary, "pick_sections": winner["sections"]}, indent=1, default=str) + "\n").encode(),
        "summary.txt": (console_summary(rows, summary) + "\n").encode(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for p in figures(rows, winner, Path(tmp)):
            files[p.name] = p.read_bytes()
    out = {}
    for name, data in files.items():
        key = safe_key(prefix, name)
        storage.put_bytes(key, data)
        out[name] = key
    return out
