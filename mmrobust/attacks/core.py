"""Attack registry and the shared l2 machinery.

An attack is `fn(model, inputs, y, **params) -> dict[str, Tensor]`, listed in registry.py and called through
`run_attack`, which puts the model in eval mode (`attack_mode`: frozen parameters, no `.grad` is ever written)
and restores both afterwards. Inputs are modality dicts in model space; modalities an attack does not
perturb are returned as the very same tensors (bit-identical, not copies).

Budgets: a *group* is a tuple of modalities that share one l2 ball. A scalar `eps` makes one group of all the
attacked modalities (joint ball: norm of the concatenated perturbation); a dict `{m: eps_m}` makes one group per
modality. Norms are per sample, over all non-batch dimensions.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from functools import lru_cache

import torch
import torch.nn as nn

from mmrobust.data.dataset import pixel_bounds

Inputs = dict[str, torch.Tensor]
Group = tuple[tuple[str, ...], float]
def logits_of(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """Fused logits whether the model returns a Tensor or an object with `.logits`."""
    out = model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@contextlib.contextmanager
def attack_mode(model: nn.Module):
    """Eval mode and frozen parameters; every module's mode and every parameter's requires_grad restored after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


# ---- modality selection and budgets -------------------------------------------------------------------------

def target_modalities(inputs: Mapping, modalities: str | Iterable[str] | None, eps=None) -> list[str]:
    """The attacked modalities: `modalities` if given, else the keys of a per-modality `eps`, else all."""
    if modalities is None:
        names = list(eps) if isinstance(eps, Mapping) else list(inputs)
    else:
        names = [modalities] if isinstance(modalities, str) else list(modalities)
    unknown = [m for m in names if m not in inputs]
    if unknown:
        raise KeyError(f"modalities {unknown} not in inputs {list(inputs)}")
    return names


def budget_groups(eps: float | Mapping[str, float], names: list[str]) -> list[Group]:
    if isinstance(eps, Mapping):
        missing = [m for m in names if m not in eps]
        if missing:
            raise KeyError(f"per-modality eps lacks {missing}")
        return [((m,), float(eps[m])) for m in names]
    return [(tuple(names), float(eps))]


def per_modality(value: float | Mapping[str, float], groups: list[Group]) -> dict[str, float]:
    """A scalar or per-modality parameter (step size, sigma...) as a dict over the groups' modalities."""
    names = [m for g, _ in groups for m in g]
    return {m: float(value[m] if isinstance(value, Mapping) else value) for m in names}


# ---- per-sample l2 geometry ---------------------------------------------------------------------------------

def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample (B,) vector shaped to broadcast against `like`."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def group_norm(d: Mapping[str, torch.Tensor], names: Iterable[str]) -> torch.Tensor:
    """Per-sample l2 norm of the concatenation of d[m] for m in names, (B,)."""
    per = [torch.linalg.vector_norm(d[m].flatten(1), dim=1) for m in names]
    return per[0] if len(per) == 1 else torch.linalg.vector_norm(torch.stack(per), dim=0)


def inverse_norms(g: Mapping[str, torch.Tensor], groups: list[Group]) -> dict[str, torch.Tensor]:
    """1 / ||g_G|| per sample for each modality's group; 0 where the gradient is zero (no NaN)."""
    out = {}
    for names, _ in groups:
        n = group_norm(g, names)
        out.update(dict.fromkeys(names, torch.where(n > 0, n.reciprocal(), torch.zeros_like(n))))
    return out


def projection_scales(delta: Mapping[str, torch.Tensor], groups: list[Group]) -> dict[str, torch.Tensor]:
    """min(1, eps_G / ||delta_G||) per sample: the factor that puts each group's perturbation in its ball."""
    out = {}
    for names, eps in groups:
        n = group_norm(delta, names)
        out.update(dict.fromkeys(names, torch.where(n > eps, eps / n, torch.ones_like(n))))
    return out


@lru_cache(maxsize=None)
def _bounds_cpu(modality: str):
    return pixel_bounds(modality)


def pixel_box(x: torch.Tensor, modality: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Clamping bounds for attacks around the clean x (per channel, model space); None for audio.

    A clean value already outside the pixel range may stay where it is: clamping then never moves a coordinate
    away from the clean input, so it can only shrink the perturbation.
    """
    bounds = _bounds_cpu(modality)
    if bounds is None:
        return None
    lo, hi = (b.to(x) for b in bounds)
    if bool(((x >= lo) & (x <= hi)).all()):
        return lo, hi
    return torch.minimum(lo, x), torch.maximum(hi, x)


def clamp_pixels(x_adv: torch.Tensor, x: torch.Tensor, modality: str) -> torch.Tensor:
    """Clamp a frame modality to its valid pixel range (see pixel_box); audio is returned as is."""
    box = pixel_box(x, modality)
    return x_adv if box is None else torch.clamp(x_adv, *box)


# ---- randomness ---------------------------------------------------------------------------------------------

def make_generator(seed: int | torch.Generator | None) -> torch.Generator | None:
    """None: torch's global RNG; an int: a fresh CPU generator seeded with it; a Generator: used as is."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def _draw(fn, shape, gen: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the generator's device, so a seed gives the same numbers whatever device the inputs are on.
    device = gen.device if gen is not None else like.device
    return fn(shape, generator=gen, device=device, dtype=like.dtype).to(like.device)


def randn_like(like: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    return _draw(torch.randn, like.shape, gen, like)


def rand_like(like: torch.Tensor, gen: torch.Generator | None, shape=None) -> torch.Tensor:
    return _draw(torch.rand, like.shape if shape is None else shape, gen, like)


def uniform_in_balls(like: Mapping[str, torch.Tensor], groups: list[Group], gen) -> Inputs:
    """A point drawn uniformly in each group's eps-ball (Gaussian direction, radius eps * U^(1/dim))."""
    out = {}
    for names, eps in groups:
        z = {m: randn_like(like[m], gen) for m in names}
        n = group_norm(z, names)
        dim = sum(like[m][0].numel() for m in names)
        radius = eps * rand_like(n, gen).pow(1.0 / dim)
        scale = torch.where(n > 0, radius / n, torch.zeros_like(n))
        out.update({m: z[m] * bcast(scale, z[m]) for m in names})
    return out
