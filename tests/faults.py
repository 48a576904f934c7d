"""Fault injection for the distributed tests: per-epoch worker callbacks (the shipped worker only
runs whatever callbacks it is given). Pickled by value, so Ray workers need not import this module."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import ray.cloudpickle

from tests import proxy
from tests.proxy import send_control


class CrashOnce:
    """Kill this worker process once, after ``epoch`` on ``rank`` (Ray Train restarts the group)."""

    def __init__(self, rank: int, epoch: int, marker: str):
        self.rank, self.epoch, self.marker = rank, epoch, marker

    def on_epoch_end(self, rec) -> None:
        if rec.rank == self.rank and rec.epoch == self.epoch and not Path(self.marker).exists():
            Path(self.marker).write_text("crashed once")
            os._exit(1)


class KillServerOnce:
    """Kill the LossNetServer actor once, after ``epoch`` (Ray restarts it; it restores from storage)."""

    def __init__(self, server_name: str, epoch: int, marker: str, namespace: str | None = None):
        self.server_name, self.epoch, self.marker, self.namespace = server_name, epoch, marker, namespace

    def on_epoch_end(self, rec) -> None:
        import ray

        if rec.rank == 0 and rec.epoch == self.epoch and not Path(self.marker).exists():
            Path(self.marker).write_text("killed once")
            ray.kill(ray.get_actor(self.server_name, namespace=self.namespace), no_restart=False)


class ProbeServer:
    """Once, after ``epoch`` on rank 0: write the LossNetServer's report to ``marker``, optionally kill the
    server (Ray restarts it; it restores from storage), then send ``commands`` to the fault proxy's control
    port (e.g. lift the outage that kept the server from saving)."""

    def __init__(self, server_name: str, epoch: int, marker: str, control_port: int, commands: list[str],
                 kill: bool = False, until_persist_failures: int = 0, namespace: str | None = None):
        self.server_name, self.epoch, self.marker, self.namespace = server_name, epoch, marker, namespace
        self.control_port, self.commands, self.kill = control_port, list(commands), kill
        self.until_persist_failures = until_persist_failures  # first wait until that many saves have failed

    def on_epoch_end(self, rec) -> None:
        import time

        import ray

        if rec.rank == 0 and rec.epoch == self.epoch and not Path(self.marker).exists():
            server = ray.get_actor(self.server_name, namespace=self.namespace)
            deadline = time.monotonic() + 60
            report = ray.get(server.report.remote())
            while report["persist_failures"] < self.until_persist_failures and time.monotonic() < deadline:
                time.sleep(0.2)
                report = ray.get(server.report.remote())
            Path(self.marker).write_text(json.dumps(report))
            if self.kill:
                ray.kill(server, no_restart=False)
            for c in self.commands:
                assert send_control(self.control_port, c).startswith("ok"), c


def _break_version_writer(server) -> None:
    """Run inside the LossNetServer actor: its version writer now raises what a bug would (not a storage error)."""
    def broken(version, payload):
        raise TypeError(f"cannot serialise loss-network version {version} (injected by the test)")

    server.core.versions.save = broken


class BreakPersister:
    """Once, after ``epoch`` on rank 0 and once every version so far is saved: make the live LossNetServer's persister fail for a reason that is not
    storage, through Ray's ``__ray_call__`` (the actor runs the change itself; nothing is mocked outside it)."""

    def __init__(self, server_name: str, epoch: int, marker: str, namespace: str | None = None):
        self.server_name, self.epoch, self.marker, self.namespace = server_name, epoch, marker, namespace

    def on_epoch_end(self, rec) -> None:
        import ray

        if rec.rank == 0 and rec.epoch == self.epoch and not Path(self.marker).exists():
            import time

            server = ray.get_actor(self.server_name, namespace=self.namespace)
            report, deadline = ray.get(server.report.remote()), time.monotonic() + 60
            while report["persisted_version"] != report["version"] and time.monotonic() < deadline:
                time.sleep(0.1)  # let every version so far be saved first, so the test knows which ones are
                report = ray.get(server.report.remote())
            ray.get(server.__ray_call__.remote(_break_version_writer))
            Path(self.marker).write_text(json.dumps(report))


class RaiseBadInput:
    """After the first epoch on rank 0: raise the bad-input error a worker meets in data the driver could not check
    (a file damaged after the driver read it)."""

    def on_epoch_end(self, rec) -> None:
        if rec.rank == 0:
            from lkd_ray.data.fashion import DataDamaged

            raise DataDamaged("data.root /d/train-images-idx3-ubyte.gz", "is not a complete gzip file", "copy it again")


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(proxy)
