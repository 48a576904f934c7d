"""Meta-gradients of the quiz loss w.r.t. the loss networks: unrolled student updates (higher /
torch.func), implicit differentiation, evolution strategies; and the one optimizer that applies them."""
from .bundle import HeadBundle, StudentBundle
from .es import ESEstimator, es_index
from .gradient import BACKENDS, MetaBatch, SGDHyper, meta_gradient, momentum_buffers, preserved_buffers
from .implicit import implicit_gradient, neumann_hypergradient
from .step import MetaStep, cost_units
from .updater import LossNetOptimizer, MetaCounters, MetaUpdater, NonFiniteMetaGradient, check_and_clip, flatten, unflatten

__all__ = ["HeadBundle", "StudentBundle", "ESEstimator", "es_index", "BACKENDS", "MetaBatch", "SGDHyper", "meta_gradient",
           "momentum_buffers", "preserved_buffers", "implicit_gradient", "neumann_hypergradient", "MetaStep", "cost_units",
           "LossNetOptimizer", "MetaCounters", "MetaUpdater", "NonFiniteMetaGradient", "check_and_clip", "flatten",
           "unflatten"]
