"""ImageNet-style input at cluster scale, on Fashion-MNIST: Parquet shards written to a real S3
endpoint (moto_server), decoded in-process, and streamed through Ray Data into a 2-worker run that
consumes every training sample of an epoch exactly once."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from lkd_ray.config import build_config  # noqa: E402
from lkd_ray.data import build_data  # noqa: E402
from lkd_ray.data.fashion import load_fashion_mnist  # noqa: E402
from lkd_ray.storage import S3Settings, S3Storage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_shards_written_streamed_and_each_sample_seen_once(tmp_path, s3_bucket, moto_endpoint, fashion_available):
    out = subprocess.run([sys.executable, "jobs/prepare_imagenet.py", "--from-fashion-mnist", "602", "--dst", f"s3://{s3_bucket}/fm",
                          "--endpoint-url", moto_endpoint, "--rows-per-shard", "100"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    st = S3Storage(s3_bucket, "fm", S3Settings(endpoint_url=moto_endpoint))
    keys = st.list("train") + st.list("quiz") + st.list("val")
    assert len([k for k in keys if k.startswith("train/part-")]) == 6 and st.exists("meta.json")
    meta = st.get_json("meta.json")
    assert meta["counts"] == {"train": 540, "quiz": 62, "val": 120} and meta["num_classes"] == 10

    cfg = build_config("fashion_mnist", data={"dataset": "parquet", "root": f"s3://{s3_bucket}/fm", "endpoint_url": moto_endpoint,
                                              "batch_size": 27, "augment": False},
                       loss={"method": "kd"}, model={"teacher_weights": "random"}, optim={"epochs": 1},
                       run={"name": "pq", "progress": False, "cache_dir": str(tmp_path / "cache")})
    data = build_data(cfg.data)  # in-process decode: images and labels survive the JPEG round trip
    raw_x, raw_y = load_fashion_mnist()["train"]
    assert (data.train_size, data.quiz_size, data.test_size) == (540, 62, 120)
    x = data.train.images[:, 0].numpy() * 0.3530 + 0.2860
    from lkd_ray.data.parquet import read_split

    fs, base = st.arrow_fs()
    table = read_split(fs, base, "train").to_pydict()
    ids = np.asarray(table["id"])
    assert np.array_equal(np.asarray(table["label"]), raw_y[ids])
    assert np.abs(x - raw_x[ids] / 255.0).mean() < 0.03  # JPEG is lossy, not wrong

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        from lkd_ray.distributed.launch import LaunchOptions, run_distributed

        res = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store"), num_workers=2,
                                                 extra_worker_config={"record_sample_ids": True}))
    finally:
        ray.shutdown()
    assert res["metrics"]["epoch"] == 1
    import json

    seen = [json.loads((tmp_path / "store" / "pq" / "seen_ids" / f"epoch1-rank{r}.json").read_text()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 270
    assert sorted(seen[0] + seen[1]) == sorted(ids.tolist())  # every sample once, none twice, none missing
