"""The non-greedy hypergradient estimators against quantities known independently:
implicit differentiation vs a closed form and vs finite differences of a long unroll; ES and PES vs
the true gradient, within their standard errors (and truncated ES visibly biased where PES is not)."""
import copy

import pytest
import torch
from torch import nn

from lkd_ray.config import LossCfg, LossNetCfg
from lkd_ray.losses import StudentOutputs, TeacherOutputs, build_lossnets, build_method
from lkd_ray.meta import ESEstimator, MetaBatch, SGDHyper, es_index, implicit_gradient, neumann_hypergradient
from lkd_ray.meta.gradient import quiz_loss

D = torch.float64


def _quadratic(n=5, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))[0]
    a = q @ torch.diag(torch.linspace(0.5, 2.0, n, dtype=D)) @ q.T  # SPD, λ ∈ [0.5, 2]
    b = torch.randn(n, m, generator=g, dtype=D)
    t = torch.randn(n, generator=g, dtype=D)
    phi = torch.randn(m, generator=g, dtype=D, requires_grad=True)
    return a, b, t, phi


def test_neumann_series_converges_to_the_closed_form_hypergradient_of_a_quadratic():
    a, b, t, phi = _quadratic()
    theta_star = torch.linalg.solve(a, b @ phi.detach())
    exact = b.T @ torch.linalg.solve(a, theta_star - t)  # d/dφ ½‖θ*(φ) − t‖², θ* = A⁻¹Bφ
    theta = theta_star.clone().requires_grad_(True)

    def train(th):
        return 0.5 * th[0] @ a @ th[0] - th[0] @ (b @ phi)

    def quiz(th):
        return 0.5 * ((th[0] - t) ** 2).sum()

    _, g = neumann_hypergradient([theta], train, quiz, [phi], steps=400, alpha=0.5)
    torch.testing.assert_close(g[0], exact, rtol=1e-8, atol=1e-10)
    _, g_short = neumann_hypergradient([theta], train, quiz, [phi], steps=1, alpha=0.5)
    assert (g_short[0] - exact).abs().max() > 1e-2  # the comparison can fail: a 1-term series is far off


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        return StudentOutputs(self.b(nn.functional.softplus(self.a(x))))


def stationary_problem(lock: str = "none", kind: str = "class", wd: float = 1e-2) -> dict:
    """A tiny student at a stationary point θ* of its update (the gradient field SGD follows plus weight decay
    vanishes there) under a learned loss near its base. For a locked or per-sample loss that field is not a
    gradient; Newton's method on the field itself finds its zero."""
    from torch.func import functional_call

    torch.manual_seed(0)
    net = _Tiny().double()
    x, y = torch.randn(24, 3, dtype=D), torch.randint(0, 4, (24,))
    xq, yq = torch.randn(24, 3, dtype=D), torch.randint(0, 4, (24,))
    t_logits = torch.randn(24, 4, dtype=D) * 2
    cfg = LossCfg(method="lkd", tau=2.0)
    lossnets = build_lossnets(cfg, LossNetCfg(hidden=[5], lock=lock, trust=None, kind=kind)).double()
    with torch.no_grad():  # a learned loss near its base: the student's update then has a zero nearby
        for p in lossnets.parameters():
            p.normal_(0, 0.1)
    method = build_method(cfg, lossnets)

    def objective(out, b):
        return method(out, TeacherOutputs(b.t_logits), b.y)[0]

    batch = MetaBatch(x, y, t_logits)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def field(flat):  # what SGD follows: the loss's logit field pulled back to θ, plus weight decay
        params = dict(zip(names, torch.split(flat, [s.numel() for s in shapes])))
        params = {n: v.view(s) for (n, v), s in zip(params.items(), shapes)}
        loss = objective(functional_call(net, params, (x,)), batch)
        g = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        return torch.cat([gi.flatten() for gi in g]) + wd * flat

    def norm(th):
        return torch.linalg.vector_norm(field(th.clone().requires_grad_(True))).item()

    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    for _ in range(3000):  # warm start: plain gradient descent on the field
        theta = theta - 0.3 * field(theta.clone().requires_grad_(True)).detach()
    for _ in range(30):  # then damped Newton on the field: quadratic convergence to its zero
        th = theta.clone().requires_grad_(True)
        step = torch.linalg.solve(torch.autograd.functional.jacobian(field, th), field(th).detach())
        t, now = 1.0, norm(theta)
        while t > 1e-4 and norm(theta - t * step) >= now:
            t /= 2
        theta = theta - t * step
        if norm(theta) < 1e-11:
            break
    gnorm = norm(theta)
    assert gnorm < 1e-9, gnorm
    torch.nn.utils.vector_to_parameters(theta, net.parameters())
    eig = torch.linalg.eigvals(torch.autograd.functional.jacobian(field, theta.clone().requires_grad_(True))).real
    return {"net": net, "objective": objective, "batch": batch, "xq": xq, "yq": yq, "phi": list(lossnets.parameters()),
            "wd": wd, "lambda_max": eig.max().item(), "lambda_min": eig.min().item()}


def fd_of_unroll(pr: dict, lr: float, steps: int, momentum: float = 0.0, n: int = 12, eps: float = 1e-6):
    """(entries, float64 central finite differences of the quiz loss after ``steps`` SGD steps from θ*)."""
    phi, net, objective, batch = pr["phi"], pr["net"], pr["objective"], pr["batch"]

    def unrolled_quiz(flat_phi):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat_phi.clone(), phi)
        m = copy.deepcopy(net)
        o = torch.optim.SGD(m.parameters(), lr=lr, weight_decay=pr["wd"], momentum=momentum)
        for _ in range(steps):
            o.zero_grad()
            objective(m(batch.inputs), batch).backward()
            o.step()
        with torch.no_grad():
            return quiz_loss(m(pr["xq"]), pr["yq"]).item()

    base = torch.nn.utils.parameters_to_vector(phi).detach().clone()
    idx = torch.randperm(base.numel(), generator=torch.Generator().manual_seed(1))[:n]
    fd = []
    for i in idx.tolist():
        e = torch.zeros_like(base)
        e[i] = eps
        fd.append((unrolled_quiz(base + e) - unrolled_quiz(base - e)) / (2 * eps))
    torch.nn.utils.vector_to_parameters(base.clone(), phi)
    return idx, torch.tensor(fd, dtype=D)


def implicit_vs_unroll(lock: str = "none", kind: str = "class") -> float:
    """Relative error of the implicit hypergradient against finite differences of a 40-step unroll from θ*."""
    pr = stationary_problem(lock, kind)
    lr, steps = 0.3, 40
    _, analytic = implicit_gradient(pr["net"], SGDHyper(lr, weight_decay=pr["wd"]), pr["objective"], [pr["batch"]],
                                    pr["xq"], pr["yq"], pr["phi"], steps=steps - 1)
    analytic = torch.cat([g.flatten() for g in analytic])
    idx, fd = fd_of_unroll(pr, lr, steps)
    return ((analytic[idx] - fd).abs().max() / fd.abs().max()).item()


@pytest.mark.parametrize("lock,kind", [("none", "class"), ("norm", "class"), ("nontarget", "class"), ("norm", "sample")])
def test_implicit_gradient_equals_finite_differences_of_a_long_unroll_from_a_stationary_point(lock, kind):
    """At a stationary point θ* of the student's update, T steps of gradient descent have the hypergradient
    −α Σ_{j<T} (I − αJ)^j ∂F/∂φ: exactly the Neumann series with K = T − 1, for a loss (J its Hessian) and for a
    locked or per-sample field alike (J the field's Jacobian)."""
    rel = implicit_vs_unroll(lock, kind)
    assert rel < 1e-5, rel


def _es_rounds(f, phi0, est, rounds):
    """Per-round antithetic estimates of ∇f at φ0 (plain ES)."""
    out = []
    for r in range(rounds):
        losses = {p: f(phi0 + est.perturbation(r, p)).item() for p in range(est.particles)}
        out.append(est.gradient(r, losses)[0])
    return torch.stack(out)


def test_es_estimate_agrees_with_the_true_gradient_within_its_standard_error():
    def f(v):
        return torch.log1p(torch.exp(v @ torch.tensor([1.0, -2.0, 0.5, 0.0]))) + 0.3 * (v**2).sum()

    phi0 = torch.tensor([0.2, -0.1, 0.4, 0.3])
    true = torch.func.grad(f)(phi0)
    est = ESEstimator(4, particles=16, sigma=0.05, persistent=False, seed=3)
    g = _es_rounds(f, phi0, est, 400)
    mean, se = g.mean(0), g.std(0) / len(g) ** 0.5
    assert ((mean - true).abs() < 4 * se + 1e-3).all(), (mean, true, se)
    assert (true.abs().max() / se.max()) > 5  # informative, not just noisy


def test_pes_is_unbiased_over_the_whole_unroll_where_truncated_es_is_not():
    """s_{t+1} = 0.9·s_t + φ, L_t = (s_t − 1)²; one ES round per step, particles never reset.
    The gradient of Σ_t L_t w.r.t. φ carries the effect of φ on every later state: PES sees it,
    truncated (per-round) ES sees only each step's own effect."""
    T, phi0 = 15, 0.05

    def true_grad():
        phi = torch.tensor(phi0, dtype=D, requires_grad=True)
        s, total = torch.zeros((), dtype=D), 0.0
        for _ in range(T):
            s = 0.9 * s + phi
            total = total + (s - 1) ** 2
        return torch.autograd.grad(total, phi)[0].item()

    def run(persistent, seed):
        est = ESEstimator(1, particles=64, sigma=0.01, persistent=persistent, seed=seed)
        s = torch.zeros(est.particles, dtype=D)
        total = 0.0
        for t in range(T):
            phis = torch.tensor([phi0 + est.perturbation(t, p).item() for p in range(est.particles)], dtype=D)
            s = 0.9 * s + phis
            total += est.gradient(t, {p: ((s[p] - 1) ** 2).item() for p in range(est.particles)})[0].item()
        return total

    g = true_grad()
    pes = torch.tensor([run(True, k) for k in range(30)])
    tes = torch.tensor([run(False, k) for k in range(30)])
    se = pes.std() / len(pes) ** 0.5
    assert abs(pes.mean() - g) < 4 * se, (pes.mean(), g, se)
    assert abs(tes.mean() - g) > 10 * tes.std() / len(tes) ** 0.5  # truncated ES: short-horizon bias


def test_es_perturbs_only_the_last_layer_when_asked():
    nets = build_lossnets(LossCfg(method="lkd"), LossNetCfg(hidden=[8, 8]))
    idx = es_index(nets, "last")
    assert len(idx) == 8 and len(es_index(nets, "all")) == sum(p.numel() for p in nets.parameters())
    assert len(es_index(build_lossnets(LossCfg(method="control"), LossNetCfg()), "last")) == 1
    est = ESEstimator(8, 4, 0.1, seed=0)
    torch.testing.assert_close(est.perturbation(3, 0), -est.perturbation(3, 1))  # antithetic pairs
    assert not torch.equal(est.perturbation(3, 0), est.perturbation(4, 0))
    torch.testing.assert_close(est.perturbation(3, 2), ESEstimator(8, 4, 0.1, seed=0).perturbation(3, 2))  # regenerable
    with pytest.raises(ValueError, match="even"):
        ESEstimator(8, 3, 0.1)


def test_the_neumann_series_is_stable_with_momentum_where_training_is():
    """SGD with momentum β trains stably while lr·λ_max < 2(1 + β) (3.8 at β = 0.9), but a Neumann series with
    step α needs α·λ_max < 2: at the student's lr (the old default) it grows without bound. The default step
    α = lr/(1 + β) converges whenever training does, to the limit of a long momentum unroll from θ*."""
    pr = stationary_problem(wd=0.05)
    assert pr["lambda_min"] > 0
    lr, beta = 2.9 / pr["lambda_max"], 0.9  # stable for heavy-ball SGD (2.9 < 3.8), not for α = lr (2.9 > 2)
    hyper = SGDHyper(lr, momentum=beta, weight_decay=pr["wd"])
    steps = int(30 * (1 + beta) / (lr * pr["lambda_min"])) + 50  # the series' slowest mode has decayed by e^-30
    _, g = implicit_gradient(pr["net"], hyper, pr["objective"], [pr["batch"]], pr["xq"], pr["yq"], pr["phi"], steps=steps)
    g = torch.cat([t.flatten() for t in g])
    idx, fd = fd_of_unroll(pr, lr, 400, momentum=beta)
    assert ((g[idx] - fd).abs().max() / fd.abs().max()).item() < 1e-3
    _, old = implicit_gradient(pr["net"], hyper, pr["objective"], [pr["batch"]], pr["xq"], pr["yq"], pr["phi"], steps=200,
                               alpha=lr)
    old = torch.cat([t.flatten() for t in old])
    assert not torch.isfinite(old).all() or old.abs().max() > 1e3 * fd.abs().max()  # α = lr: the series blows up
