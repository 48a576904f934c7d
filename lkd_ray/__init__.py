"""lkd_ray: Learnable Knowledge Distillation (learned loss networks trained by meta-gradients) on Ray.

The single-process core (config, models, losses, meta, data, train) never imports Ray;
``lkd_ray.distributed`` builds the Ray services on top of it.
"""
__version__ = "0.1.0"
