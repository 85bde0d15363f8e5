"""Encoders, late-fusion heads (JT concat, CRMT orthogonal) and the model registry."""
from .registry import ENCODERS, HEADS, IN_CHANNELS, ModelSpec, register_encoder, register_head
from . import encoders, fusion  # noqa: F401  (importing registers the built-in entries)
from .encoders import PatchTransformer, ResNet, load_imagenet_state_dict
from .fusion import ConcatHead, CRMTHead, LateFusionModel, Output
from .build import build_model

__all__ = [
    "ENCODERS", "HEADS", "IN_CHANNELS", "ModelSpec", "build_model", "register_encoder", "register_head",
    "ResNet", "PatchTransformer", "load_imagenet_state_dict",
    "ConcatHead", "CRMTHead", "LateFusionModel", "Output",
]
