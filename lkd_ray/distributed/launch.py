"""Driver side of a distributed run: validate, check storage, prepare the teacher, start the
LossNetServer and SnapshotPool, run the TorchTrainer, write ``<run>/result.json``, clean up."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..storage import Storage, open_storage, safe_key

log = logging.getLogger(__name__)


@dataclass
class LaunchOptions:
    storage: str = "runs"
    num_workers: int = 1
    use_gpu: bool = False
    endpoint_url: str | None = None
    mode: str = "sync"               # LossNetServer: sync | async
    max_staleness: int = 4
    persist_every: int = 10          # LossNetServer persists every N versions (and at the end)
    max_failures: int = 1            # Ray Train: worker-group restarts from the last checkpoint
    server_max_restarts: int = 3
    num_loaders: int = 2
    threads_per_worker: int = 1
    cpus_per_worker: float = 1.0
    extra_worker_config: dict[str, Any] = field(default_factory=dict)
    callbacks: list[Any] = field(default_factory=list)  # Ray Train UserCallbacks (Tune's TuneReportCallback)


def init_ray(address: str | None = None) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS), or start a local one on loopback."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if ray.is_initialized():
        return
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        ray.init(address=addr, log_to_driver=True)
    else:
        # The dashboard (on loopback) backs the State API that Ray Train uses to release a dead
        # controller's placement group; without it a stopped Tune trial leaks its workers' CPUs.
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=True, _node_ip_address="127.0.0.1",
                 num_cpus=max(2, os.cpu_count() or 2))


def _prepare_teacher(cfg: Config, storage: Storage, run: str) -> str | None:
    """Train/load the teacher on the driver (cached) and put it in run storage for every worker."""
    if cfg.model.teacher_weights == "random":  # --smoke: an untrained teacher of the right shape, labelled as such
        import torch

        from ..data import build_data
        from ..models import build_model

        data = build_data(cfg.data, cfg.run.seed, cache_dir=cfg.run.cache_dir)
        torch.manual_seed(cfg.run.seed)
        key = safe_key(run, "teacher.pt")
        storage.put_torch(key, build_model(cfg.model.teacher, data.num_classes, data.in_channels).state_dict())
        storage.put_json(safe_key(run, "teacher.json"), {"source": "random (smoke run)"})
        return key
    if cfg.model.teacher_weights:
        return None
    from ..data import build_data
    from ..train.teacher import prepare_teacher

    data = build_data(cfg.data, cfg.run.seed, cache_dir=cfg.run.cache_dir)
    teacher, info = prepare_teacher(cfg, data)
    key = safe_key(run, "teacher.pt")
    storage.put_torch(key, teacher.state_dict())
    storage.put_json(safe_key(run, "teacher.json"), info)
    return key


def run_distributed(cfg: Config, opts: LaunchOptions) -> dict[str, Any]:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .lossnet_server import LossNetServer
    from .snapshot_pool import start_snapshot_pool
    from .worker import train_loop_per_worker

    run = safe_key(cfg.run.name)
    storage = open_storage(opts.storage, opts.endpoint_url)
    storage.check()  # unreachable endpoint, missing bucket, bad credentials: fail before any worker starts
    uri = storage.uri  # absolute: workers and actors run in other working directories
    cfg = cfg.model_copy(deep=True)
    cfg.run.cache_dir = os.path.abspath(cfg.run.cache_dir)
    t0 = time.perf_counter()
    teacher_key = _prepare_teacher(cfg, storage, run)
    init_ray()
    ns = ray.get_runtime_context().namespace
    names = {"server_name": f"lkd-lossnet-{run}", "index_name": f"lkd-snapshots-{run}"}
    actors = []
    if cfg.loss.method == "lkd":
        server = LossNetServer.options(name=names["server_name"], max_restarts=opts.server_max_restarts,
                                       max_task_retries=-1, get_if_exists=True).remote(
            cfg.to_dict(), uri, run, opts.num_workers, opts.mode, opts.max_staleness, opts.persist_every, opts.endpoint_url)
        ray.get(server.ping.remote())
        index, loaders = start_snapshot_pool(uri, run, cfg.meta.sampling, cfg.run.seed, opts.num_loaders,
                                             endpoint_url=opts.endpoint_url, namespace_name=names["index_name"])
        actors = [server, index, *loaders]
        names["loader_names"] = [f"{names['index_name']}-loader{i}" for i in range(opts.num_loaders)]
    fs, base = storage.arrow_fs()
    worker_cfg = {"cfg": cfg.to_dict(), "storage": uri, "endpoint_url": opts.endpoint_url, "run": run,
                  "teacher_key": teacher_key, "mode": opts.mode, "use_gpu": opts.use_gpu, "namespace": ns,
                  "threads_per_worker": opts.threads_per_worker, **names, **opts.extra_worker_config}
    datasets = None
    if cfg.data.dataset == "parquet":  # stream the train split through Ray Data (decoding on CPU tasks)
        from .streaming import train_dataset

        datasets = {"train": train_dataset(cfg)}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=worker_cfg, datasets=datasets,
        scaling_config=ScalingConfig(num_workers=opts.num_workers, use_gpu=opts.use_gpu,
                                     resources_per_worker={"CPU": opts.cpus_per_worker}),
        run_config=RunConfig(name="ray", storage_path=f"{base}/{run}", storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=opts.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(opts.callbacks)),
    )
    try:
        result = trainer.fit()
        summary: dict[str, Any] = {"run": run, "storage": storage.uri, "num_workers": opts.num_workers,
                                   "method": cfg.loss.method, "metrics": dict(result.metrics or {}),
                                   "checkpoint": result.checkpoint.path if result.checkpoint else None,
                                   "wall_s": time.perf_counter() - t0, "synthetic_data": cfg.data.dataset == "synthetic",
                                   "config": cfg.to_dict()}
        if storage.exists(safe_key(run, "teacher.json")):
            summary["teacher"] = storage.get_json(safe_key(run, "teacher.json"))
        if actors:
            server = actors[0]
            summary["lossnet_final"] = ray.get(server.persist.remote())
            summary["server"] = ray.get(server.report.remote())
            summary["snapshots"] = ray.get(actors[1].stats.remote())
        storage.put_json(safe_key(run, "result.json"), summary)
        return summary
    finally:
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
