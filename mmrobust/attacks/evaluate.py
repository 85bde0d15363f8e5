"""Accuracy under attack: the clean forward once per batch, then any number of attacks on that batch.

A spec is `(name, params)` or `(label, name, params)`; results are keyed by label (default: the name) plus
"clean". Accuracy under an attack counts the samples whose attacked prediction equals the label.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .core import Inputs, attack_mode, logits_of
from .registry import run_attack

NON_INPUT_KEYS = ("label", "index")
Spec = tuple  # (name, params) | (label, name, params)


def split_batch(batch) -> tuple[Inputs, torch.Tensor]:
    """(inputs, y) from a collated dataset item dict ({modality..., "label", "index"}) or an (inputs, y) pair."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in NON_INPUT_KEYS}, batch["label"]
    inputs, y = batch
    return dict(inputs), y


def _parse(spec: Spec) -> tuple[str, str, dict]:
    if len(spec) == 2:
        return spec[0], spec[0], dict(spec[1] or {})
    label, name, params = spec
    return label, name, dict(params or {})


def _correct(model: nn.Module, inputs: Inputs, y: torch.Tensor) -> torch.Tensor:
    with attack_mode(model), torch.no_grad():
        return logits_of(model, inputs).argmax(1) == y


def correct_under_attacks(model: nn.Module, inputs: Inputs, y: torch.Tensor, specs: Sequence[Spec]
                          ) -> dict[str, torch.Tensor]:
    """{"clean": mask, label: mask under that attack, ...} for one batch: (B,) bool, True where the (attacked)
    prediction is the label."""
    parsed = [_parse(s) for s in specs]
    labels = [p[0] for p in parsed]
    if len(set(labels)) != len(labels) or "clean" in labels:
        raise ValueError(f"attack labels must be unique and not 'clean': {labels}")
    out = {"clean": _correct(model, inputs, y)}
    for label, name, params in parsed:
        out[label] = _correct(model, run_attack(name, model, inputs, y, **params), y)
    return out


def evaluate_attacks(model: nn.Module, inputs: Inputs, y: torch.Tensor, specs: Sequence[Spec]
                     ) -> dict[str, torch.Tensor]:
    """{"clean": count, label: count under that attack, ...} for one batch (0-d long tensors)."""
    return {k: m.sum() for k, m in correct_under_attacks(model, inputs, y, specs).items()}


def _device(model: nn.Module) -> torch.device | None:
    p = next(model.parameters(), None)
    return None if p is None else p.device


def accuracy_under_attacks(model: nn.Module, batches: Iterable, specs: Sequence[Spec]) -> dict[str, tuple[int, int]]:
    """{label: (correct, n)} over all batches of a loader (or any iterable of batches), "clean" included."""
    device, totals, n = _device(model), {}, 0
    for batch in batches:
        inputs, y = split_batch(batch)
        if device is not None:
            inputs, y = {m: v.to(device) for m, v in inputs.items()}, y.to(device)
        for label, count in evaluate_attacks(model, inputs, y, specs).items():
            totals[label] = totals.get(label, 0) + int(count)
        n += len(y)
    return {label: (c, n) for label, c in totals.items()}


def accuracy_under_attack(model: nn.Module, batches: Iterable, attack: str, params: dict | None = None
                          ) -> tuple[int, int]:
    """(correct, n) under one attack over all batches."""
    return accuracy_under_attacks(model, batches, [(attack, params or {})])[attack]
