"""The single-process trainer, its outputs, teacher preparation and the snapshot-store interface (no Ray here)."""
from .loop import EpochRecord, Trainer, TrainingDiverged, evaluate, fit, resolve_device, seed_everything
from .run import Run, build_run
from .snapshots import InMemorySnapshotStore, SnapshotStore, cpu_state, draw_index

__all__ = ["EpochRecord", "Trainer", "TrainingDiverged", "evaluate", "fit", "resolve_device", "seed_everything", "Run",
           "build_run", "InMemorySnapshotStore", "SnapshotStore", "cpu_state", "draw_index"]
