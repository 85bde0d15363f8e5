"""Non-adversarial perturbations (SPEC §4): missing modality, Gaussian noise (MGN), pixel masking (MPM).

Random ones take `seed` (an int or a torch.Generator; None = torch's global RNG): the same seed gives the same
result. Frame modalities are clamped to their pixel range afterwards (`clamp=True`); audio never is.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .core import Inputs, clamp_pixels, make_generator, rand_like, randn_like, target_modalities


def _value(v, m: str):
    return v[m] if isinstance(v, Mapping) else v


def missing(model: nn.Module, inputs: Inputs, y=None, modalities=None, fill: str = "zeros",
            mean: torch.Tensor | Mapping[str, torch.Tensor] | None = None) -> Inputs:
    """The given modalities (default: all) replaced by zeros, or by a training mean (`fill="mean"`, `mean=` a
    tensor, or a dict per modality, broadcastable to one sample's shape)."""
    out = dict(inputs)
    for m in target_modalities(inputs, modalities):
        x = inputs[m]
        if fill == "zeros":
            out[m] = torch.zeros_like(x)
        elif fill == "mean":
            if mean is None:
                raise ValueError("fill='mean' needs mean=")
            out[m] = torch.broadcast_to(torch.as_tensor(_value(mean, m)).to(x), x.shape).clone()
        else:
            raise ValueError(f"fill must be 'zeros' or 'mean', not {fill!r}")
    return out


def mgn(model: nn.Module, inputs: Inputs, y=None, sigma: float | Mapping[str, float] = 0.1, modalities=None,
        seed=None, clamp: bool = True) -> Inputs:
    """Additive Gaussian noise of std sigma (model space) on the given modalities (default: all)."""
    gen, out = make_generator(seed), dict(inputs)
    for m in target_modalities(inputs, modalities):
        x = inputs[m].detach()
        noisy = x + float(_value(sigma, m)) * randn_like(x, gen)
        out[m] = clamp_pixels(noisy, x, m) if clamp else noisy
    return out


def mpm(model: nn.Module, inputs: Inputs, y=None, p: float | Mapping[str, float] = 0.1, modalities=None,
        seed=None, clamp: bool = True) -> Inputs:
    """Each cell set to zero (model space) with probability p: a cell is a pixel of a frame (all its channels)
    or a time-frequency bin of the spectrogram. Modalities are (..., C, H, W) with C at dim -3."""
    gen, out = make_generator(seed), dict(inputs)
    for m in target_modalities(inputs, modalities):
        x = inputs[m].detach()
        cells = x.shape[:-3] + (1,) + x.shape[-2:]
        keep = rand_like(x, gen, cells) >= float(_value(p, m))
        masked = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
        out[m] = clamp_pixels(masked, x, m) if clamp else masked
    return out
