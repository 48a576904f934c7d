"""LossNetServer logic (rounds, validation, async batching, ES, persistence, restores) without Ray."""
import hashlib
import json

import pytest
import torch

from lkd_ray.config import build_config
from lkd_ray.distributed.lossnet_server import LossNetServerCore
from lkd_ray.losses import build_lossnets
from lkd_ray.meta import ESEstimator, LossNetOptimizer, es_index, flatten


def _core(tmp_path, mode="sync", staleness=1, particles=0, **meta):
    cfg = build_config("fashion_mnist", lossnet={"hidden": [4]}, meta={"lr": 0.01, "clip_norm": 100.0, **meta})
    return cfg, LossNetServerCore(cfg, str(tmp_path), "run", mode, staleness, particles=particles)


def _grad(core, fill=None):
    return torch.full((core.opt.numel,), fill) if fill is not None else torch.randn(core.opt.numel)


def test_a_leader_round_applies_at_once_like_local_adam(tmp_path):
    cfg, core = _core(tmp_path)
    ref = build_lossnets(cfg.loss, cfg.lossnet, cfg.run.seed)
    assert torch.equal(flatten(list(ref.parameters())), core.get()[1])  # same φ0 as every worker
    g = _grad(core)
    r = core.submit("trainer", 0, g, 0)
    assert r["accepted"] and core.version == 1 and core.stats["rounds"] == 1
    local = LossNetOptimizer(ref, 0.01, 100.0)
    local.submit(g)
    torch.testing.assert_close(flatten(list(ref.parameters())), core.get()[1])


@pytest.mark.parametrize("make,reason", [
    (lambda c: [g.tolist() for g in [_grad(c, 1.0)]][0], "wrong type"),
    (lambda c: _grad(c, 1.0)[:-1], "wrong size"),
    (lambda c: _grad(c, 1.0).long(), "wrong dtype"),
    (lambda c: _grad(c, 1.0).view(1, -1), "wrong size"),
])
def test_bad_submissions_are_rejected_and_counted(tmp_path, make, reason):
    _, core = _core(tmp_path)
    before = core.get()[1]
    r = core.submit("trainer", 0, make(core), 0)
    assert not r["accepted"] and reason in r["reason"]
    assert core.stats["rejected"] == 1 and core.version == 0 and torch.equal(before, core.get()[1])
    for bad in (float("nan"), -1.0, 1e9, "x", True):
        assert "bad lr_scale" in core.submit("trainer", 1, _grad(core, 1.0), 0, bad)["reason"]
    assert "wrong version" in core.submit("trainer", 2, _grad(core, 1.0), 7)["reason"]


def test_non_finite_rounds_are_counted_and_never_applied(tmp_path):
    _, core = _core(tmp_path)
    before = core.get()[1]
    r = core.submit("trainer", 0, None, 0, nonfinite=2)  # every rank of the round was non-finite
    assert not r["accepted"] and core.version == 0 and core.opt.stats.rejected_nonfinite == 2
    r = core.submit("trainer", 1, _grad(core, float("nan")), 0)
    assert not r["accepted"] and core.version == 0 and core.opt.stats.rejected_nonfinite == 3
    assert torch.equal(before, core.get()[1])
    assert core.submit("trainer", 2, _grad(core, 0.5), 0, nonfinite=1)["accepted"]  # one rank bad, the others' mean applied
    assert core.version == 1 and core.opt.stats.rejected_nonfinite == 4


def test_replayed_rounds_are_recognised_not_applied_twice(tmp_path):
    _, core = _core(tmp_path)
    core.submit("trainer", 0, _grad(core), 0)
    r = core.submit("trainer", 0, _grad(core), 1)
    assert r.get("duplicate") and core.version == 1 and core.stats["duplicates"] == 1


def test_async_arrivals_are_batched_into_one_step_within_the_staleness_bound(tmp_path):
    cfg, core = _core(tmp_path, mode="async", staleness=1)
    g1, g2, g3 = _grad(core), _grad(core), _grad(core)
    out = core.apply_batch([{"sender": "a", "round": 0, "grad": g1, "base_version": 0},
                            {"sender": "b", "round": 0, "grad": g2, "base_version": 0},
                            {"sender": "c", "round": 0, "grad": g3.long(), "base_version": 0}])
    assert [o["accepted"] for o in out] == [True, True, False] and core.version == 1 and out[0]["batched"] == 2
    ref = build_lossnets(cfg.loss, cfg.lossnet, cfg.run.seed)
    LossNetOptimizer(ref, 0.01, 100.0).submit((g1 + g2) / 2)  # one Adam step on the batch mean
    torch.testing.assert_close(flatten(list(ref.parameters())), core.get()[1])
    core.apply_batch([{"sender": "a", "round": 1, "grad": g1, "base_version": 1}])
    out = core.apply_batch([{"sender": "b", "round": 1, "grad": g2, "base_version": 0}])  # staleness 2 > 1
    assert not out[0]["accepted"] and "stale" in out[0]["reason"] and core.stats["max_staleness_seen"] == 2


def test_es_round_closes_when_every_particle_reported_and_applies_the_estimate(tmp_path):
    cfg, core = _core(tmp_path, mode="es", particles=4, es_sigma=0.1)
    ref = build_lossnets(cfg.loss, cfg.lossnet, cfg.run.seed)
    losses = {0: 1.0, 1: 1.5, 2: 0.7, 3: 0.9}
    for p in (0, 1, 2):
        assert not core.es_report(p, 0, losses[p])["closed"]
    assert "wrong round" in core.es_report(3, 5, 1.0)["reason"] and "unknown particle" in core.es_report(9, 0, 1.0)["reason"]
    assert core.es_report(3, 0, losses[3])["closed"] and core.version == 1
    est = ESEstimator(len(es_index(ref, "last")), 4, 0.1, True, seed=cfg.run.seed)
    g, used = est.gradient(0, losses)
    full = torch.zeros(core.opt.numel)
    full[es_index(ref, "last")] = g
    LossNetOptimizer(ref, 0.01, 100.0).submit(full)
    torch.testing.assert_close(flatten(list(ref.parameters())), core.get()[1])
    assert core.es_report(0, 0, 2.0).get("duplicate")  # a late replay of a closed round


def test_every_version_is_persisted_and_a_restart_resumes_with_its_counters(tmp_path):
    cfg, core = _core(tmp_path)
    for r in range(5):
        core.submit("trainer", r, _grad(core), core.version)
    assert core.persist_pending() == 6 and core.drain_once() and core.persisted_version == 5
    names = sorted(p.name for p in (tmp_path / "run" / "lossnet").iterdir())
    assert names == ["hashes", "latest.json"] + [f"v{v}.pt" for v in range(6)]
    manifest = json.loads((tmp_path / "run" / "lossnet" / "hashes" / "00000.json").read_text())
    assert sorted(manifest) == [str(v) for v in range(6)]  # one hash per version, in its shard of the manifest
    phi = core.get()[1]
    again = LossNetServerCore(cfg, str(tmp_path), "run", "sync", 1)  # what a Ray restart does
    assert again.version == 5 and again.stats["restored_from"] == 5 and torch.equal(again.get()[1], phi)
    assert again.stats["rounds"] == 5 and again.opt.stats.accepted == 5  # counters survive the restart
    assert again.opt.adam.state_dict()["state"][0]["step"] == 5  # Adam moments come back too
    assert again.submit("trainer", 4, _grad(again), 5).get("duplicate")  # the replayed round is recognised
    assert again.submit("trainer", 5, _grad(again), 5)["accepted"] and again.version == 6


def test_a_failed_save_never_blocks_rounds_and_loses_nothing(tmp_path):
    cfg, core = _core(tmp_path)
    core.drain_once()
    blocker = tmp_path / "run" / "lossnet" / "v1.pt"
    blocker.mkdir()  # an object path that cannot be written: the save of v1 fails
    for r in range(3):
        assert core.submit("trainer", r, _grad(core), core.version)["accepted"]
    assert not core.drain_once() and core.persist_failures == 1 and core.persist_pending() == 3
    assert core.version == 3  # rounds went on
    blocker.rmdir()  # storage back
    assert core.drain_once() and core.persisted_version == 3
    ptr = json.loads((tmp_path / "run" / "lossnet" / "latest.json").read_text())
    assert ptr["version"] == 3


def test_restore_falls_back_to_the_newest_intact_version_and_adopts_a_newer_worker_phi(tmp_path, caplog):
    cfg, core = _core(tmp_path)
    for r in range(3):
        core.submit("trainer", r, _grad(core), core.version)
    core.drain_once()
    target = tmp_path / "run" / "lossnet" / "v3.pt"
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 2])  # truncated latest target
    again = LossNetServerCore(cfg, str(tmp_path), "run", "sync", 1)
    assert again.version == 2 and any("corrupt" in r.getMessage() or "missing or corrupt" in r.getMessage()
                                      for r in caplog.records)
    worker_phi = core.get()[1]
    assert again.adopt(3, worker_phi, "test")["adopted"] and again.version == 3 and torch.equal(again.get()[1], worker_phi)
    assert not again.adopt(2, worker_phi, "older")["adopted"]  # never backwards


def test_every_saved_version_holds_exactly_its_own_phi_and_adam_state_when_saves_fall_behind(tmp_path):
    """Saves lag the rounds (nothing is written until the end): each v<N>.pt must still hold the φ and the Adam
    state of version N — copies taken when N was applied, with the hash recorded then — not a later one."""
    from lkd_ray.meta.versions import VersionStore, content_sha256
    from lkd_ray.storage import open_storage

    _, core = _core(tmp_path)
    phis = {0: core.get()[1].clone()}
    for r in range(5):
        assert core.submit("trainer", r, _grad(core), r)["accepted"]
        phis[core.version] = core.get()[1].clone()
    assert core.persist_pending() == 6  # v0..v5, none written yet
    assert core.drain_once()
    store = VersionStore(open_storage(str(tmp_path)), "run/lossnet")
    hashes = core.version_hashes()
    assert store.hashes() == hashes  # the durable hash manifest says the same
    for v in range(6):
        sd = store.storage.get_torch(store.key(v))
        assert sd["version"] == v and content_sha256(sd) == sd["state_sha256"] == hashes[v]
        flat = torch.cat([t.flatten() for t in sd["lossnets"].values()])
        assert torch.equal(flat, phis[v])
        steps = {int(st["step"]) for st in sd["adam"]["state"].values()} if v else set()
        assert steps == ({v} if v else set())  # the Adam step count inside the file is its version


def test_a_persister_failure_that_is_not_storage_stops_the_run_with_its_own_error(tmp_path):
    from lkd_ray.distributed.lossnet_server import LossNetPersistError

    _, core = _core(tmp_path)

    def broken(version, payload):
        raise TypeError("cannot serialise this payload")

    core.versions.save = broken
    core.persist_forever()  # returns: it recorded why it stopped
    assert core.persist_fatal == "TypeError: cannot serialise this payload"
    core.wait_persisted(stall_s=0.1)  # does not wait for a persister that is gone
    with pytest.raises(LossNetPersistError, match="stopped saving loss-network versions: TypeError"):
        core.submit("trainer", 0, _grad(core), 0)
    assert core.report()["persist_fatal"].startswith("TypeError")


def test_each_rejection_is_counted_once(tmp_path):
    _, core = _core(tmp_path, mode="async", staleness=4)
    out = core.apply_batch([{"sender": "a", "round": 0, "grad": _grad(core, float("nan")), "base_version": 0},
                            {"sender": "b", "round": 0, "grad": _grad(core).long(), "base_version": 0}])
    assert [o["accepted"] for o in out] == [False, False]
    rep = core.report()
    assert rep["rejected"] == 2 and rep["meta_rejected_nonfinite"] == 1  # the breakdown is not another rejection
    assert rep["rejected_reasons"] == {"non-finite": 1, "wrong dtype": 1}
    _, sync = _core(tmp_path / "s")
    sync.submit("trainer", 0, None, 0, nonfinite=2)  # a round where every rank was non-finite: one refused round
    assert sync.report()["rejected"] == 1 and sync.report()["meta_rejected_nonfinite"] == 2


def test_an_es_round_without_a_usable_pair_advances_the_round_not_the_version(tmp_path):
    _, core = _core(tmp_path, mode="es", particles=2, es_sigma=0.1)
    core.es_report(0, 0, float("nan"))
    assert core.es_report(1, 0, 1.0)["closed"]
    assert core.version == 0 and core.es_round == 1 and core.opt.stats.accepted == 0
    core.es_report(0, 1, 1.0)
    res = core.es_report(1, 1, 2.0, lr_scale=0.5)
    assert res["closed"] and res["round"] == 2 and core.version == core.opt.stats.accepted == 1
    assert core.opt.adam.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5)  # the particles' meta lr schedule applies


def test_an_async_round_arriving_after_a_later_one_is_applied_and_only_true_replays_are_duplicates(tmp_path):
    """Ray's async actor calls do not keep their order: round 0 may arrive after round 1. It is applied; round 1
    again is a replay — and still is after a restart (the applied rounds are saved with the state)."""
    cfg, core = _core(tmp_path, mode="async", staleness=4)
    item = lambda r, v: {"sender": "a", "round": r, "grad": _grad(core), "base_version": v}  # noqa: E731
    assert core.apply_batch([item(1, 0)])[0]["accepted"] and core.version == 1
    late = core.apply_batch([item(0, 0)])[0]
    assert late["accepted"] and not late.get("duplicate") and core.version == 2 and core.stats["duplicates"] == 0
    assert core.apply_batch([item(1, 1)])[0].get("duplicate") and core.version == 2
    assert core.apply_batch([item(3, 2)])[0]["accepted"]  # round 2 still in flight
    assert core.drain_once()
    again = LossNetServerCore(cfg, str(tmp_path), "run", "async", 4)  # a restart
    assert again.apply_batch([item(0, 3)])[0].get("duplicate") and again.apply_batch([item(3, 3)])[0].get("duplicate")
    assert again.apply_batch([item(2, 3)])[0]["accepted"] and again.version == 4  # the one never applied
    rep = again.report()
    assert rep["accepted"] + rep["rejected"] + rep["duplicates"] == rep["submitted"] == 7


def test_applied_rounds_are_exact_with_gaps_and_bounded_in_memory():
    from lkd_ray.distributed.rounds import AppliedRounds

    s = AppliedRounds(max_intervals=4)
    for r in (5, 3, 4, 0, 9):
        s.add(r)
    assert [r for r in range(12) if r in s] == [0, 3, 4, 5, 9] and s.to_list() == [[0, 1], [3, 6], [9, 10]]
    assert AppliedRounds(s.to_list()).to_list() == s.to_list() and s.last == 9
    for r in (11, 13, 15):  # six gaps' worth of intervals: the oldest gaps are closed, the newest kept exact
        s.add(r)
    assert len(s.to_list()) == 4 and 12 not in s and 14 not in s and 15 in s and 1 in s
    assert [r for r in range(8) if r in AppliedRounds.up_to(3)] == [0, 1, 2, 3]


@pytest.mark.parametrize("part", ["stats", "applied_rounds", "es", "version"])
def test_a_version_whose_saved_state_changed_in_any_part_is_refused_on_restore(tmp_path, part, caplog):
    """The content hash covers the whole payload: the counters, the applied rounds and the ES state too, not only
    φ and Adam. Same shapes, other numbers → the restore falls back to the version before, with a warning."""
    cfg, core = _core(tmp_path, mode="es", particles=2, es_sigma=0.1) if part == "es" else _core(tmp_path)
    for r in range(2):
        if part == "es":
            core.es_report(0, r, 1.0)
            core.es_report(1, r, 2.0)
        else:
            core.submit("trainer", r, _grad(core), core.version)
    assert core.drain_once() and core.version == 2
    path = tmp_path / "run" / "lossnet" / "v2.pt"
    sd = torch.load(path, weights_only=True)
    if part == "stats":
        sd["stats"]["accepted"] = 7
    elif part == "applied_rounds":
        sd["applied_rounds"]["trainer"] = [[0, 9]]
    elif part == "es":
        sd["es"]["xi"] = sd["es"]["xi"] + 1.0
    else:
        sd["version"] = 3
    torch.save(sd, path)
    ptr = tmp_path / "run" / "lossnet" / "latest.json"  # a pointer that agrees with the changed bytes: only the
    meta = json.loads(ptr.read_text())                 # content hash can tell
    meta.update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), size=path.stat().st_size)
    ptr.write_text(json.dumps(meta))
    again = LossNetServerCore(cfg, str(tmp_path), "run", core.mode, 1, particles=2 if part == "es" else 0)
    assert again.version == 1 and again.stats["restored_from"] == 1
    assert any("version 2 is corrupt" in r.getMessage() for r in caplog.records)


def test_init_from_a_version_file_checks_its_hash_and_refuses_other_numbers(tmp_path):
    from lkd_ray.train.run import LossNetArtifactError, read_lossnet_artifact

    _, core = _core(tmp_path)
    core.submit("trainer", 0, _grad(core), 0)
    assert core.drain_once()
    path = tmp_path / "run" / "lossnet" / "v1.pt"
    assert read_lossnet_artifact(str(path))["version"] == 1  # intact: loads
    sd = torch.load(path, weights_only=True)
    name = next(iter(sd["lossnets"]))
    sd["lossnets"][name] = torch.randn_like(sd["lossnets"][name])  # same shape, other numbers
    torch.save(sd, path)
    with pytest.raises(LossNetArtifactError, match="is corrupt and was not loaded"):
        read_lossnet_artifact(str(path))
    path.write_bytes(b"not a torch file")  # a file that does not load at all: refused by its type, the same way
    with pytest.raises(LossNetArtifactError, match="is corrupt and was not loaded"):
        read_lossnet_artifact(str(path))


def _persist_in_thread(core, wait_s: float = 15.0) -> float:
    import threading
    import time

    t0 = time.monotonic()
    t = threading.Thread(target=core.persist_forever, daemon=True)
    t.start()
    t.join(wait_s)
    assert not t.is_alive(), f"the persister still retries after {wait_s:.0f} s: {core.report()['persist_error']}"
    return time.monotonic() - t0


def _stopped_for_storage(core) -> None:
    from lkd_ray.distributed.lossnet_server import LossNetStorageError
    from lkd_ray.storage import StorageError

    assert core.persist_fatal_storage and core.report()["persist_fatal_storage"]
    before = core.get()[1]
    with pytest.raises(LossNetStorageError, match="could not save a loss-network version") as e:
        core.submit("trainer", 0, _grad(core), core.version)
    assert isinstance(e.value, StorageError)  # the jobs' storage exit code (3), found by type
    assert torch.equal(before, core.get()[1])  # no step taken that could not be recorded


def test_a_save_that_storage_refuses_stops_the_run_at_once(tmp_path, s3_bucket, moto_endpoint):
    """NoSuchBucket (as AccessDenied) is an answer, not an outage: no retry can change it. The persister stops at
    once and the next round raises a storage error, instead of training on unsaved until the final flush."""
    import boto3

    cfg = build_config("fashion_mnist", lossnet={"hidden": [4]}, meta={"lr": 0.01})
    core = LossNetServerCore(cfg, f"s3://{s3_bucket}/lkd", "run", endpoint_url=moto_endpoint, storage_outage_s=30)
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").delete_bucket(Bucket=s3_bucket)
    assert _persist_in_thread(core) < 10
    assert "NoSuchBucket" in core.persist_fatal
    _stopped_for_storage(core)


def test_a_save_outage_past_the_bound_stops_the_run(tmp_path, s3_bucket, moto_endpoint):
    """The endpoint refuses connections for good; the storage layer retries for its bound (1 s), then the
    persister stops, instead of retrying after the bound for as long as the run lasts."""
    from tests.proxy import FaultProxy

    px = FaultProxy(moto_endpoint)
    try:
        cfg = build_config("fashion_mnist", lossnet={"hidden": [4]}, meta={"lr": 0.01})
        core = LossNetServerCore(cfg, f"s3://{s3_bucket}/lkd", "run", endpoint_url=px.url, storage_outage_s=1)
        px.set_mode("refuse")
        _persist_in_thread(core)
        assert "outage bound of 1 s" in core.persist_fatal and core.persisted_version is None
        _stopped_for_storage(core)
    finally:
        px.close()


def test_a_version_saved_before_the_applied_round_sets_restores_with_its_old_hash_and_last_rounds(tmp_path):
    """Files written before this change: a hash over φ, Adam and the version only, and one last round per sender."""
    from lkd_ray.meta.versions import COVERS, content_sha256

    cfg, core = _core(tmp_path)
    for r in range(3):
        core.submit("trainer", r, _grad(core), core.version)
    old = {k: v for k, v in core.state().items() if k not in ("applied_rounds", COVERS, "state_sha256")}
    old["last_round"] = {"trainer": 2}
    old["state_sha256"] = content_sha256(old)  # the old scope, as such a file carries it
    core.versions.save(3, old)
    again = LossNetServerCore(cfg, str(tmp_path), "run", "sync", 1)
    assert again.version == 3 and again.submit("trainer", 1, _grad(again), 3).get("duplicate")
    assert again.submit("trainer", 3, _grad(again), 3)["accepted"]
