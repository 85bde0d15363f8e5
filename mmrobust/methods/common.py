"""Pieces several methods share: multimodal mixup and adversarial examples for training."""
from __future__ import annotations

import torch
import torch.nn as nn


def mixup(inputs: dict, y: torch.Tensor, alpha: float, generator: torch.Generator | None = None):
    """Multimodal mixup: ONE λ ~ Beta(α, α) and ONE permutation shared by all modalities.

    Returns (mixed inputs, y_a, y_b, λ) with x = λ x + (1 − λ) x[perm], y_a = y, y_b = y[perm].
    """
    lam = float(torch.distributions.Beta(alpha, alpha).sample()) if generator is None else float(
        _beta(alpha, generator))
    perm = torch.randperm(len(y), generator=generator, device="cpu").to(y.device)
    mixed = {m: lam * x + (1 - lam) * x[perm] for m, x in inputs.items()}
    return mixed, y, y[perm], lam


def _beta(alpha: float, generator: torch.Generator) -> torch.Tensor:
    # Beta(α, α) from two Gamma draws with an explicit generator (torch.distributions takes none)
    a = torch._standard_gamma(torch.full((2,), alpha), generator=generator)
    return a[0] / a.sum()


def adversarial_inputs(model: nn.Module, inputs: dict, y: torch.Tensor, eps: float, steps: int,
                       step_size: float | None = None) -> dict:
    """Joint l2 PGD training examples (model in eval mode while attacking, restored afterwards), in fp32 under
    any training precision."""
    from mmrobust import speed
    from mmrobust.attacks.registry import run_attack

    with speed.full_precision():
        return run_attack("pgd", model, inputs, y, eps=eps, steps=steps,
                          step_size=step_size if step_size is not None else eps / steps)
