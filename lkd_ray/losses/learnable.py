"""Learnable loss networks (DESIGN §1): residuals on a hand-crafted base with a zero-initialised
last layer, so at step 0 LKD *is* the base loss and moves only where the quiz loss asks.

The logit network is *generic*: one small MLP shared across classes, applied per (sample, class),
so the same network serves 10 or 1000 classes. Activations are smooth because the meta-gradient
differentiates through the network's input-gradient.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import handcrafted
from .ce_rules import CERule

ACTIVATIONS = {"silu": nn.SiLU, "softplus": nn.Softplus, "gelu": nn.GELU, "tanh": nn.Tanh}
STATE_DIM = 2  # (fraction of training done, running quiz accuracy)
LOCKS = ("none", "norm", "nontarget")
LOCK_SCOPES = ("batch", "sample")
SAMPLE_INPUTS = ("pt_y", "agree", "ce_s", "margin_s", "ent_s", "ent_t")
SAMPLE_OUTPUTS = ("w_ce", "w_kd", "tau")


def _mlp(in_dim: int, hidden: Sequence[int], activation: str, out_dim: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), ACTIVATIONS[activation]()]
        in_dim = h
    # No bias: a constant added to the loss has no effect on the student, so it would get no meta-gradient
    # (and a zero-initialised last layer makes every learned loss start as its base loss).
    last = nn.Linear(in_dim, out_dim, bias=False)
    nn.init.zeros_(last.weight)
    layers.append(last)
    return nn.Sequential(*layers)


def _with_state(v: torch.Tensor, state: torch.Tensor | None, use_state: bool) -> torch.Tensor:
    if not use_state:
        return v
    if state is None:
        state = v.new_zeros(STATE_DIM)
    return torch.cat([v, state.to(v.dtype).expand(*v.shape[:-1], STATE_DIM)], -1)


# --------------------------------------------------------------------------- exact gradient fields
class _FieldLoss(torch.autograd.Function):
    """A loss given by its value and its gradient field w.r.t. the logits, F(z). The field is recomputed in
    ``backward`` with differentiable operations, so when the caller asks for a graph (``create_graph``: an
    unroll, an implicit hypergradient) the Jacobian of F itself is differentiated — exact to every order,
    even where F is not the gradient of any loss (a scale lock; per-sample weights that read the logits)."""

    @staticmethod
    def forward(ctx, z, field, value):
        ctx.field = field
        ctx.save_for_backward(z)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        (z,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: keep F's dependence on z (hence θ) and on φ
            f = ctx.field(z, True)
        else:
            f = ctx.field(z.detach(), False).detach()
        return grad_out * f, None, None


def field_loss(z: torch.Tensor, field: Callable[[torch.Tensor, bool], torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """``value`` (a detached scalar) whose gradient w.r.t. ``z`` is ``field(z, create_graph)``."""
    return _FieldLoss.apply(z, field, value.detach())


def locked_direction(g_base: torch.Tensor, r: torch.Tensor, trust: float | None, scope: str = "batch",
                     eps: float = 1e-12) -> torch.Tensor:
    """(g_base + s·r)·‖g_base‖/‖g_base + s·r‖ with s = min(1, trust·‖g_base‖/‖r‖): the base gradient turned by
    at most asin(trust) towards r, at the base gradient's norm. Norms over the whole batch (``scope='batch'``:
    samples may trade size among themselves) or per sample (``'sample'``: every sample keeps its own size)."""
    def norm(t):
        return torch.linalg.vector_norm(t, dim=1, keepdim=True) if scope == "sample" else torch.linalg.vector_norm(t)

    nb = norm(g_base)
    if trust is not None:
        nr = norm(r)
        r = r * torch.where(nr > trust * nb, trust * nb / nr.clamp_min(eps), torch.ones_like(nr))
    d = g_base + r
    return d * (nb / norm(d).clamp_min(eps))


def _zero_mean(t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each row minus its mean (over the entries of ``mask``): a logit gradient that no common shift of the logits
    can absorb — every softmax loss's gradient already sums to zero per sample."""
    if mask is None:
        return t - t.mean(1, keepdim=True)
    return (t - (t * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)) * mask


def lock_field(g_base: torch.Tensor, g_learned: torch.Tensor, y: torch.Tensor, lock: str, trust: float | None,
               scope: str = "batch") -> torch.Tensor:
    """The logit gradient a locked loss gives the student (rows: samples). Every row sums to zero, as every
    softmax loss's does. ``norm``: the learned field turned inside the trust cone around the base field, at its
    norm. ``nontarget``: the target-logit entry and the non-target mean stay the base field's (so the row still
    sums to zero); only the zero-mean non-target part is turned, at its norm."""
    if lock == "none":
        return g_learned
    r = g_learned - g_base
    if lock == "norm":
        return locked_direction(g_base, _zero_mean(r), trust, scope)
    onehot = torch.nn.functional.one_hot(y, g_base.shape[1]).to(g_base.dtype)
    mask = 1 - onehot
    keep = g_base * onehot + (g_base * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True) * mask
    return keep + locked_direction(_zero_mean(g_base, mask), _zero_mean(r, mask), trust, scope)


def kd_per_sample(z_s: torch.Tensor, z_t: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """τ²·KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) per sample; τ a number or one per sample."""
    t = tau if isinstance(tau, (int, float)) else tau[:, None]
    ls, lt = F.log_softmax(z_s / t, 1), F.log_softmax(z_t / t, 1)
    return (lt.exp() * (lt - ls)).sum(1) * (t**2 if isinstance(tau, (int, float)) else tau**2)


class LogitLossNet(nn.Module):
    """ℓ_φ(z_s, z_t, y) = base(z_s, z_t) + τ²·mean_i Σ_c g_φ(v_ic), optionally scale-locked.

    With ``lock`` set, φ may turn the gradient the student receives (w.r.t. its logits) but not change its
    size (``lock_field``): over the batch or per sample (``lock_scope``), inside a trust cone. The locked
    loss's value is the base loss's; its gradient is the locked field, exactly and to every order
    (``field_loss``), so longer unrolls and the implicit estimator differentiate the lock itself.
    """

    owns_ce = False

    def __init__(self, inputs: Sequence[str] = ("log_ps", "log_pt", "ps", "pt", "onehot"),
                 hidden: Sequence[int] = (32, 32), activation: str = "silu", base: str = "kd",
                 tau: float = 4.0, state_inputs: bool = False, dist_beta: float = 1.0, dist_gamma: float = 1.0,
                 lock: str = "none", trust: float | None = None, lock_scope: str = "batch"):
        super().__init__()
        if lock not in LOCKS:
            raise ValueError(f"unknown lock {lock!r}; valid: {', '.join(LOCKS)}")
        if lock_scope not in LOCK_SCOPES:
            raise ValueError(f"unknown lock scope {lock_scope!r}; valid: {', '.join(LOCK_SCOPES)}")
        if lock != "none" and base == "none":
            raise ValueError("a scale lock keeps the base loss's gradient norm: it needs lossnet.base kd or dist, not none")
        self.inputs, self.base, self.tau, self.state_inputs = list(inputs), base, float(tau), state_inputs
        self.dist_beta, self.dist_gamma = dist_beta, dist_gamma
        self.lock, self.trust, self.lock_scope = lock, trust, lock_scope
        self.g = _mlp(len(self.inputs) + (STATE_DIM if state_inputs else 0), hidden, activation)

    @property
    def last_layer(self) -> nn.Linear:
        return self.g[-1]

    def features(self, z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-(sample, class) input vectors, shape (N, C, len(inputs))."""
        log_ps, log_pt = F.log_softmax(z_s / self.tau, 1), F.log_softmax(z_t / self.tau, 1)
        cols = {
            "log_ps": lambda: log_ps, "log_pt": lambda: log_pt,
            "ps": lambda: log_ps.exp(), "pt": lambda: log_pt.exp(),
            "onehot": lambda: F.one_hot(y, z_s.shape[1]).to(z_s.dtype),
            "log_ratio": lambda: log_ps - log_pt,
        }
        return torch.stack([cols[k]() for k in self.inputs], -1)

    def base_loss(self, z_s, z_t, y):
        if self.base == "kd":
            return handcrafted.kd(z_s, z_t, self.tau)
        if self.base == "dist":
            return handcrafted.dist(z_s, z_t, self.dist_beta, self.dist_gamma, self.tau)
        return z_s.new_zeros(())

    def residual(self, z_s, z_t, y, state=None) -> torch.Tensor:
        v = _with_state(self.features(z_s, z_t, y), state, self.state_inputs)
        return self.tau**2 * self.g(v).squeeze(-1).sum(1).mean()

    def forward(self, z_s, z_t, y, state: torch.Tensor | None = None) -> torch.Tensor:
        if self.lock == "none":
            return self.base_loss(z_s, z_t, y) + self.residual(z_s, z_t, y, state)
        value = self.base_loss(z_s.detach(), z_t, y)  # the locked loss's value is the base loss's
        if not torch.is_grad_enabled():
            return value
        return field_loss(z_s, lambda z, graph: self.locked_field(z, z_t, y, state, graph), value)

    def locked_field(self, z, z_t, y, state=None, create_graph: bool = True) -> torch.Tensor:
        """The locked logit gradient at ``z`` (differentiable in z and φ when ``create_graph``)."""
        if not create_graph:
            z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            g_b = torch.autograd.grad(self.base_loss(z, z_t, y), z, create_graph=create_graph)[0]
            r = torch.autograd.grad(self.residual(z, z_t, y, state), z, create_graph=create_graph)[0]
        return lock_field(g_b, g_b + r, y, self.lock, self.trust, self.lock_scope)


class SampleLossNet(nn.Module):
    """A per-sample learned loss (DESIGN §6): from per-sample inputs (the teacher's probability of the given
    label, teacher–label agreement, the student's CE, margin and entropy, the teacher's entropy) an MLP gives
    each sample a weight on its CE term, a weight on its KD term and its own temperature:

        ℓ_φ = mean_i [ w_ce·a_i·CE_i + w_logit·b_i·τ_i²·KL_i(τ_i) ],   a_i, b_i = 2σ(o_i),  τ_i = τ·2^tanh(o_i)

    Residual and zero-initialised: at φ₀ every a_i = b_i = 1 and τ_i = τ, i.e. exactly w_ce·CE + w_logit·KD.
    With ``base="dist"`` the distillation term is DIST's instead (the loss to beat under label noise): b_i and
    τ_i act on its per-sample inter-class term, τ_i²·(1 − Pearson_i(τ_i)), and the intra-class term — a
    statistic of the whole batch, with no per-sample share — stays DIST's; at φ₀ it is w_ce·CE + w_logit·DIST.
    The weights act as weights (the student's gradient is Σ a_i∇CE_i + b_i∇KD_i, not through a_i), and the
    loss is defined by that field (``field_loss``), so unrolls of any length differentiate it exactly. With
    ``lock=norm`` the field keeps the base field's norm per batch (samples trade weight, the step size stays)
    or per sample (each sample only chooses between its label and its teacher).
    """

    owns_ce = True

    def __init__(self, inputs: Sequence[str] = SAMPLE_INPUTS, outputs: Sequence[str] = SAMPLE_OUTPUTS,
                 hidden: Sequence[int] = (32, 32), activation: str = "silu", tau: float = 4.0, w_ce: float = 1.0,
                 w_kd: float = 1.0, label_smoothing: float = 0.0, state_inputs: bool = False, lock: str = "none",
                 trust: float | None = None, lock_scope: str = "batch", base: str = "kd", dist_beta: float = 1.0,
                 dist_gamma: float = 1.0, ce_rule: CERule | None = None):
        super().__init__()
        if base not in ("kd", "dist"):
            raise ValueError(f"a per-sample loss network weighs CE and a distillation term: base must be kd or dist, not {base!r}")
        bad = [k for k in inputs if k not in SAMPLE_INPUTS] + [k for k in outputs if k not in SAMPLE_OUTPUTS]
        if bad or not inputs or not outputs:
            raise ValueError(f"per-sample inputs must come from {SAMPLE_INPUTS} and outputs from {SAMPLE_OUTPUTS} "
                             f"(non-empty); got {bad or 'an empty list'}")
        if lock not in LOCKS or lock_scope not in LOCK_SCOPES:
            raise ValueError(f"lock must be one of {LOCKS} and lock_scope one of {LOCK_SCOPES}")
        self.inputs, self.outputs = list(inputs), list(outputs)
        self.tau, self.w_ce, self.w_kd, self.label_smoothing = float(tau), float(w_ce), float(w_kd), float(label_smoothing)
        self.state_inputs, self.lock, self.trust, self.lock_scope = state_inputs, lock, trust, lock_scope
        self.base, self.dist_beta, self.dist_gamma = base, float(dist_beta), float(dist_gamma)
        # the label term's rule (None or 'plain': CE, with its analytic gradient); a_i weighs the rule's per-sample value
        self.rule = ce_rule if ce_rule is not None and ce_rule.name != "plain" else None
        self.epoch = 0  # the student's epoch, for rules that change over training (small_loss); set by forward
        self.h = _mlp(len(self.inputs) + (STATE_DIM if state_inputs else 0), hidden, activation, len(self.outputs))

    @property
    def last_layer(self) -> nn.Linear:
        return self.h[-1]

    def sample_features(self, z_s: torch.Tensor, z_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample input vectors, shape (N, len(inputs)); entropies and CE are divided by log C (≈ [0, 1])."""
        log_c = math.log(z_s.shape[1])
        log_ps, log_pt = F.log_softmax(z_s, 1), F.log_softmax(z_t, 1)
        ps, pt = log_ps.exp(), log_pt.exp()
        idx = y[:, None]
        others = ps.scatter(1, idx, float("-inf"))
        cols = {
            "pt_y": lambda: pt.gather(1, idx).squeeze(1),
            "agree": lambda: (z_t.argmax(1) == y).to(z_s.dtype),
            "ce_s": lambda: -log_ps.gather(1, idx).squeeze(1) / log_c,
            "margin_s": lambda: ps.gather(1, idx).squeeze(1) - others.max(1).values,
            "ent_s": lambda: -(ps * log_ps).sum(1) / log_c,
            "ent_t": lambda: -(pt * log_pt).sum(1) / log_c,
        }
        return torch.stack([cols[k]() for k in self.inputs], -1)

    def per_sample(self, z_s, z_t, y, state=None) -> dict[str, torch.Tensor]:
        """``{"w_ce": a, "w_kd": b, "tau": τ_i}``, one value per sample (base values for outputs not learned)."""
        o = self.h(_with_state(self.sample_features(z_s, z_t, y), state, self.state_inputs))
        n = z_s.shape[0]
        out = {"w_ce": z_s.new_ones(n), "w_kd": z_s.new_ones(n), "tau": z_s.new_full((n,), self.tau)}
        for j, k in enumerate(self.outputs):
            out[k] = self.tau * torch.pow(2.0, torch.tanh(o[:, j])) if k == "tau" else 2 * torch.sigmoid(o[:, j])
        return out

    def _ce_grad(self, z, y):
        target = F.one_hot(y, z.shape[1]).to(z.dtype)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / z.shape[1]
        return torch.softmax(z, 1) - target

    def _dist_grad(self, z, z_t, b, tau, create_graph: bool) -> torch.Tensor:
        """∇_z of β·mean_i b_i·inter_i(τ_i) + γ·intra(τ), holding b and τ_i fixed (they act as weights), yet
        differentiable in them and in z. The gradient is taken w.r.t. an alias of z, which b and τ_i (computed
        from z itself) do not depend on; DIST's rows of softmax gradients each sum to zero."""
        create_graph = create_graph and torch.is_grad_enabled()  # a plain student step needs no second-order graph
        with torch.enable_grad():
            za = z.view_as(z) if z.requires_grad else z.detach().requires_grad_(True)
            loss = (self.dist_beta * (b * handcrafted.dist_inter_per_sample(za, z_t, tau)).sum()
                    + self.dist_gamma * z.shape[0] * handcrafted.dist_intra(za, z_t, self.tau))
            return torch.autograd.grad(loss, za, create_graph=create_graph)[0]

    def _rule_grad(self, z, z_t, y, a, create_graph: bool) -> torch.Tensor:
        """∇_z Σ_i a_i·rule_i(z), holding a fixed (it acts as a weight) yet differentiable in it and in z, as
        ``_dist_grad`` does for DIST's term."""
        create_graph = create_graph and torch.is_grad_enabled()
        with torch.enable_grad():
            za = z.view_as(z) if z.requires_grad else z.detach().requires_grad_(True)
            loss = (a * self.rule.per_sample(za, y, z_t, self.epoch)).sum()
            return torch.autograd.grad(loss, za, create_graph=create_graph)[0]

    def _label_grad(self, z, z_t, y, a) -> torch.Tensor:
        """w_ce·a_i·∇(label term)_i per sample: CE's analytic gradient (in the order of operations the records
        before the rules ran), or the rule's by autograd."""
        if self.rule is None:
            return self.w_ce * a[:, None] * self._ce_grad(z, y)
        return self.w_ce * self._rule_grad(z, z_t, y, a, True)

    def field(self, z, z_t, y, state=None, create_graph: bool = True) -> torch.Tensor:
        """The student's logit gradient (mean over the batch), locked if asked. Analytic for CE and KD:
        ∇CE_i = p_i − y_i, ∇τ²KL_i(τ) = τ·(p_i^τ − p_t,i^τ); DIST's by autograd (``_dist_grad``)."""
        if not create_graph:
            with torch.no_grad():
                return self.field(z.detach(), z_t, y, state, True).detach()
        w = self.per_sample(z, z_t, y, state)
        n = z.shape[0]
        g_ce = self._label_grad(z, z_t, y, w["w_ce"])
        if self.base == "dist":
            distil = self.w_kd * self._dist_grad(z, z_t, w["w_kd"], w["tau"], True)
        else:
            tau = w["tau"][:, None]
            g_kd = tau * (torch.softmax(z / tau, 1) - torch.softmax(z_t / tau, 1))
            distil = self.w_kd * w["w_kd"][:, None] * g_kd
        learned = (g_ce + distil) / n
        if self.lock == "none":
            return learned
        g_ce = self._label_grad(z, z_t, y, z.new_ones(n)) if self.rule is not None else self.w_ce * self._ce_grad(z, y)
        if self.base == "dist":
            base = (g_ce + self.w_kd * self._dist_grad(z, z_t, z.new_ones(n), self.tau, True)) / n
        else:
            base = (g_ce + self.w_kd * self.tau * (torch.softmax(z / self.tau, 1) - torch.softmax(z_t / self.tau, 1))) / n
        return lock_field(base, learned, y, self.lock, self.trust, self.lock_scope)

    def value(self, z_s, z_t, y, state=None) -> torch.Tensor:
        w = self.per_sample(z_s, z_t, y, state)
        ce = (F.cross_entropy(z_s, y, reduction="none", label_smoothing=self.label_smoothing) if self.rule is None
              else self.rule.per_sample(z_s, y, z_t, self.epoch))
        if self.base == "dist":
            distil = (self.dist_beta * w["w_kd"] * handcrafted.dist_inter_per_sample(z_s, z_t, w["tau"])).mean() \
                + self.dist_gamma * handcrafted.dist_intra(z_s, z_t, self.tau)
            return (self.w_ce * w["w_ce"] * ce).mean() + self.w_kd * distil
        return (self.w_ce * w["w_ce"] * ce + self.w_kd * w["w_kd"] * kd_per_sample(z_s, z_t, w["tau"])).mean()

    def forward(self, z_s, z_t, y, state: torch.Tensor | None = None, epoch: int | None = None) -> torch.Tensor:
        if epoch is not None:
            self.epoch = int(epoch)
        with torch.no_grad():
            value = self.value(z_s.detach(), z_t, y, state)
        if not torch.is_grad_enabled():
            return value
        return field_loss(z_s, lambda z, graph: self.field(z, z_t, y, state, graph), value)


class KDWeight(nn.Module):
    """The scalar control: w·KD with w = exp(s) meta-learned, s₀ = 0 (so it starts as KD)."""

    state_inputs = False
    owns_ce = False

    def __init__(self, tau: float = 4.0):
        super().__init__()
        self.tau = float(tau)
        self.log_w = nn.Parameter(torch.zeros(()))

    @property
    def weight(self) -> float:
        return float(self.log_w.detach().exp())

    def forward(self, z_s, z_t, y, state: torch.Tensor | None = None) -> torch.Tensor:
        return self.log_w.exp().to(z_s.dtype) * handcrafted.kd(z_s, z_t, self.tau)


class Connector(nn.Module):
    """1×1 conv + BN mapping student features to the teacher's channels and spatial size.

    Trained with the student (it lives in the student's optimizer), as FitNets-style hints are.
    """

    def __init__(self, c_s: int, c_t: int):
        super().__init__()
        self.conv = nn.Conv2d(c_s, c_t, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_t)

    def forward(self, f_s: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(f_s.shape[-2:]) != tuple(size):
            f_s = F.adaptive_avg_pool2d(f_s, size)
        return self.bn(self.conv(f_s))


class FeatureLossNet(nn.Module):
    """ℓ_ψ(f̂_s, f_t) = MSE(f̂_s, f_t) + mean over elements of h_ψ([f̂_s, f_t, f̂_s − f_t])."""

    def __init__(self, hidden: Sequence[int] = (16,), activation: str = "silu", state_inputs: bool = False):
        super().__init__()
        self.state_inputs = state_inputs
        self.h = _mlp(3 + (STATE_DIM if state_inputs else 0), hidden, activation)

    @property
    def last_layer(self) -> nn.Linear:
        return self.h[-1]

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        if f_s.shape != f_t.shape:
            raise ValueError(f"feature loss needs equal shapes after the connector: student {tuple(f_s.shape)} vs teacher {tuple(f_t.shape)}")
        v = _with_state(torch.stack([f_s, f_t, f_s - f_t], -1), state, self.state_inputs)
        return F.mse_loss(f_s, f_t) + self.h(v).mean()


class LossNetworks(nn.Module):
    """φ and ψ together: the parameters the meta-optimizer owns (and the Ray LossNetServer serves)."""

    def __init__(self, logit: LogitLossNet | KDWeight | None, feature: FeatureLossNet | None):
        super().__init__()
        self.logit = logit
        self.feature = feature

    def es_parameters(self, which: str = "last") -> list[nn.Parameter]:
        """What evolution strategies perturb: every entry, or only each network's last layer (far fewer
        numbers, so far less variance; the last layer is also what starts at zero)."""
        if which == "all":
            return list(self.parameters())
        out: list[nn.Parameter] = []
        for net in (self.logit, self.feature):
            if isinstance(net, KDWeight):
                out.append(net.log_w)
            elif net is not None:
                out.append(net.last_layer.weight)
        return out
