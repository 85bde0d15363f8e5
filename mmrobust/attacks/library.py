"""Attacks from a well-kept library (IBM ART) on our multimodal inputs: the attacked modalities are flattened and
concatenated into one vector (one l2 ball over all of them, as the joint attacks here), the others stay fixed
inside the adapter, and the pixel box is ART's clip range.

APGD (Croce & Hein 2020, the attacks of AutoAttack): step-size halving on stalled progress, momentum, restarts
from random points of the ball; `loss="ce"` (APGD-CE) or `"dlr"` (difference of logits ratio; needs >= 3
classes). Random starts draw from numpy's global generator, seeded here from torch's, so the evaluation's
per-batch torch seed makes them reproducible.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .core import Inputs, logits_of, pixel_box, target_modalities

# AutoAttack's first step size for l2 is 2 eps (ART halves it from eps_step on stalled progress)
ART_LOSS = {"ce": "cross_entropy", "dlr": "difference_logits_ratio"}


class FlatInputs(nn.Module):
    """model(inputs read from one flat vector per sample: every modality flattened and concatenated)."""

    def __init__(self, model: nn.Module, inputs: Inputs):
        super().__init__()
        self.model, self.names = model, list(inputs)
        self.shapes = {m: inputs[m].shape[1:] for m in self.names}
        self.sizes = [int(np.prod(self.shapes[m])) for m in self.names]

    def flatten(self, inputs: Inputs) -> torch.Tensor:
        return torch.cat([inputs[m].detach().flatten(1) for m in self.names], 1)

    def unflatten(self, flat: torch.Tensor) -> Inputs:
        return {m: p.reshape(len(flat), *self.shapes[m]) for m, p in zip(self.names, torch.split(flat, self.sizes, 1))}

    def forward(self, flat: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model, self.unflatten(flat)).float()  # ART reads numpy (no bf16)


def _bounds(inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature clip range (ART clips every sample to one range): the pixel box of frame modalities (widened
    to the batch's clean values), a wide finite one on audio (no box)."""
    lo, hi = [], []
    for m, x in inputs.items():
        x = x.detach()
        box = pixel_box(x, m)
        if box is None:
            big = float(x.abs().max()) * 10 + 1e3
            lo.append(torch.full(x.shape[1:], -big).flatten())
            hi.append(torch.full(x.shape[1:], big).flatten())
        else:
            lo.append(torch.minimum(torch.broadcast_to(box[0], x.shape), x).amin(0).flatten())
            hi.append(torch.maximum(torch.broadcast_to(box[1], x.shape), x).amax(0).flatten())
    return torch.cat(lo).numpy().astype(np.float32), torch.cat(hi).numpy().astype(np.float32)


def apgd(model: nn.Module, inputs: Inputs, y: torch.Tensor, eps: float = 0.5, steps: int = 100, restarts: int = 1,
         loss: str = "ce", modalities=None) -> Inputs:
    """Joint l2 APGD (all modalities in one ball of radius eps) through ART's AutoProjectedGradientDescent.
    ART perturbs every feature of its input (its random start ignores masks), so a uni-modal budget is not
    offered: `modalities` must be None or all of them."""
    from art.attacks.evasion import AutoProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    if sorted(target_modalities(inputs, modalities, None)) != sorted(inputs) or isinstance(eps, dict):
        raise ValueError("apgd: joint attacks only (one scalar eps over every modality)")
    flat_model = FlatInputs(model, inputs)
    x = flat_model.flatten(inputs)
    with torch.no_grad():
        k = int(logits_of(model, inputs).shape[1])
    if loss == "dlr" and k < 3:
        raise ValueError(f"apgd: the DLR loss needs at least 3 classes, the model has {k}")
    clf = PyTorchClassifier(flat_model, loss=nn.CrossEntropyLoss(), input_shape=(x.shape[1],), nb_classes=k,
                            clip_values=_bounds(inputs), device_type="cpu")
    np.random.seed(int(torch.randint(0, 2**31 - 1, ())))  # ART's random start: from the evaluation's seed
    attack = AutoProjectedGradientDescent(clf, norm=2, eps=float(eps), eps_step=2.0 * float(eps), max_iter=steps,
                                          nb_random_init=restarts, batch_size=len(x), loss_type=ART_LOSS[loss],
                                          verbose=False)
    adv = attack.generate(x.cpu().numpy(), y=np.eye(k, dtype=np.float32)[y.cpu().numpy()])
    return flat_model.unflatten(torch.as_tensor(adv, dtype=x.dtype, device=x.device))


def apgd_ce(model: nn.Module, inputs: Inputs, y: torch.Tensor, **params) -> Inputs:
    return apgd(model, inputs, y, loss="ce", **params)


def apgd_dlr(model: nn.Module, inputs: Inputs, y: torch.Tensor, **params) -> Inputs:
    return apgd(model, inputs, y, loss="dlr", **params)
