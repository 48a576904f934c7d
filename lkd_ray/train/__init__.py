"""The single-process trainer, teacher preparation and the snapshot-store interface (no Ray here)."""
from .loop import Trainer, TrainingDiverged, evaluate, resolve_device, seed_everything
from .snapshots import InMemorySnapshotStore, SnapshotStore, cpu_state, draw_index

__all__ = ["Trainer", "TrainingDiverged", "evaluate", "resolve_device", "seed_everything",
           "InMemorySnapshotStore", "SnapshotStore", "cpu_state", "draw_index"]
