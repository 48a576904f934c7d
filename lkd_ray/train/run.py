"""``build_run(cfg)``: every part of a training run, built once from the typed config — for the CLI, the Ray
driver and workers, and the benchmarks alike, so they cannot drift apart.

    data → teacher (loaded, or trained once and cached) → where its outputs come from (live or cached)
         → loss networks (fresh, or learned earlier: ``lossnet.init_from``) → method
         → student, optimizer, lr schedule → meta-learner (gradient, ES particle, ES population) → Trainer
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import Config, ConfigError, MetaCfg
from ..data import DataBundle, build_data
from ..errors import InputError
from ..losses import LossNetworks, build_lossnets, build_method
from ..losses.methods import METHODS
from ..meta import LossNetOptimizer
from ..storage import CorruptObject, Storage, open_storage
from .loop import LoopSettings, Trainer, autocast_for, fit
from .meta_learning import ESParticleLearner, ESPopulation, GradientMetaLearner
from .outputs import Callback, default_outputs
from .parts import build_optimizer, build_scheduler, build_student, check_teacher, resolve_device, seed_everything
from .progress import Progress
from .snapshots import InMemorySnapshotStore
from .teacher_source import CachedTeacher, LiveTeacher, NoTeacher


class LossNetArtifactError(InputError, ValueError):
    """A loss network to start from (``lossnet.init_from``) is missing or does not fit this config."""


def _split_uri(uri: str) -> tuple[str, str]:
    """(storage root, key) of an object URI: ``/a/b/v3.pt`` → (``/a/b``, ``v3.pt``); s3 likewise."""
    uri = uri.rstrip("/")
    head, _, tail = uri.rpartition("/")
    return (head or "/"), tail


def read_lossnet_artifact(uri: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """A loss-network version (``v<N>.pt``), or the newest intact version of a run folder / URI holding
    ``lossnet/``; weights-only, content-hash checked (``state_sha256``), and sha256-checked against ``latest.json``
    where there is one: a changed or corrupted file is refused."""
    from ..meta.versions import VersionStore, check_content

    if uri.endswith(".pt"):
        root, key = _split_uri(uri)
        st = open_storage(root, endpoint_url)
        if not st.exists(key):
            raise LossNetArtifactError(f"lossnet.init_from={uri!r}: no such file — point it at a v<N>.pt file or at the "
                                       "folder of an LKD run holding lossnet/")
        try:
            sd = st.get_torch(key)
            check_content(sd, uri)
        except CorruptObject as e:
            raise LossNetArtifactError(f"lossnet.init_from={uri!r} is corrupt and was not loaded ({e}); point it at "
                                       "an intact version, or at the run folder (its newest intact version is "
                                       "taken)") from None
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


def describe(cfg: Config, data: DataBundle) -> dict[str, Any]:
    """What a run is, for its result record."""
    return {"method": cfg.loss.method, "student": cfg.model.student, "teacher": cfg.model.teacher,
            "dataset": cfg.data.dataset, "synthetic_data": bool(data.synthetic), "seed": cfg.run.seed,
            "config": cfg.to_dict()}


@dataclass
class Run:
    """A built run: data, teacher, the trainer, and how to fit it with the standard outputs."""

    cfg: Config
    data: DataBundle
    teacher: torch.nn.Module | None
    teacher_info: dict
    trainer: Trainer
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
        res = fit(self.trainer, cbs, Progress(label, self.cfg.optim.epochs, enabled=show), describe(self.cfg, self.data))
        res.update({"teacher_info": self.teacher_info, **({"run_info": self.info} if self.info else {})})
        res["_trainer"] = self.trainer
        return res


def student_trainer(cfg: Config, data: DataBundle, teacher: torch.nn.Module | None, device: torch.device, *,
                    lossnets: LossNetworks | None = None, wrap_student: Callable | None = None, rank: int = 0,
                    world_size: int = 1) -> Trainer:
    """A student with its optimizer, schedule, method and teacher source, in a Trainer without a meta-learner
    (``build_run`` attaches one; an ES population builds its particles with this)."""
    method = build_method(cfg.loss, lossnets)
    cached = bool(cfg.model.teacher_cache) and getattr(data.train, "teacher_logits", None) is not None
    if method.needs_teacher and teacher is None and not cached:
        raise ValueError(f"method {cfg.loss.method!r} distils from a teacher; none was given")
    if teacher is not None:
        teacher = teacher.to(device).eval().requires_grad_(False)
        check_teacher(teacher, data.num_classes, data.in_channels, data.image_size, device, cfg.model.teacher,
                      cfg.data.dataset, cfg.model.student)
    seed_everything(cfg.run.seed)
    bundle = build_student(cfg.model.student, data.num_classes, data.in_channels, data.image_size, device, teacher,
                           features=method.uses_features, channels_last=cfg.run.channels_last)
    if teacher is not None and cfg.run.channels_last:
        teacher.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(bundle, cfg.optim)
    settings = LoopSettings.from_config(cfg)
    source = NoTeacher()
    if cached:
        source = CachedTeacher(device)
    elif teacher is not None:
        source = LiveTeacher(teacher, method.uses_features, autocast_for(settings, device))
    if lossnets is not None:
        lossnets.to(device).requires_grad_(False)
    return Trainer(settings, data, bundle, optimizer, build_scheduler(optimizer, cfg.optim), method, source, device=device,
                   student=wrap_student(bundle) if wrap_student else bundle, lossnets=lossnets, rank=rank,
                   world_size=world_size)


def meta_schedule(meta: MetaCfg, steps_per_epoch: int, epochs: int) -> tuple[MetaCfg, str | None]:
    """``meta`` with ``meta_every`` derived from the data when the schedule is given in its units
    (``meta_steps_per_epoch``) or has a floor (``min_meta_steps``); and what was chosen, in words (None when
    ``meta_every`` stands as given). A preset thus makes as many meta-steps per epoch on a data set 7× smaller."""
    if meta.meta_steps_per_epoch is None and not meta.min_meta_steps:
        return meta, None
    adapting = epochs if meta.freeze_after_epoch is None else min(epochs, meta.freeze_after_epoch)  # frozen after
    steps = max(1, steps_per_epoch) * adapting
    every = meta.meta_every
    why = f"meta_every={every} as given"
    if meta.meta_steps_per_epoch is not None:
        every = max(1, round(steps_per_epoch / meta.meta_steps_per_epoch))
        why = f"{meta.meta_steps_per_epoch:g} per epoch of {steps_per_epoch} steps → every {every} steps"
    if meta.min_meta_steps and steps // every < meta.min_meta_steps:
        every = max(1, steps // meta.min_meta_steps)
        why += f", shortened to every {every} steps for at least {meta.min_meta_steps} meta-steps"
    span = f"{epochs} epochs" if adapting == epochs else f"the first {adapting} of {epochs} epochs (frozen after)"
    return meta.model_copy(update={"meta_every": every}), f"{why} ({steps // every} meta-steps in {span})"


def ramp_schedule(loss, epochs: int) -> str | None:
    """The loss's hand-written ramp (``loss.ramp_epochs``) in words, for the run's log; None without one. A ramp
    counts epochs, so a preset's ramp tuned over one run length says so when the run is another length."""
    if not loss.ramp_epochs:
        return None
    term = "DIST's inter-class term" if loss.method == "dist" else "KD's term"
    words = (f"the weights of CE and {term} ×1 → ×{loss.ramp_weight:g} and its τ ×1 → ×{loss.ramp_tau:g} over "
             f"{loss.ramp_epochs} epochs")
    if loss.ramp_epochs < epochs:
        words += f", then held for the last {epochs - loss.ramp_epochs} of {epochs}"
    elif loss.ramp_epochs > epochs:
        words += (f": this run has {epochs}, so it ends at {epochs / loss.ramp_epochs:.0%} of the ramp (set "
                  f"loss.ramp_epochs={epochs} to ramp over the whole run, as the ramp family tunes it)")
    return words


def build_run(cfg: Config, *, rank: int = 0, world_size: int = 1, device: torch.device | None = None,
              data: DataBundle | None = None, teacher: torch.nn.Module | None = None, teacher_info: dict | None = None,
              meta_updater: Callable[[LossNetworks], Any] | None = None, snapshots=None,
              wrap_student: Callable | None = None, cache_storage: Storage | None = None, stream_train: bool = False,
              es_particle: Callable[[LossNetworks], Any] | None = None, log: Callable[[str], None] = print) -> Run:
    """Build every part of a run from ``cfg``. Parts already at hand (data, a teacher loaded by the Ray
    driver) are passed in; ``meta_updater`` is a factory given the loss networks (the Ray worker's
    remote updater); ``snapshots`` a ``SnapshotStore`` (the Ray pool); ``cache_storage`` holds the
    teacher-output cache (default: ``run.cache_dir``); ``es_particle``: a factory given the loss networks when
    this process is one ES particle (a Ray worker), not the whole population."""
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
        local = open_storage(str(Path(cfg.run.cache_dir))) if cache_storage is not None else None
        info["teacher_cache"] = teacher_cache.attach(data.train, teacher, tkey, data.fingerprint(),
                                                     cfg.model.teacher_cache_views, store, device, log=log,
                                                     progress=cfg.run.progress and rank == 0, seed_from=local)
        teacher = None  # no teacher forward per step: that is the point (and frees its memory)
    lossnets = build_lossnets(cfg.loss, cfg.lossnet, cfg.run.seed)
    if lossnets is not None and cfg.lossnet.init_from:
        info["lossnet"] = load_lossnets_from(lossnets, cfg)
    adapts = lossnets is not None and not cfg.lossnet.frozen
    es = adapts and cfg.meta.estimator == "es"
    if es and es_particle is None and world_size > 1:
        raise ConfigError("meta.estimator=es runs one particle per Ray worker (the LossNetServer combines them); "
                          "in one process it runs every particle itself: do not shard it")
    if es and es_particle is None:  # the whole population here: this trainer is particle 0
        center, lossnets = lossnets, copy.deepcopy(lossnets)
    trainer = student_trainer(cfg, data, teacher, device, lossnets=lossnets, wrap_student=wrap_student, rank=rank,
                              world_size=world_size)
    meta_cfg = cfg.meta  # the meta-schedule in units of the data: resolved here, where the epoch's length is known
    if adapts:
        meta_cfg, chosen = meta_schedule(cfg.meta, len(data.train), cfg.optim.epochs)
        if chosen:
            log(f"meta-schedule: {chosen}")
            info["meta_schedule"] = chosen
    if es and es_particle is not None:
        trainer.meta = ESParticleLearner(meta_cfg, lossnets, es_particle(lossnets))
    elif es:
        particles = [student_trainer(cfg, data, teacher, device, lossnets=copy.deepcopy(center))
                     for _ in range(cfg.meta.es_particles - 1)]
        trainer.meta = ESPopulation(meta_cfg, cfg.run.seed, center, particles, data)
    elif adapts:
        updater = meta_updater(lossnets) if meta_updater else LossNetOptimizer(lossnets, cfg.meta.lr, cfg.meta.clip_norm)
        mb = cfg.meta.snapshot_memory_mb
        store = snapshots if snapshots is not None else InMemorySnapshotStore(
            cfg.meta.sampling, cfg.meta.max_snapshots, None if mb is None else mb << 20, cfg.run.cache_dir)
        trainer.meta = GradientMetaLearner(meta_cfg, trainer.method, lossnets, updater, store, data, trainer.teacher,
                                           trainer.to_device, cfg.run.seed, rank)
    ramp = ramp_schedule(cfg.loss, cfg.optim.epochs)
    if ramp:
        log(f"loss ramp: {ramp}")
    if trainer.meta is not None and hasattr(trainer.meta, "attach"):
        trainer.meta.attach(trainer)
    return Run(cfg, data, teacher, teacher_info, trainer, info)
