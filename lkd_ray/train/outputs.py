"""Run outputs as callbacks: each gets a read-only ``EpochRecord`` (and the final result), never the
trainer. JSON-lines metrics and TensorBoard scalars, loss-network versions, result.json.

Every file is written atomically; metrics are appended, so a resumed attempt adds to what the
earlier one wrote instead of overwriting it; JSON is strict (non-finite numbers become null).
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..storage import Storage, atomic_write_bytes, open_storage


def json_safe(obj: Any) -> Any:
    """NaN/±inf → None, recursively, so every file is strict JSON (``json.loads`` in any language)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return json_safe(obj.item())
    return obj


def dumps(obj: Any, **kw) -> str:
    return json.dumps(json_safe(obj), allow_nan=False, default=float, **kw)


class Callback:
    def on_fit_start(self, rec) -> None: ...
    def on_epoch_end(self, rec) -> None: ...
    def on_fit_end(self, result: dict) -> None: ...


class MetricsLog(Callback):
    """Per-epoch scalars appended to ``metrics.jsonl`` and written as TensorBoard events in ``out_dir/tb``."""

    def __init__(self, out_dir: str | Path):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"))
        except ImportError:  # tensorboard is a declared dependency; keep JSON logs regardless
            pass

    def on_epoch_end(self, rec) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(dumps({"step": rec.step, "rank": rec.rank, **rec.metrics}) + "\n")
        if self._tb is not None:
            for k, v in rec.metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, rec.step)
            self._tb.flush()

    def on_fit_end(self, result: dict) -> None:
        if self._tb is not None:
            self._tb.close()


def lossnet_payload(rec, config: dict) -> dict:
    return {"lossnets": dict(rec.lossnet_state), "version": rec.lossnet_version, "epoch": rec.epoch, "step": rec.step,
            "counters": dict(rec.meta or {}), "config": config}


class LossNetVersions(Callback):
    """φ as ``<run>/lossnet/v<version>.pt`` at the start and after every epoch (the LossNetServer's
    layout), so ``plot`` shows what the loss looked like and ``lossnet.init_from`` can reuse it."""

    def __init__(self, storage: Storage | str, config: dict, prefix: str = "lossnet"):
        self.storage = open_storage(storage) if isinstance(storage, str) else storage
        self.config, self.prefix = config, prefix

    def _write(self, rec) -> None:
        from ..meta.versions import VersionStore

        if rec.lossnet_state is None or rec.rank != 0:
            return
        store = VersionStore(self.storage, self.prefix)
        if not self.storage.exists(store.key(rec.lossnet_version)):
            store.save(rec.lossnet_version, lossnet_payload(rec, self.config))

    on_fit_start = on_epoch_end = _write


class ResultFile(Callback):
    """``result.json`` (strict JSON) and ``lossnet_final.pt`` in ``out_dir``."""

    def __init__(self, out_dir: str | Path, lossnet_state=None):
        self.out_dir = Path(out_dir)
        self._last = None

    def on_epoch_end(self, rec) -> None:
        self._last = rec

    def on_fit_end(self, result: dict) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.out_dir / "result.json", (dumps(result, indent=2) + "\n").encode())
        if self._last is not None and self._last.lossnet_state is not None:
            buf = io.BytesIO()
            torch.save(dict(self._last.lossnet_state), buf)
            atomic_write_bytes(self.out_dir / "lossnet_final.pt", buf.getvalue())


def default_outputs(out_dir: str | Path, config: dict) -> list[Callback]:
    """What a single-process run writes: metrics (jsonl + TensorBoard), loss-network versions, result.json."""
    return [MetricsLog(out_dir), LossNetVersions(str(out_dir), config), ResultFile(out_dir)]
