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


class InMemorySnapshotStore:
    """Keeps every recorded state (or the newest ``max_snapshots``) in host memory."""

    def __init__(self, sampling: str = "uniform", max_snapshots: int | None = None):
        if sampling not in SAMPLING:
            raise ValueError(f"unknown sampling {sampling!r}; valid: {', '.join(SAMPLING)}")
        self.sampling, self.max_snapshots = sampling, max_snapshots
        self.steps: list[int] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def record(self, step: int, state: dict[str, torch.Tensor]) -> None:
        self.steps.append(step)
        self.states.append(state)
        if self.max_snapshots is not None and len(self.states) > self.max_snapshots:
            self.steps.pop(0)
            self.states.pop(0)

    def sample(self, rng: random.Random) -> dict[str, torch.Tensor] | None:
        if not self.states:
            return None
        return self.states[draw_index(len(self.states), self.sampling, rng)]

    def __len__(self) -> int:
        return len(self.states)
