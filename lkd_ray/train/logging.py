"""Run outputs: JSON-lines metrics, TensorBoard scalars and an atomically written result.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..storage import atomic_write_bytes


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


class RunLogger:
    """Per-epoch scalars to ``metrics.jsonl`` and TensorBoard event files in ``out_dir``."""

    def __init__(self, out_dir: str | Path | None, enabled: bool = True):
        self.out_dir = Path(out_dir) if out_dir else None
        self.enabled = enabled and self.out_dir is not None
        self._tb = None
        if self.enabled:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except ImportError:  # tensorboard is a declared dependency; keep JSON logs regardless
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}, default=float) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
