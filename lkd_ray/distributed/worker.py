"""The Ray Train worker: ``build_run`` with Ray plugged into its seams — the student prepared for DDP
by Ray (teacher frozen beside it), meta-gradients to the LossNetServer, snapshots through the
SnapshotPool — then a straight epoch loop with ``ray.train.report`` inline, as in Ray's examples.

Under ``meta.estimator=es`` each worker is one ES particle with its own student (no DDP).
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch

from ..config import Config
from ..data import build_data
from ..models import build_model, load_teacher, load_weights
from ..storage import OUTAGE_ENV, open_storage
from ..train import build_run
from ..train.outputs import MetricsLog
from .meta_client import ESParticle, RemoteMetaUpdater
from .snapshot_pool import RaySnapshotStore

CHECKPOINT_FILE = "trainer.pt"   # full resumable state (weights-only loadable)
STUDENT_FILE = "student.pt"      # the student in the KD community's layout: {"model": state_dict, "epoch": …}
log = logging.getLogger(__name__)


def _teacher(cfg: Config, config: dict, storage, data):
    if config.get("teacher_key"):
        teacher = build_model(cfg.model.teacher, data.num_classes, data.in_channels)
        load_weights(teacher, storage.get_torch(config["teacher_key"]), cfg.model.teacher, "teacher in run storage")
        return teacher.eval().requires_grad_(False)
    if cfg.model.teacher_weights:
        return load_teacher(cfg.model.teacher, cfg.model.teacher_weights, data.num_classes, data.in_channels)
    return None


def newest_checkpoint(storage, run_key: str, registered=None, device="cpu") -> tuple[dict | None, bool]:
    """The resumable state with the most epochs, and whether Ray Train registered it: the registered
    checkpoint, or one uploaded to ``<run>/ray/checkpoint_*/`` whose registration a crash or a storage
    outage cut short (the controller registers a report only once every rank's report arrived, and
    writes its registry after the upload). A file that does not load is skipped."""
    best, is_registered = None, registered is not None
    if registered is not None:
        with registered.as_directory() as d:
            best = torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=True)
    try:
        keys = [k for k in storage.list(f"{run_key}/ray") if k.endswith(f"/{CHECKPOINT_FILE}") and "/checkpoint_" in k]
    except Exception as e:  # listing is an optimisation: the registered checkpoint still works
        log.warning("could not list %s/ray for unregistered checkpoints: %s", run_key, e)
        keys = []
    for key in sorted(keys, reverse=True):
        try:
            sd = storage.get_torch(key, map_location=str(device))
        except Exception as e:
            log.warning("skipping checkpoint %s: %s", key, e)
            continue
        if best is None or int(sd.get("epoch", 0)) > int(best.get("epoch", 0)):
            log.warning("resuming from %s (epoch %s): newer than the registered checkpoint (%s), whose registration "
                        "a failure cut short", key, sd.get("epoch"), f"epoch {best.get('epoch')}" if best else "none")
            best, is_registered = sd, False
    return best, is_registered


def _resume(trainer, sd: dict, server, updater, rank: int) -> None:
    """Load the state and reconcile its loss-network version with the server's (never going backwards)."""
    trainer.load_state_dict(sd)
    if updater is None or server is None:
        return
    ck_v = int(sd.get("lossnet_version") or 0)
    srv_v = ray.get(server.report.remote())["version"]
    if srv_v < ck_v and rank == 0 and sd.get("lossnets"):
        from ..meta import flatten

        flat = flatten([sd["lossnets"][k] for k in trainer.lossnets.state_dict()])
        ray.get(server.adopt.remote(ck_v, flat, f"resumed checkpoint holds v{ck_v}, server restored v{srv_v}"))
        log.warning("resume: checkpoint at loss-network v%s, server at v%s: the server took the checkpoint's φ", ck_v, srv_v)
    elif srv_v > ck_v and rank == 0:
        log.warning("resume: checkpoint at loss-network v%s, server at v%s (updates after the checkpoint): "
                    "workers continue with the server's φ", ck_v, srv_v)
    updater.round = int(sd.get("meta_round", updater.round))
    updater.pull(blocking=True)


def train_loop_per_worker(config: dict) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg: Config = config["cfg"]
    torch.set_num_threads(config.get("threads_per_worker", 1))
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    if config.get("storage_outage_s") is not None:  # every storage client in this worker (ours and the trainer's)
        os.environ[OUTAGE_ENV] = str(config["storage_outage_s"])
    storage = open_storage(config["storage"], config.get("endpoint_url"))
    run_key = config["run"]
    es = cfg.meta.estimator == "es" and cfg.loss.method in ("lkd", "control") and not cfg.lossnet.frozen
    data_rank, data_world = (0, 1) if es else (rank, world)  # a particle trains its own student on the whole set
    streaming = cfg.data.dataset == "parquet"
    data = build_data(cfg.data, cfg.run.seed, data_rank, data_world, cfg.run.cache_dir, stream_train=streaming)
    if streaming:
        from .streaming import StreamingLoader

        clock = ray.get_actor(config["clock_name"], namespace=config.get("namespace")) if config.get("clock_name") else None
        data.train = StreamingLoader(ray.train.get_dataset_shard("train"), cfg.data.batch_size, data.train_size, world,
                                     record_ids=bool(config.get("record_sample_ids")), clock=clock, seed=cfg.run.seed)
    learnable = cfg.loss.method in ("lkd", "control")
    ns = config.get("namespace")
    server = ray.get_actor(config["server_name"], namespace=ns) if learnable and not cfg.lossnet.frozen else None
    store = None
    if server is not None and not es:
        index = ray.get_actor(config["index_name"], namespace=ns)
        loaders = [ray.get_actor(n, namespace=ns) for n in config["loader_names"]]
        store = RaySnapshotStore(config["storage"], run_key, index, loaders, record=rank == 0,
                                 endpoint_url=config.get("endpoint_url"), rank=rank, outage_s=config.get("storage_outage_s"))
    updaters = []

    def remote_updater(lossnets):
        u = RemoteMetaUpdater(server, rank, world, config.get("mode", "sync"), lossnets,
                              sender=f"{run_key}/rank{rank}" if config.get("mode") == "async" else run_key, device=device)
        updaters.append(u)
        return u

    def prepare(bundle):
        if world <= 1 or es:
            return bundle
        return ray.train.torch.prepare_model(bundle, move_to_device=False, parallel_strategy="ddp")

    run = build_run(cfg, rank=rank, world_size=world, device=device, data=data,
                    teacher=_teacher(cfg, config, storage, data), teacher_info=config.get("teacher_info"),
                    meta_updater=remote_updater if server is not None and not es else None, snapshots=store,
                    wrap_student=prepare, cache_storage=storage,
                    es_particle=(lambda nets: ESParticle(server, rank, cfg, nets)) if es and server is not None else None,
                    log=lambda *_: None)
    trainer = run.trainer
    updater = updaters[0] if updaters else None
    state, registered = newest_checkpoint(storage, run_key, ray.train.get_checkpoint(), device)
    if state is not None:
        _resume(trainer, state, server, updater, rank)
    metrics_log = MetricsLog(Path(tempfile.mkdtemp(prefix=f"lkd-{run_key}-logs-"))) if rank == 0 else None
    if metrics_log is not None and storage.exists(f"{run_key}/logs/metrics.jsonl"):  # earlier attempts' lines are kept
        (metrics_log.out_dir / "metrics.jsonl").write_bytes(storage.get_bytes(f"{run_key}/logs/metrics.jsonl"))
    progress = ray.get_actor(config["progress_name"], namespace=ns) if config.get("progress_name") and rank == 0 else None
    callbacks = list(config.get("callbacks") or [])  # extra per-epoch callbacks (the tests' fault injection lives there)
    steps_per_epoch = len(trainer.data.train)

    def on_step(stats: dict) -> None:
        if progress is not None and trainer.state.step % 10 == 0:
            progress.update.remote(trainer.state.step, stats.get("loss"))

    def epoch_metrics(m) -> dict:
        metrics = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        metrics.update({"rank": rank, "steps_per_epoch": steps_per_epoch})
        if server is not None:
            srv = ray.get(server.report.remote())
            metrics.update({f"server_{k}": v for k, v in srv.items() if isinstance(v, (int, float)) and v is not None})
        return metrics

    def report(metrics: dict, epoch: int) -> None:
        """Every rank reports (Ray Train V2); rank 0 attaches the resumable state and the student."""
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            state = trainer.state_dict()
            if updater is not None:
                state["meta_round"] = updater.round
            torch.save(state, os.path.join(d, CHECKPOINT_FILE))
            torch.save({"model": trainer.bundle.net.state_dict(), "epoch": epoch}, os.path.join(d, STUDENT_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    if state is not None and not registered and trainer.state.epoch >= cfg.optim.epochs and trainer.state.history:
        # the final checkpoint was uploaded but its registration failed (e.g. storage down beyond the bound in Ray
        # Train's controller): register it now, or the run's result would name the epoch before
        log.warning("registering the final checkpoint (epoch %s), whose registration failed in the last attempt",
                    trainer.state.epoch)
        report(epoch_metrics(trainer.state.history[-1]), trainer.state.epoch)

    while trainer.state.epoch < cfg.optim.epochs:
        t0 = time.perf_counter()
        train_metrics = trainer.train_epoch(on_step=on_step)
        if updater is not None:
            updater.flush()
            updater.refresh_counters()
        rec = trainer.end_epoch(train_metrics, time.perf_counter() - t0)
        metrics = epoch_metrics(rec.metrics)
        if streaming and config.get("record_sample_ids"):
            storage.put_json(f"{run_key}/seen_ids/epoch{rec.epoch}-rank{rank}.json", trainer.data.train.seen)
        if rank == 0:
            metrics_log.on_epoch_end(rec)
            for f in metrics_log.out_dir.rglob("*"):  # metrics.jsonl and TensorBoard events, next to the run
                if f.is_file():
                    storage.put_bytes(f"{run_key}/logs/{f.relative_to(metrics_log.out_dir).as_posix()}", f.read_bytes())
            if progress is not None:
                ray.get(progress.epoch.remote(metrics))
        report(metrics, rec.epoch)
        for cb in callbacks:
            cb.on_epoch_end(rec)
