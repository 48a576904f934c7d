"""Earlier student states for the meta-step to start from (DESIGN §1, "uniform sampling").

The trainer talks to a ``SnapshotStore``; this module's in-memory store serves single-process runs
and the Ray ``SnapshotPool`` implements the same interface over object storage.
"""
from __future__ import annotations

import random
from typing import Protocol, runtime_checkable

import torch

SAMPLING = ("uniform", "recent", "gaussian")


@runtime_checkable
class SnapshotStore(Protocol):
    def record(self, step: int, state: dict[str, torch.Tensor]) -> None: ...
    def sample(self, rng: random.Random) -> dict[str, torch.Tensor] | None: ...
    def __len__(self) -> int: ...


def draw_index(n: int, sampling: str, rng: random.Random) -> int:
    """Index into n snapshots ordered oldest→newest. ``uniform`` is the method; the others are ablations
    (``recent``: uniform over the newest quarter; ``gaussian``: half-normal back from the newest, σ=n/4)."""
    if n <= 0:
        raise ValueError("no snapshots to draw from")
    if sampling == "uniform":
        return rng.randrange(n)
    if sampling == "recent":
        k = max(1, n // 4)
        return n - 1 - rng.randrange(k)
    if sampling == "gaussian":
        return max(0, n - 1 - int(abs(rng.gauss(0.0, max(1.0, n / 4)))))
    raise ValueError(f"unknown sampling {sampling!r}; valid: {', '.join(SAMPLING)}")


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class InMemorySnapshotStore:
    """Every recorded state (or the newest ``max_snapshots``): the newest in host memory up to ``max_bytes``,
    older ones spilled to files in ``spill_dir`` (weights-only loads), so a long run's history does not fill
    RAM (the CIFAR recipe records ~19 GB of students) and the draw stays uniform over all of it."""

    def __init__(self, sampling: str = "uniform", max_snapshots: int | None = None, max_bytes: int | None = 1 << 30,
                 spill_dir: str | None = None):
        if sampling not in SAMPLING:
            raise ValueError(f"unknown sampling {sampling!r}; valid: {', '.join(SAMPLING)}")
        self.sampling, self.max_snapshots, self.max_bytes = sampling, max_snapshots, max_bytes
        self.steps: list[int] = []
        self.states: list[dict[str, torch.Tensor] | str] = []  # a state in memory, or the path of its spill file
        self.in_memory = 0
        self.spilled = 0
        self._mem_from = 0  # states[_mem_from:] are in memory, the older ones spilled (spills go oldest first)
        self._spill_parent, self._spill_dir = spill_dir, None

    def _spill(self, state: dict[str, torch.Tensor], step: int) -> str:
        import os
        import tempfile
        import weakref

        if self._spill_dir is None:
            if self._spill_parent:
                os.makedirs(self._spill_parent, exist_ok=True)
            self._spill_dir = tempfile.mkdtemp(prefix="lkd-snapshots-", dir=self._spill_parent)
            import shutil

            weakref.finalize(self, shutil.rmtree, self._spill_dir, True)
        path = os.path.join(self._spill_dir, f"{step}.pt")
        torch.save(state, path)
        self.spilled += 1
        return path

    def record(self, step: int, state: dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        self.states.append(state)
        self.in_memory += state_bytes(state)
        if self.max_snapshots is not None and len(self.states) > self.max_snapshots:
            self.steps.pop(0)
            gone = self.states.pop(0)
            if isinstance(gone, dict):
                self.in_memory -= state_bytes(gone)
            else:
                import os

                os.unlink(gone)
            self._mem_from = max(0, self._mem_from - 1)
        if self.max_bytes is not None:
            # only the oldest in-memory states move to disk: work per call is the number spilled, not the history
            while self.in_memory > self.max_bytes and self._mem_from < len(self.states) - 1:  # the newest stays
                i = self._mem_from
                state = self.states[i]
                self.in_memory -= state_bytes(state)
                self.states[i] = self._spill(state, self.steps[i])
                self._mem_from += 1

    def sample(self, rng: random.Random) -> dict[str, torch.Tensor] | None:
        if not self.states:
            return None
        s = self.states[draw_index(len(self.states), self.sampling, rng)]
        return s if isinstance(s, dict) else torch.load(s, map_location="cpu", weights_only=True)

    def __len__(self) -> int:
        return len(self.states)
