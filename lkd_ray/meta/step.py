"""The meta-step: pick the unroll's starting point (the current student or an earlier snapshot) and
the scope, and compute the meta-gradient with the configured estimator (``unroll`` or ``implicit``;
``es`` runs particles instead of a per-step gradient, see ``lkd_ray.train.es``)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..config import MetaCfg
from ..losses.methods import Method, TeacherOutputs
from .bundle import StudentBundle
from .gradient import MetaBatch, SGDHyper, meta_gradient, momentum_buffers, preserved_buffers
from .implicit import implicit_gradient

# Student forward+backward passes per meta-step (the cost unit of BENCHMARKS.md), by estimator.
def cost_units(cfg: MetaCfg) -> float:
    """≈ passes of the student per meta-step: an unroll of k steps costs k double-differentiable steps
    (≈ 2 passes each) plus the quiz pass and the backward through it; implicit ≈ 2K + 4."""
    if cfg.estimator == "implicit":
        return 2 * cfg.neumann_steps + 4
    if cfg.estimator == "es":
        return 0.0  # no meta-step: the cost is the particles' own training (es_particles × a KD run)
    return 3 * cfg.unroll_steps + 2


@dataclass
class MetaStep:
    """Computes meta-gradients for one student; holds a scratch copy for snapshot starts."""

    cfg: MetaCfg
    method: Method
    lossnets: nn.Module
    _scratch: StudentBundle | None = field(default=None, repr=False)

    @property
    def phi(self) -> list[nn.Parameter]:
        return list(self.lossnets.parameters())

    def compute(self, bundle: StudentBundle, optimizer: torch.optim.Optimizer, batches: Sequence[MetaBatch],
                quiz_x: torch.Tensor, quiz_y: torch.Tensor, state: torch.Tensor | None = None, epoch: int = 0,
                start_state: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``batches`` carry images; for scope=head they are turned into detached features here."""
        hyper = SGDHyper.from_optimizer(optimizer)
        src = bundle
        if start_state is not None:
            if self._scratch is None:
                self._scratch = copy.deepcopy(bundle)
            self._scratch.load_state_dict(start_state)
            self._scratch.train(bundle.training)
            src = self._scratch
        if self.cfg.scope == "head":
            with torch.no_grad(), preserved_buffers(src):
                batches = [MetaBatch(src.net.forward_features(b.inputs), b.y, b.t_logits, b.t_feat) for b in batches]
                quiz_x = src.net.forward_features(quiz_x)
            module: nn.Module = src.head_view()
        else:
            module = src
        params = [p for p in module.parameters() if p.requires_grad]

        def obj(out, b: MetaBatch) -> torch.Tensor:
            return self.method(out, TeacherOutputs(b.t_logits, b.t_feat), b.y, state, epoch)[0]

        if self.cfg.estimator == "implicit":
            return implicit_gradient(module, hyper, obj, batches, quiz_x, quiz_y, self.phi, self.cfg.neumann_steps,
                                     self.cfg.neumann_alpha, self.cfg.quiz_objective)
        if self.cfg.estimator != "unroll":
            raise ValueError(f"meta.estimator={self.cfg.estimator!r} has no per-step meta-gradient (es trains particles)")
        bufs = [None] * len(params) if start_state is not None else momentum_buffers(optimizer, params)
        return meta_gradient(module, hyper, bufs, obj, batches, quiz_x, quiz_y, self.phi, self.cfg.backend,
                             self.cfg.quiz_objective)
