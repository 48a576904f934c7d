"""Ray Tune searches: over loss-network architectures, or over the hand-crafted losses.

``lossnet`` (default): a define-by-run space (Optuna's TPE sampler through ``OptunaSearch``) over depth,
width per layer, activation, input features, base loss, scope, ``meta_every`` and the meta learning rate;
ASHA stops trials whose quiz-split accuracy lags.
``handcrafted``: a grid over every hand-crafted loss and its literature grid (``lkd_ray.search_spaces``;
the accuracy benchmark runs the same trials), every trial to its last epoch (the same budget for all),
and the pick named: the best quiz top-1.
Each trial is a run that builds its own ``TorchTrainer`` (the Ray Train V2 pattern) and relays its per-epoch
metrics with ``TuneReportCallback``. The test set is never consulted: trials are ranked on the quiz split.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, _deep_update, with_absolute_paths
from ..storage import open_storage, safe_key
from .launch import LaunchOptions, init_ray, run_distributed

METRIC, MODE = "quiz_top1", "max"
INPUT_SETS = {
    "probs": ["ps", "pt", "onehot"],
    "logprobs": ["log_ps", "log_pt", "onehot"],
    "full": ["log_ps", "log_pt", "ps", "pt", "onehot"],
    "ratio": ["log_ratio", "pt", "onehot"],
}


def define_space(trial) -> dict[str, Any] | None:
    """Optuna define-by-run: the number of width parameters depends on the sampled depth."""
    depth = trial.suggest_int("lossnet.depth", 1, 3)
    for i in range(depth):
        trial.suggest_categorical(f"lossnet.width{i}", [8, 16, 32, 64])
    trial.suggest_categorical("lossnet.activation", ["silu", "softplus", "gelu", "tanh"])
    trial.suggest_categorical("lossnet.inputs", list(INPUT_SETS))
    trial.suggest_categorical("lossnet.base", ["kd", "dist", "none"])
    trial.suggest_categorical("meta.scope", ["full", "head"])
    trial.suggest_categorical("meta.meta_every", [2, 5, 10, 20])
    trial.suggest_float("meta.lr", 1e-4, 1e-2, log=True)
    return None


def overrides_from_params(params: dict[str, Any]) -> dict[str, Any]:
    """Flat sampled parameters → config sections (``lossnet``, ``meta``)."""
    depth = int(params["lossnet.depth"])
    return {
        "lossnet": {"hidden": [int(params[f"lossnet.width{i}"]) for i in range(depth)],
                    "activation": params["lossnet.activation"], "inputs": INPUT_SETS[params["lossnet.inputs"]],
                    "base": params["lossnet.base"],
                    # a scale lock needs a base loss to take its gradient norm from
                    **({"lock": "none"} if params["lossnet.base"] == "none" else {})},
        "meta": {"scope": params["meta.scope"], "meta_every": int(params["meta.meta_every"]), "lr": float(params["meta.lr"])},
    }


def handcrafted_sections(params: dict[str, Any]) -> dict[str, Any]:
    """A grid point of the hand-crafted space (``{"trial": "kd[alpha=0.5,tau=4]"}``) → config sections."""
    from ..search_spaces import trials

    by_label = {t.label: t for t in trials("handcrafted")}
    if params.get("trial") not in by_label:
        raise ValueError(f"unknown hand-crafted trial {params.get('trial')!r}")
    return copy.deepcopy(by_label[params["trial"]].sections)


SECTIONS = {"lossnet": overrides_from_params, "handcrafted": handcrafted_sections}


def lkd_trial(params: dict[str, Any], base: dict, opts: dict, space: str = "lossnet") -> None:
    """One Tune trial: a distributed run with the sampled loss network (or hand-crafted loss)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    data = copy.deepcopy(base)
    _deep_update(data, SECTIONS[space](params))
    cfg = Config.model_validate(data)
    cfg.run.name = safe_key(f"{cfg.run.name}-{tune.get_context().get_trial_id()}")
    run_distributed(cfg, LaunchOptions(**opts, callbacks=[TuneReportCallback()]))


@dataclass
class TuneOptions:
    trials: int = 8
    max_concurrent: int = 2
    grace_epochs: int = 1
    reduction_factor: int = 2
    seed: int = 0
    cpus_per_trial: float = 0.01     # the trial function itself only waits; its TorchTrainer asks for the workers
    gpus_per_trial: float = 0.0
    name: str = "tune"
    space: str = "lossnet"           # lossnet | handcrafted
    families: list[str] | None = None  # handcrafted: only these families (kd, dkd, dist, ls, wsl)


def run_search(cfg: Config, launch: LaunchOptions, topts: TuneOptions, out_dir: str | Path) -> dict[str, Any]:
    """Run (or resume) a search; write trials.csv/json and best_config.yaml; return a summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    storage = open_storage(launch.storage, launch.endpoint_url, launch.storage_outage_s)
    storage.check()
    init_ray()
    fs, base_path = storage.arrow_fs()
    opts = {k: v for k, v in launch.__dict__.items() if k != "callbacks"}
    opts["storage"] = storage.uri
    opts["progress"] = False  # trials run side by side: no progress bars in the driver
    if topts.space not in SECTIONS:
        raise ValueError(f"unknown search space {topts.space!r}; valid: {', '.join(SECTIONS)}")
    cfg = with_absolute_paths(cfg)  # workers and trials run in other working directories
    if topts.space == "lossnet":
        cfg.loss.method = "lkd"
    # prepare the teacher once, so trials share it from the cache
    from .launch import _prepare_teacher

    _prepare_teacher(cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"method": "kd"})}), storage,
                     safe_key(topts.name, "teacher"))
    trainable = tune.with_resources(tune.with_parameters(lkd_trial, base=cfg.to_dict(), opts=opts, space=topts.space),
                                    {"CPU": max(topts.cpus_per_trial, 0.01), "GPU": topts.gpus_per_trial})
    path = f"{base_path}/{safe_key(topts.name)}"
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(path, trainable=trainable, storage_filesystem=fs, resume_errored=True)
    elif topts.space == "handcrafted":
        from ..search_spaces import trials

        labels = [t.label for t in trials("handcrafted", topts.families)]
        tuner = tune.Tuner(trainable, param_space={"trial": tune.grid_search(labels)},
                           tune_config=tune.TuneConfig(max_concurrent_trials=topts.max_concurrent),
                           run_config=tune.RunConfig(name=safe_key(topts.name), storage_path=base_path, storage_filesystem=fs))
    else:
        search = ConcurrencyLimiter(OptunaSearch(space=define_space, metric=METRIC, mode=MODE, seed=topts.seed),
                                    max_concurrent=topts.max_concurrent)
        sched = ASHAScheduler(time_attr="training_iteration", metric=METRIC, mode=MODE, max_t=cfg.optim.epochs,
                              grace_period=topts.grace_epochs, reduction_factor=topts.reduction_factor)
        tuner = tune.Tuner(trainable,
                           tune_config=tune.TuneConfig(search_alg=search, scheduler=sched, num_samples=topts.trials),
                           run_config=tune.RunConfig(name=safe_key(topts.name), storage_path=base_path, storage_filesystem=fs))
    grid = tuner.fit()
    return write_results(grid, cfg, out_dir, storage, topts.name, topts.space)


def write_results(grid, cfg: Config, out_dir: str | Path, storage, name: str, space: str = "lossnet") -> dict[str, Any]:
    from ..search_spaces import loss_rank

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in grid:
        params = {k[len("config/"):]: v for k, v in (r.metrics or {}).items() if k.startswith("config/")} or dict(r.config or {})
        m = r.metrics or {}
        rows.append({"trial_id": m.get("trial_id"), "epochs": m.get("training_iteration", 0), METRIC: m.get(METRIC),
                     "quiz_loss": m.get("quiz_loss"), "test_top1": m.get("test_top1"),
                     "error": str(r.error) if r.error else None, **{f"param.{k}": v for k, v in params.items()}})
    rows.sort(key=lambda r: (-(r[METRIC] if r[METRIC] is not None else -1), *loss_rank(r["quiz_loss"])))
    import csv

    cols = sorted({k for r in rows for k in r}, key=lambda k: (not k.startswith(("trial", "epochs", METRIC, "test")), k))
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    (out / "trials.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    done = [r for r in rows if r[METRIC] is not None and not r["error"]]
    if not done:
        raise RuntimeError(f"Tune search {name!r}: no trial finished (see {out / 'trials.csv'} for their errors)")
    best = done[0]  # best quiz top-1, then lowest quiz loss (the same rule as lkd_ray.search_spaces.pick)
    best_params = {k[len("param."):]: v for k, v in best.items() if k.startswith("param.")}
    best_sections = SECTIONS[space](best_params)
    what = f"hand-crafted loss {best_params.get('trial')}" if space == "handcrafted" else "loss network"
    (out / "best_config.yaml").write_text(
        f"# Best {what} of Tune search {name!r} by {METRIC} (quiz split): {best[METRIC]}\n"
        + yaml.safe_dump(best_sections, sort_keys=False))
    for f in ("trials.csv", "trials.json", "best_config.yaml"):
        storage.put_bytes(safe_key(name, f), (out / f).read_bytes())
    return {"rows": rows, "best": best_sections, "best_metric": best[METRIC], "best_params": best_params,
            "out_dir": str(out)}


def format_table(rows: list[dict[str, Any]]) -> str:
    if any("param.trial" in r for r in rows):
        keys = ["trial_id", "epochs", METRIC, "test_top1", "param.trial"]
    else:
        keys = ["trial_id", "epochs", METRIC, "param.lossnet.depth", "param.lossnet.activation", "param.lossnet.inputs",
                "param.lossnet.base", "param.meta.scope", "param.meta.meta_every", "param.meta.lr"]
    head = " | ".join(k.replace("param.", "") for k in keys)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        lines.append(" | ".join(cells))
    return "\n".join(lines)
