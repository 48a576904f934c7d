"""Meta-gradients through unrolled student updates (higher / torch.func), and the meta-step."""
from .bundle import HeadBundle, StudentBundle
from .gradient import BACKENDS, MetaBatch, SGDHyper, meta_gradient, momentum_buffers, preserved_buffers
from .step import MetaCounters, MetaOptimizer, MetaStep, NonFiniteMetaGradient, check_and_clip

__all__ = ["HeadBundle", "StudentBundle", "BACKENDS", "MetaBatch", "SGDHyper", "meta_gradient", "momentum_buffers",
           "preserved_buffers", "MetaCounters", "MetaOptimizer", "MetaStep", "NonFiniteMetaGradient", "check_and_clip"]
