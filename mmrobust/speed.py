"""Speed options of the one training loop, all params (`train.speed`), never a code fork: memory format, mixed
precision, torch.compile, cuDNN autotuning and pinned host memory. fp32 with everything off is the reference
arithmetic; the options change how fast a step runs, not what it computes (up to rounding: see the tests)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The autocast region of a forward pass and its loss (`precision` fp32: a no-op context)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


@contextlib.contextmanager
def full_precision():
    """Autocast off inside an autocast region, for work that must stay fp32: the attacks that adversarial
    training runs inside its loss (bf16 would round their small steps away, see EvaluateCfg.precision)."""
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling (its exponent range underflows small gradients); bf16 and fp32 do not, and the
    disabled scaler is then a pass-through (scale(loss) is loss, step(opt) is opt.step())."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def prepare(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """Apply the memory format and compilation of `cfg` (a `SpeedCfg`) to a model already on `device`; in place
    (state_dict keys unchanged, so checkpoints are the same with any option)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    if cfg.channels_last:
        to_channels_last(model, device)
    if cfg.compile:
        model.compile(mode=cfg.compile_mode, backend=cfg.compile_backend)
    return model


def to_channels_last(model: nn.Module, device: torch.device, weight_grads: bool = True) -> nn.Module:
    """4-d conv weights in NHWC: the convolutions then run (and hand on) channels-last activations. Refused on CPU
    for a model with a strided 1x1 convolution of fewer than 8 input channels: torch 2.13's CPU (oneDNN)
    channels-last weight gradient for it is wrong in 10-100 % of calls and can corrupt the heap or hang, even
    with its weight and input in NCHW when the gradient from the next layer arrives in NHWC (docs/decisions.md,
    "channels-last on CPU"). Only slim widths have one (ResNet downsampling at width < 8). Input gradients
    alone (`weight_grads=False`: the attacks on a frozen model) come out right."""
    if device.type == "cpu" and weight_grads:
        broken = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)
                  and m.kernel_size == (1, 1) and max(m.stride) > 1 and m.in_channels < 8]
        if broken:
            raise ValueError(f"speed.channels_last on CPU: {broken[0]} is a strided 1x1 convolution with "
                             f"{model.get_submodule(broken[0]).in_channels} input channels, whose channels-last "
                             "gradient torch 2.13 computes wrongly on CPU; use model width >= 8 or channels_last: false")
    return model.to(memory_format=torch.channels_last)


def pin_memory(cfg, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.pin_memory is None else cfg.pin_memory
