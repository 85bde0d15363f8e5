"""The attack implementations by name (each declared to the evaluation in specs.py) and `run_attack`."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .core import Inputs, attack_mode
from .corruptions import mgn, missing, mpm
from .gradient import fgm, mea, pgd, pgd_adaptive
from .library import apgd_ce, apgd_dlr

ATTACKS: dict[str, Callable[..., Inputs]] = {"fgm": fgm, "pgd": pgd, "mea": mea, "missing": missing, "mgn": mgn,
                                             "mpm": mpm, "apgd_ce": apgd_ce, "apgd_dlr": apgd_dlr,
                                             "pgd_adaptive": pgd_adaptive}


def run_attack(name: str, model: nn.Module, inputs: Inputs, y: torch.Tensor, **params) -> Inputs:
    """Adversarial/perturbed copy of `inputs` (never modified in place) under attack `name`."""
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; registered: {sorted(ATTACKS)}")
    with attack_mode(model):
        return ATTACKS[name](model, dict(inputs), y, **params)
