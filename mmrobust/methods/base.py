"""The method interface and registry: every training method is a named objective that any model can train with.

A method sees a `LateFusionModel` (mmrobust.models) and the batch as `inputs: dict[modality, Tensor]`, `y`.
The trainer (mmrobust/train.py) calls, per epoch of each phase:

    method.on_epoch_start(model, ctx)
    for each batch:  loss, logs = method.loss(model, inputs, y, ctx); backward; method.after_backward(model, ctx); step;
                     method.after_step(model, ctx)
    method.on_epoch_end(model, ctx)

Hyper-parameters come from the top-level params group `<params_key>` (e.g. `crmt`), validated by the
method's `Params` model; both are declared in catalog.py, which the config reads without importing torch.
Extra trainable modules (uni-modal heads, prototypes, ...) are attached in `prepare(model)` as attributes of the
model, so they are saved in checkpoints, moved to the device and synchronised by DDP like everything else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmrobust.methods.catalog import MethodParams


@dataclass
class Phase:
    """A block of epochs with its own trainable parameters and optimiser settings."""
    name: str
    epochs: int
    train_mode: bool = True              # False: model.eval() while training (e.g. CRMT step 2: frozen BN stats)
    lr: float | None = None              # None: train.lr, etc.
    momentum: float | None = None
    weight_decay: float | None = None
    scheduler: bool = True               # step decay of the lr (train.lr_step, lr_gamma)
    # phases with the same `schedule` share one step decay, counted over their epochs together (CRMT's
    # repeated step 1: N phases of a split budget decay where one phase of the whole budget would); None: own
    schedule: str | None = None
    # "best": begin from the previous phase's best validation epoch (its weights, chosen as the final model is),
    # e.g. CRMT step 2 on the step-1 encoders JT's selection would keep; "last": from where it stopped
    start: str = "last"


@dataclass
class Ctx:
    epoch: int = 0                       # global epoch index
    phase: str = "train"
    phase_epoch: int = 0
    step: int = 0
    num_classes: int = 0
    train_batches: Callable | None = None  # () -> iterable of (inputs, y) over the train split (for estimates)
    val_batches: Callable | None = None    # () -> iterable of (inputs, y) over the validation split
    state: dict = field(default_factory=dict)  # method-owned state across epochs


class Method:
    name: ClassVar[str] = ""
    head: ClassVar[str] = "concat"       # the fusion head this method trains
    params_key: ClassVar[str | None] = None
    Params: ClassVar[type[MethodParams]] = MethodParams
    predict_cost: ClassVar[float] = 1.0  # of a prediction and its input gradient, relative to JT's (work ordering)

    def __init__(self, cfg, params: MethodParams | None = None):
        self.cfg = cfg                   # TrainCfg
        self.p = params if params is not None else self.Params()

    # ---- structure
    def prepare(self, model: nn.Module) -> None:
        """Attach extra modules to the model (called once, before the optimiser is built)."""

    def phases(self) -> list[Phase]:
        return [Phase("train", self.cfg.epochs)]

    def parameters(self, model: nn.Module, phase: Phase) -> list[nn.Parameter]:
        """Parameters optimised in this phase (the rest get requires_grad False for the phase)."""
        return list(model.parameters())

    # ---- training hooks
    def on_epoch_start(self, model: nn.Module, ctx: Ctx) -> None:
        pass

    def loss(self, model: nn.Module, inputs: dict, y: torch.Tensor, ctx: Ctx) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def after_backward(self, model: nn.Module, ctx: Ctx) -> None:
        pass

    def after_step(self, model: nn.Module, ctx: Ctx) -> None:
        """After the optimiser step (e.g. a projection onto the method's constraint set)."""

    def on_epoch_end(self, model: nn.Module, ctx: Ctx) -> None:
        pass

    def on_train_end(self, model: nn.Module, ctx: Ctx) -> None:
        """Once the final weights are selected (e.g. calibrating test-time settings on the validation split)."""

    # ---- inference
    def predict(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """Fused logits used for evaluation (a method with test-time processing overrides this)."""
        return model(inputs).logits

    has_adaptive: ClassVar[bool] = False  # True: predict_adaptive differs from predict (adaptive attacks run)

    def predict_adaptive(self, model: nn.Module, inputs: dict) -> torch.Tensor:
        """The same prediction with the full gradient through its test-time computation, for adaptive attacks
        (where `predict` treats part of it as a constant)."""
        return self.predict(model, inputs)


    def objective_accuracy(self, predictor, batches, eps: float, steps: int, step_ratio: float) -> tuple[int, int]:
        """(correct, n) under the tuning objective's attack: joint l2-PGD with steps of eps * step_ratio."""
        from mmrobust.attacks.evaluate import accuracy_under_attack

        return accuracy_under_attack(predictor, batches, "pgd", dict(eps=eps, steps=steps, step_size=eps * step_ratio))


class Predictor(nn.Module):
    """The method's own test-time prediction as a model the attacks can differentiate through."""

    def __init__(self, model: nn.Module, method):
        super().__init__()
        self.model, self.method = model, method
        self.modalities = model.modalities

    def forward(self, inputs):
        return self.method.predict(self.model, inputs)

    def encode(self, inputs):
        return self.model.encode(inputs)

    def adaptive(self) -> "Predictor":
        """The predictor adaptive attacks differentiate: `method.predict_adaptive`, same weights."""
        return AdaptivePredictor(self.model, self.method)


class AdaptivePredictor(Predictor):
    def forward(self, inputs):
        return self.method.predict_adaptive(self.model, inputs)


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if not cls.name or cls.name in METHODS:
        raise KeyError(f"method name {cls.name!r} is empty or already registered")
    METHODS[cls.name] = cls
    return cls


def params_models() -> dict[str, type[MethodParams]]:
    out: dict[str, type[MethodParams]] = {}
    for cls in METHODS.values():
        if cls.params_key:
            out.setdefault(cls.params_key, cls.Params)
    return out


def build_method(params, name: str | None = None) -> Method:
    """The method `name` (default params.train.method) with its hyper-parameter group from `params`."""
    name = name or params.train.method
    if name not in METHODS:
        raise KeyError(f"train.method: unknown method {name!r}; registered: {sorted(METHODS)}")
    cls = METHODS[name]
    hp = getattr(params, cls.params_key, None) if cls.params_key else None
    return cls(params.train, hp if hp is not None else cls.Params())


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CE for hard labels (B,) or soft targets (B, K)."""
    if y.dim() == 2:
        return -(y * F.log_softmax(logits, 1)).sum(1).mean()
    return F.cross_entropy(logits, y)
