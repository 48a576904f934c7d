"""Faults lose nothing and freeze nothing (issue 12).

A loopback proxy (tests/proxy.py) in front of a real moto_server refuses, resets or black-holes
connections, armed to hit one exact operation (the save of a loss-network version, Ray Train's
checkpoint upload or registration); the LossNetServer is killed before its first save and after;
stored objects are truncated. Real Ray on 127.0.0.1. Every test checks what an operator looks at
afterwards: the run finished (or exited 3 with a one-line message), the loss-network version counts
every applied round exactly once, versions kept rising after the fault, and storage is consistent.
"""
import hashlib
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

from lkd_ray.distributed.launch import LaunchOptions, run_distributed  # noqa: E402
from lkd_ray.distributed.lossnet_server import LossNetServerCore  # noqa: E402
from lkd_ray.distributed.snapshot_pool import RaySnapshotStore, start_snapshot_pool  # noqa: E402
from lkd_ray.meta.versions import VersionStore, content_sha256  # noqa: E402
from lkd_ray.storage import S3Settings, S3Storage, StorageError, StorageUnavailable  # noqa: E402
from tests.faults import BreakPersister, ProbeServer  # noqa: E402
from tests.proxy import FaultProxy  # noqa: E402
from tests.test_distributed import ray_cluster, small_cfg  # noqa: E402,F401  (ray_cluster: the same module-scoped local Ray)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "jobs"))
from _common import launch, parser, storage_cause  # noqa: E402


@pytest.fixture(scope="module")
def proxy(moto_endpoint):
    px = FaultProxy(moto_endpoint)
    yield px
    px.close()


@pytest.fixture
def faults(proxy):
    """The proxy, passing and unarmed before and after each test."""
    proxy.clear()
    proxy.log.clear()
    yield proxy
    proxy.clear()


def direct(bucket, moto_endpoint) -> S3Storage:
    """Storage that bypasses the proxy: what the bucket really holds."""
    return S3Storage(bucket, "lkd", S3Settings(endpoint_url=moto_endpoint))


def run(cfg, bucket, proxy, num_workers: int = 1, **opts) -> dict:
    return run_distributed(cfg, LaunchOptions(storage=f"s3://{bucket}/lkd", endpoint_url=proxy.url, num_workers=num_workers,
                                              **opts))


def put(key_regex: str) -> str:
    """A proxy pattern for the upload of one object (no spaces: it also travels over the control port)."""
    return rf"^PUT\s/\S+/{key_regex}\s"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def assert_consistent(st: S3Storage, run_name: str, res: dict, meta_every: int = 2) -> None:
    """Every applied round counted exactly once, all of it persisted, every pointer and manifest entry intact."""
    m, srv = res["metrics"], res["server"]
    rounds = m["steps_per_epoch"] * m["epoch"] // meta_every
    assert srv["version"] == rounds == res["server_version"] == res["server_accepted"], (rounds, srv)
    assert res["server_rejected"] == 0 and srv["persist_pending"] == 0 and srv["persisted_version"] == rounds, srv
    ptr = st.get_json(f"{run_name}/lossnet/latest.json")
    assert ptr["version"] == rounds and sha(st.get_bytes(ptr["key"])) == ptr["sha256"]
    store = VersionStore(st, f"{run_name}/lossnet")
    hashes = store.hashes()  # what the server(s) held at each version, hashed when it was applied
    versions = store.versions()
    assert sorted(hashes) == sorted(v for v, _ in versions)
    for v, key in versions:  # each stored version holds exactly its own state
        sd = st.get_torch(key)
        assert int(sd["version"]) == v and content_sha256(sd) == sd["state_sha256"] == hashes[v], key
    shards = [k for k in st.list(f"{run_name}/snapshots/manifest") if k.endswith(".json")]
    entries = [e for k in shards for e in st.get_json(k)["snapshots"]]
    assert entries and all(sha(st.get_bytes(e["key"])) == e["sha256"] for e in entries)
    keys = set(st.list(f"{run_name}/ray"))  # every checkpoint Ray Train registered is there, whole
    registered = json.loads(st.get_bytes(f"{run_name}/ray/checkpoint_manager_snapshot.json"))["checkpoint_results"]
    assert registered and all(f"{run_name}/ray/{c['checkpoint_dir_name']}/trainer.pt" in keys for c in registered)
    ck = st.get_torch(res["checkpoint"].split("/lkd/", 1)[1] + "/trainer.pt")
    assert ck["epoch"] == m["epoch"] and ck["lossnet_version"] == rounds  # the final checkpoint is the last epoch
    json.loads(st.get_bytes(f"{run_name}/result.json"), parse_constant=lambda c: pytest.fail(f"result.json holds {c}"))


# --------------------------------------------------------------------------- storage clients alone


def test_s3_calls_ride_out_short_outages_and_fail_beyond_the_bound_with_one_line(faults, s3_bucket, caplog):
    st = S3Storage(s3_bucket, "unit", S3Settings(endpoint_url=faults.url, outage_s=3))
    st.put_bytes("a", b"0")
    for mode in ("refuse", "reset", "blackhole"):  # shorter than the bound: a pause, one warning, one recovery line
        caplog.clear()
        faults.set_mode(mode, 1.0)
        with caplog.at_level(logging.WARNING, logger="lkd_ray.storage"):
            st.put_bytes("a", mode.encode())
        assert st.get_bytes("a") == mode.encode()
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 2 and "unreachable" in lines[0] and "retrying for up to 3 s" in lines[0], lines
        assert "reachable again" in lines[1], lines
    for mode, most in (("refuse", 5), ("reset", 5), ("blackhole", 2 * 3 + 2)):  # beyond: bounded, one line
        faults.set_mode(mode)
        t0 = time.monotonic()
        with pytest.raises(StorageUnavailable) as e:
            st.get_bytes("a")
        assert time.monotonic() - t0 < most, mode
        msg = str(e.value)
        assert "\n" not in msg and "unreachable" in msg and "--storage-outage-s" in msg and "rerun" in msg
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in msg  # never a credential
    faults.clear()
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="object not found"):  # a 4xx answer is final: no retrying
        st.get_bytes("missing")
    assert time.monotonic() - t0 < 1


def test_ray_trains_filesystem_keeps_its_retry_bound_when_pickled_and_rides_out_an_outage(faults, s3_bucket):
    """pyarrow's S3FileSystem drops its retry strategy when pickled (Ray ships it to the controller and
    workers); ours keeps it. A refused endpoint for 2 s is ridden out; a dead one fails within the bound,
    and the job maps pyarrow's error to one line."""
    import pickle

    from ray.train import WorkerGroupError

    fs, base = S3Storage(s3_bucket, "unit", S3Settings(endpoint_url=faults.url, outage_s=3)).arrow_fs()
    fs = pickle.loads(pickle.dumps(fs))
    assert fs._lkd_args[1] >= 7 and fs._lkd_args[0]["request_timeout"] == 3
    faults.set_mode("refuse", 2.0)
    with fs.open_output_stream(f"{base}/ray/ck.txt") as f:
        f.write(b"survived")
    with fs.open_input_stream(f"{base}/ray/ck.txt") as f:
        assert f.read() == b"survived"
    faults.set_mode("refuse")
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        with fs.open_output_stream(f"{base}/ray/ck2.txt") as f:
            f.write(b"x")
    assert 3 <= time.monotonic() - t0 < 10
    wrapped = WorkerGroupError("rank 0 failed", {0: RuntimeError("upload failed")})
    wrapped.worker_failures[0].__cause__ = e.value
    cause = storage_cause(wrapped)
    assert cause.startswith("Ray Train could not reach its checkpoint storage") and "\n" not in cause


# --------------------------------------------------------------------------- whole runs


def test_an_outage_over_lossnet_saves_blocks_no_round_and_loses_no_version(tmp_path, faults, s3_bucket, moto_endpoint):
    """Only the server's saves fail (a scoped reset from the save of v3 on; the storage layer retries it in the
    background within its 60 s bound) until after the end of epoch 1: rounds go on, and the save goes through."""
    faults.arm(put(r"saveout/lossnet/v3\.pt"), "reset", 600, scope="/lossnet/")
    probe = tmp_path / "probe.json"
    cb = ProbeServer("lkd-lossnet-saveout", 1, str(probe), faults.control_port, ["clear"])
    res = run(small_cfg("saveout", tmp_path), s3_bucket, faults, storage_outage_s=60, worker_callbacks=[cb])
    during = json.loads(probe.read_text())
    assert faults.faulted("lossnet/v3.pt")
    assert during["version"] == res["metrics"]["steps_per_epoch"] // 2  # every round of epoch 1 applied...
    assert during["persisted_version"] == 2 and during["persist_fatal"] is None  # ...while v3's save was retried
    assert res["metrics"]["epoch"] == 2 and res["server"]["version"] > during["version"]  # not frozen after it
    assert_consistent(direct(s3_bucket, moto_endpoint), "saveout", res)


def test_an_outage_over_a_checkpoint_registration_is_ridden_out(tmp_path, faults, s3_bucket, moto_endpoint):
    """Ray Train's controller writes its checkpoint registry after each report: every connection is reset
    for 8 s from the moment it does (Ray Train's own pyarrow retries give up after ~3 s; ours don't)."""
    faults.arm(put(r"regout/ray/checkpoint_manager_snapshot\.json"), "reset", 8)
    res = run(small_cfg("regout", tmp_path), s3_bucket, faults)
    tries = [x for x in faults.faulted("checkpoint_manager_snapshot.json") if x.startswith("PUT")]
    assert len(tries) >= 2  # the registration met the outage and was retried
    assert res["metrics"]["epoch"] == 2
    assert_consistent(direct(s3_bucket, moto_endpoint), "regout", res)


def test_a_30s_outage_during_training_costs_a_pause_not_the_run(tmp_path, faults, s3_bucket, moto_endpoint):
    """Two workers; the endpoint refuses every connection for 30 s from the moment Ray Train uploads the epoch-1
    checkpoint (its pyarrow filesystem retries), so the registration and our own calls (saves of loss-network
    versions falling behind) meet it too. Every version file holds exactly its own state (its hash)."""
    faults.arm(put(r"thirty/ray/checkpoint_[^/]+/\S*"), "refuse", 30)
    t0 = time.monotonic()
    res = run(small_cfg("thirty", tmp_path), s3_bucket, faults, num_workers=2)
    assert faults.faulted("/ray/checkpoint_") and time.monotonic() - t0 > 30
    assert res["metrics"]["epoch"] == 2
    assert_consistent(direct(s3_bucket, moto_endpoint), "thirty", res)


def test_a_blackholed_endpoint_beyond_the_bound_exits_3_with_one_line(tmp_path, faults, s3_bucket):
    """A job (its own driver, on this Ray cluster) with --storage-outage-s 3: the endpoint black-holes from the
    first loss-network update on. The job stops within seconds, exit code 3, one line that says what to do."""
    faults.arm(put(r"lossnet/v1\.pt"), "blackhole", 600)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "jobs/lkd_fashion.py", "--smoke", "--methods", "lkd", "--storage",
                          f"s3://{s3_bucket}/jobs", "--endpoint-url", faults.url, "--storage-outage-s", "3",
                          "--max-failures", "0", "--set", f"run.cache_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    took = time.monotonic() - t0
    assert faults.faulted("lossnet/v1.pt")
    assert out.returncode == 3, out.stderr[-3000:]
    errors = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "unreachable" in errors[0] and "outage bound of 3 s" in errors[0] and "rerun the same command" in errors[0]
    assert "testing" not in errors[0]  # no credentials
    assert took < 180


def test_a_persister_failure_that_is_not_storage_exits_4_and_the_rerun_resumes_from_the_newest_saved_version(
        tmp_path, capsys):
    """After epoch 1 the live server's version writer starts raising TypeError (a bug, not an outage). The job
    stops with exit code 4 and one line that names the cause; no saved version claims a φ it does not hold;
    the same command, the bug gone, resumes from the newest saved version and finishes."""
    from lkd_ray.storage import open_storage

    cfg = small_cfg("persistbug", tmp_path)
    args = parser("test", "fashion_mnist").parse_args(["--storage", str(tmp_path / "store"), "--max-failures", "0"])
    marker = tmp_path / "broken.json"
    with pytest.raises(SystemExit) as e:
        launch(cfg, args, worker_callbacks=[BreakPersister("lkd-lossnet-persistbug", 1, str(marker))])
    assert e.value.code == 4
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert "stopped saving loss-network versions: TypeError" in errors[0] and "rerunning resumes" in errors[0]
    assert "storage failed" not in errors[0]  # not mistaken for an outage
    before = json.loads(marker.read_text())  # the server when the writer broke: everything so far was saved
    store = VersionStore(open_storage(str(tmp_path / "store")), "persistbug/lossnet")
    saved = dict(store.versions())
    assert max(saved) == before["version"], (sorted(saved), before)  # nothing after the break was written
    for v, key in saved.items():
        sd = store.storage.get_torch(key)
        assert int(sd["version"]) == v and content_sha256(sd) == sd["state_sha256"]

    res = launch(cfg, args)
    m, srv = res["metrics"], res["server"]
    assert m["epoch"] == 2 and srv["restored_from"] == before["version"], srv
    assert srv["persist_fatal"] is None and srv["persisted_version"] == srv["version"] > before["version"]


def test_server_killed_before_its_first_save_and_after_one_loses_and_recounts_nothing(tmp_path, faults, s3_bucket,
                                                                                      moto_endpoint):
    """Kill 1 (end of epoch 1): no version was ever saved (every save reset from v0 on); the restarted server
    has nothing to restore and takes the workers' newer φ. Kill 2 (end of epoch 2): saves fail from v10 on,
    the server restores v9 and takes v14 from the workers. The run counts each of its 21 rounds once."""
    faults.arm(put(r"srvfaults/lossnet/v0\.pt"), "reset", 600, scope="/lossnet/")
    name = "lkd-lossnet-srvfaults"
    cbs = [ProbeServer(name, 1, str(tmp_path / "kill1.json"), faults.control_port,
                       ["clear", "arm reset 600 " + put(r"srvfaults/lossnet/v10\.pt") + " /lossnet/"], kill=True),
           ProbeServer(name, 2, str(tmp_path / "kill2.json"), faults.control_port, ["clear"], kill=True)]
    res = run(small_cfg("srvfaults", tmp_path, optim={"epochs": 3}), s3_bucket, faults, worker_callbacks=cbs)
    per_epoch = res["metrics"]["steps_per_epoch"] // 2
    k1, k2 = (json.loads((tmp_path / f"kill{i}.json").read_text()) for i in (1, 2))
    assert k1["version"] == per_epoch and k1["persisted_version"] is None  # killed before any save succeeded
    assert k2["version"] == 2 * per_epoch and k2["persisted_version"] == 9  # killed with v10… unsaved
    srv = res["server"]
    assert srv["restored_from"] == 9 and srv["adopted_from"]["worker_version"] == 2 * per_epoch
    assert srv["version"] == 3 * per_epoch > k2["version"] > k1["version"]  # rising after each fault
    assert srv["behind"] == 2 and srv["duplicates"] == 0
    assert_consistent(direct(s3_bucket, moto_endpoint), "srvfaults", res)


def test_a_final_registration_lost_beyond_the_bound_exits_clearly_and_the_rerun_registers_it(tmp_path, faults, s3_bucket,
                                                                                              moto_endpoint):
    """Storage goes down for good (bound 1 s) when Ray Train registers the last epoch's checkpoint: the run stops
    with a one-line storage error. The rerun, storage back, finds that checkpoint uploaded but unregistered,
    registers it instead of training on, and the result counts every round once."""
    cfg = small_cfg("lastreg", tmp_path)
    faults.arm(put(r"lastreg/ray/checkpoint_manager_snapshot\.json"), "reset", 600, after=1)  # epoch 2's registration
    with pytest.raises(Exception) as e:
        run(cfg, s3_bucket, faults, storage_outage_s=1)
    cause = storage_cause(e.value)
    assert cause and "\n" not in cause and "storage" in cause, e.value
    assert [x for x in faults.faulted("checkpoint_manager_snapshot.json") if x.startswith("PUT")]
    st = direct(s3_bucket, moto_endpoint)
    assert not st.exists("lastreg/result.json")
    faults.clear()
    res = run(cfg, s3_bucket, faults, storage_outage_s=1)
    assert res["metrics"]["epoch"] == 2 and res["server"]["duplicates"] == 0  # nothing trained or applied twice
    assert_consistent(st, "lastreg", res)


# --------------------------------------------------------------------------- corrupt and unreadable objects


def test_a_truncated_latest_version_falls_back_to_the_newest_intact_one_with_a_warning(tmp_path, s3_bucket,
                                                                                      moto_endpoint, caplog):
    uri = f"s3://{s3_bucket}/lkd"
    cfg = small_cfg("trunc", tmp_path)
    core = LossNetServerCore(cfg, uri, "trunc", endpoint_url=moto_endpoint)
    for r in range(3):
        assert core.submit("trunc", r, torch.randn(core.opt.numel) * 0.01, r)["accepted"]
    assert core.drain_once()
    st = direct(s3_bucket, moto_endpoint)
    ptr = st.get_json("trunc/lossnet/latest.json")
    assert ptr["version"] == 3
    st.put_bytes(ptr["key"], st.get_bytes(ptr["key"])[:100])  # the pointer's target, truncated
    with caplog.at_level(logging.WARNING):
        again = LossNetServerCore(cfg, uri, "trunc", endpoint_url=moto_endpoint)
    assert again.version == 2 and again.stats["restored_from"] == 2
    assert any("version 3" in r.getMessage() and ("corrupt" in r.getMessage() or "does not load" in r.getMessage())
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert again.submit("trunc", 3, torch.randn(again.opt.numel) * 0.01, 2)["accepted"] and again.drain_once()
    ptr = st.get_json("trunc/lossnet/latest.json")  # the next update replaces the corrupt object: intact again
    assert ptr["version"] == 3 and sha(st.get_bytes(ptr["key"])) == ptr["sha256"]


def test_a_transient_snapshot_read_error_is_retried_and_never_marks_it_corrupt(faults, s3_bucket, caplog):
    uri = f"s3://{s3_bucket}/lkd"
    index, loaders = start_snapshot_pool(uri, "tr", "uniform", 0, num_loaders=1, cache_bytes=0, endpoint_url=faults.url,
                                         namespace_name="tr-test", outage_s=2.5, object_bytes=0)  # every draw reads storage
    store = RaySnapshotStore(uri, "tr", index, loaders, record=True, endpoint_url=faults.url, prefetch=False, outage_s=2.5)
    try:
        for step in (1, 2, 3):
            store.record(step, {"w": torch.full((4,), float(step))})
        store.flush()
        faults.set_mode("reset", 1.0)  # shorter than the loader's bound: retried, loaded
        assert store.sample() is not None and faults.faulted("/tr/snapshots/")
        faults.set_mode("refuse")  # longer: this draw starts from the current student
        with caplog.at_level(logging.WARNING, logger="lkd_ray.distributed.snapshot_pool"):
            assert store.sample() is None
        assert store.transient_seen == 1 and store.corrupt_seen == 0
        assert any("stays in the pool" in r.getMessage() for r in caplog.records)
        faults.clear()
        seen = {store.sample()["w"][0].item() for _ in range(30)}
        assert seen == {1.0, 2.0, 3.0}  # none was dropped
        assert ray.get(index.stats.remote())["corrupt_skipped"] == 0
    finally:
        for a in [index, *loaders]:
            ray.kill(a)


def test_snapshot_draws_never_wait_on_a_storage_put_and_accounting_survives_a_re_record(faults, s3_bucket):
    """Storage black-holes every PUT: recording a snapshot returns at once (stored and indexed in the
    background), and every rank's draws keep being served from what the index holds. A resumed run records a
    snapshot again: the object-store bytes count it once."""
    uri = f"s3://{s3_bucket}/lkd"
    index, loaders = start_snapshot_pool(uri, "np", "uniform", 0, num_loaders=1, endpoint_url=faults.url,
                                         namespace_name="np-test", outage_s=30)
    store = RaySnapshotStore(uri, "np", index, loaders, record=True, endpoint_url=faults.url, prefetch=False, outage_s=30)
    try:
        for step in (1, 2):
            store.record(step, {"w": torch.full((256,), float(step))})
        store.flush()
        size = ray.get(index.entries_list.remote())[0]["size"]
        faults.arm(r"^PUT\s", "blackhole", 600)  # every upload from now on hangs
        t0 = time.monotonic()
        store.record(3, {"w": torch.full((256,), 3.0)})  # queued: the step goes on
        draws = [store.sample()["w"][0].item() for _ in range(20)]
        assert time.monotonic() - t0 < 5 and set(draws) <= {1.0, 2.0}
        again = ray.get(index.record.remote({"key": "np/snapshots/2.pt", "size": size, "sha256": "x", "step": 2},
                                            {"w": torch.full((256,), 2.0)}))  # the index answers while its PUTs hang
        assert again == 2
        st = ray.get(index.stats.remote())
        assert st["object_store_bytes"] == 2 * size and st["object_store_snapshots"] == 2  # re-recorded: counted once
        assert time.monotonic() - t0 < 10
        faults.clear()
        store.flush()  # once storage is back, the queued snapshot is stored and indexed
        assert len(store) == 3 and ray.get(index.flush.remote(30))
    finally:
        faults.clear()
        for a in [index, *loaders]:
            ray.kill(a)


@pytest.mark.parametrize("mode", ["async", "es"])
def test_an_async_or_es_persister_failure_exits_4_with_its_own_message(tmp_path, capsys, mode):
    """As the sync test above, through the job's launch with ``--mode async`` (two ranks submitting on their own),
    and with two ES particles: after epoch 1 the server's version writer breaks; the job stops with exit code 4
    and one line that names the cause — it neither hangs in a worker's flush() nor waits out an ES round."""
    name = f"persist{mode}"
    extra = {"meta": {"estimator": "es", "es_particles": 2, "meta_every": 3, "es_sigma": 0.5}} if mode == "es" else {}
    cfg = small_cfg(name, tmp_path, **extra)
    args = parser("test", "fashion_mnist").parse_args(
        ["--storage", str(tmp_path / "store"), "--max-failures", "0", "--num-workers", "2"]
        + (["--mode", "async"] if mode == "async" else []))
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as e:
        launch(cfg, args, worker_callbacks=[BreakPersister(f"lkd-lossnet-{name}", 1, str(tmp_path / "broken.json"))])
    assert e.value.code == 4
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "stopped saving loss-network versions: TypeError" in errors[0], errors
    assert time.monotonic() - t0 < 300  # an ES particle waiting for its round would have taken 600 s
