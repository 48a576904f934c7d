"""Meta-gradients: finite differences, backend agreement, side-effect freedom, non-finite rejection."""
import subprocess
import sys

import pytest
import torch

from lkd_ray.config import LossCfg, LossNetCfg, MetaCfg
from lkd_ray.losses import Connector, TeacherOutputs, build_lossnets, build_method
from lkd_ray.meta import (LossNetOptimizer, MetaBatch, MetaStep, NonFiniteMetaGradient, StudentBundle, check_and_clip,
                          flatten)
from lkd_ray.meta.gradcheck import run_gradcheck
from lkd_ray.models import build_model


@pytest.mark.parametrize("scope,unroll,lock,method", [
    ("full", 1, "none", "lkd"), ("full", 2, "none", "lkd"), ("head", 1, "none", "lkd"), ("head", 3, "none", "lkd"),
    ("full", 1, "norm", "lkd"), ("full", 1, "nontarget", "lkd"), ("head", 1, "norm", "lkd"), ("full", 2, "none", "control")])
def test_both_backends_match_finite_differences(scope, unroll, lock, method):
    errs = run_gradcheck(scope=scope, unroll=unroll, max_entries=25, seed=unroll, lock=lock, method=method)
    assert set(errs) == {"higher", "torch.func"}
    for backend, e in errs.items():
        assert e < 1e-5, f"{backend}: {e}"


@pytest.mark.parametrize("unroll,lock", [(2, "none"), (1, "norm")])
def test_calibrated_quiz_objective_matches_finite_differences(unroll, lock):
    """The calibrated objective re-optimises its temperature at every evaluation; the analytic meta-gradient
    holds β* fixed (envelope theorem). Finite differences of the re-optimised objective must agree."""
    # ε = 1e-4: the re-optimised temperature (an iterative solve) adds rounding noise that a 1e-6 step would amplify
    errs = run_gradcheck(eps=1e-4, scope="full", unroll=unroll, max_entries=20, seed=3, lock=lock, quiz="calibrated")
    for backend, e in errs.items():
        assert e < 1e-5, f"{backend}: {e}"


def test_calibrated_objective_is_the_best_temperature_and_ignores_confidence():
    from lkd_ray.meta.gradient import calibrated_scale, quiz_objective

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(64, 10, generator=g, dtype=torch.float64) * 3, torch.randint(0, 10, (64,), generator=g)
    grid = torch.linspace(0.01, 3, 6000, dtype=torch.float64)
    best = torch.stack([torch.nn.functional.cross_entropy(b * z, y) for b in grid]).min()
    assert quiz_objective(z, y, "calibrated").item() == pytest.approx(best.item(), abs=1e-6)
    assert quiz_objective(z, y, "calibrated").item() <= quiz_objective(z, y, "ce").item()
    for s in (0.25, 4.0):  # a more or less confident student with the same ranking scores the same
        assert quiz_objective(s * z, y, "calibrated").item() == pytest.approx(quiz_objective(z, y, "calibrated").item(), rel=1e-9)
    assert calibrated_scale(2 * z, y).item() == pytest.approx(calibrated_scale(z, y).item() / 2, rel=1e-6)
    assert quiz_objective(z, y, "error").item() == pytest.approx((z.argmax(1) != y).double().mean().item())


@pytest.mark.parametrize("kind,lock,lock_scope,unroll", [
    ("class", "norm", "batch", 2), ("class", "nontarget", "batch", 2), ("class", "norm", "sample", 3),
    ("class", "nontarget", "sample", 2), ("sample", "none", "batch", 2), ("sample", "norm", "batch", 2),
    ("sample", "norm", "sample", 3), ("sample", "nontarget", "batch", 1)])
def test_locked_and_per_sample_losses_are_exact_through_longer_unrolls(kind, lock, lock_scope, unroll):
    """A locked or per-sample loss is defined by its logit-gradient field, which is not the gradient of any loss;
    the unroll must differentiate that field itself (the old surrogate saw only the base loss's curvature:
    5e-4 relative error at k = 2). Float64 finite differences of an independent SGD copy must agree."""
    errs = run_gradcheck(eps=1e-4, unroll=unroll, max_entries=20, seed=unroll, lock=lock, kind=kind, lock_scope=lock_scope)
    for backend, e in errs.items():
        assert e < 1e-5, f"{backend}: {e}"


def test_gradcheck_cli_exit_codes():
    ok = subprocess.run([sys.executable, "-m", "lkd_ray", "gradcheck", "--scope", "head", "--unroll", "1", "--lock", "none"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "backend=higher" in ok.stdout and "backend=torch.func" in ok.stdout and "max relative error" in ok.stdout
    # a tolerance nothing can meet must fail: the command really compares
    bad = subprocess.run([sys.executable, "-m", "lkd_ray", "gradcheck", "--scope", "head", "--unroll", "1", "--lock", "none", "--tol", "1e-30"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "FAILED" in bad.stderr


def _cifar_setup(scope="full", w_feat=0.0, seed=0, lock="none"):
    torch.manual_seed(seed)
    teacher = build_model("resnet8x4", 10).eval()
    net = build_model("resnet8", 10)
    bundle = StudentBundle(net, Connector(64, 256) if w_feat else None, (8, 8) if w_feat else None).train()
    loss_cfg = LossCfg(method="lkd", w_feat=w_feat)
    lossnets = build_lossnets(loss_cfg, LossNetCfg(hidden=[8], lock=lock))
    with torch.no_grad():
        for p in lossnets.parameters():
            p.normal_(0, 0.2)
    method = build_method(loss_cfg, lossnets)

    def obj(out, tl, ft, y):
        return method(out, TeacherOutputs(tl, ft), y)
    opt = torch.optim.SGD(bundle.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    with torch.no_grad():
        ft = teacher.forward_features(x)
        tl = teacher.forward_head(ft)
    loss = obj(bundle(x), tl, ft, y)[0]
    opt.zero_grad()
    loss.backward()
    opt.step()
    batch = MetaBatch(x, y, tl, ft if w_feat else None)
    xq, yq = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    return bundle, opt, obj, lossnets, batch, xq, yq


@pytest.mark.parametrize("scope", ["full", "head"])
def test_backends_agree_on_a_cifar_model(scope):
    bundle, opt, obj, lossnets, batch, xq, yq = _cifar_setup(w_feat=0.5)
    grads = {}
    for backend in ("higher", "torch.func"):
        step = MetaStep(MetaCfg(backend=backend, scope=scope), build_method(LossCfg(method="lkd", w_feat=0.5), lossnets), lossnets)
        q, grads[backend] = step.compute(bundle, opt, [batch], xq, yq)
    assert any(g.abs().sum() > 0 for g in grads["higher"])
    for a, b in zip(grads["higher"], grads["torch.func"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def _fingerprint(bundle, opt):
    return ({k: v.clone() for k, v in bundle.state_dict().items()},
            {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()} for p, s in opt.state.items()},
            [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups])


@pytest.mark.parametrize("backend,estimator,lock", [("higher", "unroll", "none"), ("torch.func", "unroll", "none"),
                                                    ("higher", "unroll", "norm"), ("higher", "unroll", "nontarget"),
                                                    ("higher", "implicit", "none"), ("higher", "implicit", "norm")])
@pytest.mark.parametrize("scope", ["full", "head"])
@pytest.mark.parametrize("from_snapshot", [False, True])
def test_meta_step_is_side_effect_free(backend, estimator, lock, scope, from_snapshot):
    bundle, opt, obj, lossnets, batch, xq, yq = _cifar_setup(w_feat=0.5, lock=lock)
    snap = {k: v.clone() * (1.01 if v.is_floating_point() else 1) for k, v in bundle.state_dict().items()} if from_snapshot else None
    before = _fingerprint(bundle, opt)
    grads_before = [None if p.grad is None else p.grad.clone() for p in bundle.parameters()]
    step = MetaStep(MetaCfg(backend=backend, scope=scope, unroll_steps=2, estimator=estimator, neumann_steps=2),
                    build_method(LossCfg(method="lkd", w_feat=0.5), lossnets), lossnets)
    _, grads = step.compute(bundle, opt, [batch, batch], xq, yq, start_state=snap)
    assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    after = _fingerprint(bundle, opt)
    for k, v in before[0].items():
        assert torch.equal(v, after[0][k]), k  # parameters and BatchNorm buffers, bit for bit
    for pid, s in before[1].items():
        for k, v in s.items():
            assert torch.equal(v, after[1][pid][k]) if torch.is_tensor(v) else v == after[1][pid][k]
    assert before[2] == after[2]
    for g0, p in zip(grads_before, bundle.parameters()):  # the real .grad fields are not touched either
        assert (g0 is None and p.grad is None) or torch.equal(g0, p.grad)


def test_snapshot_start_changes_the_meta_gradient():
    bundle, opt, obj, lossnets, batch, xq, yq = _cifar_setup()
    step = MetaStep(MetaCfg(scope="full"), build_method(LossCfg(method="lkd"), lossnets), lossnets)
    _, g_now = step.compute(bundle, opt, [batch], xq, yq)
    snap = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in bundle.state_dict().items()}
    _, g_snap = step.compute(bundle, opt, [batch], xq, yq, start_state=snap)
    assert not all(torch.allclose(a, b) for a, b in zip(g_now, g_snap))
    # and it is exactly the meta-gradient of a student that *is* that snapshot, with no momentum yet (independently built)
    import copy

    twin = copy.deepcopy(bundle)
    twin.load_state_dict(snap)
    fresh = torch.optim.SGD(twin.parameters(), **{k: opt.param_groups[0][k] for k in ("lr", "momentum", "weight_decay")})
    _, g_twin = step.compute(twin, fresh, [batch], xq, yq)
    for a, b in zip(g_snap, g_twin):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_non_finite_meta_gradient_is_rejected_and_counted():
    lossnets = build_lossnets(LossCfg(method="lkd"), LossNetCfg(hidden=[4]))
    mo = LossNetOptimizer(lossnets, lr=1e-2, clip_norm=1.0)
    before = [p.clone() for p in lossnets.parameters()]
    grads = [torch.ones_like(p) for p in lossnets.parameters()]
    grads[0][0, 0] = float("nan")
    assert mo.submit(grads) is False
    c = mo.counters()
    assert c["rejected_nonfinite"] == 1 and c["accepted"] == 0 and c["version"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, lossnets.parameters()))
    with pytest.raises(NonFiniteMetaGradient, match="non-finite"):
        check_and_clip(flatten(grads), 1.0)
    assert mo.submit(flatten([torch.ones_like(p) for p in lossnets.parameters()]), from_snapshot=True) is True
    c = mo.counters()
    assert c["version"] == 1 and c["from_snapshot"] == 1 and not all(torch.equal(a, b) for a, b in zip(before, lossnets.parameters()))
    with pytest.raises(ValueError, match="values"):
        mo.submit(torch.ones(3))


def test_clipping_bounds_the_norm():
    clipped, norm = check_and_clip(torch.cat([torch.full((3,), 4.0), torch.full((4,), 3.0)]), clip_norm=1.0)
    assert norm == pytest.approx((48 + 36) ** 0.5)
    assert torch.linalg.vector_norm(clipped).item() == pytest.approx(1.0, rel=1e-6)
