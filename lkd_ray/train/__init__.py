"""The single-process trainer, its parts, outputs, teacher preparation and the snapshot-store interface (no Ray here)."""
from .loop import EpochRecord, LoopSettings, Trainer, TrainingDiverged, evaluate, fit
from .meta_learning import ESParticleLearner, ESPopulation, GradientMetaLearner, MetaLearner, StepContext
from .parts import resolve_device, seed_everything
from .run import Run, build_run
from .snapshots import InMemorySnapshotStore, SnapshotStore, cpu_state, draw_index

__all__ = ["EpochRecord", "LoopSettings", "Trainer", "TrainingDiverged", "evaluate", "fit", "ESParticleLearner", "ESPopulation",
           "GradientMetaLearner", "MetaLearner", "StepContext", "resolve_device", "seed_everything", "Run", "build_run",
           "InMemorySnapshotStore", "SnapshotStore", "cpu_state", "draw_index"]
