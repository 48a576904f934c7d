"""Fault injection for the distributed tests: per-epoch worker callbacks (the shipped worker only
runs whatever callbacks it is given). Pickled by value, so Ray workers need not import this module."""
from __future__ import annotations

import os
from pathlib import Path

import sys

import ray.cloudpickle


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


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
