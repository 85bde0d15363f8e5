"""l∞ attacks on images in pixel space [0, 1] (the budgets of the zero-shot robustness literature: 1/255, 4/255).

`pgd_linf` is the hand-written PGD used in training (any loss to maximise: CE for TeCoA, the embedding
distance for FARE); tests cross-check it step for step against ART's ProjectedGradientDescent. APGD
(AutoAttack's first attack) comes from ART as is.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmrobust.attacks.core import attack_mode, make_generator, rand_like


def pgd_linf(loss_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, eps: float, steps: int,
             step_size: float | None = None, random_start: bool = True, seed=None) -> torch.Tensor:
    """x' in {‖x' − x‖∞ ≤ eps} ∩ [0, 1] that ascends `loss_fn` (a scalar, summed over the batch so that each
    sample's step is its own): x' ← Π(x' + step · sign ∇). step_size None: 2.5 eps / steps (Madry et al.)."""
    x = x.detach()
    if eps <= 0 or steps <= 0:
        return x
    step = 2.5 * eps / steps if step_size is None else step_size
    delta = torch.zeros_like(x)
    if random_start:
        delta = (rand_like(x, make_generator(seed)) * 2 - 1) * eps
    adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        grad, = torch.autograd.grad(loss_fn(adv), adv)
        with torch.no_grad():
            adv = adv + step * grad.sign()
            adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return adv.detach()


def ce_sum(model: nn.Module, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda adv: F.cross_entropy(model(adv), y, reduction="sum")


def pgd_ce(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, step_size: float | None = None,
           random_start: bool = True, seed=None) -> torch.Tensor:
    """Untargeted l∞ PGD on the cross-entropy of `model`'s logits, with the model frozen in eval mode."""
    with attack_mode(model):
        return pgd_linf(ce_sum(model, y), x, eps, steps, step_size, random_start, seed)


def apgd_linf(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 100,
              restarts: int = 1, loss: str = "ce", seed: int = 0) -> torch.Tensor:
    """l∞ APGD (Croce & Hein 2020) through ART's AutoProjectedGradientDescent, box [0, 1]."""
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    from mmrobust.attacks.library import ART_LOSS

    with attack_mode(model), torch.no_grad():
        k = int(model(x[:1]).shape[1])
    if loss == "dlr" and k < 3:
        raise ValueError(f"apgd: the DLR loss needs at least 3 classes, the model has {k}")
    with attack_mode(model):
        clf = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]), nb_classes=k,
                                clip_values=(0.0, 1.0), device_type="cpu")
        np.random.seed(seed)
        attack = AutoProjectedGradientDescent(clf, norm=np.inf, eps=float(eps), eps_step=2.0 * float(eps),
                                              max_iter=steps, nb_random_init=restarts, batch_size=len(x),
                                              loss_type=ART_LOSS[loss], verbose=False)
        adv = attack.generate(x.detach().cpu().numpy(), y=np.eye(k, dtype=np.float32)[y.cpu().numpy()])
    return torch.as_tensor(adv, dtype=x.dtype, device=x.device)
