"""Hand-crafted KD losses, the learnable loss networks and the method registry that combines them."""
from . import handcrafted
from .learnable import Connector, FeatureLossNet, KDWeight, LogitLossNet, LossNetworks, SampleLossNet
from .methods import METHODS, Method, StudentOutputs, TeacherOutputs, build_lossnets, build_method

__all__ = ["handcrafted", "Connector", "FeatureLossNet", "KDWeight", "LogitLossNet", "LossNetworks", "SampleLossNet",
           "METHODS", "Method", "StudentOutputs", "TeacherOutputs", "build_lossnets", "build_method"]
