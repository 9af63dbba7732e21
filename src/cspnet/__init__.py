"""cspnet: CSPNet (Wang, Liao et al., CVPRW 2020) backbones, exact to the official Darknet cfgs."""
from .detection import create_detector
from .export import deploy, fuse
from .layers import ConvBnAct, Maxout, darknet_add, make_act, memory_efficient
from .net import FeatureInfo, StagedNet
from .profile import Profile, profile
from .registry import ModelSpec, PaperFigures, create_model, get_spec, list_models
from .stage import CrossStage

__version__ = "0.1.0"

__all__ = [
    "ConvBnAct", "CrossStage", "FeatureInfo", "Maxout", "ModelSpec", "PaperFigures", "Profile", "StagedNet",
    "create_detector", "create_model", "deploy", "fuse", "darknet_add", "get_spec", "list_models", "make_act",
    "memory_efficient", "profile",
]
