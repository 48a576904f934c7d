"""Hand-crafted losses against independent numpy formulas; learnable losses against their base."""
import numpy as np
import pytest
import torch

from lkd_ray.losses import FeatureLossNet, LogitLossNet, handcrafted


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _kl(p, q):
    return float(np.sum(p * (np.log(p) - np.log(q))))


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(16, 10, generator=g, dtype=torch.float64) * 3, torch.randn(16, 10, generator=g, dtype=torch.float64) * 3,
            torch.randint(0, 10, (16,), generator=g))


def test_ce(logits):
    zs, _, y = logits
    p = _softmax(zs.numpy())
    assert handcrafted.ce(zs, y).item() == pytest.approx(-np.mean(np.log(p[np.arange(16), y.numpy()])), rel=1e-12)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd(logits, tau):
    zs, zt, _ = logits
    ps, pt = _softmax(zs.numpy() / tau), _softmax(zt.numpy() / tau)
    ref = tau**2 * np.mean([_kl(pt[i], ps[i]) for i in range(16)])
    assert handcrafted.kd(zs, zt, tau).item() == pytest.approx(ref, rel=1e-10)


def test_dkd(logits):
    zs, zt, y = logits
    tau, a, b = 4.0, 1.0, 8.0
    ps, pt = _softmax(zs.numpy() / tau), _softmax(zt.numpy() / tau)
    tck = nck = 0.0
    for i, c in enumerate(y.numpy()):
        bs, bt = np.array([ps[i, c], 1 - ps[i, c]]), np.array([pt[i, c], 1 - pt[i, c]])
        tck += _kl(bt, bs)
        keep = np.arange(10) != c  # non-target distributions, renormalised
        nck += _kl(pt[i, keep] / pt[i, keep].sum(), ps[i, keep] / ps[i, keep].sum())
    ref = tau**2 * (a * tck + b * nck) / 16
    assert handcrafted.dkd(zs, zt, y, a, b, tau).item() == pytest.approx(ref, rel=1e-8)


def test_dist(logits):
    zs, zt, _ = logits
    tau, beta, gamma = 2.0, 1.0, 2.0
    ps, pt = _softmax(zs.numpy() / tau), _softmax(zt.numpy() / tau)
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(16)])
    intra = 1 - np.mean([np.corrcoef(ps[:, j], pt[:, j])[0, 1] for j in range(10)])
    ref = tau**2 * (beta * inter + gamma * intra)
    assert handcrafted.dist(zs, zt, beta, gamma, tau).item() == pytest.approx(ref, rel=1e-8)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_wsl_against_its_formula(logits, tau):
    """Zhou et al. (ICLR 2021): w_i = 1 − exp(−CE_s,i / CE_t,i) on the hard label, times τ²·KL_i(τ)."""
    zs, zt, y = logits
    ps1, pt1 = _softmax(zs.numpy()), _softmax(zt.numpy())
    ps, pt = _softmax(zs.numpy() / tau), _softmax(zt.numpy() / tau)
    ref = 0.0
    for i, c in enumerate(y.numpy()):
        w = 1 - np.exp(-(-np.log(ps1[i, c])) / (-np.log(pt1[i, c])))
        ref += w * tau**2 * _kl(pt[i], ps[i]) / 16
    assert handcrafted.wsl(zs, zt, y, tau).item() == pytest.approx(ref, rel=1e-6)
    z = zs.clone().requires_grad_(True)  # the weights are constants for the student: its gradient is w·∇KL
    g, = torch.autograd.grad(handcrafted.wsl(z, zt, y, tau), z)
    w = torch.tensor([1 - np.exp(-np.log(ps1[i, c]) / np.log(pt1[i, c])) for i, c in enumerate(y.numpy())])
    torch.testing.assert_close(g, w[:, None] * tau * (torch.softmax(zs / tau, 1) - torch.softmax(zt / tau, 1)) / 16)


def test_label_smoothing_against_its_formula(logits):
    zs, _, y = logits
    eps = 0.2
    logp = np.log(_softmax(zs.numpy()))
    target = np.full((16, 10), eps / 10)
    target[np.arange(16), y.numpy()] += 1 - eps
    assert handcrafted.ce(zs, y, eps).item() == pytest.approx(-np.mean((target * logp).sum(1)), rel=1e-12)


def test_kd_precomputed_value():
    # A fixed case, computed once by hand: p_t = softmax([0, ln 3]) = [.25, .75], p_s = [.5, .5], τ=1.
    zs, zt = torch.tensor([[0.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, np.log(3.0)]], dtype=torch.float64)
    expected = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)  # Σ p_t log(p_t/p_s)
    assert handcrafted.kd(zs, zt, 1.0).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("base", ["kd", "dist", "none"])
def test_logit_lossnet_equals_base_at_init(logits, base):
    zs, zt, y = logits
    net = LogitLossNet(hidden=(16, 16), base=base, tau=4.0).double()
    z1 = zs.clone().requires_grad_(True)
    z2 = zs.clone().requires_grad_(True)
    learned = net(z1, zt, y)
    ref = {"kd": lambda z: handcrafted.kd(z, zt, 4.0), "dist": lambda z: handcrafted.dist(z, zt, 1.0, 1.0, 4.0),
           "none": lambda z: z.sum() * 0}[base](z2)
    assert torch.equal(learned, ref)
    g1, = torch.autograd.grad(learned, z1)
    g2, = torch.autograd.grad(ref, z2)
    assert torch.equal(g1, g2)


def test_logit_lossnet_is_class_count_generic_and_moves_when_trained():
    net = LogitLossNet(hidden=(8,), base="kd", tau=2.0, state_inputs=True)
    for k in (10, 100, 1000):
        zs, zt, y = torch.randn(4, k), torch.randn(4, k), torch.randint(0, k, (4,))
        assert torch.isfinite(net(zs, zt, y, torch.tensor([0.5, 0.8])))
    with torch.no_grad():
        net.g[-1].weight.fill_(0.1)
    g = torch.Generator().manual_seed(3)
    zs, zt, y = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g), torch.randint(0, 10, (4,), generator=g)
    state = torch.tensor([0.5, 0.8])
    # the residual by its definition: τ²·mean_i Σ_c 0.1·Σ_j h_j(v_ic), v = [log p_s, log p_t, p_s, p_t, onehot, state]
    ls, lt = torch.log_softmax(zs / 2.0, 1), torch.log_softmax(zt / 2.0, 1)
    v = torch.stack([ls, lt, ls.exp(), lt.exp(), torch.nn.functional.one_hot(y, 10).float()], -1)
    v = torch.cat([v, state.expand(4, 10, 2)], -1)
    h = torch.nn.functional.silu(torch.nn.functional.linear(v, net.g[0].weight, net.g[0].bias))
    expect = handcrafted.kd(zs, zt, 2.0) + 4.0 * (0.1 * h.sum(-1)).sum(1).mean()
    assert net(zs, zt, y, state).item() == pytest.approx(expect.item(), rel=1e-5)


def test_feature_lossnet_equals_mse_at_init():
    fs, ft = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 8, 4, 4, dtype=torch.float64)
    net = FeatureLossNet(hidden=(4,)).double()
    out = net(fs, ft)
    ref = ((fs - ft) ** 2).mean()
    assert torch.equal(out, ref)
    assert torch.equal(torch.autograd.grad(out, fs)[0], torch.autograd.grad(ref, fs)[0])
    with pytest.raises(ValueError, match="equal shapes"):
        net(fs, ft[:, :4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dkd_is_exact_for_confidently_wrong_students_at_low_temperature(dtype):
    """τ = 1, target-logit gap of 60: TCKD must equal the exact log-space value and keep its gradient."""
    from scipy.special import logsumexp

    zs = torch.tensor([[-30.0, 30.0, 0.0, 1.0], [40.0, -20.0, 5.0, 0.0]], dtype=dtype, requires_grad=True)
    zt = torch.tensor([[5.0, 0.0, 1.0, -1.0], [0.0, 3.0, 0.0, 0.0]], dtype=dtype)
    y = torch.tensor([0, 1])
    loss = handcrafted.dkd(zs, zt, y, alpha=1.0, beta=0.0, tau=1.0)
    g, = torch.autograd.grad(loss, zs)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    ref, ref_g = 0.0, np.zeros((2, 4))
    for i, c in enumerate(y.tolist()):  # exact, in float64 log space, independent of the implementation
        s, t = zs[i].detach().double().numpy(), zt[i].double().numpy()
        rest = [j for j in range(4) if j != c]
        ls = np.array([s[c] - logsumexp(s), logsumexp(s[rest]) - logsumexp(s)])
        lt = np.array([t[c] - logsumexp(t), logsumexp(t[rest]) - logsumexp(t)])
        ref += float(np.sum(np.exp(lt) * (lt - ls))) / 2
        ref_g[i, c] = (np.exp(ls[0]) - np.exp(lt[0])) / 2  # ∂/∂z_target of KL(b_t‖b_s), batch mean
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert g[0, 0].item() == pytest.approx(ref_g[0, 0], rel=1e-4) and g[0, 0].item() < -0.4  # pulled back up
    assert ref > -np.log(1e-12) / 2 + 2  # the case lies beyond where the old clamp at 1e-12 capped TCKD


@pytest.mark.parametrize("lock", ["norm", "nontarget"])
def test_scale_locked_lossnet_equals_base_at_init_and_keeps_the_base_gradient_norm(logits, lock):
    zs, zt, y = logits
    net = LogitLossNet(hidden=(16,), base="kd", tau=4.0, lock=lock, trust=0.5).double()
    z1, z2 = zs.clone().requires_grad_(True), zs.clone().requires_grad_(True)
    learned, ref = net(z1, zt, y), handcrafted.kd(z2, zt, 4.0)
    assert torch.equal(learned, ref)
    g_l, g_b = torch.autograd.grad(learned, z1)[0], torch.autograd.grad(ref, z2)[0]
    torch.testing.assert_close(g_l, g_b, rtol=0, atol=1e-15)
    with torch.no_grad():  # move φ far from zero: the gradient turns, its size does not
        for p in net.parameters():
            p.normal_(0, 1.0)
    z3 = zs.clone().requires_grad_(True)
    g = torch.autograd.grad(net(z3, zt, y), z3)[0]
    mask = torch.ones_like(g) if lock == "norm" else 1 - torch.nn.functional.one_hot(y, 10).double()
    gm, bm = g * mask, g_b * mask
    assert torch.linalg.vector_norm(gm).item() == pytest.approx(torch.linalg.vector_norm(bm).item(), rel=1e-10)
    cos = (gm * bm).sum() / (torch.linalg.vector_norm(gm) * torch.linalg.vector_norm(bm))
    assert 0.99 > cos.item() >= np.cos(np.arcsin(0.5)) - 1e-9  # turned, but within the cone of half-angle asin(trust)
    if lock == "nontarget":  # the target-logit components are the base loss's, exactly
        tgt = torch.nn.functional.one_hot(y, 10).bool()
        torch.testing.assert_close(g[tgt], g_b[tgt], rtol=0, atol=1e-15)
    # without a trust bound the direction is free: the same φ turns it further
    free = LogitLossNet(hidden=(16,), base="kd", tau=4.0, lock=lock, trust=None).double()
    free.load_state_dict(net.state_dict())
    z4 = zs.clone().requires_grad_(True)
    gf = torch.autograd.grad(free(z4, zt, y), z4)[0] * mask
    cos_free = (gf * bm).sum() / (torch.linalg.vector_norm(gf) * torch.linalg.vector_norm(bm))
    assert cos_free < cos


def test_lock_needs_a_base_and_a_known_name():
    with pytest.raises(ValueError, match="needs lossnet.base"):
        LogitLossNet(base="none", lock="norm")
    with pytest.raises(ValueError, match="unknown lock"):
        LogitLossNet(lock="sideways")


def test_scalar_control_starts_as_kd_and_scales_it(logits):
    from lkd_ray.losses import KDWeight

    zs, zt, y = logits
    c = KDWeight(tau=4.0).double()
    assert torch.equal(c(zs, zt, y), handcrafted.kd(zs, zt, 4.0)) and c.weight == 1.0
    with torch.no_grad():
        c.log_w.fill_(np.log(2.5))
    assert c(zs, zt, y).item() == pytest.approx(2.5 * handcrafted.kd(zs, zt, 4.0).item(), rel=1e-12)


def test_method_registry_names_every_method_and_combines_terms(logits):
    from lkd_ray.config import LossCfg, LossNetCfg
    from lkd_ray.losses import METHODS, StudentOutputs, TeacherOutputs, build_lossnets, build_method

    assert set(METHODS) == {"ce", "kd", "dkd", "dist", "wsl", "lkd", "control"}
    zs, zt, y = logits
    for name in METHODS:
        cfg = LossCfg(method=name, w_ce=0.5, w_logit=2.0)
        nets = build_lossnets(cfg, LossNetCfg(hidden=[4]))
        m = build_method(cfg, nets.double() if nets is not None else None)
        total, parts = m(StudentOutputs(zs), TeacherOutputs(zt), y)
        assert parts["ce"].item() == pytest.approx(0.5 * handcrafted.ce(zs, y).item())
        expect = {"ce": 0.0, "kd": handcrafted.kd(zs, zt, 4.0), "dkd": handcrafted.dkd(zs, zt, y),
                  "dist": handcrafted.dist(zs, zt, tau=4.0), "wsl": handcrafted.wsl(zs, zt, y, 4.0), "lkd": handcrafted.kd(zs, zt, 4.0),
                  "control": handcrafted.kd(zs, zt, 4.0)}[name]
        if name != "ce":
            assert parts[name].item() == pytest.approx(2.0 * float(expect), rel=1e-10)
        assert total.item() == pytest.approx(sum(v.item() for v in parts.values()))
    with pytest.raises(ValueError, match="teacher's logits"):
        build_method(LossCfg(method="kd"))(StudentOutputs(zs), None, y)
