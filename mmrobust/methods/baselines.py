"""Baselines of paper Tables 1, 2, 7, 10 (SPEC §3): Gradient Blending, OGM-GE, PMR, multimodal Mixup, MMAT.

All of them train the JT concatenation head and predict with the fused logits.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from mmrobust.methods import catalog
from mmrobust.methods.base import Method, register_method
from mmrobust.methods.common import adversarial_inputs, mixup

FUSED = "fused"  # Gradient Blending's key for the multimodal head


def _num_classes(model) -> int:
    return model.head.bias.numel()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over data-parallel workers, so that every worker derives the same modulation from the global batch."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def target_confidence(scores: dict, y: torch.Tensor) -> torch.Tensor:
    """s_m = Σ_i softmax(z_m(x_i))_{y_i} for each modality, in `scores` order: shape (M,), no gradient."""
    return torch.stack([F.softmax(z.detach().float(), 1).gather(1, y[:, None]).sum() for z in scores.values()])


PMR_RHO_FLOOR = 0.01


def imbalance_ratios(s: torch.Tensor) -> torch.Tensor:
    """ρ_m = s_m / mean_{j≠m} s_j (for two modalities ρ_a = s_a / s_v and ρ_v = 1 / ρ_a)."""
    M = len(s)
    if M < 2:
        raise ValueError("imbalance ratios need at least 2 modalities")
    others = (s.sum() - s) / (M - 1)
    return s / others.clamp_min(torch.finfo(s.dtype).tiny)


# ------------------------------------------------------------------------------------------ Gradient Blending

def blend_weights(prev: dict, cur: dict, min_overfit: float = 1e-2) -> dict:
    """Gradient-Blending weights (Wang et al. 2020) from two checkpoints, per head k (modalities and 'fused').

    prev[k], cur[k] = (train loss, validation loss) at checkpoints N and N+n. With
        G_k  = L^V_N − L^V_{N+n}                              (generalisation: drop of the validation loss)
        ΔO_k = (L^V_{N+n} − L^T_{N+n}) − (L^V_N − L^T_N)      (overfitting: growth of the train/val gap)
    w_k = max(G_k, 0) / max(ΔO_k, min_overfit)² normalised to Σ_k w_k = 1.
    Guards: a head whose validation loss did not drop (G ≤ 0) gets weight 0; ΔO ≤ min_overfit (the gap did not
    grow, or shrank) counts as min_overfit, so such a head gets the largest weight for its G instead of a
    division by ~0; if no head generalised (all G ≤ 0) the weights are uniform.
    """
    raw = {}
    for k in cur:
        (t0, v0), (t1, v1) = prev[k], cur[k]
        g = max(v0 - v1, 0.0)
        o = max((v1 - t1) - (v0 - t0), min_overfit)
        raw[k] = g / o ** 2
    total = sum(raw.values())
    if not total > 0:
        return {k: 1.0 / len(cur) for k in cur}
    return {k: w / total for k, w in raw.items()}


@register_method
class GradientBlending(Method):
    """GB: loss = Σ_m w_m CE(g_m(φ_m), y) + w_fused CE(h(x), y), with linear uni-modal heads g_m
    (`model.gb_heads`); the weights start uniform and are re-estimated with `blend_weights` every
    `reestimate_every` epochs from train/validation losses (first checkpoint: before training)."""
    name = "gb"
    head = "concat"
    params_key = "gb"
    Params = catalog.GBParams

    def prepare(self, model):
        K = _num_classes(model)
        model.gb_heads = nn.ModuleDict({m: nn.Linear(d, K) for m, d in model.head.dims.items()})

    def heads(self, model) -> list[str]:
        return [*model.modalities, FUSED]

    def weights(self, model, ctx) -> dict:
        """The blend weights (sum 1) scaled to `weights_sum`: with "heads" the uniform start gives every head
        JT's loss scale, instead of a third of it to the fused head that predicts."""
        w = ctx.state["gb"]["weights"] if "gb" in ctx.state else self.uniform(model)
        scale = len(w) if self.p.weights_sum == "heads" else 1.0
        return {k: scale * v for k, v in w.items()}

    def uniform(self, model) -> dict:
        return {k: 1.0 / len(self.heads(model)) for k in self.heads(model)}

    def head_logits(self, model, inputs) -> dict:
        out = model(inputs)
        return {**{m: model.gb_heads[m](out.features[m]) for m in model.modalities}, FUSED: out.logits}

    @torch.no_grad()
    def mean_losses(self, model, batches) -> dict | None:
        """Mean CE of every head over `batches` (eval mode), or None when there is no sample."""
        was = model.training
        model.eval()
        sums, n = {}, 0
        for i, (inputs, y) in enumerate(batches):
            if self.p.estimate_batches and i >= self.p.estimate_batches:
                break
            for k, z in self.head_logits(model, inputs).items():
                sums[k] = sums.get(k, 0.0) + float(F.cross_entropy(z, y, reduction="sum"))
            n += len(y)
        model.train(was)
        return {k: v / n for k, v in sums.items()} if n else None

    def checkpoint(self, model, ctx) -> dict | None:
        tr, va = self.mean_losses(model, ctx.train_batches()), self.mean_losses(model, ctx.val_batches())
        return None if tr is None or va is None else {k: (tr[k], va[k]) for k in tr}

    def on_epoch_start(self, model, ctx):
        if "gb" not in ctx.state:
            ctx.state["gb"] = {"weights": self.uniform(model), "prev": self.checkpoint(model, ctx)}

    def on_epoch_end(self, model, ctx):
        if (ctx.epoch + 1) % self.p.reestimate_every:
            return
        st, cur = ctx.state["gb"], self.checkpoint(model, ctx)
        if cur is None:  # no held-out split: keep the current weights
            return
        if st["prev"] is not None:
            st["weights"] = blend_weights(st["prev"], cur, self.p.min_overfit)
        st["prev"] = cur

    def loss(self, model, inputs, y, ctx):
        w = self.weights(model, ctx)
        ces = {k: F.cross_entropy(z, y) for k, z in self.head_logits(model, inputs).items()}
        loss = sum(w[k] * ce for k, ce in ces.items())
        return loss, {f"ce_{k}": ce.detach() for k, ce in ces.items()}


# ------------------------------------------------------------------------------------------ OGM-GE

def ogm_coefficients(scores: dict, y: torch.Tensor, alpha: float, shift: bool = False) -> dict:
    """OGM coefficients (Peng et al. 2022, official code): with s_m = Σ_i softmax(z_m)_{y_i} and
    ρ_m = s_m / mean_{j≠m} s_j,
        k_m = 1 − tanh(α·ρ_m)  if ρ_m > 1  else 1
    (shift=True: 1 − tanh(α·(ρ_m − 1)), continuous at ρ = 1). For two modalities only the dominant one has
    ρ > 1; at an exact tie no modality is modulated."""
    return _coefficients(imbalance_ratios(target_confidence(scores, y)), list(scores), alpha, shift)


def _coefficients(rho: torch.Tensor, names: list, alpha: float, shift: bool) -> dict:
    out = {}
    for m, r in zip(names, rho.tolist()):
        out[m] = 1.0 - math.tanh(alpha * (r - 1 if shift else r)) if r > 1 else 1.0
    return out


@register_method
class OGMGE(Method):
    """OGM-GE: fused CE; after the backward pass (gradients already averaged over workers), for epochs in
    [modulation_start, modulation_end) every weight tensor (dim ≥ 2: conv kernels / linear weights, as the
    official code modulates only 4-D conv kernels, not BN or biases) of encoder m becomes
        g ← k_m · g + N(0, std(g)²)          (noise only with ge_noise, std of the unscaled g, on all modalities)
    with k_m from `ogm_coefficients`, the confidences s_m summed over all workers' batches."""
    name = "ogm_ge"
    head = "concat"
    params_key = "ogm_ge"
    Params = catalog.OGMParams

    def __init__(self, cfg, params=None):
        super().__init__(cfg, params)
        self._coeffs: dict = {}

    def active(self, epoch: int) -> bool:
        end = self.p.modulation_end
        return self.p.modulation_start <= epoch and (end is None or epoch < end)

    def loss(self, model, inputs, y, ctx):
        out = model(inputs)
        loss = F.cross_entropy(out.logits, y)
        rho = imbalance_ratios(_all_reduce_sum(target_confidence(out.scores, y)))
        self._coeffs = _coefficients(rho, list(out.scores), self.p.alpha, self.p.shift)
        logs = {"ce": loss.detach(), **{f"coeff_{m}": k for m, k in self._coeffs.items()}}
        return loss, logs

    @torch.no_grad()
    def after_backward(self, model, ctx):
        if not self.active(ctx.epoch):
            return
        gens: dict = {}
        for m in model.modalities:
            k = self._coeffs.get(m, 1.0)
            for p in model.encoders[m].parameters():
                if p.grad is None or p.dim() < 2:
                    continue
                noise = self._noise(p.grad, gens, ctx) if self.p.ge_noise else None
                p.grad.mul_(k)
                if noise is not None:
                    p.grad.add_(noise)

    def _noise(self, g: torch.Tensor, gens: dict, ctx) -> torch.Tensor:
        # Seeded by (seed, step): every data-parallel worker draws the same noise for the same (synced) gradient.
        if g.device not in gens:
            gens[g.device] = torch.Generator(device=g.device).manual_seed(self.cfg.seed * 1_000_003 + ctx.step)
        std = (g.std() if g.numel() > 1 else g.new_zeros(())) + 1e-8
        return torch.randn(g.shape, generator=gens[g.device], device=g.device, dtype=g.dtype) * std


# ------------------------------------------------------------------------------------------ PMR

class Prototypes(nn.Module):
    """Per-modality class prototypes C_m (K, d_m) as buffers, plus a flag telling whether they were set."""

    def __init__(self, dims: dict, num_classes: int):
        super().__init__()
        self.modalities = list(dims)
        for m, d in dims.items():
            self.register_buffer(f"proto_{m}", torch.zeros(num_classes, d))
            self.register_buffer(f"seen_{m}", torch.zeros(num_classes, dtype=torch.bool))

    def get(self, m: str) -> torch.Tensor:
        return getattr(self, f"proto_{m}")

    def seen(self, m: str) -> torch.Tensor:
        return getattr(self, f"seen_{m}")


def class_means(features: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, d) per-class mean of `features` (zeros for an absent class) and the (K,) counts."""
    counts = torch.bincount(y, minlength=num_classes).to(features.dtype)
    sums = torch.zeros(num_classes, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, y, features)
    return sums / counts.clamp_min(1)[:, None], counts


def prototype_logits(features: torch.Tensor, protos: torch.Tensor, squared: bool = False) -> torch.Tensor:
    """−d(φ, c_k): negative Euclidean (or squared Euclidean) distance to each prototype, (B, K)."""
    d2 = (features.pow(2).sum(1, keepdim=True) - 2 * features @ protos.T + protos.pow(2).sum(1)).clamp_min(0)
    return -d2 if squared else -(d2 + 1e-12).sqrt()  # the epsilon keeps the sqrt's gradient finite at 0


@register_method
class PMR(Method):
    """PMR (Fan et al. 2023): prototypes C_m = EMA over epochs of the class means of φ_m on the train split
    (recomputed at each epoch start, eval mode; `model.pmr_prototypes`); prototype logits p_m = −d(φ_m, C_m);
    s_m = Σ_i softmax(p_m)_{y_i}, ρ_m = s_m / mean_{j≠m} s_j;
        loss = CE(h, y) + Σ_{m: ρ_m<1} β·min(1/ρ_m − 1, c)·CE(p_m, y) − Σ_{m: ρ_m>1} γ(ρ_m − 1)·H(softmax(p_m))
    (PCE accelerates the weak modality; PER, the entropy term, slows the dominant one, off by default)."""
    name = "pmr"
    head = "concat"
    params_key = "pmr"
    Params = catalog.PMRParams

    def prepare(self, model):
        model.pmr_prototypes = Prototypes(model.head.dims, _num_classes(model))

    @torch.no_grad()
    def update_prototypes(self, model, batches, num_classes: int) -> None:
        """C_m ← μ C_m + (1 − μ) class means of φ_m over `batches` (eval mode); a class seen for the first time
        takes its mean as is, an absent class keeps its prototype."""
        was = model.training
        model.eval()
        sums, counts = {}, None
        for i, (inputs, y) in enumerate(batches):
            if self.p.proto_batches and i >= self.p.proto_batches:
                break
            for m, f in model.encode(inputs).items():
                mean, c = class_means(f.float(), y, num_classes)
                sums[m] = sums.get(m, 0) + mean * c[:, None]
            counts = c if counts is None else counts + c
        model.train(was)
        if counts is None:
            return
        protos, mu, present = model.pmr_prototypes, self.p.proto_momentum, counts > 0
        for m in model.modalities:
            old, seen = protos.get(m), protos.seen(m)
            new = (sums[m] / counts.clamp_min(1)[:, None]).to(old)
            blended = torch.where(seen[:, None], mu * old + (1 - mu) * new, new)
            old.copy_(torch.where(present[:, None], blended, old))
            seen |= present

    def on_epoch_start(self, model, ctx):
        self.update_prototypes(model, ctx.train_batches(), ctx.num_classes or _num_classes(model))

    def loss(self, model, inputs, y, ctx):
        out = model(inputs)
        ce = F.cross_entropy(out.logits, y)
        protos = model.pmr_prototypes
        if not all(bool(protos.seen(m).any()) for m in model.modalities):
            return ce, {"ce": ce.detach()}
        plog = {m: prototype_logits(out.features[m], protos.get(m), self.p.squared_distance) for m in model.modalities}
        rho = imbalance_ratios(target_confidence(plog, y)).tolist()
        loss, logs = ce, {"ce": ce.detach()}
        per_on = self.p.per_epochs is None or ctx.epoch < self.p.per_epochs
        for m, r in zip(model.modalities, rho):
            logs[f"rho_{m}"] = r
            if r < 1 and self.p.beta > 0:
                pce = F.cross_entropy(plog[m], y)
                # a modality whose target confidence underflows to 0 on a batch (prototypes far apart, real
                # clips) would get an infinite weight: ρ is floored, and the coefficient capped
                coef = 1 / max(r, PMR_RHO_FLOOR) - 1
                if self.p.max_coefficient is not None:
                    coef = min(coef, self.p.max_coefficient)
                loss = loss + self.p.beta * coef * pce
                logs[f"pce_{m}"] = pce.detach()
            elif r > 1 and self.p.gamma > 0 and per_on:
                logp = F.log_softmax(plog[m], 1)
                entropy = -(logp.exp() * logp).sum(1).mean()
                loss = loss - self.p.gamma * (r - 1) * entropy
                logs[f"entropy_{m}"] = entropy.detach()
        return loss, logs


# ------------------------------------------------------------------------------------------ Mixup and MMAT

@register_method
class Mixup(Method):
    """Multimodal mixup: x̃_m = λ x_m + (1 − λ) x_m[π] with ONE λ ~ Beta(α, α) and ONE permutation π for all
    modalities; loss = λ CE(h(x̃), y) + (1 − λ) CE(h(x̃), y[π])."""
    name = "mixup"
    head = "concat"
    params_key = "mixup"
    Params = catalog.MixupParams

    def loss(self, model, inputs, y, ctx):
        mixed, ya, yb, lam = mixup(inputs, y, self.p.alpha)
        logits = model(mixed).logits
        loss = lam * F.cross_entropy(logits, ya) + (1 - lam) * F.cross_entropy(logits, yb)
        return loss, {"ce": loss.detach(), "lam": lam}


@register_method
class MMAT(Method):
    """Multimodal adversarial training: CE on joint l2-PGD examples (one ε-ball over the concatenated
    perturbation of all modalities, no random start, model in eval mode while attacking), optionally mixed with
    the clean CE: loss = (1 − c) CE(h(x_adv), y) + c CE(h(x), y)."""
    name = "mmat"
    head = "concat"
    params_key = "mmat"
    Params = catalog.MMATParams

    def loss(self, model, inputs, y, ctx):
        adv = adversarial_inputs(model, inputs, y, self.p.eps, self.p.steps, self.p.step_size)
        adv_ce = F.cross_entropy(model(adv).logits, y)
        c = self.p.clean_weight
        if c == 0:
            return adv_ce, {"adv_ce": adv_ce.detach()}
        clean_ce = F.cross_entropy(model(inputs).logits, y)
        loss = (1 - c) * adv_ce + c * clean_ce
        return loss, {"adv_ce": adv_ce.detach(), "clean_ce": clean_ce.detach()}
