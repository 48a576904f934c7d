"""``build_run(cfg)``: everything a training run needs, built once from the typed config — used by the
CLI, the Ray driver and workers, and the benchmarks, so they cannot drift apart.

    data → teacher (loaded, or trained once and cached) → teacher-output cache (optional)
         → loss networks (fresh, or learned earlier: ``lossnet.init_from``) → Trainer | ESTrainer
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import Config, ConfigError
from ..data import DataBundle, build_data
from ..losses import LossNetworks, build_lossnets
from ..losses.methods import METHODS
from ..storage import Storage, open_storage
from .loop import Trainer, fit, resolve_device
from .outputs import Callback, default_outputs
from .progress import Progress


class LossNetArtifactError(ValueError):
    """A loss network to start from (``lossnet.init_from``) is missing or does not fit this config."""


def _split_uri(uri: str) -> tuple[str, str]:
    """(storage root, key) of an object URI: ``/a/b/v3.pt`` → (``/a/b``, ``v3.pt``); s3 likewise."""
    uri = uri.rstrip("/")
    head, _, tail = uri.rpartition("/")
    return (head or "/"), tail


def read_lossnet_artifact(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """A loss-network version (``v<N>.pt``), or the newest intact version of a run folder / URI holding
    ``lossnet/``; weights-only, sha256-checked against ``latest.json`` where there is one."""
    from ..meta.versions import VersionStore

    if uri.endswith(".pt"):
        root, key = _split_uri(uri)
        st = open_storage(root, endpoint_url)
        if not st.exists(key):
            raise LossNetArtifactError(f"lossnet.init_from={uri!r}: no such file")
        sd = st.get_torch(key)
        m = re.fullmatch(r"v(\d+)\.pt", key)
        if isinstance(sd, dict) and m:
            sd.setdefault("version", int(m.group(1)))
    else:
        st = open_storage(uri, endpoint_url)
        sd = VersionStore(st, "lossnet").load_latest()
        if sd is None:
            sd = VersionStore(st, ".").load_latest()
        if sd is None:
            raise LossNetArtifactError(f"lossnet.init_from={uri!r} holds no loss-network version (lossnet/v<N>.pt); "
                                       "point it at a run folder of an LKD run or at one of its v<N>.pt files")
    if not isinstance(sd, dict) or "lossnets" not in sd:
        raise LossNetArtifactError(f"lossnet.init_from={uri!r} is not a loss-network version (no 'lossnets' entry)")
    return sd


def load_lossnets_from(lossnets: LossNetworks, cfg: Config) -> dict[str, Any]:
    sd = read_lossnet_artifact(cfg.lossnet.init_from)
    try:
        lossnets.load_state_dict(sd["lossnets"])
    except RuntimeError as e:
        src = sd.get("config", {}).get("lossnet", {})
        raise LossNetArtifactError(
            f"lossnet.init_from={cfg.lossnet.init_from!r} does not fit this run's loss network ({cfg.loss.method}, "
            f"inputs {cfg.lossnet.inputs}, hidden {cfg.lossnet.hidden}); it was learned with inputs {src.get('inputs')}, "
            f"hidden {src.get('hidden')}: use the same lossnet settings ({str(e).splitlines()[0]})") from None
    return {"init_from": cfg.lossnet.init_from, "version": sd.get("version"), "learned_with": sd.get("config", {}).get("meta")}


@dataclass
class Run:
    """A built run: data, teacher, the trainer, and how to fit it with the standard outputs."""

    cfg: Config
    data: DataBundle
    teacher: torch.nn.Module | None
    teacher_info: dict
    trainer: Any
    info: dict = field(default_factory=dict)

    def fit(self, out_dir: str | Path | None = None, callbacks: list[Callback] | tuple = (), progress: bool | None = None,
            progress_label: str | None = None) -> dict[str, Any]:
        cbs = list(callbacks) + (default_outputs(out_dir, self.cfg.to_dict()) if out_dir is not None else [])
        table = self.data.label_table()
        if out_dir is not None and table is not None:  # noisy or scarce labels: stored with the run, for anyone to audit
            from ..data.regimes import label_table_parquet
            from ..storage import atomic_write_bytes

            Path(out_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(Path(out_dir) / "labels.parquet", label_table_parquet(table))
        show = self.cfg.run.progress if progress is None else progress
        label = progress_label or f"{self.cfg.run.name} ({self.cfg.loss.method})"
        res = fit(self.trainer, cbs, Progress(label, self.cfg.optim.epochs, enabled=show))
        res.update({"teacher_info": self.teacher_info, **({"run_info": self.info} if self.info else {})})
        res["_trainer"] = self.trainer
        return res


def build_run(cfg: Config, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
              data: DataBundle | None = None, teacher: torch.nn.Module | None = None, teacher_info: dict | None = None,
              meta_updater: Callable[[LossNetworks], Any] | None = None, snapshots=None,
              wrap_student: Callable | None = None, cache_storage: Storage | None = None, stream_train: bool = False,
              es_particle: Callable[[LossNetworks], Any] | None = None, log: Callable[[str], None] = print) -> Run:
    """Build every part of a run from ``cfg``. Parts already at hand (data, a teacher loaded by the Ray
    driver) are passed in; ``meta_updater`` is a factory given the loss networks (the Ray worker's
    remote updater); ``cache_storage`` holds the teacher-output cache (default: ``run.cache_dir``);
    ``es_particle``: a factory given the loss networks when this process is one ES particle (a Ray worker),
    not the whole population."""
    from .teacher import prepare_teacher, teacher_key

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = device or resolve_device(cfg.run.device)
    data = data or build_data(cfg.data, cfg.run.seed, rank, world_size, cfg.run.cache_dir, stream_train=stream_train)
    method = METHODS[cfg.loss.method]
    info: dict[str, Any] = {}
    if teacher is None and method.needs_teacher:
        teacher, teacher_info = prepare_teacher(cfg, data, device, log=log)
    teacher_info = teacher_info or {}
    if cfg.model.teacher_cache and method.needs_teacher:
        from . import teacher_cache

        tkey = teacher_info.get("key") or teacher_key(cfg, data)
        store = cache_storage or open_storage(str(Path(cfg.run.cache_dir)))
        info["teacher_cache"] = teacher_cache.attach(data.train, teacher, tkey, data.fingerprint(),
                                                     cfg.model.teacher_cache_views, store, device, log=log,
                                                     progress=cfg.run.progress and rank == 0)
        teacher = None  # no teacher forward per step: that is the point (and frees its memory)
    lossnets = build_lossnets(cfg.loss, cfg.lossnet, cfg.run.seed)
    if lossnets is not None and cfg.lossnet.init_from:
        info["lossnet"] = load_lossnets_from(lossnets, cfg)
    if lossnets is not None and cfg.meta.estimator == "es" and not cfg.lossnet.frozen and es_particle is None:
        if world_size > 1:
            raise ConfigError("meta.estimator=es runs one particle per Ray worker (the LossNetServer combines them); "
                              "in one process it runs every particle itself: do not shard it")
        from .es import ESTrainer

        trainer = ESTrainer(cfg, data, teacher, lossnets, device)
    else:
        trainer = Trainer(cfg, data, teacher, device=device, lossnets=lossnets,
                          meta_updater=meta_updater(lossnets) if (meta_updater and lossnets is not None) else None,
                          snapshots=snapshots, wrap_student=wrap_student, rank=rank, world_size=world_size,
                          particle=es_particle(lossnets) if (es_particle and lossnets is not None) else None)
    return Run(cfg, data, teacher, teacher_info, trainer, info)

