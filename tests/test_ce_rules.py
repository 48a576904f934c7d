"""The noisy-label field's label rules (lkd_ray/losses/ce_rules.py), each against an independent formula
written here in numpy from its paper; on every distillation base; and as the start of the per-sample loss
network (at φ₀ it is the rule; its meta-gradient matches float64 finite differences through an unroll)."""
import math

import numpy as np
import pytest
import torch

from lkd_ray.config import ConfigError, LossCfg, build_config
from lkd_ray.losses import SampleLossNet, build_method, handcrafted
from lkd_ray.losses.ce_rules import CE_RULES, build_ce_rule
from lkd_ray.losses.methods import StudentOutputs, TeacherOutputs


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    zs = torch.randn(20, 6, generator=g, dtype=torch.float64) * 2
    zt = torch.randn(20, 6, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, 6, (20,), generator=g)
    y[:5] = zt[:5].argmax(1)  # some samples where the teacher agrees with the label, for sure
    return zs, zt, y


def _np(t):
    return t.detach().numpy()


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def independent(rule: str, zs, zt, y, epoch=0, **p) -> np.ndarray:
    """Each rule's per-sample value from its definition, in numpy (no torch loss code)."""
    zs, zt, y = _np(zs), _np(zt), _np(y)
    n = len(y)
    ps, pt = _softmax(zs), _softmax(zt)
    ce = -np.log(ps[np.arange(n), y])
    if rule == "plain":
        return ce
    if rule == "agree":
        return (pt.argmax(1) == y) * ce
    if rule == "agree_soft":
        return pt[np.arange(n), y] * ce
    if rule == "relabel":
        return -np.log(ps[np.arange(n), pt.argmax(1)])
    if rule == "gce":
        q = p["gce_q"]
        return (1 - ps[np.arange(n), y] ** q) / q
    if rule == "sce":
        onehot = np.eye(zs.shape[1])[y]
        rce = -(np.clip(ps, 1e-7, 1) * np.log(np.clip(onehot, 1e-4, 1))).sum(1)
        return p["sce_alpha"] * ce + p["sce_beta"] * rce
    if rule == "boot_soft":
        b = p["boot_beta"]
        onehot = np.eye(zs.shape[1])[y]
        return -((b * onehot + (1 - b) * ps) * np.log(ps)).sum(1)
    if rule == "boot_hard":
        b = p["boot_beta"]
        return -(b * np.log(ps[np.arange(n), y]) + (1 - b) * np.log(ps.max(1)))
    if rule == "small_loss":
        r = p["forget_rate"] * min(1.0, epoch / p["forget_ramp_epochs"])
        k = n - int(round(r * n))
        keep = np.zeros(n)
        keep[np.argsort(ce, kind="stable")[:k]] = 1
        return keep * ce * n / k  # batch mean = mean CE over the kept samples
    raise AssertionError(rule)


PARAMS = {"gce_q": 0.3, "sce_alpha": 0.5, "sce_beta": 2.0, "boot_beta": 0.8, "forget_rate": 0.4, "forget_ramp_epochs": 4}


@pytest.mark.parametrize("rule", sorted(CE_RULES))
@pytest.mark.parametrize("epoch", [0, 2, 9])
def test_each_rule_matches_its_paper_s_formula(batch, rule, epoch):
    zs, zt, y = batch
    cfg = LossCfg(method="kd", ce_rule=rule, **PARAMS)
    got = build_ce_rule(cfg).per_sample(zs, y, zt, epoch)
    np.testing.assert_allclose(_np(got), independent(rule, zs, zt, y, epoch, **PARAMS), rtol=1e-10, atol=1e-12)


def test_the_rules_differ_where_their_papers_say(batch):
    """Guards against a rule that silently fell back to CE: each differs from plain CE on this batch, the
    teacher rules only on samples where the teacher disagrees with the label (agree) or everywhere (soft)."""
    zs, zt, y = batch
    ce = _np(build_ce_rule(LossCfg(method="kd")).per_sample(zs, y, zt))
    disagree = _np(zt.argmax(1) != y)
    for rule in CE_RULES:
        if rule == "plain":
            continue
        v = _np(build_ce_rule(LossCfg(method="kd", ce_rule=rule, **PARAMS)).per_sample(zs, y, zt, 9))
        assert not np.allclose(v, ce), rule
    agree = _np(build_ce_rule(LossCfg(method="kd", ce_rule="agree")).per_sample(zs, y, zt))
    np.testing.assert_array_equal(agree[disagree], 0)
    np.testing.assert_allclose(agree[~disagree], ce[~disagree])
    relabel = _np(build_ce_rule(LossCfg(method="kd", ce_rule="relabel")).per_sample(zs, y, zt))
    np.testing.assert_allclose(relabel[~disagree], ce[~disagree])


def test_small_loss_ramps_its_rate_over_the_first_epochs_and_keeps_the_lowest_losses(batch):
    zs, zt, y = batch
    rule = build_ce_rule(LossCfg(method="kd", ce_rule="small_loss", forget_rate=0.3, forget_ramp_epochs=3))
    assert [rule.rate(e) for e in (0, 1, 3, 10)] == pytest.approx([0.0, 0.1, 0.3, 0.3])
    v = _np(rule.per_sample(zs, y, zt, 5))
    ce = _np(torch.nn.functional.cross_entropy(zs, y, reduction="none"))
    kept = v > 0
    assert kept.sum() == 20 - 6 and ce[kept].max() <= ce[~kept].min()
    assert v.mean() == pytest.approx(ce[kept].mean(), rel=1e-12)


@pytest.mark.parametrize("base", ["kd", "dist", "dkd", "wsl"])
@pytest.mark.parametrize("rule", ["agree", "gce", "small_loss"])
def test_a_rule_replaces_the_label_term_on_every_distillation_base(batch, base, rule):
    zs, zt, y = batch
    cfg = LossCfg(method=base, ce_rule=rule, w_ce=0.7, w_logit=1.3, tau=2.0, **PARAMS)
    total, parts = build_method(cfg)(StudentOutputs(zs), TeacherOutputs(zt), y, None, epoch=3)
    plain_total, plain = build_method(LossCfg(method=base, w_ce=0.7, w_logit=1.3, tau=2.0))(
        StudentOutputs(zs), TeacherOutputs(zt), y, None, epoch=3)
    assert parts["ce"].item() == pytest.approx(0.7 * independent(rule, zs, zt, y, 3, **PARAMS).mean(), rel=1e-10)
    assert parts[base].item() == pytest.approx(plain[base].item(), rel=1e-12)  # the distillation term is untouched
    assert total.item() == pytest.approx(parts["ce"].item() + parts[base].item(), rel=1e-12)


def test_config_refuses_a_teacher_rule_without_a_teacher_and_smoothing_on_a_rule_with_its_own_target():
    with pytest.raises(ConfigError, match="reads the teacher"):
        build_config("fashion_mnist", overrides=["loss.method=ce", "loss.ce_rule=agree"])
    with pytest.raises(ConfigError, match="label_smoothing"):
        build_config("fashion_mnist", overrides=["loss.method=dist", "loss.ce_rule=gce", "loss.label_smoothing=0.1"])
    with pytest.raises(ConfigError, match="ce_rule"):
        build_config("fashion_mnist", overrides=["loss.ce_rule=coteach"])
    build_config("fashion_mnist", overrides=["loss.method=ce", "loss.ce_rule=gce"])  # a robust CE needs no teacher


@pytest.mark.parametrize("rule", ["plain", "relabel", "gce", "small_loss"])
@pytest.mark.parametrize("kappa", [0.0, 0.4])
def test_disagree_weight_scales_any_rule_where_the_teacher_s_top_class_is_not_the_label(batch, rule, kappa):
    """κ·value where argmax z_t ≠ y, the value elsewhere (independent formula); κ = 0 on plain CE is the agree rule;
    κ = 1 is the rule itself, the same object; the method's label term and the network at φ₀ follow it."""
    zs, zt, y = batch
    cfg = LossCfg(method="dist", ce_rule=rule, disagree_weight=kappa, tau=2.0, **PARAMS)
    got = _np(build_ce_rule(cfg).per_sample(zs, y, zt, 3))
    agree = _np(zt.argmax(1) == y)
    want = np.where(agree, 1.0, kappa) * independent(rule, zs, zt, y, 3, **PARAMS)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    if rule == "plain" and kappa == 0:
        np.testing.assert_allclose(got, independent("agree", zs, zt, y), rtol=1e-12)
    _, parts = build_method(cfg)(StudentOutputs(zs), TeacherOutputs(zt), y, None, epoch=3)
    assert parts["ce"].item() == pytest.approx(want.mean(), rel=1e-10)
    net = SampleLossNet(tau=2.0, w_ce=1.0, w_kd=1.0, base="dist", ce_rule=build_ce_rule(cfg)).double()
    z1, z2 = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    val, ref = net(z1, zt, y, epoch=3), build_method(cfg)(StudentOutputs(z2), TeacherOutputs(zt), y, None, epoch=3)[0]
    assert val.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(val, z1)[0], torch.autograd.grad(ref, z2)[0], rtol=1e-10, atol=1e-14)
    plain_cfg = LossCfg(method="dist", ce_rule=rule, **PARAMS)
    assert type(build_ce_rule(plain_cfg)) is CE_RULES[rule]  # κ = 1: no wrapper, the rule bit for bit
    with pytest.raises(ConfigError, match="disagree_weight.*no teacher"):
        build_config("fashion_mnist", overrides=["loss.method=ce", "loss.disagree_weight=0.5"])
    with pytest.raises(ConfigError, match="disagree_weight"):
        build_config("fashion_mnist", overrides=["loss.method=dist", "loss.disagree_weight=1.5"])


# --------------------------------------------------------------------------- the learned loss on a rule
@pytest.mark.parametrize("rule", ["agree", "agree_soft", "relabel", "gce", "sce", "boot_soft", "boot_hard", "small_loss"])
@pytest.mark.parametrize("base", ["kd", "dist"])
@pytest.mark.parametrize("lock", ["none", "norm"])
def test_the_per_sample_network_at_phi0_is_the_rule_it_starts_from(batch, rule, base, lock):
    """Value and logit gradient at φ₀ equal the hand-crafted method with that rule (same weights, base, τ)."""
    zs, zt, y = batch
    cfg = LossCfg(method=base, ce_rule=rule, w_ce=0.6, w_logit=1.4, tau=2.0, **PARAMS)
    net = SampleLossNet(tau=2.0, w_ce=0.6, w_kd=1.4, lock=lock, trust=0.5, base=base, ce_rule=build_ce_rule(cfg)).double()
    z1, z2 = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    val = net(z1, zt, y, epoch=3)
    ref = build_method(cfg)(StudentOutputs(z2), TeacherOutputs(zt), y, None, epoch=3)[0]
    assert val.item() == pytest.approx(ref.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(val, z1)[0], torch.autograd.grad(ref, z2)[0], rtol=1e-10, atol=1e-14)


def test_the_network_weighs_the_rule_s_per_sample_values(batch):
    """Away from φ₀: value = mean_i[w_ce·a_i·rule_i + w_kd·b_i·KD_i(τ_i)], computed independently."""
    zs, zt, y = batch
    cfg = LossCfg(method="kd", ce_rule="agree_soft", tau=2.0)
    net = SampleLossNet(tau=2.0, w_ce=0.6, w_kd=1.4, ce_rule=build_ce_rule(cfg)).double()
    with torch.no_grad():
        net.last_layer.weight.normal_(0, 2.0)
    w = net.per_sample(zs, zt, y)
    t = w["tau"][:, None]
    kd = (torch.softmax(zt / t, 1) * (torch.log_softmax(zt / t, 1) - torch.log_softmax(zs / t, 1))).sum(1) * w["tau"] ** 2
    rule = torch.from_numpy(independent("agree_soft", zs, zt, y))
    assert net(zs, zt, y).item() == pytest.approx((0.6 * w["w_ce"] * rule + 1.4 * w["w_kd"] * kd).mean().item(), rel=1e-10)


@pytest.mark.parametrize("rule,base", [("agree", "dist"), ("gce", "kd"), ("small_loss", "dist"), ("boot_soft", "kd")])
def test_the_network_on_a_rule_is_gradchecked_through_a_two_step_unroll(rule, base):
    from lkd_ray.meta.gradcheck import run_gradcheck

    errs = run_gradcheck(eps=1e-4, unroll=2, max_entries=12, seed=7, kind="sample", base=base,
                         loss={"ce_rule": rule, "forget_rate": 0.3, "forget_ramp_epochs": 0})
    assert max(errs.values()) < 1e-5, errs


@pytest.mark.parametrize("scope,unroll", [("head", 1), ("head", 2), ("full", 2)])
def test_the_reweighted_rule_s_residual_is_gradchecked_at_both_scopes(scope, unroll):
    """``lkd-best-head``'s shape: the relabel rule with the distillation term off, only the CE weight learned, the
    meta-step unrolled through the classifier head only (or the whole student): float64 finite differences agree."""
    from lkd_ray.meta.gradcheck import run_gradcheck

    errs = run_gradcheck(eps=1e-4, scope=scope, unroll=unroll, max_entries=12, seed=11, kind="sample", base="dist",
                         lock="norm", sample_outputs=["w_ce"], loss={"ce_rule": "relabel", "w_logit": 0.0})
    assert set(errs) == {"higher", "torch.func"} and max(errs.values()) < 1e-5, errs


def _np_pearson_rows(a, b):
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    return (a * b).sum(1) / np.sqrt((a * a).sum(1) * (b * b).sum(1))


@pytest.mark.parametrize("method", ["kd", "dist"])
def test_a_ramp_scales_the_loss_and_heats_its_temperature_linearly_over_its_epochs(batch, method):
    """``loss.ramp_epochs``: at epoch e the CE weight and the distillation weight are 1 + (w − 1)·min(1, e/R) and the
    temperature τ·(1 + (t − 1)·min(1, e/R)) — on DIST its inter-class term only, the intra-class term at τ — checked
    against numpy formulas; epoch 0 is the loss itself, bit for bit."""
    zs, zt, y = batch
    cfg = LossCfg(method=method, tau=2.0, ce_rule="boot_soft", boot_beta=0.8, w_ce=0.7, w_logit=1.3,
                  ramp_epochs=10, ramp_weight=2.0, ramp_tau=2.0)
    plain = build_method(LossCfg(**{**cfg.model_dump(), "ramp_epochs": 0, "ramp_weight": 1.0, "ramp_tau": 1.0}))
    ramped = build_method(cfg)
    out, t = StudentOutputs(zs), TeacherOutputs(zt)
    assert torch.equal(ramped(out, t, y, epoch=0)[0], plain(out, t, y, epoch=0)[0])
    s, tt = _np(zs), _np(zt)
    ce_rule = independent("boot_soft", zs, zt, y, boot_beta=0.8).mean()
    for epoch, f in ((5, 0.5), (10, 1.0), (30, 1.0)):
        w, tau = 1 + f, 2.0 * (1 + f)
        ps, pt = _softmax(s / tau), _softmax(tt / tau)
        if method == "kd":
            distil = w * tau ** 2 * (pt * (np.log(pt) - np.log(ps))).sum(1).mean()
        else:
            ps2, pt2 = _softmax(s / 2.0), _softmax(tt / 2.0)
            inter = (tau ** 2 * (1 - _np_pearson_rows(ps, pt))).mean()
            intra = 2.0 ** 2 * (1 - _np_pearson_rows(ps2.T, pt2.T).mean())
            distil = w * inter + intra
        ref = 0.7 * w * ce_rule + 1.3 * distil
        assert ramped(out, t, y, epoch=epoch)[0].item() == pytest.approx(ref, rel=1e-9), epoch


def test_a_ramp_without_its_epochs_or_on_a_learned_loss_is_refused():
    with pytest.raises(ConfigError, match="loss.ramp_epochs is 0"):
        build_config("fashion_mnist", overrides=["loss.method=dist", "loss.ramp_weight=2"])
    with pytest.raises(ConfigError, match="loss.method='lkd' has no such ramp"):
        build_config("fashion_mnist", overrides=["loss.ramp_epochs=10"])
    assert build_config("fashion_mnist", overrides=["loss.method=kd", "loss.ramp_epochs=10", "loss.ramp_tau=2"]).loss.ramp_tau == 2
