"""The Ray Train worker: the single-process Trainer with Ray plugged into its seams — DDP over the
student only (teacher frozen beside it), meta-gradients to the LossNetServer, snapshots through the
SnapshotPool, and a per-epoch ``ray.train.report`` with a rank-0 checkpoint."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import ray
import ray.train
import torch

from ..config import Config
from ..data import build_data
from ..models import load_teacher
from ..storage import open_storage
from ..train import Trainer
from .snapshot_pool import RaySnapshotStore

CHECKPOINT_FILE = "trainer.pt"   # full resumable state (weights-only loadable)
STUDENT_FILE = "student.pt"      # the student in the KD community's layout: {"model": state_dict, "epoch": …}


class RemoteMetaUpdater:
    """Send meta-gradients to the LossNetServer and keep the local loss networks at its newest version."""

    def __init__(self, server, rank: int, mode: str, lossnets: torch.nn.Module):
        self.server, self.rank, self.mode, self.lossnets = server, rank, mode, lossnets
        self.round = 0
        self.version = -1
        self._pending_get = None
        self.pull(blocking=True)

    def pull(self, blocking: bool = False) -> None:
        if blocking:
            v, sd = ray.get(self.server.get.remote(self.version))
            self._load(v, sd)
            return
        if self._pending_get is not None:
            ready, _ = ray.wait([self._pending_get], timeout=0)
            if ready:
                self._load(*ray.get(self._pending_get))
                self._pending_get = None
        if self._pending_get is None:
            self._pending_get = self.server.get.remote(self.version)

    def _load(self, v: int, sd) -> None:
        if sd is not None and v > self.version:
            self.lossnets.load_state_dict(sd)
            self.version = v

    def apply(self, grads: list[torch.Tensor], lr_scale: float = 1.0) -> bool:
        payload = [g.detach().cpu() for g in grads]
        if self.mode == "sync":
            res = ray.get(self.server.submit.remote(self.rank, self.round, payload, self.version, True, lr_scale))
            self.round += 1
            self.pull(blocking=True)  # the round is closed: everyone trains on the same φ
            return bool(res["accepted"])
        self.server.submit.remote(self.rank, self.round, payload, self.version, False, lr_scale)  # fire and forget
        self.round += 1
        self.pull(blocking=False)
        return True


def _maybe_kill_server(config: dict, rank: int, epoch: int, server) -> None:
    """Fault injection for tests: kill the LossNetServer once (Ray restarts it from storage)."""
    fault = config.get("kill_server_after_epoch")
    if not fault or rank != 0 or fault["epoch"] != epoch or Path(fault["marker"]).exists():
        return
    Path(fault["marker"]).write_text("killed once")
    ray.kill(server, no_restart=False)


def _maybe_crash(config: dict, rank: int, epoch: int) -> None:
    """Fault injection for tests: kill this worker process once, after a given epoch."""
    fault = config.get("crash_after_epoch")
    if not fault or fault["rank"] != rank or fault["epoch"] != epoch:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text("crashed once")
    os._exit(1)


def train_loop_per_worker(config: dict) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = Config.model_validate(config["cfg"])
    torch.set_num_threads(config.get("threads_per_worker", 1))
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    storage = open_storage(config["storage"], config.get("endpoint_url"))
    run = config["run"]
    streaming = cfg.data.dataset == "parquet"
    data = build_data(cfg.data, cfg.run.seed, rank, world, cfg.run.cache_dir, stream_train=streaming)
    if streaming:
        from .streaming import StreamingLoader

        data.train = StreamingLoader(ray.train.get_dataset_shard("train"), cfg.data.batch_size, data.train_size, world,
                                     record_ids=bool(config.get("record_sample_ids")))
    if config.get("teacher_key"):
        net_state = storage.get_torch(config["teacher_key"])
        from ..models import build_model, load_weights

        teacher = build_model(cfg.model.teacher, data.num_classes, data.in_channels)
        load_weights(teacher, net_state, cfg.model.teacher, "teacher in run storage")
        teacher.eval().requires_grad_(False)
    else:
        teacher = load_teacher(cfg.model.teacher, cfg.model.teacher_weights, data.num_classes, data.in_channels)

    def wrap(bundle):
        if world <= 1:
            return bundle
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(bundle, device_ids=[device.index] if device.type == "cuda" else None)

    is_lkd = cfg.loss.method == "lkd"
    store = None
    if is_lkd:
        index = ray.get_actor(config["index_name"], namespace=config.get("namespace"))
        loaders = [ray.get_actor(n, namespace=config.get("namespace")) for n in config["loader_names"]]
        store = RaySnapshotStore(config["storage"], run, index, loaders, record=rank == 0, endpoint_url=config.get("endpoint_url"))
    server = ray.get_actor(config["server_name"], namespace=config.get("namespace")) if is_lkd else None

    log_dir = Path(tempfile.mkdtemp(prefix=f"lkd-{run}-logs-")) if rank == 0 else None

    def upload_logs() -> None:
        """metrics.jsonl and TensorBoard events, mirrored to <run>/logs/ (readable wherever the storage is)."""
        for f in log_dir.rglob("*"):
            if f.is_file():
                storage.put_bytes(f"{run}/logs/{f.relative_to(log_dir).as_posix()}", f.read_bytes())

    def on_epoch_end(trainer: Trainer, metrics: dict) -> None:
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        metrics["rank"] = rank
        if server is not None:
            metrics.update({f"server_{k}": v for k, v in ray.get(server.report.remote()).items() if isinstance(v, (int, float))})
        if streaming and config.get("record_sample_ids"):
            storage.put_json(f"{run}/seen_ids/epoch{trainer.state.epoch}-rank{rank}.json", trainer.data.train.seen)
        if rank == 0:
            upload_logs()
            with tempfile.TemporaryDirectory() as d:
                state = trainer.state_dict()
                if is_lkd:  # φ lives on the server; the checkpoint records which version this epoch trained with
                    state["lossnet_version"] = trainer.meta_updater.version
                torch.save(state, os.path.join(d, CHECKPOINT_FILE))
                torch.save({"model": trainer.bundle.net.state_dict(), "epoch": trainer.state.epoch}, os.path.join(d, STUDENT_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        _maybe_crash(config, rank, trainer.state.epoch)
        if server is not None:
            _maybe_kill_server(config, rank, trainer.state.epoch, server)

    trainer = Trainer(cfg, teacher, data, device=device, snapshot_store=store, wrap_student=wrap,
                      on_epoch_end=on_epoch_end, rank=rank, world_size=world, out_dir=log_dir, log=rank == 0)
    if is_lkd:
        trainer.meta_updater = RemoteMetaUpdater(server, rank, config.get("mode", "sync"), trainer.lossnets)
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            trainer.load_state_dict(torch.load(os.path.join(d, CHECKPOINT_FILE), map_location=device, weights_only=True))
        if is_lkd:
            server_round = ray.get(server.report.remote())["round"]  # continue the server's numbering
            trainer.meta_updater.round = server_round if server_round is not None else trainer.state.step // cfg.meta.meta_every
            trainer.meta_updater.pull(blocking=True)  # φ lives on the server, newer than the checkpoint
    trainer.fit()
