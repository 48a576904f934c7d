"""LossNetServer logic (sync averaging, validation, async staleness, persistence) without Ray."""
import pytest
import torch

from lkd_ray.config import build_config
from lkd_ray.distributed.lossnet_server import LossNetServerCore
from lkd_ray.losses import build_lossnets


def _core(tmp_path, world=2, mode="sync", persist_every=0, staleness=1):
    cfg = build_config("fashion_mnist", lossnet={"hidden": [4]}, meta={"lr": 0.01, "clip_norm": 100.0})
    return cfg, LossNetServerCore(cfg.to_dict(), str(tmp_path), "run", world, mode, staleness, persist_every)


def _grads(core, fill):
    return [torch.full_like(p, fill) for p in core.params]


def test_sync_round_averages_all_ranks_then_steps(tmp_path):
    cfg, core = _core(tmp_path)
    ref = build_lossnets(cfg.loss, cfg.lossnet, cfg.run.seed)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), core.params))  # same φ0 as every worker
    g0 = [torch.randn_like(p) for p in core.params]
    g1 = [torch.randn_like(p) for p in core.params]
    r = core.submit(0, 0, g0, 0)
    assert r["accepted"] and not r["closed"] and core.counters.version == 0
    r = core.submit(1, 0, g1, 0)
    assert r["closed"] and core.counters.version == 1 and core.round == 1
    adam = torch.optim.Adam(ref.parameters(), lr=0.01)
    for p, a, b in zip(ref.parameters(), g0, g1):
        p.grad = (a + b) / 2
    adam.step()
    for a, b in zip(ref.parameters(), core.params):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case,reason", [
    (lambda c: c.submit(5, 0, _grads(c, 1.0), 0), "unknown rank"),
    (lambda c: c.submit(0, 3, _grads(c, 1.0), 0), "wrong round"),
    (lambda c: c.submit(0, 0, _grads(c, 1.0)[:-1], 0), "wrong tensor count"),
    (lambda c: c.submit(0, 0, [torch.zeros(3)] + _grads(c, 1.0)[1:], 0), "wrong shape"),
    (lambda c: c.submit(0, 0, [g.long() for g in _grads(c, 1.0)], 0), "wrong dtype"),
])
def test_bad_submissions_are_rejected_and_counted(tmp_path, case, reason):
    _, core = _core(tmp_path)
    core.submit(1, 0, _grads(core, 0.5), 0)  # round 0 open
    before = [p.clone() for p in core.params]
    r = case(core)
    assert not r["accepted"] and reason in r["reason"]
    assert core.stats["rejected"] == 1 and core.counters.version == 0
    assert all(torch.equal(a, b) for a, b in zip(before, core.params))


def test_duplicate_and_non_finite_do_not_apply(tmp_path):
    _, core = _core(tmp_path)
    core.submit(0, 0, _grads(core, 1.0), 0)
    assert "duplicate" in core.submit(0, 0, _grads(core, 1.0), 0)["reason"]
    before = [p.clone() for p in core.params]
    r = core.submit(1, 0, _grads(core, float("nan")), 0)  # closes the round with rank 0's gradient only
    assert not r["accepted"] and r["closed"] and core.counters.rejected_nonfinite == 1 and core.counters.version == 1
    assert all(torch.isfinite(p).all() for p in core.params)
    assert not all(torch.equal(a, b) for a, b in zip(before, core.params))  # rank 0's finite gradient was applied
    _, core2 = _core(tmp_path / "b", world=1)
    r = core2.submit(0, 0, _grads(core2, float("inf")), 0)
    assert r["closed"] and core2.counters.version == 0 and core2.counters.rejected_nonfinite == 1


def test_async_applies_each_arrival_within_the_staleness_bound(tmp_path):
    _, core = _core(tmp_path, mode="async", staleness=1)
    assert core.submit(0, 0, _grads(core, 1.0), 0)["accepted"]
    assert core.submit(1, 0, _grads(core, 1.0), 0)["accepted"]  # staleness 1: allowed
    r = core.submit(0, 1, _grads(core, 1.0), 0)                # staleness 2: rejected
    assert not r["accepted"] and "stale" in r["reason"] and core.counters.version == 2
    assert core.stats["max_staleness_seen"] == 2


def test_persists_every_n_versions_and_restores(tmp_path):
    cfg, core = _core(tmp_path, world=1, persist_every=2)
    for r in range(5):
        core.submit(0, r, [torch.randn_like(p) for p in core.params], core.counters.version)
        if core.counters.version == 4:
            at_v4 = [p.clone() for p in core.params]
    assert sorted(p.name for p in (tmp_path / "run" / "lossnet").iterdir()) == ["latest.json", "v2.pt", "v4.pt"]
    restored = LossNetServerCore(cfg.to_dict(), str(tmp_path), "run", 1, "sync", 1, 2)  # what a Ray restart does
    assert restored.counters.version == 4 and restored.stats["restored_from"] == 4 and restored.round is None
    assert all(torch.equal(a, b) for a, b in zip(at_v4, restored.params))
    assert restored.adam.state_dict()["state"][0]["step"] == 4  # Adam moments come back too
    r = restored.submit(0, 7, _grads(restored, 0.1), 4)  # follows the workers' round after a restart
    assert r["accepted"] and r["closed"] and restored.round == 8 and restored.counters.version == 5


def test_meta_lr_scale_is_the_mean_of_the_round_and_bad_scales_are_rejected(tmp_path):
    cfg, core = _core(tmp_path)
    ref = build_lossnets(cfg.loss, cfg.lossnet, cfg.run.seed)
    g = [torch.randn_like(p) for p in core.params]
    assert core.submit(0, 0, g, 0, 0.2)["accepted"]
    assert core.submit(1, 0, g, 0, 0.6)["closed"]
    adam = torch.optim.Adam(ref.parameters(), lr=0.01 * 0.4)  # Adam's step scales with its lr: mean of 0.2 and 0.6
    for p, a in zip(ref.parameters(), g):
        p.grad = a.clone()
    adam.step()
    for a, b in zip(ref.parameters(), core.params):
        torch.testing.assert_close(a, b)
    for bad in (float("nan"), -1.0, 1e9, "x"):
        r = core.submit(0, 1, g, 1, bad)
        assert not r["accepted"] and "bad lr_scale" in r["reason"]
