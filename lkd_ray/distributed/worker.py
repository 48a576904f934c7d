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
from .meta_client import ESParticle, RemoteMetaUpdater
from .snapshot_pool import RaySnapshotStore

CHECKPOINT_FILE = "trainer.pt"   # full resumable state (weights-only loadable)
STUDENT_FILE = "student.pt"      # the student in the KD community's layout: {"model": state_dict, "epoch": …}
PARTICLE_FILE = "particle-{:03d}.pt"  # under ES: particle r's own resumable state (rank 0's is CHECKPOINT_FILE)
log = logging.getLogger(__name__)


def _teacher(cfg: Config, config: dict, storage, data):
    if config.get("teacher_key"):
        teacher = build_model(cfg.model.teacher, data.num_classes, data.in_channels)
        load_weights(teacher, storage.get_torch(config["teacher_key"]), cfg.model.teacher, "teacher in run storage")
        return teacher.eval().requires_grad_(False)
    if cfg.model.teacher_weights:
        return load_teacher(cfg.model.teacher, cfg.model.teacher_weights, data.num_classes, data.in_channels)
    return None


def _load_registered(registered, device) -> dict:
    with registered.as_directory() as d:
        return torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=True)


def _holds(registered, storage, key: str | None, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` a checkpoint lacks (the registered one, or the uploaded folder of ``key``)."""
    if not names:
        return []
    if key is None:
        with registered.as_directory() as d:
            return [n for n in names if not os.path.exists(os.path.join(d, n))]
    folder = key.rsplit("/", 1)[0]
    return [n for n in names if not storage.exists(f"{folder}/{n}")]


def newest_checkpoint(storage, run_key: str, registered=None, device="cpu",
                      need: tuple[str, ...] = ()) -> tuple[dict | None, bool, str | None]:
    """The resumable state with the most epochs, whether Ray Train registered it, and its storage key when it
    did not: the registered checkpoint, or one uploaded to ``<run>/ray/checkpoint_*/`` whose registration a
    crash or a storage outage cut short (the controller registers a report only once every rank's report
    arrived, and writes its registry after the upload). A file that does not load is skipped, and so is a
    checkpoint without every file in ``need`` (under ES, each particle's own state: a particle whose upload
    was lost must not resume from another particle's student)."""
    best, is_registered, best_key = None, registered is not None, None
    incomplete: list[str] = []
    if registered is not None:
        missing = _holds(registered, storage, None, need)
        if missing:
            log.warning("the registered checkpoint lacks %s: looking for an uploaded one that holds every particle's "
                        "state", ", ".join(missing))
            is_registered = False
            incomplete.append(f"the registered checkpoint (lacks {', '.join(missing)})")
        else:
            best = _load_registered(registered, device)
    try:
        keys = [k for k in storage.list(f"{run_key}/ray") if k.endswith(f"/{CHECKPOINT_FILE}") and "/checkpoint_" in k]
    except Exception as e:  # listing is an optimisation: the registered checkpoint still works
        log.warning("could not list %s/ray for unregistered checkpoints: %s", run_key, e)
        keys = []
    for key in sorted(keys, reverse=True):
        try:
            missing = _holds(registered, storage, key, need)
            if missing:
                log.warning("skipping checkpoint %s: it lacks %s (an upload cut short)", key, ", ".join(missing))
                incomplete.append(f"{key} (lacks {', '.join(missing)})")
                continue
            sd = storage.get_torch(key, map_location=str(device))
        except Exception as e:
            log.warning("skipping checkpoint %s: %s", key, e)
            continue
        if best is None or int(sd.get("epoch", 0)) > int(best.get("epoch", 0)):
            log.warning("resuming from %s (epoch %s): newer than the registered checkpoint (%s), whose registration "
                        "a failure cut short", key, sd.get("epoch"), f"epoch {best.get('epoch')}" if best else "none")
            best, is_registered, best_key = sd, False, key
    if best is None and incomplete:  # starting over would train from scratch under a server that moved on
        raise RuntimeError(f"no checkpoint of {run_key} holds every ES particle's state: {'; '.join(incomplete)}; "
                           "a resumed particle may not take another's student: start again under a new run.name")
    return best, is_registered, best_key


def _load_own(registered, storage, key: str | None, name: str, device) -> dict | None:
    """``name`` from the chosen checkpoint (Ray merges every rank's files into one folder), or None if absent."""
    if registered is not None and key is None:
        with registered.as_directory() as d:
            path = os.path.join(d, name)
            return torch.load(path, map_location=device, weights_only=True) if os.path.exists(path) else None
    own = key.rsplit("/", 1)[0] + "/" + name
    return storage.get_torch(own, map_location=str(device)) if storage.exists(own) else None


def resume_state(storage, run_key: str, registered, rank: int, world: int, device,
                 own_file: str | None = None, need: tuple[str, ...] = ()) -> tuple[dict | None, bool]:
    """Rank 0 chooses the checkpoint to resume from and every rank loads exactly that one: after a transient
    error, ranks choosing on their own could resume from different epochs. A rank that cannot load the chosen
    checkpoint fails (the worker group restarts) instead of silently training from another state. With
    ``own_file`` (ES: one student per particle) a rank other than 0 loads its own file from that checkpoint,
    which rank 0 chose among those holding every file in ``need`` (every particle's)."""
    import torch.distributed as dist

    choice = [None]
    if rank == 0:
        state, is_registered, key = newest_checkpoint(storage, run_key, registered, device, need)
        choice = [None if state is None else {"registered": is_registered, "key": key, "epoch": int(state.get("epoch", 0))}]
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    pick = choice[0]
    if pick is None:
        return None, False
    if rank != 0:
        chosen = (registered if pick["registered"] else None, storage, None if pick["registered"] else pick["key"])
        if own_file:
            state = _load_own(*chosen, own_file, device)
            if state is None:  # never another particle's student: this particle's own state or nothing
                raise RuntimeError(f"rank {rank}: the checkpoint of epoch {pick['epoch']} holds no {own_file}, this ES "
                                   "particle's own state; it cannot resume from another particle's student (a run "
                                   "checkpointed before per-particle files: start it again under a new run.name)")
        else:
            state = _load_registered(registered, device) if pick["registered"] else storage.get_torch(pick["key"], map_location=str(device))
        if int(state.get("epoch", 0)) != pick["epoch"]:
            raise RuntimeError(f"rank {rank} loaded epoch {state.get('epoch')} where rank 0 chose epoch {pick['epoch']}")
    return state, pick["registered"]


class EpochLogs:
    """Rank 0's metrics and TensorBoard events, next to the run: one ``logs/metrics/epoch-NNNNN.jsonl`` line and one
    TensorBoard event file per epoch, each uploaded once (a resumed epoch overwrites its own objects), so an
    epoch costs its own bytes, not the whole history's. ``read_metrics`` reads them back in order."""

    def __init__(self, storage, run_key: str):
        self.storage, self.run_key = storage, run_key

    def on_epoch_end(self, rec) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from ..train.outputs import dumps

        line = dumps({"step": rec.step, "rank": rec.rank, **rec.metrics}) + "\n"
        self.storage.put_bytes(f"{self.run_key}/logs/metrics/epoch-{rec.epoch:05d}.jsonl", line.encode())
        with tempfile.TemporaryDirectory() as d:
            tb = SummaryWriter(d, filename_suffix=f".epoch{rec.epoch:05d}")
            for k, v in rec.metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf"):
                    tb.add_scalar(k, v, rec.step)
            tb.close()
            for f in Path(d).iterdir():
                self.storage.put_bytes(f"{self.run_key}/logs/tb/{f.name}", f.read_bytes())


def read_metrics(storage, run_key: str) -> list[dict]:
    """A distributed run's per-epoch metrics (rank 0), in epoch order."""
    import json

    keys = sorted(k for k in storage.list(f"{run_key}/logs/metrics") if k.endswith(".jsonl"))
    return [json.loads(line) for k in keys for line in storage.get_bytes(k).decode().splitlines() if line]


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
    state, registered = resume_state(storage, run_key, ray.train.get_checkpoint(), rank, world, device,
                                     own_file=PARTICLE_FILE.format(rank) if es else None,
                                     need=tuple(PARTICLE_FILE.format(r) for r in range(1, world)) if es else ())
    if state is not None:
        _resume(trainer, state, server, updater, rank)
    metrics_log = EpochLogs(storage, run_key) if rank == 0 else None
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
        """Every rank reports (Ray Train V2); rank 0 attaches the resumable state and the student. Under ES every
        particle trains its own student, so ranks other than 0 attach theirs too (Ray merges the folders)."""
        if rank != 0:
            if not es:
                ray.train.report(metrics)
                return
            with tempfile.TemporaryDirectory() as d:
                torch.save(trainer.state_dict(), os.path.join(d, PARTICLE_FILE.format(rank)))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
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
        if store is not None:
            store.flush()  # this epoch's snapshots are stored and indexed before its checkpoint is
        rec = trainer.end_epoch(train_metrics, time.perf_counter() - t0)
        metrics = epoch_metrics(rec.metrics)
        if streaming and config.get("record_sample_ids"):
            storage.put_json(f"{run_key}/seen_ids/epoch{rec.epoch}-rank{rank}.json", trainer.data.train.seen)
        if rank == 0:
            metrics_log.on_epoch_end(rec)
            if progress is not None:
                ray.get(progress.epoch.remote(metrics))
        report(metrics, rec.epoch)
        for cb in callbacks:
            cb.on_epoch_end(rec)
    if updater is not None and updater.mode != "sync":  # what the server refused this rank, for the run's result
        updater.flush()
        storage.put_json(f"{run_key}/clients/rank{rank}.json", updater.client_counters())
