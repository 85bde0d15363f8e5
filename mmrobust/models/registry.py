"""Name -> constructor registries of encoders, heads and fusions, and `ModelSpec` (build.py builds the model).

An encoder factory is called as `factory(in_channels=int, width=int, **encoder_kwargs)` and must return a module
with an `out_dim` attribute that maps (B, C, H, W) or (B, T, C, H, W) to (B, out_dim).
A head factory is called as `factory(dims: dict[str, int], num_classes: int, **head_kwargs)` and must return a
module mapping a features dict to `(logits, scores)` (see fusion.py).
`spec.fusion` picks how encoders and head are wired: "late" (LateFusionModel) or an entry of FUSIONS,
a `factory(spec) -> model` with LateFusionModel's interface ("mmtm", "mmt": intermediate.py).
New entries register themselves with the decorators:

    @register_encoder("my_net")
    def my_net(in_channels, width, **kw): ...
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch.nn as nn

ENCODERS: dict[str, Callable[..., nn.Module]] = {}
HEADS: dict[str, Callable[..., nn.Module]] = {}
FUSIONS: dict[str, Callable[..., nn.Module]] = {}

# Input channels implied by a modality's name (the Dataset's convention).
IN_CHANNELS = {"audio": 1, "visual": 3, "diff": 3, "flow": 2}


def _register(table: dict, kind: str, name: str):
    def deco(fn):
        if name in table:
            raise KeyError(f"{kind} {name!r} is already registered")
        table[name] = fn
        return fn
    return deco


def register_encoder(name: str):
    return _register(ENCODERS, "encoder", name)


def register_head(name: str):
    return _register(HEADS, "head", name)


def register_fusion(name: str):
    return _register(FUSIONS, "fusion", name)


@dataclass
class ModelSpec:
    num_classes: int
    modalities: list[str] = field(default_factory=lambda: ["audio", "visual"])
    encoder: str | dict[str, str] = "resnet18"  # one name for all modalities, or one per modality
    width: int = 16  # base channels; feature dim is 8 * width (64 = the paper's ResNet18)
    head: str = "crmt"  # "concat" (JT) | "crmt" (orthogonal, eq. 8)
    encoder_kwargs: dict[str, dict] = field(default_factory=dict)  # per modality
    head_kwargs: dict = field(default_factory=dict)
    in_channels: dict[str, int] = field(default_factory=dict)  # overrides IN_CHANNELS
    fusion: str = "late"  # "late" (LateFusionModel) | "mmtm" | "mmt" (intermediate fusion, intermediate.py)

    @classmethod
    def from_dict(cls, raw: Mapping) -> "ModelSpec":
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise ValueError(f"model spec: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return cls(**raw)


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered: {sorted(table)}")
    return table[name]


def input_channels(spec: ModelSpec, m: str) -> int:
    channels = spec.in_channels.get(m, IN_CHANNELS.get(m))
    if channels is None:
        raise ValueError(f"model spec: cannot infer input channels of modality {m!r}; "
                         f"known {sorted(IN_CHANNELS)}, or set in_channels[{m!r}]")
    return channels
