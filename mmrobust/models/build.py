"""`build_model(spec)`: the encoders and head of `spec` from the registries, wired as `spec.fusion` says."""
from __future__ import annotations

from typing import Mapping

import torch.nn as nn

from . import intermediate  # noqa: F401  (registers "mmtm" and "mmt"; through it, the encoders and heads)
from .fusion import LateFusionModel
from .registry import ENCODERS, FUSIONS, HEADS, ModelSpec, _lookup, input_channels


def build_model(spec: ModelSpec | Mapping) -> nn.Module:
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    if not spec.modalities or len(set(spec.modalities)) != len(spec.modalities):
        raise ValueError(f"model spec: modalities must be a non-empty list of distinct names, got {spec.modalities}")
    if spec.fusion != "late":
        return _lookup(FUSIONS, "fusion", spec.fusion)(spec)
    encoders = {}
    for m in spec.modalities:
        name = spec.encoder if isinstance(spec.encoder, str) else spec.encoder[m]
        encoders[m] = _lookup(ENCODERS, "encoder", name)(
            in_channels=input_channels(spec, m), width=spec.width, **spec.encoder_kwargs.get(m, {}))
    dims = {m: enc.out_dim for m, enc in encoders.items()}
    head = _lookup(HEADS, "head", spec.head)(dims, spec.num_classes, **spec.head_kwargs)
    return LateFusionModel(encoders, head)
