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
    zs, zt, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    assert net(zs, zt, y) != handcrafted.kd(zs, zt, 2.0)


def test_feature_lossnet_equals_mse_at_init():
    fs, ft = torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 8, 4, 4, dtype=torch.float64)
    net = FeatureLossNet(hidden=(4,)).double()
    out = net(fs, ft)
    ref = ((fs - ft) ** 2).mean()
    assert torch.equal(out, ref)
    assert torch.equal(torch.autograd.grad(out, fs)[0], torch.autograd.grad(ref, fs)[0])
    with pytest.raises(ValueError, match="equal shapes"):
        net(fs, ft[:, :4])
