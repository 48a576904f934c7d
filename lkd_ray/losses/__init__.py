"""Hand-crafted KD losses, the learnable loss networks and the student objective that combines them."""
from . import handcrafted
from .learnable import Connector, FeatureLossNet, LogitLossNet, LossNetworks
from .objective import DistillObjective, StudentOutputs, build_lossnets

__all__ = ["handcrafted", "Connector", "FeatureLossNet", "LogitLossNet", "LossNetworks",
           "DistillObjective", "StudentOutputs", "build_lossnets"]
