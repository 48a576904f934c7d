import os

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Tests only ever talk to the moto_server on 127.0.0.1. Set dummy credentials before any Ray
# cluster starts, so actors and workers inherit them (as an instance role would provide on a cluster).
os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
for _v in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_v, None)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def fashion_available():
    from lkd_ray.data.fashion import _find_dir

    if _find_dir(None) is None:
        pytest.skip("Fashion-MNIST not installed (./dev installs dataset-fashion-mnist as root); offline data needed")
    return True


import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Start a real moto_server on 127.0.0.1 and wait until it accepts connections."""
    exe = str(Path(sys.executable).parent / "moto_server")  # the venv's, installed by ./dev
    if not Path(exe).exists():
        exe = shutil.which("moto_server") or exe
    port = free_port()
    log = open(os.environ.get("LKD_MOTO_LOG", os.devnull), "w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto_server did not start within 30 s")


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 endpoint: a moto_server process on 127.0.0.1, stopped at the end of the session."""
    proc, url = start_moto()
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(moto_endpoint, request):
    import boto3

    name = "lkd-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-")
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name
