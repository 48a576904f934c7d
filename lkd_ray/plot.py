"""Figures of what the loss learned and how every method trained (``python -m lkd_ray plot``).

The learned logit loss is drawn on a one-parameter family of predictions: the target class gets
probability p, the other C−1 classes share 1−p equally, for the student (p_s) and the teacher (p_t),
at the loss network's own temperature. On that family KD's gradient with respect to the student's
target logit is τ·(p_s − p_t), so any bend away from that straight line is what meta-learning added.
Loss-network versions are read from storage (local or s3://) in the layout the trainer and the
LossNetServer write: ``<run>/lossnet/v<version>.pt``, each carrying the run's config.
"""
from __future__ import annotations

import copy
import json
import os
import re
import statistics
from pathlib import Path
from typing import Sequence

import torch

from .config import Config
from .errors import InputError
from .losses import build_lossnets, handcrafted
from .losses.learnable import STATE_DIM, LogitLossNet
from .storage import open_storage

NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet": 1000, "parquet": 1000}


class PlotError(InputError, ValueError):
    """Missing or unusable input for a figure, worded with what to do."""


# --------------------------------------------------------------------------- loss-network versions
def load_versions(uri: str, endpoint_url: str | None = None, max_versions: int = 5) -> list[dict]:
    """Up to ``max_versions`` evenly spaced versions (first and last included), oldest first."""
    st = open_storage(uri, endpoint_url)
    found = []
    for key in st.list("lossnet"):
        m = re.fullmatch(r"lossnet/v(\d+)\.pt", key)
        if m:
            found.append((int(m.group(1)), key))
    if not found:
        raise PlotError(f"no loss-network versions under {uri}/lossnet/ (expected v<version>.pt, written by an LKD run: "
                        "the trainer's out_dir or the LossNetServer's <storage>/<run>); pass --lossnet with such a location")
    found.sort()
    if len(found) > max_versions:
        idx = sorted({round(i * (len(found) - 1) / (max_versions - 1)) for i in range(max_versions)})
        found = [found[i] for i in idx]
    out = []
    fallback = None
    for version, key in found:
        sd = st.get_torch(key)
        if "config" in sd:
            cfg = Config.model_validate(sd["config"])
        else:  # versions written before they carried their config: the run's result.json has it
            if fallback is None:
                if not st.exists("result.json"):
                    raise PlotError(f"{uri}/{key} carries no config and {uri}/result.json does not exist, so the network "
                                    "cannot be rebuilt; plot a run that finished, or rerun the LKD training")
                fallback = Config.model_validate(st.get_json("result.json")["config"])
            cfg = fallback
        nets = build_lossnets(cfg.loss, cfg.lossnet, cfg.run.seed)
        nets.load_state_dict(sd["lossnets"])
        out.append({"version": version, "epoch": sd.get("epoch"), "config": cfg, "net": nets.logit.eval()})
    return out


def _family_logits(p: torch.Tensor, num_classes: int, tau: float) -> torch.Tensor:
    """Logits whose softmax at temperature τ puts p on class 0 and (1−p)/(C−1) on each other class."""
    rest = ((1 - p) / (num_classes - 1)).unsqueeze(1).expand(-1, num_classes - 1)
    return tau * torch.log(torch.cat([p.unsqueeze(1), rest], 1))


def _state(net: LogitLossNet) -> torch.Tensor | None:
    """State inputs (progress, quiz accuracy), when the network takes them, drawn at the start of training."""
    return torch.zeros(STATE_DIM, dtype=torch.float64) if net.state_inputs else None


def loss_and_target_grad(net: LogitLossNet | None, p_s: torch.Tensor, p_t: torch.Tensor, num_classes: int,
                         tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample distillation loss and its gradient w.r.t. the student's target logit, float64.

    ``net=None`` gives KD (τ²·KL) for reference. Each sample is its own batch of one, so a scale-locked
    loss shows its per-example direction at the base loss's per-example gradient norm.
    """
    p_s, p_t = p_s.double(), p_t.double().expand_as(p_s)
    n = p_s.numel()
    y = torch.zeros(n, dtype=torch.long)
    z_t = _family_logits(p_t, num_classes, tau)
    z_s = _family_logits(p_s, num_classes, tau).requires_grad_(True)
    if net is None:
        def fn(a, b, c):
            return handcrafted.kd(a, b, tau)
    else:
        net64 = copy.deepcopy(net).double()

        def fn(a, b, c):
            return net64(a, b, c, _state(net64))
    # one sample at a time: a scale-locked loss normalises over its batch, and a figure of "what the loss
    # does to one example" should not depend on which other points were drawn beside it
    grad = torch.stack([torch.autograd.grad(fn(z_s[i:i + 1], z_t[i:i + 1], y[i:i + 1]), z_s)[0][i, 0] for i in range(n)])
    with torch.no_grad():
        loss = torch.stack([fn(z_s[i:i + 1], z_t[i:i + 1], y[i:i + 1]) for i in range(n)])
    return loss.detach(), grad.detach()


def _savefig(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130, bbox_inches="tight")
    os.replace(tmp, path)
    return path


def _label(v: dict) -> str:
    return f"φ v{v['version']}" + (f" (epoch {v['epoch']})" if v.get("epoch") is not None else "")


def _pair_logits(n: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Synthetic (student, teacher, label) logits shaped like a mid-training pair: the teacher mostly
    right with a spread of confidence, the student a noisier, less confident copy. Fixed seed, float64."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=g)
    onehot = torch.nn.functional.one_hot(y, num_classes).double()
    z_t = 2 * torch.randn(n, num_classes, generator=g, dtype=torch.float64) + 8 * torch.rand(n, 1, generator=g, dtype=torch.float64) * onehot
    scale = 0.3 + 0.9 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    z_s = scale * z_t + 1.5 * torch.randn(n, num_classes, generator=g, dtype=torch.float64)
    return z_s, z_t, y


def gradient_vs_kd(net: LogitLossNet, tau: float, num_classes: int, n: int = 2048, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example angle (degrees) and norm ratio of the learned loss's logit gradient to KD's, computed in
    batches of ``batch`` as in training (a scale lock normalises per batch). Unlike the one-parameter family,
    this shows a direction change, which is all a norm-locked loss may learn."""
    z_s, z_t, y = _pair_logits(n, num_classes)
    net64 = copy.deepcopy(net).double()
    angles, ratios = [], []
    for i in range(0, n, batch):
        a = z_s[i:i + batch].clone().requires_grad_(True)
        g_l = torch.autograd.grad(net64(a, z_t[i:i + batch], y[i:i + batch], _state(net64)), a)[0]
        g_k = torch.autograd.grad(handcrafted.kd(a, z_t[i:i + batch], tau), a)[0]
        cos = torch.nn.functional.cosine_similarity(g_l, g_k, dim=1).clamp(-1, 1)
        angles.append(torch.rad2deg(torch.arccos(cos)))
        ratios.append(g_l.norm(dim=1) / g_k.norm(dim=1).clamp_min(1e-300))
    return torch.cat(angles).detach(), torch.cat(ratios).detach()


def plot_gradient_vs_kd(versions: list[dict], out: Path, title: str) -> Path:
    """Histograms of the angle and the norm ratio between the learned and KD's logit gradients, per version."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = versions[-1]["config"]
    tau, C = cfg.loss.tau, NUM_CLASSES.get(cfg.data.dataset, cfg.data.num_classes_override or 10)
    colors = plt.cm.viridis(torch.linspace(0, 0.9, len(versions)).tolist())
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for v, c in zip(versions, colors):
        ang, ratio = gradient_vs_kd(v["net"], tau, C)
        label = f"{_label(v)}: median {ang.median().item():.1f}°, ×{ratio.median().item():.2f}"
        axes[0].hist(ang.numpy(), bins=60, range=(0, 90), histtype="step", color=c, lw=1.5, label=label)
        axes[1].hist(ratio.clamp(0, 3).numpy(), bins=60, range=(0, 3), histtype="step", color=c, lw=1.5)
    axes[0].set_xlabel("angle between the learned and KD's logit gradient (degrees)")
    axes[1].set_xlabel("|learned gradient| / |KD gradient| per example (clipped at 3)")
    axes[0].set_ylabel("examples (of 2048 synthetic student/teacher pairs)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: how far the learned gradient turns from KD's, and how much longer it is")
    path = _savefig(fig, out / f"learned_vs_kd_gradient_{title}.png")
    plt.close(fig)
    return path


def plot_learned_loss(versions: list[dict], out: Path, title: str, p_teacher: Sequence[float] = (0.3, 0.6, 0.9)) -> list[Path]:
    """Loss and ∂loss/∂z_s[target] vs p_s at a few p_t, each version beside KD; plus a map of the final
    version's gradient minus KD's over (p_s, p_t)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = versions[-1]["config"]
    tau, C = cfg.loss.tau, NUM_CLASSES.get(cfg.data.dataset, cfg.data.num_classes_override or 10)
    p_s = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    x = p_s.numpy()
    colors = plt.cm.viridis(torch.linspace(0, 0.9, len(versions)).tolist())
    fig, axes = plt.subplots(2, len(p_teacher), figsize=(4.2 * len(p_teacher), 7), squeeze=False)
    for j, pt in enumerate(p_teacher):
        pt_t = torch.tensor(pt, dtype=torch.float64)
        kd_l, kd_g = loss_and_target_grad(None, p_s, pt_t, C, tau)
        axes[0, j].plot(x, (kd_l - kd_l.min()).numpy(), "k--", lw=2, label="KD (τ²·KL)")
        axes[1, j].plot(x, kd_g.numpy(), "k--", lw=2, label="KD")
        for v, c in zip(versions, colors):
            lv, gv = loss_and_target_grad(v["net"], p_s, pt_t, C, tau)
            axes[0, j].plot(x, (lv - lv.min()).numpy(), color=c, label=_label(v))
            axes[1, j].plot(x, gv.numpy(), color=c, label=_label(v))
        axes[0, j].set_title(f"teacher target prob p_t = {pt}")
        axes[1, j].axhline(0, color="grey", lw=0.5)
        axes[1, j].set_xlabel("student target-class probability p_s (at τ)")
    axes[0, 0].set_ylabel("distillation loss − its minimum over p_s\n(a constant offset does not change training)")
    axes[1, 0].set_ylabel("∂ loss / ∂ z_s[target]")
    axes[0, -1].legend(fontsize=8)
    fig.suptitle(f"{title}: learned logit loss vs KD (τ={tau:g}, C={C}; other classes share the rest equally)")
    paths = [_savefig(fig, out / f"learned_loss_{title}.png")]
    plt.close(fig)

    grid = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    ps, pt = torch.meshgrid(grid, grid, indexing="xy")
    _, g_kd = loss_and_target_grad(None, ps.reshape(-1), pt.reshape(-1), C, tau)
    _, g_l = loss_and_target_grad(versions[-1]["net"], ps.reshape(-1), pt.reshape(-1), C, tau)
    diff = (g_l - g_kd).reshape(ps.shape)
    lim = float(diff.abs().max()) or 1e-12
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.pcolormesh(grid.numpy(), grid.numpy(), diff.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, shading="auto")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("student target prob p_s")
    ax.set_ylabel("teacher target prob p_t")
    ax.set_title(f"{title}, {_label(versions[-1])}:\n∂loss/∂z_s[target], learned − KD")
    fig.colorbar(im, ax=ax)
    paths.append(_savefig(fig, out / f"learned_grad_map_{title}.png"))
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------- accuracy benchmark
def load_accuracy(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise PlotError(f"{p} does not exist; run `python benchmarks/accuracy.py` first (or pass --accuracy)")
    recs = json.loads(p.read_text())
    if not isinstance(recs, list) or not recs or not all("curve" in r and "method" in r for r in recs):
        raise PlotError(f"{p} is not a list of accuracy records with per-epoch curves (as benchmarks/accuracy.py writes)")
    return recs


def _mean_std(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    cols = list(zip(*rows))
    return [statistics.mean(c) for c in cols], [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]


MAIN_METHODS = ("ce", "kd", "dkd", "dist", "control", "lkd", "lkd-full", "lkd-head", "lkd-me40")  # lkd: the shipped default


def plot_training_curves(records: list[dict], out: Path, methods: Sequence[str] | None = MAIN_METHODS,
                         tag: str = "", ref: str = "kd", title: str | None = None) -> list[Path]:
    """Quiz and test top-1 per epoch, mean ± std over seeds, one line per method; and the paired
    difference of every method to ``ref`` (KD, or e.g. the best tuned hand-crafted loss) per seed.
    ``methods=None`` draws every method in the records (the accuracy benchmark's variants included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401  (integer epoch ticks)

    present = list(dict.fromkeys(r["method"] for r in records))
    methods = present if methods is None else [m for m in methods if m in present]
    if not methods:
        raise PlotError(f"none of the methods {', '.join(MAIN_METHODS)} is in the accuracy records (found: {', '.join(present)}); "
                        "pass --methods all")
    records = [r for r in records if r["method"] in methods]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for m in methods:
        rs = [r for r in records if r["method"] == m]
        n_ep = min(len(r["curve"]) for r in rs)
        ep = [c["epoch"] for c in rs[0]["curve"][:n_ep]]
        for ax, key in zip(axes, ("quiz_top1", "test_top1")):
            mu, sd = _mean_std([[c[key] for c in r["curve"][:n_ep]] for r in rs])
            ax.plot(ep, mu, marker="o", ms=3, label=f"{m} (n={len(rs)})")
            ax.fill_between(ep, [a - b for a, b in zip(mu, sd)], [a + b for a, b in zip(mu, sd)], alpha=0.15)
    for ax, name in zip(axes, ("quiz split (meta-learning held-out)", "test set")):
        ax.set_title(f"top-1 on the {name}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%), mean ± std over seeds")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    paths = [_savefig(fig, out / f"training_curves{tag}.png")]
    plt.close(fig)

    kd = {r["seed"]: r["test_top1"] for r in records if r["method"] == ref}
    others = [m for m in methods if m != ref]
    if kd and others:
        fig, ax = plt.subplots(figsize=(1.2 * len(others) + 2, 4))
        for i, m in enumerate(others):
            d = [r["test_top1"] - kd[r["seed"]] for r in records if r["method"] == m and r["seed"] in kd]
            if not d:
                continue
            ax.scatter([i] * len(d), d, alpha=0.5, s=14)
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
            ax.errorbar(i + 0.15, statistics.mean(d), yerr=se, fmt="D", color="k", capsize=4)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(others)), others, rotation=20)
        ax.set_ylabel(f"test top-1 − {ref}'s, same seed (pp)")
        ax.set_title(f"paired difference to {ref} (dots: seeds; ◆: mean ± SE)" + (f"\n{title}" if title else ""), fontsize=9)
        paths.append(_savefig(fig, out / f"paired_vs_{'kd' if ref == 'kd' else 'best'}{tag}.png"))
        plt.close(fig)
    return paths


def make_figures(lossnet_uris: Sequence[str], accuracy: str | Path | None, out: str | Path,
                 endpoint_url: str | None = None, max_versions: int = 5,
                 methods: Sequence[str] | None = MAIN_METHODS, tag: str = "") -> list[Path]:
    out = Path(out)
    paths: list[Path] = []
    for uri in lossnet_uris:
        title = (Path(uri.rstrip("/")).name or "run") + tag
        versions = load_versions(uri, endpoint_url, max_versions)
        paths += plot_learned_loss(versions, out, title)
        paths.append(plot_gradient_vs_kd(versions, out, title))
    if accuracy is not None:
        paths += plot_training_curves(load_accuracy(accuracy), out, methods, tag)
    return paths
