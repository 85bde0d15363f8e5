"""CRMT maths (paper eqs. 10 and 12, SPEC section 3): margin regulariser, step-1/step-2 losses, tau, bound r(x).

Per-modality quantities are accepted as a dict keyed by modality (in the model's order) or as a list / (M, ...)
tensor in that same order.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def _stack(x, names: Sequence[str] | None = None) -> torch.Tensor:
    """dict / ParameterDict / list / tensor of per-modality tensors -> one tensor with modality as dim 0."""
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "keys"):
        return torch.stack([x[m] for m in (names if names is not None else list(x.keys()))])
    return torch.stack(list(x))


def _names(scores) -> list[str] | None:
    return list(scores.keys()) if hasattr(scores, "keys") else None


def crmt_margin_loss(scores, y: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """mean_i log( sum_m sum_{k != y_i} exp(z_{m,k} - z_{m,y_i}) + eps )   (paper eq. 12).

    The reference computes log(sum + 1e-5) with raw exponentials; here log(S + eps) = logaddexp(logsumexp(...),
    log eps), which is the same number without overflow. eps=0 gives the plain log-sum-exp.
    """
    z = _stack(scores)  # (M, B, K)
    zy = z.gather(2, y.view(1, -1, 1).expand(z.shape[0], -1, 1))
    is_y = F.one_hot(y, z.shape[2]).bool().unsqueeze(0)
    diff = (z - zy).masked_fill(is_y, float("-inf"))
    lse = diff.transpose(0, 1).flatten(1).logsumexp(1)  # over (m, k != y)
    if eps > 0:
        lse = torch.logaddexp(lse, lse.new_tensor(math.log(eps)))
    return lse.mean()


def step1_loss(out, y: torch.Tensor, rho: float, eps: float = 1e-5) -> torch.Tensor:
    """CRMT step 1: CE(h(x), y) + rho * margin regulariser on the uni-modal scores."""
    return F.cross_entropy(out.logits, y) + rho * crmt_margin_loss(out.scores, y, eps)


def certified_bound(out, y: torch.Tensor, tau, a, b: torch.Tensor) -> torch.Tensor:
    """Per-sample r(x) of paper eq. 10 with j the runner-up class (highest fused logit other than y):

    r = [sum_m (a_{m,y} z_{m,y} - a_{m,j} z_{m,j}) + b_y - b_j] / sqrt(sum_m (a_{m,y} tau_{m,y} + a_{m,j} tau_{m,j})^2)

    out: anything with .logits (B, K) and .scores (per-modality (B, K)); tau, a: per-modality (K,); b: (K,).
    Negative for misclassified samples (j is then the predicted class).
    """
    names = _names(out.scores)
    z, tau, a = _stack(out.scores, names), _stack(tau, names), _stack(a, names)  # (M,B,K), (M,K), (M,K)
    rows = torch.arange(len(y), device=y.device)
    others = out.logits.detach().masked_fill(F.one_hot(y, z.shape[2]).bool(), float("-inf"))
    j = others.argmax(1)
    ay, aj = a[:, y], a[:, j]  # (M, B)
    num = (ay * z[:, rows, y] - aj * z[:, rows, j]).sum(0) + b[y] - b[j]
    den = ((ay * tau[:, y] + aj * tau[:, j]) ** 2).sum(0).sqrt()
    return num / den


def step2_loss(out, y: torch.Tensor, tau, a, b: torch.Tensor) -> torch.Tensor:
    """CRMT step 2: L2 = -mean_i r(x_i); only a receives gradient (see step2_parameters)."""
    return -certified_bound(out, y, tau, a, b).mean()


@torch.no_grad()
def project_weights(head: nn.Module) -> None:
    """a_m <- max(a_m, 0) in place: the bound of eq. 10 (and the certificate built on it) holds for
    non-negative modality weights only; a plain SGD step on a can cross zero, and the step-2 objective would then
    reward a radius that is not one."""
    for a in head.a.values():
        a.clamp_(min=0)


def step2_parameters(model: nn.Module, freeze: bool = True) -> list[nn.Parameter]:
    """The CRMT head's a_m (in modality order), the only parameters step 2 trains.

    With freeze=True every other parameter gets requires_grad=False, so step 2 never backpropagates into the
    encoders; call model.requires_grad_(True) before the next step 1. The caller keeps the model in eval mode so
    BatchNorm statistics stay fixed (the reference's defect 3 is running step 2 in train mode).
    """
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "a"):
        raise TypeError(f"step 2 needs a CRMT head with modality weights a_m, got {type(head).__name__}")
    params = [head.a[m] for m in head.modalities]
    if freeze:
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    return params


def _batch_inputs(batch, names: Sequence[str]) -> dict[str, torch.Tensor]:
    inputs = batch if isinstance(batch, Mapping) else batch[0]  # (inputs, y, ...) or a dict with modality keys
    return {m: inputs[m] for m in names}


@torch.no_grad()
def _max_into(tau: torch.Tensor, i: int, k: int, grad: torch.Tensor):
    tau[i, k] = torch.maximum(tau[i, k], grad.flatten(1).norm(dim=1).max())


def estimate_tau(model: nn.Module, batches: Iterable, modalities: Sequence[str] | None = None,
                 num_classes: int | None = None, reference_compat: bool = False,
                 max_batches: int | None = None) -> dict[str, torch.Tensor]:
    """tau[m][k] = max over samples of ||grad_{x_m} z_{m,k}(x)||_2, the Lipschitz estimate of paper eq. 9.

    One gradient per (modality, class), of the batch sum of the uni-modal score z_{m,k} (not the fused logit, so
    tau holds no a), taken with autograd.grad so nothing accumulates between classes. Summing over the batch
    yields per-sample gradients only if samples do not interact, hence the model runs in eval mode (BatchNorm on
    running statistics); its previous mode is restored afterwards.

    reference_compat=True reproduces the released get_lip (defect 2): it differentiates the fused logit h_k; the
    audio modality (the last one when there is no 'audio') always gets tau = 0 because its gradient is zeroed
    before being read; the other modalities' gradients accumulate over classes within a batch.
    """
    names = list(modalities if modalities is not None else model.modalities)
    device = next(model.parameters()).device
    zeroed = ("audio" if "audio" in names else names[-1]) if reference_compat else None
    was_training = model.training
    model.eval()
    tau = None
    try:
        for n, batch in enumerate(batches):
            if max_batches is not None and n >= max_batches:
                break
            inputs = _batch_inputs(batch, getattr(model, "modalities", names))
            inputs = {m: x.to(device).detach().requires_grad_(m in names) for m, x in inputs.items()}
            with torch.enable_grad():
                out = model(inputs)
                K = out.logits.shape[1]
                if num_classes is not None and num_classes != K:
                    raise ValueError(f"num_classes={num_classes} but the model outputs {K} logits")
                if tau is None:
                    tau = torch.zeros(len(names), K, device=device)
                if reference_compat:
                    acc = {m: torch.zeros_like(inputs[m]) for m in names}
                    for k in range(K):
                        grads = torch.autograd.grad(out.logits[:, k].sum(), [inputs[m] for m in names],
                                                    retain_graph=True, allow_unused=True)
                        for i, (m, g) in enumerate(zip(names, grads)):
                            if m != zeroed and g is not None:
                                acc[m] += g
                                _max_into(tau, i, k, acc[m])
                else:
                    for i, m in enumerate(names):
                        for k in range(K):
                            (g,) = torch.autograd.grad(out.scores[m][:, k].sum(), inputs[m], retain_graph=True)
                            _max_into(tau, i, k, g)
    finally:
        model.train(was_training)
    if tau is None:
        raise ValueError("estimate_tau: no batches")
    return {m: tau[i].detach() for i, m in enumerate(names)}
