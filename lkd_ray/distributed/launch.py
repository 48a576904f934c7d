"""Driver side of a distributed run: check the run name against storage, prepare the teacher (and its
output cache), start the LossNetServer and SnapshotPool, run the TorchTrainer with one progress line
that updates in place, write ``<run>/result.json``, clean up.

Config is already validated (``jobs/_common.py``); the inputs it names (``train.inputs.check_inputs``) and storage
are checked before the run claims its name and before any worker starts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import Config, with_absolute_paths
from ..errors import InputError
from ..storage import Storage, StorageError, default_outage_s, open_storage, safe_key
from ..train.outputs import dumps, json_safe

log = logging.getLogger(__name__)


class RunConflict(InputError, ValueError):
    """A run name already holds a run with another config."""


@dataclass
class LaunchOptions:
    storage: str = "runs"
    num_workers: int = 1
    use_gpu: bool = False
    endpoint_url: str | None = None
    mode: str = "sync"               # LossNetServer: sync | async (ES runs its own protocol)
    max_staleness: int = 4
    max_failures: int = 1            # Ray Train: worker-group restarts from the last checkpoint
    server_max_restarts: int = 3
    num_loaders: int = 2
    snapshot_object_bytes: int = 1 << 30  # snapshots kept in Ray's object store (beyond: drawn from storage)
    threads_per_worker: int = 1
    cpus_per_worker: float = 1.0
    progress: bool = True
    callbacks: list[Any] = field(default_factory=list)         # Ray Train UserCallbacks (Tune's TuneReportCallback)
    worker_callbacks: list[Any] = field(default_factory=list)  # per-epoch callbacks run inside every worker
    extra_worker_config: dict[str, Any] = field(default_factory=dict)
    storage_outage_s: float | None = None  # how long storage calls retry an outage (None: $LKD_STORAGE_OUTAGE_S or 60)


def init_ray(address: str | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a local one on loopback.
    Worker output stays in Ray's logs (and the run folder): the driver shows one line per run."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS")
    quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
    if addr:
        ray.init(address=addr, **quiet)
    else:
        # The dashboard (on loopback) backs the State API that Ray Train uses to release a dead
        # controller's placement group; without it a stopped Tune trial leaks its workers' CPUs.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 num_cpus=max(2, os.cpu_count() or 2), **quiet)


def config_fingerprint(cfg: Config) -> str:
    """What makes two runs the same run: the config minus what does not change results."""
    d = cfg.to_dict()
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("progress", "out_dir", "cache_dir", "threads")}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def claim_run(storage: Storage, run: str, cfg: Config) -> dict | None:
    """Record this run's config under its name, or check it against the one already there.

    Returns the finished result when an identical run already completed (nothing to redo), None to
    start or resume. A different config under the same name raises ``RunConflict`` with what to do.
    """
    key = safe_key(run, "run.json")
    fp = config_fingerprint(cfg)
    if storage.exists(key):
        prev = storage.get_json(key)
        if prev.get("fingerprint") != fp:
            old = prev.get("config", {})
            new = cfg.to_dict()
            diff = [f"{s}.{k}: {old.get(s, {}).get(k)!r} → {v!r}" for s, sec in new.items() if isinstance(sec, dict)
                    for k, v in sec.items() if s != "run" and old.get(s, {}).get(k) != v]
            raise RunConflict(
                f"run {run!r} already exists in {storage.uri} with another config ({'; '.join(diff[:6]) or 'run settings differ'}). "
                f"Give this run another name (--set run.name=NEW), or delete {storage.uri}/{run} to start it over; "
                "to resume the existing run, rerun it with its own config.")
        if storage.exists(safe_key(run, "result.json")):
            return storage.get_json(safe_key(run, "result.json"))
        return None
    storage.put_json(key, {"fingerprint": fp, "config": cfg.to_dict(), "created": time.time()})
    return None


def _prepare_teacher(cfg: Config, storage: Storage, run: str) -> tuple[str | None, dict]:
    """Train/load the teacher on the driver (cached), put it in run storage for every worker, and
    build the teacher-output cache there when asked (workers read it, nobody recomputes it)."""
    import torch

    from ..data import build_data
    from ..losses.methods import METHODS
    from ..models import build_model

    if not METHODS[cfg.loss.method].needs_teacher:
        return None, {}
    key = safe_key(run, "teacher.pt")
    if cfg.model.teacher_weights == "random":  # --smoke: an untrained teacher of the right shape, labelled as such
        data = build_data(cfg.data, cfg.run.seed, cache_dir=cfg.run.cache_dir)
        torch.manual_seed(cfg.run.seed)
        teacher = build_model(cfg.model.teacher, data.num_classes, data.in_channels)
        info = {"source": "random (smoke run)", "key": f"random-{cfg.model.teacher}-{cfg.run.seed}"}
    elif cfg.model.teacher_weights and not cfg.model.teacher_cache:
        return None, {"source": cfg.model.teacher_weights}
    else:
        from ..train.teacher import prepare_teacher

        data = build_data(cfg.data, cfg.run.seed, cache_dir=cfg.run.cache_dir)
        teacher, info = prepare_teacher(cfg, data, log=lambda m: print(f"[teacher] {m}", flush=True))
    storage.put_torch(key, teacher.state_dict())
    storage.put_json(safe_key(run, "teacher.json"), json_safe({k: v for k, v in info.items()}))
    if cfg.model.teacher_cache:
        from ..train import teacher_cache

        teacher_cache.attach(data.train, teacher, info["key"], data.fingerprint(), cfg.model.teacher_cache_views,
                             storage, torch.device("cpu"), log=lambda m: print(f"[teacher] {m}", flush=True))
    return key, info


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self):
            self.step, self.loss, self.epochs = 0, None, []

        def update(self, step: int, loss: float | None) -> None:
            self.step, self.loss = step, loss

        def epoch(self, metrics: dict) -> None:
            self.epochs.append(metrics)

        def poll(self, seen: int) -> tuple[int, float | None, list]:
            return self.step, self.loss, self.epochs[seen:]

    return Progress


def _watch(progress, label: str, total: int, epochs: int, done: threading.Event, enabled: bool) -> None:
    """Render the run's progress in the driver: one bar updating in place and a short line per epoch."""
    import ray

    from ..train.progress import RunBar, epoch_line

    bar = RunBar(label, total, enabled, sys.stderr)
    seen = 0
    while True:
        finished = done.wait(0.5)
        try:
            step, loss, new = ray.get(progress.poll.remote(seen), timeout=5)
        except Exception:  # the actor is gone at shutdown: nothing more to show
            break
        seen += len(new)
        bar.show(step, loss)
        for m in new:
            bar.write(epoch_line(label, int(m.get("epoch", 0)), epochs, m))
        if finished:
            break
    bar.close()


def run_distributed(cfg: Config, opts: LaunchOptions) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..data import build_data
    from .lossnet_server import LossNetServer
    from .snapshot_pool import start_snapshot_pool
    from .streaming import EpochClock
    from .worker import train_loop_per_worker

    from ..train.inputs import check_inputs

    run = safe_key(cfg.run.name)
    check_inputs(cfg)  # bad data, teacher or loss network: stop before anything is written under the run's name
    outage = opts.storage_outage_s if opts.storage_outage_s is not None else default_outage_s()
    storage = open_storage(opts.storage, opts.endpoint_url, outage)
    storage.check()  # unreachable endpoint, missing bucket, bad credentials: fail before any worker starts
    es = cfg.meta.estimator == "es" and cfg.loss.method in ("lkd", "control") and not cfg.lossnet.frozen
    if es and opts.num_workers != cfg.meta.es_particles:
        raise RunConflict(f"meta.estimator=es runs one particle per worker: --num-workers {opts.num_workers} must equal "
                          f"meta.es_particles={cfg.meta.es_particles}")
    done_before = claim_run(storage, run, cfg)
    if done_before is not None:
        print(f"[{run}] already finished with this config in {storage.uri}/{run}: showing its result "
              "(delete the run folder or pick another run.name to train again)", file=sys.stderr, flush=True)
        return done_before
    uri = storage.uri  # absolute: workers and actors run in other working directories
    cfg = with_absolute_paths(cfg)  # workers and trials run in other working directories
    t0 = time.perf_counter()
    teacher_key, teacher_info = _prepare_teacher(cfg, storage, run)
    init_ray()
    ns = ray.get_runtime_context().namespace
    names = {"server_name": f"lkd-lossnet-{run}", "index_name": f"lkd-snapshots-{run}", "progress_name": f"lkd-progress-{run}"}
    actors = []
    learnable = cfg.loss.method in ("lkd", "control") and not cfg.lossnet.frozen
    if learnable:
        mode = "es" if es else opts.mode
        server = LossNetServer.options(name=names["server_name"], max_restarts=opts.server_max_restarts,
                                       max_task_retries=-1, get_if_exists=True).remote(
            cfg, uri, run, mode, opts.max_staleness, opts.endpoint_url, cfg.meta.es_particles if es else 0,
            storage_outage_s=outage)
        ray.get(server.ping.remote())
        actors.append(server)
        if not es:
            index, loaders = start_snapshot_pool(uri, run, cfg.meta.sampling, cfg.run.seed, opts.num_loaders,
                                                 endpoint_url=opts.endpoint_url, namespace_name=names["index_name"],
                                                 max_snapshots=cfg.meta.max_snapshots, outage_s=outage,
                                                 object_bytes=opts.snapshot_object_bytes)
            actors += [index, *loaders]
            names["loader_names"] = [f"{names['index_name']}-loader{i}" for i in range(opts.num_loaders)]
    progress = _progress_actor().options(name=names["progress_name"], get_if_exists=True).remote()
    actors.append(progress)
    fs, base = storage.arrow_fs()
    worker_cfg = {"cfg": cfg, "storage": uri, "endpoint_url": opts.endpoint_url, "run": run, "teacher_key": teacher_key,
                  "teacher_info": teacher_info, "mode": opts.mode, "use_gpu": opts.use_gpu, "namespace": ns,
                  "threads_per_worker": opts.threads_per_worker, "callbacks": list(opts.worker_callbacks),
                  "storage_outage_s": outage,
                  **names, **opts.extra_worker_config}
    datasets = None
    if cfg.data.dataset == "parquet":  # stream the train split through Ray Data (decoding on CPU tasks)
        from .streaming import train_dataset

        clock = EpochClock.options(name=f"lkd-epoch-{run}", get_if_exists=True).remote()
        actors.append(clock)
        worker_cfg["clock_name"] = f"lkd-epoch-{run}"
        datasets = {"train": train_dataset(cfg, worker_cfg["clock_name"], ns)}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=worker_cfg, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=opts.num_workers, use_gpu=opts.use_gpu,
                                     resources_per_worker={"CPU": opts.cpus_per_worker}),
        run_config=RunConfig(name="ray", storage_path=f"{base}/{run}", storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=opts.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(opts.callbacks)),
    )
    data_rows = build_data(cfg.data, cfg.run.seed, cache_dir=cfg.run.cache_dir, stream_train=cfg.data.dataset == "parquet")
    table = data_rows.label_table()
    if table is not None:  # noisy or scarce labels: stored with the run, for anyone to audit
        from ..data.regimes import label_table_parquet

        storage.put_bytes(safe_key(run, "labels.parquet"), label_table_parquet(table))
    per_epoch = (data_rows.train_size // (1 if es else opts.num_workers)) // cfg.data.batch_size
    done = threading.Event()
    watcher = threading.Thread(target=_watch, args=(progress, f"{run} ({cfg.loss.method})", per_epoch * cfg.optim.epochs,
                                                     cfg.optim.epochs, done, opts.progress and cfg.run.progress), daemon=True)
    watcher.start()
    try:
        try:
            result = trainer.fit()
        finally:
            done.set()
            watcher.join(10)
        summary: dict[str, Any] = {"run": run, "storage": storage.uri, "num_workers": opts.num_workers,
                                   "method": cfg.loss.method, "metrics": dict(result.metrics or {}),
                                   "checkpoint": result.checkpoint.path if result.checkpoint else None,
                                   "wall_s": time.perf_counter() - t0, "synthetic_data": cfg.data.dataset == "synthetic",
                                   "config": cfg.to_dict(), "teacher": teacher_info}
        if learnable:
            server = actors[0]
            # waits while versions are still being written; gives up once none was for longer than an outage may last
            summary["server"] = ray.get(server.flush.remote(stall_s=2 * outage + 15))
            if summary["server"]["persist_pending"]:
                raise StorageError(f"the loss network's last {summary['server']['persist_pending']} version(s) could not be "
                                   f"saved to {storage.uri}/{run}/lossnet ({summary['server']['persist_error']})")
            for k in ("version", "accepted", "rejected", "rounds"):
                summary[f"server_{k}"] = summary["server"].get(k)
            summary["server_accepted"] = summary["server"].get("meta_accepted")
            summary["server_rejected"] = summary["server"].get("rejected", 0)  # every refused submission, once
            if opts.mode == "async" and not es:  # each rank's own count of what the server accepted and refused it
                clients = [storage.get_json(k) for k in sorted(storage.list(safe_key(run, "clients"))) if k.endswith(".json")]
                summary["clients"] = clients
                for k in ("submitted", "accepted", "rejected", "duplicates", "errors"):
                    summary[f"client_{k}"] = sum(int(c.get(k, 0)) for c in clients)
            if not es:
                summary["snapshots"] = ray.get(actors[1].stats.remote())
                storage.put_json(safe_key(run, "snapshots", "draws.json"),  # per rank: (drawn position, live count)
                                 {str(r): v for r, v in ray.get(actors[1].draw_history.remote()).items()})
        storage.put_bytes(safe_key(run, "result.json"), (dumps(summary, indent=1) + "\n").encode())
        return json.loads(dumps(summary))
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
