"""Shared helpers for benchmarks: records with provenance, summary statistics, a local moto_server."""
from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def summary(xs: list[float]) -> dict:
    """Median, spread and (from 100 samples on) the 99th percentile; fewer samples cannot give a p99."""
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]  # noqa: E731
    return {"n": len(xs), "p50": statistics.median(xs), "p99": q(0.99) if len(xs) >= 100 else None, "min": xs[0],
            "max": xs[-1], "iqr": q(0.75) - q(0.25)}


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
