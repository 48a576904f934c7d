"""`ray job submit` of a job against a real local head (dashboard and Jobs API on 127.0.0.1 only)."""
import json
import os
import signal
import subprocess
import sys
import time
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
    # `--block` keeps the head in the foreground of its own session: stopping it stops only this test's
    # cluster (`ray stop --force` would stop every Ray process on a shared machine)
    head = subprocess.Popen([str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    store = tmp_path / "store"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the Jobs API answers once the dashboard is up
            probe = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", f"http://127.0.0.1:{dash}"], env=env,
                                   capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            assert head.poll() is None, "ray start --head exited"
            time.sleep(2)
        out = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                              "--", "python", "jobs/lkd_imagenet.py", "--smoke", "--storage", str(store)],
                             env=env, capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
        assert "SMOKE" in out.stdout and "succeeded" in (out.stdout + out.stderr)
        res = json.loads((store / "smoke-imagenet-r34-r18" / "result.json").read_text())
        assert res["synthetic_data"] is True and res["metrics"]["epoch"] == 1 and res["server_accepted"] > 0
        # without --storage a submitted job refuses: its working directory is a temporary copy Ray deletes
        nostore = subprocess.run([str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir",
                                  str(ROOT), "--", "python", "jobs/lkd_fashion.py", "--smoke"],
                                 env={k: v for k, v in env.items() if k != "LKD_STORAGE"}, capture_output=True, text=True,
                                 timeout=600)
        assert nostore.returncode != 0 and "pass --storage" in nostore.stdout + nostore.stderr
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
