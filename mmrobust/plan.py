"""Per-model method-params files written by the `plan` stage.

A DVC matrix over datasets × models names each model by its id only and cannot look up the model's params group
(`models.<id>.group`), so `train@<dataset>-<model>` cannot declare that group as a params dependency. The plan
stage depends on the whole params file and writes `plan/<model>.yaml` with the group's values; a train stage
depends on its model's file (and reads the group from it), so changing `crmt.rho` re-trains only the models
of group `crmt`, on every dataset.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from mmrobust.config import ConfigError, Params, parse_params
from mmrobust.io import atomic_dir, atomic_file


def method_plan(params: Params, model_id: str) -> dict:
    entry = params.all_models[model_id]
    plan = {"model": model_id, "group": entry.group}
    if entry.group != "train":  # the train group is a params dependency of every train stage already
        plan[entry.group] = getattr(params, entry.group).model_dump(mode="json")
    return plan


def write_plans(params: Params, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        for model_id in params.all_models:
            with atomic_file(tmp / f"{model_id}.yaml") as fh:
                yaml.safe_dump(method_plan(params, model_id), fh, sort_keys=True)
    return [out_dir / f"{m}.yaml" for m in params.all_models]


def apply_plan(params: Params, model_id: str, path: str | Path) -> Params:
    """`params` with the method group of `model_id` read from its plan file."""
    if model_id not in params.all_models:
        raise ConfigError(f"models.{model_id}: no such model; configured: {sorted(params.all_models)}")
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: plan file not found; run the plan stage first (dvc repro plan)")
    plan = yaml.safe_load(path.read_text()) or {}
    group = params.all_models[model_id].group
    if plan.get("model") != model_id or plan.get("group") != group:
        raise ConfigError(f"{path}: plan of model {plan.get('model')!r} (group {plan.get('group')!r}), expected "
                          f"{model_id!r} (group {group!r}); re-run the plan stage (dvc repro plan)")
    if group == "train":
        return params
    raw = params.model_dump(mode="json")
    raw[group] = plan[group]
    resolved = parse_params(raw, str(path))
    resolved._dataset = params.dataset_id
    return resolved
