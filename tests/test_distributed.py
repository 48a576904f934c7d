"""Distributed LKD on a real local Ray cluster (127.0.0.1) with real storage: local folders and a
moto_server S3 endpoint. Each run is small (generated 16×16 data) so the module fits CI's budget."""
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from lkd_ray.config import build_config  # noqa: E402
from lkd_ray.data import build_data  # noqa: E402
from lkd_ray.distributed.launch import LaunchOptions, RunConflict, run_distributed  # noqa: E402
from lkd_ray.distributed.snapshot_pool import MANIFEST_SHARD, RaySnapshotStore, SnapshotIndex, start_snapshot_pool  # noqa: E402
from lkd_ray.distributed.worker import read_metrics  # noqa: E402
from lkd_ray.models import build_model, load_weights  # noqa: E402
from lkd_ray.storage import LocalStorage, S3Settings, S3Storage, StorageError  # noqa: E402
from lkd_ray.train import build_run  # noqa: E402
from tests.faults import CrashOnce, KillServerOnce  # noqa: E402

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
    assert ray.get(idx.flush.remote(30))  # the manifest is written in the background: wait for it
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


def test_manifest_is_sharded_so_writes_stay_constant_and_max_snapshots_bounds_the_index(tmp_path):
    st = LocalStorage(tmp_path)
    idx = SnapshotIndex.remote(str(tmp_path), "m", "uniform", 0)
    n = 2 * MANIFEST_SHARD + 10
    for step in range(n):
        ray.get(idx.record.remote({"key": f"m/snapshots/{step}.pt", "size": 1, "sha256": "x", "step": step}))
    assert ray.get(idx.flush.remote(30))
    shards = sorted((tmp_path / "m" / "snapshots" / "manifest").glob("*.json"))
    assert len(shards) == 3
    sizes = [len(json.loads(p.read_text())["snapshots"]) for p in shards]
    assert sizes == [MANIFEST_SHARD, MANIFEST_SHARD, 10]  # the last record rewrote 10 entries, not 522
    assert ray.get(SnapshotIndex.remote(str(tmp_path), "m", "uniform", 1).stats.remote())["snapshots"] == n
    # bounded: the oldest leave the index *and* storage
    for step in range(6):
        st.put_torch(f"b/snapshots/{step}.pt", {"w": torch.tensor(float(step))})
    b = SnapshotIndex.remote(str(tmp_path), "b", "uniform", 0, None, 4)
    for step in range(6):
        ray.get(b.record.remote({"key": f"b/snapshots/{step}.pt", "size": 1, "sha256": "x", "step": step}))
    assert ray.get(b.flush.remote(30))
    assert ray.get(b.stats.remote())["snapshots"] == 4 and ray.get(b.stats.remote())["evicted"] == 2
    assert sorted(p.name for p in (tmp_path / "b" / "snapshots").glob("*.pt")) == ["2.pt", "3.pt", "4.pt", "5.pt"]
    assert {d["step"] for d in ray.get([b.sample.remote() for _ in range(100)])} == {2, 3, 4, 5}
    assert ray.get(SnapshotIndex.remote(str(tmp_path), "b", "uniform", 0, None, 4).stats.remote())["snapshots"] == 4


def test_corrupted_snapshot_is_skipped_with_a_warning(tmp_path, caplog):
    # object_bytes=0: every draw is read from storage, where the corruption is
    index, loaders = start_snapshot_pool(str(tmp_path), "c", "uniform", 0, num_loaders=2, namespace_name="c-test", object_bytes=0)
    store = RaySnapshotStore(str(tmp_path), "c", index, loaders, record=True)
    for step in range(1, 5):
        store.record(step, {"w": torch.full((4,), float(step))})
    store.flush()  # recorded in the background: stored and indexed now
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


def test_draws_come_from_the_object_store_within_its_bound_and_a_lost_copy_falls_back_to_storage(tmp_path):
    index, loaders = start_snapshot_pool(str(tmp_path), "o", "uniform", 0, num_loaders=1, namespace_name="o-test")
    store = RaySnapshotStore(str(tmp_path), "o", index, loaders, record=True)
    for step in range(1, 4):
        store.record(step, {"w": torch.full((1000,), float(step))})
    store.flush()
    assert all(store.sample()["w"][0].item() in (1.0, 2.0, 3.0) for _ in range(10))
    assert store.stats()["from_object_store"] == 10 and store.stats()["from_storage"] == 0
    size = ray.get(index.entries_list.remote())[0]["size"]
    # bounded: with room for two, the object store keeps the newest two and the others are read from storage
    bi, bl = start_snapshot_pool(str(tmp_path), "ob", "uniform", 0, num_loaders=1, namespace_name="ob-test",
                                 object_bytes=2 * size + 10)
    bounded = RaySnapshotStore(str(tmp_path), "ob", bi, bl, record=True)
    for step in range(1, 6):
        bounded.record(step, {"w": torch.full((1000,), float(step))})
    bounded.flush()
    st = ray.get(bi.stats.remote())
    assert st["object_store_snapshots"] == 2 and st["object_store_bytes"] <= st["object_store_limit"]
    seen = {bounded.sample()["w"][0].item() for _ in range(60)}
    assert seen == {1.0, 2.0, 3.0, 4.0, 5.0} and bounded.stats()["from_storage"] > 0 and bounded.stats()["from_object_store"] > 0
    # a copy that cannot be read (lost with its node, or never arriving) is read from storage instead
    li, ll = start_snapshot_pool(str(tmp_path), "ol", "uniform", 0, num_loaders=1, namespace_name="ol-test")
    lost = RaySnapshotStore(str(tmp_path), "ol", li, ll, record=True, copy_timeout_s=1.0)
    lost.record(7, {"w": torch.full((1000,), 7.0)})
    lost.flush()
    entry = ray.get(li.sample.remote(0))

    @ray.remote(num_cpus=0)
    def never():  # an object that does not arrive
        time.sleep(3600)

    stuck = never.remote()
    entry["ref"] = [stuck]
    out = lost._resolve(entry)
    assert out["error"] is None and out["state"]["w"][0].item() == 7.0 and lost.stats()["lost_copies"] == 1
    assert lost.stats()["from_storage"] == 1
    ray.cancel(stuck, force=True)
    for a in [index, *loaders, bi, *bl, *ll]:
        ray.kill(a)


def test_two_worker_lkd_run_on_s3(tmp_path, s3_bucket, moto_endpoint):
    cfg = small_cfg("e2e", tmp_path)
    res = run_distributed(cfg, LaunchOptions(storage=f"s3://{s3_bucket}/lkd", endpoint_url=moto_endpoint, num_workers=2))
    st = S3Storage(s3_bucket, "lkd", S3Settings(endpoint_url=moto_endpoint))
    keys = st.list("e2e")
    steps_per_rank = (460 // 2) // 32  # 10 % quiz held out of 512, sharded over 2 ranks, drop_last
    rounds = 2 * steps_per_rank // 2
    assert res["metrics"]["epoch"] == 2
    # the ranks all-reduce their meta-gradients: one submission and one update per round
    assert res["server"]["rounds"] == rounds and res["server"]["submitted"] == rounds and res["server"]["rejected"] == 0
    assert res["server"]["version"] == rounds == res["server_version"] and res["server_accepted"] == rounds
    snaps = [k for k in keys if k.startswith("e2e/snapshots/") and k.endswith(".pt")]
    assert len(snaps) == (2 * steps_per_rank) // 3 and "e2e/snapshots/manifest/00000.json" in keys
    manifest = st.get_json("e2e/snapshots/manifest/00000.json")["snapshots"]
    assert all(st.get_torch(e["key"], expect_sha256=e["sha256"]) for e in manifest)
    assert {f"e2e/lossnet/v{v}.pt" for v in range(0, rounds + 1)} <= set(keys) and "e2e/lossnet/latest.json" in keys
    assert st.get_json("e2e/lossnet/latest.json")["version"] == rounds  # every version persisted
    assert any(k.startswith("e2e/ray/checkpoint_") and k.endswith("trainer.pt") for k in keys)
    assert any(k.endswith("student.pt") for k in keys)
    tb = sorted(k for k in keys if k.startswith("e2e/logs/tb/events.out.tfevents"))  # TensorBoard-readable, in the bucket
    assert len(tb) == 2 and tb[0].endswith(".epoch00001") and tb[1].endswith(".epoch00002")  # one new file per epoch
    metrics = read_metrics(st, "e2e")  # one object per epoch, each written once: no re-upload of the history
    assert [m["epoch"] for m in metrics] == [1, 2] and sorted(k for k in keys if "/logs/metrics/" in k) == [
        "e2e/logs/metrics/epoch-00001.jsonl", "e2e/logs/metrics/epoch-00002.jsonl"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for k in tb:
        (tmp_path / "tb").mkdir(exist_ok=True)
        (tmp_path / "tb" / k.rsplit("/", 1)[1]).write_bytes(st.get_bytes(k))
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert len(acc.Scalars("test_top1")) == 2  # TensorBoard reads both epochs' files as one run
    result = json.loads(st.get_bytes("e2e/result.json"), parse_constant=lambda c: pytest.fail(f"result.json holds {c}"))
    assert result["server_accepted"] == rounds and result["run"] == "e2e" and result["server_rejected"] == 0
    assert result["server"]["meta_from_snapshot"] > 0  # counted where the update is applied, from every rank's starts


def test_every_rank_starts_meta_steps_from_uniformly_drawn_snapshots(tmp_path):
    """Bug: only the recording rank ever drew. Now each rank draws, and each draw is uniform over the
    snapshots recorded by then (chi-square against the expected counts given each draw's live count)."""
    from scipy.stats import chisquare

    cfg = small_cfg("draws", tmp_path, data={"synthetic_size": 2048, "batch_size": 16},
                    meta={"meta_every": 1, "p_snapshot": 1.0, "snapshot_every": 4}, optim={"epochs": 1})
    res = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store"), num_workers=2))
    draws = json.loads((tmp_path / "store" / "draws" / "snapshots" / "draws.json").read_text())
    assert set(draws) == {"0", "1"}
    for rank, pairs in draws.items():
        assert len(pairs) > 40, (rank, len(pairs))
        n_max = max(n for _, n in pairs)
        observed = np.bincount([i for i, _ in pairs], minlength=n_max)
        expected = np.zeros(n_max)
        for _, n in pairs:
            expected[:n] += 1.0 / n
        keep = expected >= 1.0  # pool the sparse tail so chi-square's expectations stay ≥ 1
        obs = np.append(observed[keep], observed[~keep].sum())
        exp = np.append(expected[keep], expected[~keep].sum())
        obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
        assert chisquare(obs, exp).pvalue > 1e-3, (rank, obs, exp)
    # both ranks start every meta-step from a snapshot once the first one exists (recorded after step 4)
    assert res["server"]["meta_from_snapshot"] == 2 * (res["server"]["rounds"] - 4)


def test_one_ray_worker_reproduces_the_single_process_trainer(tmp_path, monkeypatch):
    cfg = small_cfg("equiv", tmp_path, meta={"p_snapshot": 0.0})
    monkeypatch.chdir(tmp_path)  # a relative --storage must reach workers, whose working directory differs
    store = tmp_path / "store"
    run_distributed(cfg, LaunchOptions(storage="store", num_workers=1))
    st = LocalStorage(store)
    ptr = st.get_json("equiv/lossnet/latest.json")
    ray_phi = st.get_torch(ptr["key"], expect_sha256=ptr["sha256"])["lossnets"]
    data = build_data(cfg.data, cfg.run.seed)
    teacher = build_model(cfg.model.teacher, data.num_classes, data.in_channels)
    load_weights(teacher, st.get_torch("equiv/teacher.pt"), cfg.model.teacher)
    torch.set_num_threads(1)
    try:
        run = build_run(cfg, data=data, teacher=teacher)
        run.fit(progress=False)
    finally:
        torch.set_num_threads(2)
    assert ptr["version"] == run.trainer.meta.version() > 0
    for k, v in run.trainer.lossnets.state_dict().items():
        torch.testing.assert_close(ray_phi[k], v, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in ray_phi.values())


def test_lossnet_server_killed_mid_run_restores_and_the_run_finishes(tmp_path):
    cfg = small_cfg("srvkill", tmp_path, optim={"epochs": 3})
    marker = tmp_path / "killed"
    ns = None
    res = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store"), num_workers=1,
                                             worker_callbacks=[KillServerOnce("lkd-lossnet-srvkill", 1, str(marker), ns)]))
    assert marker.exists()
    assert res["metrics"]["epoch"] == 3
    srv = res["server"]
    assert srv["restored_from"] is not None and srv["restored_from"] > 0
    steps = res["metrics"]["steps_per_epoch"] * 3
    assert srv["version"] == steps // 2 == srv["meta_accepted"]  # every round applied exactly once across the restart


def _whole_and_crashed_once(base, cut_name: str, tmp_path: Path) -> tuple[dict, dict]:
    """The same config run twice on two workers: whole (storage ``a``), and under ``cut_name`` (storage ``b``) with
    rank 1 crashing once after epoch 1 and Ray Train restarting the group from the last checkpoint."""
    whole = run_distributed(base, LaunchOptions(storage=str(tmp_path / "a"), num_workers=2))
    cut = base.model_copy(deep=True)
    cut.run.name = cut_name
    marker = tmp_path / "crashed"
    resumed = run_distributed(cut, LaunchOptions(storage=str(tmp_path / "b"), num_workers=2, max_failures=1,
                                                 worker_callbacks=[CrashOnce(1, 1, str(marker))]))
    assert marker.exists(), "the crash never happened: the test would compare two uninterrupted runs"
    return whole, resumed


def test_killed_and_resumed_run_ends_where_an_uninterrupted_run_ends(tmp_path):
    """Same seeds, CPU, gloo: the resumed run is equal to the uninterrupted one. (p_snapshot = 0: a snapshot
    draw already prefetched when a worker dies is drawn again after the restart, which changes later draws.)"""
    base = small_cfg("whole", tmp_path, optim={"epochs": 3}, meta={"p_snapshot": 0.0})
    whole, resumed = _whole_and_crashed_once(base, "cut", tmp_path)
    assert resumed["metrics"]["epoch"] == 3
    a = torch.load(Path(whole["checkpoint"]) / "trainer.pt", weights_only=True)
    b = torch.load(Path(resumed["checkpoint"]) / "trainer.pt", weights_only=True)
    assert b["epoch"] == 3 and len(b["history"]) == 3 and b["lossnet_version"] == resumed["server"]["version"]
    for k, v in a["student"].items():
        assert torch.equal(v, b["student"][k]), k
    for k, v in a["lossnets"].items():
        assert torch.equal(v, b["lossnets"][k]), k
    assert whole["metrics"]["test_top1"] == resumed["metrics"]["test_top1"]
    assert [m["epoch"] for m in read_metrics(LocalStorage(tmp_path / "b"), "cut")] == [1, 2, 3]  # both attempts' epochs


def test_async_mode_end_to_end_on_two_workers(tmp_path):
    cfg = small_cfg("async", tmp_path)
    res = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store"), num_workers=2, mode="async", max_staleness=8))
    srv = res["server"]
    steps_per_rank = (460 // 2) // 32
    submitted = 2 * (2 * steps_per_rank // 2)  # every rank submits each of its meta-steps
    assert res["metrics"]["epoch"] == 2 and srv["submitted"] == submitted
    assert srv["accepted"] + srv["rejected"] == submitted and srv["accepted"] > 0  # per submission
    # arrivals batched into steps: one Adam step (= one version) per batch of one or more submissions
    assert 0 < srv["version"] == srv["meta_accepted"] == srv["batches"] <= srv["accepted"]
    # each rank collected its calls: together they saw every submission and its outcome, as the server did
    assert res["client_submitted"] == submitted and res["client_errors"] == 0
    assert (res["client_accepted"], res["client_rejected"]) == (srv["accepted"], srv["rejected"])
    assert len(res["clients"]) == 2


def test_an_async_client_counts_what_the_server_refused_it(tmp_path):
    """Staleness 0 with two ranks submitting on their own: the server refuses the late ones, and the ranks know."""
    cfg = small_cfg("async0", tmp_path, meta={"meta_every": 1, "p_snapshot": 0.0}, optim={"epochs": 1})
    res = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store"), num_workers=2, mode="async", max_staleness=0))
    srv = res["server"]
    assert srv["rejected"] > 0 and res["client_rejected"] == srv["rejected"] > 0
    assert sum(c["rejected_reasons"].get("stale", 0) for c in res["clients"]) == srv["rejected_reasons"]["stale"]
    assert res["server_rejected"] == srv["rejected"]  # each refusal counted once


def test_es_particles_are_workers_and_the_server_turns_losses_into_updates(tmp_path):
    cfg = small_cfg("es", tmp_path, meta={"estimator": "es", "es_particles": 2, "meta_every": 3, "es_sigma": 0.5, "lr": 0.05},
                    optim={"epochs": 1})
    with pytest.raises(RunConflict, match="one particle per worker"):
        run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store"), num_workers=1))
    res = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store2"), num_workers=2))
    steps = (460 // 32)  # each particle trains on the whole training split
    srv = res["server"]
    assert srv["rounds"] == steps // 3 == srv["version"] and srv["submitted"] == 2 * (steps // 3)
    st = LocalStorage(tmp_path / "store2")
    v0 = st.get_torch("es/lossnet/v0.pt")["lossnets"]
    vn = st.get_torch(f"es/lossnet/v{srv['version']}.pt")["lossnets"]
    moved = [k for k in v0 if not torch.equal(v0[k], vn[k])]
    assert moved == ["logit.g.4.weight"]  # only the perturbed last layer moves


def test_es_on_ray_follows_the_same_phi_trajectory_as_es_in_one_process(tmp_path):
    """Two particles as Ray workers and the same two particles in one process, same seed and one thread: every
    version of the centre φ is the same (same rounds, same noise, the meta lr schedule applied alike)."""
    cfg = small_cfg("esq", tmp_path, meta={"estimator": "es", "es_particles": 2, "meta_every": 3, "es_sigma": 0.5,
                                           "lr": 0.05, "lr_schedule": "student"},
                    run={"threads": 1}, optim={"epochs": 2})
    res = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "ray"), num_workers=2))
    st = LocalStorage(tmp_path / "ray")
    data = build_data(cfg.data, cfg.run.seed)
    teacher = build_model(cfg.model.teacher, data.num_classes, data.in_channels)
    load_weights(teacher, st.get_torch("esq/teacher.pt"), cfg.model.teacher)
    try:
        local = build_run(cfg, data=data, teacher=teacher)
        local.fit(tmp_path / "local", progress=False)
    finally:
        torch.set_num_threads(2)
    assert res["server"]["version"] == local.trainer.meta.version() == res["server"]["meta_accepted"] > 0
    ray_v = {v: st.get_torch(f"esq/lossnet/v{v}.pt")["lossnets"] for v in range(res["server"]["version"] + 1)}
    final = local.trainer.meta.lossnets.state_dict()
    for k, v in final.items():
        assert torch.equal(ray_v[res["server"]["version"]][k], v), k
    for f in sorted((tmp_path / "local" / "lossnet").glob("v*.pt")):  # the per-epoch versions saved in one process
        v = int(f.stem[1:])
        mine = torch.load(f, weights_only=True)["lossnets"]
        assert all(torch.equal(mine[k], ray_v[v][k]) for k in mine), f.name


def test_a_resumed_es_run_gives_every_particle_back_its_own_student(tmp_path):
    """ES on Ray, a particle killed after epoch 1 and the group restarted: every particle resumes from its own
    checkpointed student, quiz position and perturbation, so the run ends exactly where an uninterrupted one
    ends (one thread, same seed) — particle 1's student included, which it could not if it resumed from rank 0's."""
    base = small_cfg("esw", tmp_path, meta={"estimator": "es", "es_particles": 2, "meta_every": 3, "es_sigma": 0.5,
                                            "lr": 0.05}, run={"threads": 1}, optim={"epochs": 2})
    whole, resumed = _whole_and_crashed_once(base, "esc", tmp_path)
    assert resumed["metrics"]["epoch"] == 2
    for name in ("trainer.pt", "particle-001.pt"):
        a = torch.load(Path(whole["checkpoint"]) / name, weights_only=True)
        b = torch.load(Path(resumed["checkpoint"]) / name, weights_only=True)
        assert a["epoch"] == b["epoch"] == 2
        for k, v in a["student"].items():
            assert torch.equal(v, b["student"][k]), (name, k)
    s0 = torch.load(Path(resumed["checkpoint"]) / "trainer.pt", weights_only=True)["student"]
    s1 = torch.load(Path(resumed["checkpoint"]) / "particle-001.pt", weights_only=True)["student"]
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)  # the particles' students are their own
    assert resumed["server"]["version"] == whole["server"]["version"] > 0
    a_phi = LocalStorage(tmp_path / "a").get_torch(f"esw/lossnet/v{whole['server']['version']}.pt")["lossnets"]
    b_phi = LocalStorage(tmp_path / "b").get_torch(f"esc/lossnet/v{resumed['server']['version']}.pt")["lossnets"]
    for k, v in a_phi.items():
        assert torch.equal(v, b_phi[k]), k


def test_a_changed_config_under_an_existing_run_name_stops_and_an_unchanged_one_reuses(tmp_path, capsys):
    cfg = small_cfg("named", tmp_path, loss={"method": "kd"}, optim={"epochs": 1})
    first = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store"), num_workers=1))
    again = run_distributed(cfg, LaunchOptions(storage=str(tmp_path / "store"), num_workers=1))
    assert again["metrics"] == first["metrics"] and "already finished with this config" in capsys.readouterr().err
    other = cfg.model_copy(deep=True)
    other.optim.epochs = 2
    with pytest.raises(RunConflict, match=r"optim.epochs: 1 → 2.*--set run.name=NEW"):
        run_distributed(other, LaunchOptions(storage=str(tmp_path / "store"), num_workers=1))


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
    submitted = subprocess.run([sys.executable, "jobs/lkd_fashion.py", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                               timeout=120, env={**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}", "LKD_STORAGE": ""})
    assert submitted.returncode == 2 and "pass --storage" in submitted.stderr  # under `ray job submit`, no silent temp dir
    assert time.time() - t0 < 200


def test_a_job_shows_phases_one_line_per_epoch_and_the_results_not_worker_chatter(tmp_path):
    """What a user sees: the run's phases, a short line per epoch and the final table; no worker logs,
    progress bars from inside Ray workers or report reprs. Rerunning with another config under the same
    name stops with the difference; rerunning unchanged shows the finished result."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    cmd = [sys.executable, "jobs/lkd_fashion.py", "--smoke", "--storage", str(tmp_path / "store")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("== lkd-") == 2 and "kd: test top-1" in out.stdout and "lkd: test top-1" in out.stdout
    err_lines = [x for x in out.stderr.replace("\r", "\n").splitlines() if x.strip()]
    assert sum("epoch 1/1" in x for x in err_lines) == 2
    noise = [x for x in err_lines if "TrainingReport" in x or "RayTrainWorker" in x or "pid=" in x]
    assert not noise, noise[:5]
    changed = subprocess.run(cmd + ["--set", "optim.lr=0.01"], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert changed.returncode == 2 and "optim.lr: 0.05 → 0.01" in changed.stderr and "run.name" in changed.stderr
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "already finished with this config" in again.stderr


def test_a_worker_that_meets_bad_input_exits_2_with_the_same_one_line(tmp_path, capfd):
    """Bad input the driver could not see, met by a worker: Ray Train wraps it; the job still names the input in one
    last line, exit 2, no traceback on the console."""
    from tests.faults import RaiseBadInput

    sys.path.insert(0, str(ROOT / "jobs"))
    from _common import launch, parser

    cfg = small_cfg("workerbad", tmp_path, loss={"method": "ce"}, optim={"epochs": 1})
    args = parser("t", "fashion_mnist").parse_args(["--storage", str(tmp_path / "store"), "--max-failures", "0"])
    with pytest.raises(SystemExit) as e:
        launch(cfg, args, worker_callbacks=[RaiseBadInput()])
    out, err = capfd.readouterr()
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip()]
    assert e.value.code == 2, err[-3000:]
    assert lines[-1] == "error: data.root /d/train-images-idx3-ubyte.gz: is not a complete gzip file — copy it again"
    assert "Traceback" not in out + err, (out + err)[-3000:]
def _persister_broken(server, after_version: int) -> None:
    """Once ``after_version`` is saved, the live server's version writer raises what a bug would; returns once the
    persister stopped on the next version (the actor runs the change itself, through ``__ray_call__``)."""
    from tests.faults import _break_version_writer

    deadline = time.monotonic() + 60
    while ray.get(server.report.remote())["persisted_version"] != after_version and time.monotonic() < deadline:
        time.sleep(0.05)
    ray.get(server.__ray_call__.remote(_break_version_writer))


def _wait_fatal(server) -> None:
    deadline = time.monotonic() + 60
    while ray.get(server.report.remote())["persist_fatal"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ray.get(server.report.remote())["persist_fatal"], "the broken persister never stopped"


def test_an_async_submission_after_the_persister_stopped_gets_the_error_not_a_hang(tmp_path):
    """apply_batch raised and ended the batcher with the batch's futures unset: every worker's flush() blocked
    forever. Now each submission of the batch gets the persister's error."""
    from lkd_ray.distributed.lossnet_server import LossNetPersistError, LossNetServer

    server = LossNetServer.remote(small_cfg("asyncbug", tmp_path), str(tmp_path / "store"), "asyncbug", "async", 4)
    n = ray.get(server.get.remote(-1))[1].numel()
    _persister_broken(server, 0)
    assert ray.get(server.submit_async.remote("a", 0, torch.zeros(n), 0), timeout=30)["accepted"]  # v1, never saved
    _wait_fatal(server)
    refs = [server.submit_async.remote(s, 1, torch.zeros(n), 1) for s in ("a", "b")]
    for ref in refs:
        with pytest.raises(LossNetPersistError, match="stopped saving loss-network versions: TypeError"):
            ray.get(ref, timeout=30)
    assert ray.get(server.report.remote())["version"] == 1  # no step after the persister stopped
    ray.kill(server)


def test_es_particles_waiting_for_a_round_stop_when_the_persister_stopped_not_after_600_s(tmp_path):
    from lkd_ray.distributed.lossnet_server import LossNetPersistError, LossNetServer

    cfg = small_cfg("esbug", tmp_path, meta={"estimator": "es", "es_particles": 2})
    server = LossNetServer.remote(cfg, str(tmp_path / "store"), "esbug", "es", 4, particles=2)
    ray.get([server.es_report.remote(p, 0, 1.0 + p) for p in (0, 1)], timeout=30)  # round 0 closes: v1
    _persister_broken(server, 1)
    done, _ = ray.wait([server.es_report.remote(p, 1, 1.0 + p) for p in (0, 1)], num_returns=2, timeout=30)
    assert len(done) == 2  # round 1 closed (v2, whose save fails: its answers may carry that error already)
    _wait_fatal(server)
    waiting = server.es_report.remote(0, 2, 1.0)  # particle 0 reports round 2 and would wait for particle 1
    closing = server.es_report.remote(1, 2, 2.0)
    for ref in (waiting, closing):
        with pytest.raises(LossNetPersistError, match="stopped saving loss-network versions"):
            ray.get(ref, timeout=30)
    ray.kill(server)
