"""Gradient attacks in the l2 geometry of SPEC §4: joint / uni-modal / per-modality-budget FGM and PGD, and
the multimodal embedding attack (MEA).

One PGD step, for every budget group G with radius eps_G and step size a:
    x'_m <- x'_m + a * g_m / sqrt(sum_{n in G} ||g_n||^2)      (g = gradient of the objective, per sample)
    delta_G <- delta_G * min(1, eps_G / ||delta_G||)            (projection of the concatenated perturbation)
    x'_m <- clamp to the pixel range (frame modalities, when clamp=True)
FGM is one such step with a = eps. This is ART's l2 PGD/FGM (normalise, step, project after every step) on the
flatten-and-concatenate view of the inputs, which tests/test_attacks.py checks.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core import (Group, Inputs, bcast, budget_groups, group_norm, inverse_norms, logits_of, make_generator,
                   per_modality, pixel_box, projection_scales, target_modalities, uniform_in_balls)

Objective = Callable[[Inputs], torch.Tensor]  # per-sample objectives summed over the batch: a scalar


def _gradients(objective: Objective, inputs: Inputs, x_adv: Inputs) -> Inputs:
    leaves = {m: v.detach().requires_grad_(True) for m, v in x_adv.items()}
    with torch.enable_grad():
        value = objective({**inputs, **leaves})
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    return {m: torch.zeros_like(leaves[m]) if g is None else g for m, g in zip(leaves, grads)}


class _Ball:
    """Projection onto the budget balls around the clean x, then clamping to the pixel range."""

    def __init__(self, x: Inputs, groups: list[Group], clamp: bool):
        self.x, self.groups = x, groups
        self.box = {m: pixel_box(v, m) for m, v in x.items()} if clamp else {}

    def __call__(self, x_adv: Inputs) -> Inputs:
        delta = {m: x_adv[m] - x for m, x in self.x.items()}
        scale = projection_scales(delta, self.groups)
        out = {m: torch.addcmul(x, delta[m], bcast(scale[m], x)) for m, x in self.x.items()}
        return {m: v if self.box.get(m) is None else torch.clamp(v, *self.box[m]) for m, v in out.items()}


def _ascend(objective: Objective, inputs: Inputs, groups: list[Group], steps: int, step_size: dict[str, float],
            random_start: bool, gen, clamp: bool) -> Inputs:
    """One run of l2 PGD from `inputs` (or a uniform random point of the ball); returns the full input dict."""
    x = {m: inputs[m].detach() for g, _ in groups for m in g}
    to_ball = _Ball(x, groups, clamp)
    x_adv = dict(x)
    if random_start:
        start = uniform_in_balls(x, groups, gen)
        x_adv = to_ball({m: x[m] + start[m] for m in x})
    for _ in range(steps):
        g = _gradients(objective, inputs, x_adv)
        inv = inverse_norms(g, groups)
        x_adv = to_ball({m: torch.addcmul(x_adv[m], g[m], bcast(step_size[m] * inv[m], g[m])) for m in x})
    return {**inputs, **x_adv}


def _setup(inputs: Inputs, eps, step_size, modalities, default_ratio: float):
    names = target_modalities(inputs, modalities, eps)
    groups = budget_groups(eps, names)
    if step_size is None:
        step_size = {m: e * default_ratio for g, e in groups for m in g}
    return groups, per_modality(step_size, groups)


def _ce_objective(model: nn.Module, y: torch.Tensor) -> Objective:
    return lambda x: F.cross_entropy(logits_of(model, x), y, reduction="sum")


def _predict(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    with torch.no_grad():
        return logits_of(model, inputs).argmax(1)


def _where(mask: torch.Tensor, a: Inputs, b: Inputs, groups: list[Group]) -> Inputs:
    """b with the attacked modalities of the samples in `mask` taken from a."""
    picked = {m: torch.where(mask.view(-1, *([1] * (a[m].dim() - 1))), a[m], b[m]) for g, _ in groups for m in g}
    return {**b, **picked}


def pgd(model: nn.Module, inputs: Inputs, y: torch.Tensor, eps: float | Mapping[str, float] = 0.5, steps: int = 4,
        step_size: float | Mapping[str, float] | None = None, restarts: int = 1, random_start: bool = False,
        modalities=None, clamp: bool = True, seed=None) -> Inputs:
    """l2 PGD on the CE of the fused logits. Defaults: the reference setting (4 steps of eps/3, no random start).
    With restarts > 1 each sample keeps the first restart that fools the model, else the last one."""
    groups, alphas = _setup(inputs, eps, step_size, modalities, 1 / 3)
    objective, gen = _ce_objective(model, y), make_generator(seed)
    best, fooled = None, None
    for r in range(restarts):
        adv = _ascend(objective, inputs, groups, steps, alphas, random_start, gen, clamp)
        if best is None:
            best = adv
        else:
            best = _where(~fooled, adv, best, groups)
        if r < restarts - 1:
            fooled = _predict(model, best) != y
            if bool(fooled.all()):
                break
    return best


def pgd_adaptive(model: nn.Module, inputs: Inputs, y: torch.Tensor, **params) -> Inputs:
    """PGD on the model's adaptive form (`Predictor.adaptive()`: the full gradient through a defence's test-time
    computation); a model without one is attacked as is."""
    return pgd(model.adaptive() if hasattr(model, "adaptive") else model, inputs, y, **params)


def fgm(model: nn.Module, inputs: Inputs, y: torch.Tensor, eps: float | Mapping[str, float] = 0.5,
        modalities=None, clamp: bool = True) -> Inputs:
    """One step x_m + eps * g_m / sqrt(sum_m ||g_m||^2) (per-modality normalisation for a dict eps)."""
    return pgd(model, inputs, y, eps=eps, steps=1, step_size=eps, modalities=modalities, clamp=clamp)


def joint_embedding(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """[phi_1(x_1); ...; phi_M(x_M)] as (B, D) from `model.encode`."""
    return torch.cat([f.flatten(1) for f in model.encode(inputs).values()], 1)


def mea(model: nn.Module, inputs: Inputs, y: torch.Tensor | None = None, eps: float | Mapping[str, float] = 0.5,
        steps: int = 10, step_size: float | Mapping[str, float] | None = None, restarts: int = 1,
        random_start: bool = True, modalities=None, clamp: bool = True, seed=None) -> Inputs:
    """Multimodal embedding attack: l2 PGD maximising ||phi(x') - phi(x)||_2 of the joint embedding.
    The random start is on by default because the objective's gradient vanishes at x' = x.
    With restarts > 1 each sample keeps the restart with the largest embedding distance."""
    groups, alphas = _setup(inputs, eps, step_size, modalities, 1 / 4)
    with torch.no_grad():
        clean = joint_embedding(model, inputs)
    # The squared distance has the same normalised gradient as the distance and no 0/0 at x' = x.
    objective = lambda x: (joint_embedding(model, x) - clean).pow(2).sum()  # noqa: E731
    gen = make_generator(seed)
    best, best_dist = None, None
    for _ in range(restarts):
        adv = _ascend(objective, inputs, groups, steps, alphas, random_start, gen, clamp)
        with torch.no_grad():
            dist = (joint_embedding(model, adv) - clean).norm(dim=1)
        if best is None:
            best, best_dist = adv, dist
        else:
            better = dist > best_dist
            best, best_dist = _where(better, adv, best, groups), torch.maximum(dist, best_dist)
    return best


def perturbation_norms(x: Inputs, x_adv: Inputs, groups: list[Group]) -> dict[tuple[str, ...], torch.Tensor]:
    """Per-sample l2 norm of each group's perturbation (for checks and reports)."""
    delta = {m: x_adv[m] - x[m] for g, _ in groups for m in g}
    return {g: group_norm(delta, g) for g, _ in groups}
