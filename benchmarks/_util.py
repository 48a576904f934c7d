"""Shared helpers for benchmarks: records with provenance, summary statistics, a local moto_server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def summary(xs: list[float]) -> dict:
    """Median, spread and (from 100 samples on) the 99th percentile; fewer samples cannot give a p99."""
    import numpy as np

    p25, p50, p75, p99 = (float(v) for v in np.percentile(np.asarray(xs, dtype=float), [25, 50, 75, 99]))
    return {"n": len(xs), "p50": p50, "p99": p99 if len(xs) >= 100 else None, "min": float(min(xs)),
            "max": float(max(xs)), "iqr": p75 - p25}


def write(name: str, payload: dict, jobs_beside: int = 0, started: str | None = None, load_start: float | None = None,
          configs: list[dict] | None = None) -> Path:
    """A benchmark's record: its provenance (command, commit, machine, how many jobs ran beside it, the load
    when it started and ended) and the configs it ran (by sha, kept in ``results/configs.json``)."""
    import records

    shas = records.keep_configs(configs, RESULTS / "configs.json") if configs else []
    path = RESULTS / name
    records.write_json(path, {**records.provenance(jobs_beside), "started": started, "finished": records.now(),
                              "load_1m_start": load_start, "load_1m_end": records.load_1m(), "config_shas": shas, **payload})
    return path


@contextmanager
def moto_server():
    """A real S3 endpoint on 127.0.0.1 for the duration of a benchmark."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    exe = str(Path(sys.executable).parent / "moto_server")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.3).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)
