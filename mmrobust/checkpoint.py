"""The one owner of checkpoints: the model-building rule, saving, safe loading and rebuilding a trained model.

A checkpoint is plain data: tensors, numbers, strings, lists and dicts (the params as their JSON dump), so it
loads with `torch.load(weights_only=True)` and a file from anyone cannot run code. Two kinds share the format:
the per-epoch training state (`Trainer.state_dict`, what a resumed run restores) and `model.pt`, the selected
model of a finished run (`model_file`), which evaluation rebuilds with `load_trained`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mmrobust.config import Params, parse_params
from mmrobust.io import atomic_file
from mmrobust.methods import Method, Predictor, build_method
from mmrobust.models import ModelSpec, build_model, load_imagenet_state_dict

MODEL_FILE = "model.pt"
# the per-epoch training state that a finished run's model.pt leaves out (it keeps the selected weights only)
TRAINING_ONLY = ("optimizer", "scheduler", "best")


class CheckpointError(ValueError):
    """A file that is not a readable checkpoint; the message names it."""


def model_spec(params: Params, method: Method, num_classes: int, modalities: list[str]) -> ModelSpec:
    """The architecture a method trains with: `train.model`, the method's own head unless one is set."""
    cfg = params.train.model
    head = cfg.head or method.head
    head_kwargs = {}
    if head == "crmt":
        head_kwargs = {"a_init": cfg.crmt_a_init, "reference_compat": bool(getattr(method.p, "reference_compat", False))}
    return ModelSpec(num_classes=num_classes, modalities=list(modalities), encoder=cfg.encoder, width=cfg.width,
                     head=head, head_kwargs=head_kwargs, encoder_kwargs=cfg.encoder_kwargs, fusion=cfg.fusion)


def build(params: Params, method_name: str | None, num_classes: int, modalities: list[str],
          pretrained: bool = False) -> tuple[torch.nn.Module, Method]:
    """(model, method) ready to train or to receive trained weights; `pretrained` loads `train.model.pretrained`."""
    method = build_method(params, method_name)
    model = build_model(model_spec(params, method, num_classes, modalities))
    if pretrained:
        for m, path in params.train.model.pretrained.items():
            load_imagenet_state_dict(model.encoders[m], path)
    method.prepare(model)
    return model, method


def save(state: dict, path: str | Path) -> Path:
    """Write a checkpoint atomically (an interrupted write never leaves a file that looks complete)."""
    path = Path(path)
    with atomic_file(path, "wb") as fh:
        torch.save(state, fh)
    return path


def load(path: str | Path, device: str | torch.device = "cpu") -> dict:
    """A checkpoint's contents, loaded without unpickling code."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated, not a torch file, or holding objects other than plain data
        raise CheckpointError(f"{path}: not a readable mmrobust checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None
    missing = [k for k in ("model", "method", "config", "num_classes", "modalities") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return state


def model_file(state: dict, metrics: dict, **extra) -> dict:
    """model.pt of a finished run from its last training state, whose `model` holds the selected weights."""
    return {**{k: v for k, v in state.items() if k not in TRAINING_ONLY}, "metrics": metrics, **extra}


def encoder_state(ckpt: dict, modality: str) -> dict:
    """The state dict of one trained encoder, keys as the encoder names them (what `load_imagenet_state_dict`
    reads: the pretrain stage's output)."""
    prefix = f"encoders.{modality}."
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint of {ckpt.get('modalities')} has no {modality!r} encoder")
    return state


def params_of(ckpt: dict, where: str | Path = "checkpoint") -> Params:
    return parse_params(ckpt["config"], f"{where}:config")


def load_trained(path: str | Path, device: str = "cpu") -> tuple[Predictor, Params, dict]:
    """The trained model of a checkpoint as the method's own prediction (eval mode), its params and contents."""
    ckpt = load(path, device)
    params = params_of(ckpt, path)
    model, method = build(params, ckpt["method"], ckpt["num_classes"], ckpt["modalities"])
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return Predictor(model, method).eval(), params, ckpt
