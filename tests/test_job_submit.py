"""`ray job submit` of a job against a real local head (dashboard and Jobs API on 127.0.0.1 only)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_ray_job_submit_imagenet_smoke(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    import secrets

    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(24))  # token auth on, as on a real cluster
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    import tempfile

    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    start = subprocess.run([str(bin_dir / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
                            f"--temp-dir={temp_dir}"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    store = tmp_path / "store"
    try:
        out = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                              "--", "python", "jobs/lkd_imagenet.py", "--smoke", "--storage", str(store)],
                             env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
        assert "SMOKE" in out.stdout and "succeeded" in (out.stdout + out.stderr)
        res = json.loads((store / "smoke-imagenet-r34-r18" / "result.json").read_text())
        assert res["synthetic_data"] is True and res["metrics"]["epoch"] == 1 and res["server"]["accepted"] > 0
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
