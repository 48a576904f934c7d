"""``python -m lkd_ray gradcheck``: both meta-gradient backends against float64 central finite
differences of an *independent* computation (a deep copy stepped by torch's own SGD), on a small
student with BatchNorm, momentum, weight decay and a feature connector."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import LossCfg, LossNetCfg
from ..losses import Connector, TeacherOutputs, build_lossnets, build_method
from ..models.small import SmallCNN
from .bundle import StudentBundle
from .gradient import BACKENDS, MetaBatch, SGDHyper, meta_gradient, momentum_buffers, quiz_objective


def _problem(seed: int = 0, scope: str = "full", unroll: int = 2, lock: str = "none", method: str = "lkd",
             kind: str = "class", lock_scope: str = "batch", loss: dict | None = None, **lossnet):
    torch.manual_seed(seed)
    dt = torch.float64
    k, n = 5, 12
    teacher = SmallCNN((4, 6, 8), k, 1).to(dt).eval()
    net = SmallCNN((3, 4, 5), k, 1).to(dt)
    bundle = StudentBundle(net, Connector(5, 8), (2, 2)).to(dt).train()
    loss_cfg = LossCfg(**{"method": method, "w_feat": 0.5, "tau": 2.0, **(loss or {})})
    lossnets = build_lossnets(loss_cfg, LossNetCfg(hidden=[6], feature_hidden=[4], state_inputs=True, lock=lock,
                                                   trust=0.5, kind=kind, lock_scope=lock_scope, **lossnet)).to(dt)
    with torch.no_grad():  # leave the zero-initialised start so every φ entry carries gradient
        for p in lossnets.parameters():
            p.normal_(0, 0.3)
    method_ = build_method(loss_cfg, lossnets)

    def objective(out, t_logits, t_feat, y, st):
        return method_(out, TeacherOutputs(t_logits, t_feat), y, st)
    opt = torch.optim.SGD(bundle.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3, nesterov=False)
    xs = [torch.randn(n, 1, 8, 8, dtype=dt) for _ in range(unroll + 1)]
    ys = [torch.randint(0, k, (n,)) for _ in range(unroll + 1)]
    state = torch.tensor([0.3, 0.6], dtype=dt)

    def t_out(x):
        with torch.no_grad():
            f = teacher.forward_features(x)
            return teacher.forward_head(f), f

    # one real step first, so the momentum buffers are non-zero
    out = bundle(xs[0])
    loss = objective(out, *t_out(xs[0]), ys[0], state)[0]
    opt.zero_grad()
    loss.backward()
    opt.step()
    batches = [MetaBatch(x, y, *t_out(x)) for x, y in zip(xs[1:], ys[1:])]
    xq, yq = torch.randn(n, 1, 8, 8, dtype=dt), torch.randint(0, k, (n,))
    if scope == "head":
        with torch.no_grad():
            batches = [MetaBatch(bundle.net.forward_features(b.inputs), b.y, b.t_logits, b.t_feat) for b in batches]
            xq = bundle.net.forward_features(xq)
        module = bundle.head_view()
    else:
        module = bundle
    return module, opt, objective, lossnets, batches, xq, yq, state


def _reference_quiz_loss(module: nn.Module, opt: torch.optim.Optimizer, objective, batches, xq, yq, state,
                         quiz: str = "ce") -> float:
    """Independent of both backends: a deep copy trained by torch.optim.SGD itself."""
    m = copy.deepcopy(module)
    params = [p for p in m.parameters() if p.requires_grad]
    src = [p for p in module.parameters() if p.requires_grad]
    g = opt.param_groups[0]
    ref = torch.optim.SGD(params, lr=g["lr"], momentum=g["momentum"], weight_decay=g["weight_decay"],
                          dampening=g["dampening"], nesterov=g["nesterov"])
    for p, s in zip(params, src):
        b = opt.state.get(s, {}).get("momentum_buffer")
        if b is not None:
            ref.state[p]["momentum_buffer"] = b.clone()
    for b in batches:
        loss = objective(m(b.inputs), b.t_logits, b.t_feat, b.y, state)[0]
        ref.zero_grad()
        loss.backward()
        ref.step()
    with torch.no_grad():
        return quiz_objective(m(xq).logits, yq, quiz).item()  # calibrated: β re-optimised at every evaluation


def run_gradcheck(eps: float = 1e-6, max_entries: int = 60, scope: str = "full", unroll: int = 2, seed: int = 0,
                  lock: str = "none", method: str = "lkd", quiz: str = "ce", kind: str = "class",
                  lock_scope: str = "batch", loss: dict | None = None, **lossnet) -> dict[str, float]:
    """Max relative error per backend: max_i |analytic_i − fd_i| / max_i |fd_i|, for any lock, loss-network
    kind and unroll length (a locked or per-sample loss is defined by its gradient field, which the unroll
    differentiates exactly)."""
    module, opt, objective, lossnets, batches, xq, yq, state = _problem(seed, scope, unroll, lock, method, kind, lock_scope,
                                                                        loss, **lossnet)
    phi = list(lossnets.parameters())
    params = [p for p in module.parameters() if p.requires_grad]
    hyper, bufs = SGDHyper.from_optimizer(opt), momentum_buffers(opt, params)
    obj = lambda out, b: objective(out, b.t_logits, b.t_feat, b.y, state)[0]  # noqa: E731
    analytic = {name: torch.cat([g.flatten() for g in meta_gradient(module, hyper, bufs, obj, batches, xq, yq, phi, name,
                                                                     quiz)[1]])
                for name in BACKENDS}
    flat = torch.cat([p.detach().flatten() for p in phi])
    gen = torch.Generator().manual_seed(seed)
    entries = torch.randperm(flat.numel(), generator=gen)[:max_entries]
    fd = torch.zeros(len(entries), dtype=torch.float64)
    for j, i in enumerate(entries.tolist()):
        vals = []
        for sign in (+1, -1):
            _set_flat(phi, i, flat[i].item() + sign * eps)
            vals.append(_reference_quiz_loss(module, opt, objective, batches, xq, yq, state, quiz))
        _set_flat(phi, i, flat[i].item())
        fd[j] = (vals[0] - vals[1]) / (2 * eps)
    if not fd.abs().max() > 0:  # a φ the quiz loss does not depend on: every error would be 0 and prove nothing
        raise ValueError("the finite differences are all zero: the quiz loss does not depend on the sampled "
                         "loss-network entries, so the check cannot fail; change the problem")
    scale = fd.abs().max()
    return {name: ((g[entries] - fd).abs().max() / scale).item() for name, g in analytic.items()}


def _set_flat(params, index: int, value: float) -> None:
    with torch.no_grad():
        for p in params:
            if index < p.numel():
                p.view(-1)[index] = value
                return
            index -= p.numel()
