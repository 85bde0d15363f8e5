"""Sound certified l2 radius of a late-fusion model from encoder Lipschitz upper bounds (SPEC section 5).

For logits h(x) = sum_m W^(m) phi_m(x_m) + b (W^(m) = head.fused_weight(m), a_{m,k} W~_{m,k} rows for CRMT) and
any perturbation d = (d_1, ..., d_M), by the triangle and Cauchy-Schwarz inequalities
    |(h_y - h_k)(x + d) - (h_y - h_k)(x)| <= sum_m ||W_y^(m) - W_k^(m)||_2 Lip(phi_m) ||d_m||
                                          <= sqrt(sum_m (L^m_yk)^2) ||d||_2
with L^m_yk = ||W_y^(m) - W_k^(m)||_2 Lip(phi_m),
so the prediction y^ cannot change while ||d||_2 < R(x) = min_{k != y^} (h_y^ - h_k)(x) / sqrt(sum_m (L^m_y^k)^2).
R(x) = 0 for a misclassified x. The certificate covers the whole l2 ball (no pixel-range clamping assumed).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from mmrobust.attacks.evaluate import split_batch

from .lipschitz import lipschitz_upper_bound


def model_lipschitz_bounds(model: nn.Module, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """{m: Lip(phi_m)} upper bounds for one sample of shape input_shapes[m] (no batch dimension)."""
    return {m: lipschitz_upper_bound(model.encoders[m], input_shapes[m]) for m in model.modalities}


def pairwise_lipschitz(model: nn.Module, lips: Mapping[str, float]) -> torch.Tensor:
    """(K, K) sqrt(sum_m (||W_y^(m) - W_k^(m)||_2 Lip(phi_m))^2), in float64."""
    total = None
    for m in model.modalities:
        w = model.head.fused_weight(m).detach().double()
        # Direct differences, not the |a|^2 + |b|^2 - 2ab shortcut, which loses precision for close rows.
        dist = torch.cdist(w, w, compute_mode="donot_use_mm_for_euclid_dist")
        term = (dist * float(lips[m])) ** 2
        total = term if total is None else total + term
    return total.sqrt()


@torch.no_grad()
def certified_radius(model: nn.Module, inputs: Mapping[str, torch.Tensor], y: torch.Tensor,
                     lips: Mapping[str, float]) -> torch.Tensor:
    """(B,) R(x) = min_{k != y^} (h_y^ - h_k) / sqrt(sum_m (L^m_y^k)^2), 0 where y^ != y (model in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        h = model(dict(inputs)).logits.double()
    finally:
        model.train(was_training)
    pred = h.argmax(1)
    den = pairwise_lipschitz(model, lips).to(h.device)[pred]  # (B, K)
    num = h.gather(1, pred[:, None]) - h
    ratio = torch.where(den > 0, num / den, torch.where(num > 0, torch.inf, 0.0))
    ratio = ratio.masked_fill(torch.nn.functional.one_hot(pred, h.shape[1]).bool(), torch.inf)
    radius = ratio.min(1).values.clamp(min=0)
    return radius.masked_fill(pred != y.to(h.device), 0.0).float()


def certified_radii(model: nn.Module, batches: Iterable, lips: Mapping[str, float]) -> torch.Tensor:
    """R(x) for every sample of a loader (or any iterable of batches), concatenated on the CPU."""
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        inputs, y = split_batch(batch)
        out.append(certified_radius(model, {m: v.to(device) for m, v in inputs.items()}, y.to(device), lips).cpu())
    return torch.cat(out)


def certified_accuracy(radii: torch.Tensor | Sequence[float], grid: Sequence[float]) -> list[float]:
    """CA(r) = fraction of samples with R(x) > r, for each r in grid (CA(0) is the clean accuracy up to ties)."""
    radii = torch.as_tensor(radii, dtype=torch.float64).flatten()
    if radii.numel() == 0:
        raise ValueError("certified_accuracy: no radii")
    return [float((radii > float(r)).double().mean()) for r in grid]
