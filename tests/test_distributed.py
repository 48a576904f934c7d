"""Distributed LKD on a real local Ray cluster (127.0.0.1) with real storage: local folders and a
moto_server S3 endpoint. Each run is small (generated 16×16 data) so the module fits CI's budget."""
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from lkd_ray.config import build_config  # noqa: E402
from lkd_ray.data import build_data  # noqa: E402
from lkd_ray.distributed.launch import LaunchOptions, run_distributed  # noqa: E402
from lkd_ray.distributed.snapshot_pool import RaySnapshotStore, SnapshotIndex, start_snapshot_pool  # noqa: E402
from lkd_ray.models import build_model, load_weights  # noqa: E402
from lkd_ray.storage import LocalStorage, S3Settings, S3Storage, StorageError  # noqa: E402
from lkd_ray.train import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def small_cfg(name: str, tmp_path, **over):
    sections = {"data": {"dataset": "synthetic", "synthetic_size": 512, "batch_size": 32, "image_size": 16, "channels": 1},
                "optim": {"epochs": 2}, "meta": {"meta_every": 2, "snapshot_every": 3, "p_snapshot": 0.5},
                "model": {"teacher_epochs": 1}, "run": {"name": name, "cache_dir": str(tmp_path / "cache"), "progress": False}}
    for k, v in over.items():
        sections.setdefault(k, {}).update(v)
    return build_config("fashion_mnist", **sections)


def test_uniform_sampling_passes_chi_square_and_index_persists(tmp_path):
    from scipy.stats import chisquare

    idx = SnapshotIndex.remote(str(tmp_path), "u", "uniform", 3)
    for step in range(12):
        ray.get(idx.record.remote({"key": f"u/snapshots/{step}.pt", "size": 1, "sha256": "x", "step": step}))
    draws = ray.get([idx.sample.remote() for _ in range(2400)])
    counts = [sum(d["step"] == s for d in draws) for s in range(12)]
    assert chisquare(counts).pvalue > 1e-3, counts
    # the index covers the whole history, persisted: a fresh index actor (a restart) sees all 12
    again = SnapshotIndex.remote(str(tmp_path), "u", "uniform", 4)
    assert ray.get(again.stats.remote())["snapshots"] == 12
    # and "recent" really is a different distribution (the test can tell them apart)
    rec = SnapshotIndex.remote(str(tmp_path), "u", "recent", 3)
    steps = {d["step"] for d in ray.get([rec.sample.remote() for _ in range(300)])}
    assert steps <= {9, 10, 11}


def test_corrupted_snapshot_is_skipped_with_a_warning(tmp_path, caplog):
    index, loaders = start_snapshot_pool(str(tmp_path), "c", "uniform", 0, num_loaders=2, namespace_name="c-test")
    store = RaySnapshotStore(str(tmp_path), "c", index, loaders, record=True)
    for step in range(1, 5):
        store.record(step, {"w": torch.full((4,), float(step))})
    assert len(store) == 4
    path = tmp_path / "c" / "snapshots" / "2.pt"
    path.write_bytes(path.read_bytes()[:-8] + b"corrupt!")
    seen = set()
    with caplog.at_level(logging.WARNING, logger="lkd_ray.distributed.snapshot_pool"):
        for _ in range(40):
            seen.add(store.sample()["w"][0].item())
    assert seen == {1.0, 3.0, 4.0}
    assert store.corrupt_seen == 1 and ray.get(index.stats.remote())["corrupt_skipped"] == 1
    assert any("skipping snapshot c/snapshots/2.pt" in r.getMessage() for r in caplog.records)
    for a in [index, *loaders]:
        ray.kill(a)


def test_two_worker_lkd_run_on_s3(tmp_path, s3_bucket, moto_endpoint):
    cfg = small_cfg("e2e", tmp_path)
    res = run_distributed(cfg, LaunchOptions(storage=f"s3://{s3_bucket}/lkd", endpoint_url=moto_endpoint, num_workers=2,
                                             persist_every=2))
    st = S3Storage(s3_bucket, "lkd", S3Settings(endpoint_url=moto_endpoint))
    keys = st.list("e2e")
    steps_per_rank = (460 // 2) // 32  # 10 % quiz held out of 512, sharded over 2 ranks, drop_last
    rounds = 2 * steps_per_rank // 2
    assert res["metrics"]["epoch"] == 2
    assert res["server"]["accepted"] == rounds * 2 and res["server"]["rounds"] == rounds and res["server"]["rejected"] == 0
    assert res["server"]["version"] == rounds
    snaps = [k for k in keys if k.startswith("e2e/snapshots/") and k.endswith(".pt")]
    assert len(snaps) == (2 * steps_per_rank) // 3 and "e2e/snapshots/manifest.json" in keys
    manifest = st.get_json("e2e/snapshots/manifest.json")["snapshots"]
    assert all(st.get_torch(e["key"], expect_sha256=e["sha256"]) for e in manifest)
    assert {f"e2e/lossnet/v{v}.pt" for v in range(2, rounds + 1, 2)} <= set(keys) and "e2e/lossnet/latest.json" in keys
    assert any(k.startswith("e2e/ray/checkpoint_") and k.endswith("trainer.pt") for k in keys)
    assert any(k.endswith("student.pt") for k in keys)
    assert any(k.startswith("e2e/logs/tb/events.out.tfevents") for k in keys)  # TensorBoard-readable, in the bucket
    lines = st.get_bytes("e2e/logs/metrics.jsonl").decode().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["epoch"] == 2
    result = st.get_json("e2e/result.json")
    assert result["server"]["accepted"] == rounds * 2 and result["run"] == "e2e"


def test_one_ray_worker_reproduces_the_single_process_trainer(tmp_path, monkeypatch):
    cfg = small_cfg("equiv", tmp_path, meta={"p_snapshot": 0.0})
    monkeypatch.chdir(tmp_path)  # a relative --storage must reach workers, whose working directory differs
    store = tmp_path / "store"
    run_distributed(cfg, LaunchOptions(storage="store", num_workers=1, persist_every=1000))
    st = LocalStorage(store)
    ptr = st.get_json("equiv/lossnet/latest.json")
    ray_phi = st.get_torch(ptr["key"], expect_sha256=ptr["sha256"])["lossnets"]
    data = build_data(cfg.data, cfg.run.seed)
    teacher = build_model(cfg.model.teacher, data.num_classes, data.in_channels)
    load_weights(teacher, st.get_torch("equiv/teacher.pt"), cfg.model.teacher)
    torch.set_num_threads(1)
    try:
        local = Trainer(cfg, teacher, data, log=False)
        local.fit()
    finally:
        torch.set_num_threads(2)
    assert ptr["version"] == local.meta_optimizer.counters.version > 0
    for k, v in local.lossnets.state_dict().items():
        torch.testing.assert_close(ray_phi[k], v, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ray_phi.items() if k.endswith("g.4.weight") or "g." in k)


def test_lossnet_server_killed_mid_run_restores_and_the_run_finishes(tmp_path):
    cfg = small_cfg("srvkill", tmp_path, optim={"epochs": 3})
    marker = tmp_path / "killed"
    res = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store"), num_workers=1, persist_every=1,
                                             extra_worker_config={"kill_server_after_epoch": {"epoch": 1, "marker": str(marker)}}))
    assert marker.exists()
    assert res["metrics"]["epoch"] == 3
    assert res["server"]["restored_from"] is not None and res["server"]["restored_from"] > 0
    assert res["server"]["version"] > res["server"]["restored_from"]  # it carried on after the restart


def test_train_worker_killed_mid_run_resumes_from_checkpoint(tmp_path):
    cfg = small_cfg("wkill", tmp_path, optim={"epochs": 3})
    marker = tmp_path / "crashed"
    res = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store"), num_workers=2, max_failures=1,
                                             extra_worker_config={"crash_after_epoch": {"rank": 1, "epoch": 1, "marker": str(marker)}}))
    assert marker.exists()
    assert res["metrics"]["epoch"] == 3
    ckpt = torch.load(Path(res["checkpoint"]) / "trainer.pt", weights_only=True)
    assert ckpt["epoch"] == 3 and len(ckpt["history"]) == 3  # resumed: epochs 2-3 after the restored epoch 1
    assert ckpt["lossnet_version"] == res["server"]["version"]


def test_missing_bucket_and_unreachable_endpoint_fail_before_any_worker(tmp_path, moto_endpoint):
    cfg = small_cfg("nobucket", tmp_path)
    t0 = time.time()
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        run_distributed(cfg, LaunchOptions(storage="s3://no-such-bucket/x", endpoint_url=moto_endpoint))
    from tests.conftest import free_port

    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "jobs/lkd_fashion.py", "--storage", "s3://b/x", "--endpoint-url",
                          f"http://127.0.0.1:{free_port()}", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 3 and "cannot reach S3 endpoint" in out.stderr
    assert "Ray" not in out.stdout + out.stderr.replace("cannot reach", "")  # no cluster was started
    bad = subprocess.run([sys.executable, "jobs/lkd_fashion.py", "--set", "meta.scope=everything"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "meta.scope" in bad.stderr
    assert time.time() - t0 < 200
