"""Trained models as MLflow models: a PyTorch model with a signature on each training run (the runs list's
Models column; `mlflow.pytorch.load_model` gives it back), and the model registry entry of a dataset's best
CRMT model.

The logged model takes one flat float32 vector per sample, every modality flattened and concatenated in the
order of `modalities` (an MLflow tensor signature has one input; the attacks' library adapter uses the same
layout), and returns the method's fused logits. `unflatten` on the loaded model turns a flat batch back into
the modality dict."""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mmrobust.attacks.library import FlatInputs

ARTIFACT = "model"
PACKAGE_DIR = Path(__file__).resolve().parent


@contextmanager
def tracking_uri(uri: str) -> Iterator:
    """MLflow's fluent API pointed at `uri` for a while. set_tracking_uri also writes MLFLOW_TRACKING_URI (which
    `resolve_uri` honours and child processes inherit), so the previous value is put back after."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: unset again


def flat_model(predictor: torch.nn.Module, example: dict) -> FlatInputs:
    """`predictor` reading one flat vector per sample laid out as `example`'s modalities (shapes from it)."""
    return FlatInputs(predictor.eval(), example).eval()


def signature(model: FlatInputs, num_classes: int):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    width = sum(model.sizes)
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, width), "inputs")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "logits")]))


def log_model(uri: str, run_id: str, predictor: torch.nn.Module, example: dict, num_classes: int,
              name: str = ARTIFACT, tags: dict | None = None, requirements: list[str] = ()) -> str:
    """Log `predictor` on run `run_id` as MLflow PyTorch model `name` with a tensor signature; returns its URI.
    The library travels with the model (code_paths), so it loads where mmrobust is not installed."""
    import mlflow
    import mlflow.pytorch

    model = flat_model(predictor, example)
    layout = {m: list(model.shapes[m]) for m in model.names}
    quiet = logging.getLogger("mlflow.pytorch")  # its pickle caution: chosen on purpose (docs/decisions.md)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with tracking_uri(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pytorch.log_model(
                model, name=name, signature=signature(model, num_classes), code_paths=[str(PACKAGE_DIR)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                                  "pydantic", "pyyaml", *requirements],
                metadata={"input_layout": layout}, tags=tags or {},
                serialization_format="pickle")  # pt2 (torch.export) cannot trace per-sample defences
    finally:
        quiet.setLevel(level)
    return info.model_uri


def log_clip(uri: str, run_id: str, model: torch.nn.Module, image: torch.Tensor, name: str, tags: dict) -> str:
    """A zero-shot CLIP classifier (mmrobust.vl.clip.ZeroShotCLIP: images in [0, 1] -> class logits) as an
    MLflow PyTorch model of its run, the same flat-input layout as the AV models (one modality: visual)."""
    import transformers

    return log_model(uri, run_id, model, {"visual": image[None]}, len(model.class_names), name=name, tags=tags,
                     requirements=[f"transformers=={transformers.__version__}"])


def register(uri: str, model_uri: str, name: str, description: str, tags: dict | None = None):
    """A new version of registered model `name` (created when absent) from `model_uri`."""
    import mlflow

    with tracking_uri(uri):
        version = mlflow.register_model(model_uri, name, tags=tags or {})
    mlflow.MlflowClient(uri).update_model_version(name, version.version, description)
    return version
