"""Zero-shot robustness methods on CLIP, as `Method`s of the one training loop (mmrobust/train.py).

The model is a `ZeroShotCLIP` over the tuning task's classes; a method that needs the pre-trained model
(PMG-AFT's KL, FARE's target, TIMA's distillations and text distances) gets a frozen copy as `model.teacher`
in `prepare`. Training attacks are l∞ PGD in pixel space on each method's own objective.

  clip_pretrain  contrastive pre-training of both towers on captioned images (the embedded default's CLIP)
  zeroshot       no tuning
  tecoa          CE of adversarial images against the class texts; image tower tuned (Mao et al. 2023)
  pmg_aft        + KL(frozen on adv ‖ tuned on adv) + KL(tuned on clean ‖ tuned on adv) (Wang et al. 2024)
  fare           ‖φ(x_adv) − φ₀(x)‖², unsupervised; image tower tuned (Schlarmann et al. 2024)
  tima_iat       Image-Aware Text tuning (MHE + image-to-text distillation), then TeCoA on images
  tima_tai       Text-Aware Image tuning (adaptive margin + distillation to the pre-trained image embeddings)
  tima           IAT, then TAI (Ma, Liu & Cheng 2024; arXiv 2405.17678 v1 names: MHE, TAM)
"""
from __future__ import annotations

import copy
import random
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmrobust.methods.base import Method, Phase
from mmrobust import speed
from mmrobust.vl.attacks import ce_sum, pgd_linf
from mmrobust.attacks.core import attack_mode
from mmrobust.vl.losses import adaptive_margin, contrastive, embedding_l2, kl_to, mhe

VL_METHODS: dict[str, type["VLMethod"]] = {}


def register_vl_method(cls):
    if not cls.name or cls.name in VL_METHODS:
        raise KeyError(f"vl method name {cls.name!r} is empty or already registered")
    VL_METHODS[cls.name] = cls
    return cls


def image_params(clip) -> list[nn.Parameter]:
    return list(clip.vision_model.parameters()) + list(clip.visual_projection.parameters())


def text_params(clip) -> list[nn.Parameter]:
    return list(clip.text_model.parameters()) + list(clip.text_projection.parameters())


class VLMethod(Method):
    """`self.p` is the `vl` params group (VLCfg); the training attack is `p.attack`."""
    head: ClassVar[str] = "clip"
    needs_teacher: ClassVar[bool] = False
    tunes: ClassVar[str] = "image"           # image | text | both | none

    def prepare(self, model) -> None:
        if self.needs_teacher:
            model.teacher = copy.deepcopy(model.clip).requires_grad_(False).eval()

    def phases(self) -> list[Phase]:
        return [Phase(self.tunes, self.cfg.epochs)] if self.tunes != "none" else []

    def parameters(self, model, phase: Phase) -> list[nn.Parameter]:
        return {"image": image_params, "text": text_params,
                "both": lambda c: list(c.parameters())}[phase.name](model.clip)

    def predict(self, model, inputs) -> torch.Tensor:
        return model(inputs)

    def adversarial(self, model, loss_fn, x: torch.Tensor) -> torch.Tensor:
        a = self.p.attack
        with attack_mode(model), speed.full_precision():  # a 1/255 step is one bf16 unit: fp32 always
            return pgd_linf(loss_fn, x, a.eps, a.steps, a.step_size, a.random_start)

    def objective_accuracy(self, predictor, batches, eps: float, steps: int, step_ratio: float) -> tuple[int, int]:
        """l∞ PGD in pixel space with a random start (step_ratio None-like values: 2.5 eps / steps)."""
        from mmrobust.vl.attacks import pgd_ce

        correct = n = 0
        for i, (inputs, y) in enumerate(batches):
            adv = pgd_ce(predictor, inputs["visual"], y, eps, steps, eps * step_ratio if step_ratio else None, seed=i)
            with torch.no_grad():
                correct += int((predictor({"visual": adv}).argmax(1) == y).sum())
            n += len(y)
        return correct, n

    def teacher_logits(self, model, x: torch.Tensor | None = None, image0: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen pre-trained model's logits for images `x` (or their pre-trained embeddings `image0`)."""
        with torch.no_grad():
            text = F.normalize(model.text_embeds(model.teacher), dim=-1)
            image0 = model.image_embeds(x, model.teacher) if image0 is None else image0
            return model.logits(image0, text)


@register_vl_method
class CLIPPretrain(VLMethod):
    """Contrastive pre-training; each image's caption is vl.prompt of a random non-empty subset of its class
    name's words (with probability `pretrain.word_dropout`, else of the whole name): single factors ("red",
    "circle") are seen alone, so prompts of unseen combinations land near their images."""
    name = "clip_pretrain"
    tunes = "both"

    def loss(self, model, inputs, y, ctx):
        x = inputs["visual"]
        captions = [model.prompt.format(self.caption(model.class_names[int(k)])) for k in y]
        tok = model.tokenizer(captions, padding=True, return_tensors="pt")
        text = model.text_embeds(input_ids=tok["input_ids"].to(x.device),
                                 attention_mask=tok["attention_mask"].to(x.device))
        same = torch.tensor([[a == b for b in captions] for a in captions], device=x.device)
        scale = model.scale()
        loss = contrastive(model.image_embeds(x), text, scale, same)
        return loss, {"scale": scale.detach()}

    def caption(self, class_name: str) -> str:
        words = class_name.split()
        drop = self.p.pretrain.word_dropout
        if len(words) > 1 and random.random() < drop:
            keep = [w for w in words if random.random() < 0.5] or [random.choice(words)]
            words = keep
        return " ".join(words)


@register_vl_method
class ZeroShot(VLMethod):
    name = "zeroshot"
    tunes = "none"


@register_vl_method
class TeCoA(VLMethod):
    name = "tecoa"

    def loss(self, model, inputs, y, ctx):
        adv = self.adversarial(model, ce_sum(model, y), inputs["visual"])
        return F.cross_entropy(model(adv), y), {}


@register_vl_method
class PMGAFT(VLMethod):
    name = "pmg_aft"
    needs_teacher = True

    def loss(self, model, inputs, y, ctx):
        x = inputs["visual"]
        adv = self.adversarial(model, ce_sum(model, y), x)
        logits_adv = model(adv)
        ce = F.cross_entropy(logits_adv, y)
        kl_teacher = kl_to(self.teacher_logits(model, adv), logits_adv)
        kl_clean = kl_to(model(x), logits_adv)
        w = self.p.pmg_aft
        return ce + w.teacher_weight * kl_teacher + w.clean_weight * kl_clean, {"ce": ce.detach(),
                                                                               "kl_teacher": kl_teacher.detach()}


@register_vl_method
class FARE(VLMethod):
    name = "fare"
    needs_teacher = True

    def loss(self, model, inputs, y, ctx):
        x = inputs["visual"]
        with torch.no_grad():
            target = model.image_embeds(x, model.teacher)
        adv = self.adversarial(model, lambda a: (model.image_embeds(a) - target).pow(2).sum(), x)
        return embedding_l2(model.image_embeds(adv), target), {}


class TIMABase(VLMethod):
    """IAT (text tower) for `p.tima.iat_epochs`, then image tuning: TAI (margin + distillation) or plain TeCoA."""
    needs_teacher = True
    iat: ClassVar[bool] = True
    tai: ClassVar[bool] = True

    def phases(self) -> list[Phase]:
        out = [Phase("text", self.p.tima.iat_epochs)] if self.iat else []
        return out + [Phase("image", self.cfg.epochs)]

    def loss(self, model, inputs, y, ctx):
        x = inputs["visual"]
        return self.iat_loss(model, x, y) if ctx.phase == "text" else self.tai_loss(model, x, y)

    def iat_loss(self, model, x, y):
        """CE of the frozen pre-trained image embeddings against the tuned class texts + MHE of the tuned texts
        + KL(pre-trained image-to-text similarities ‖ tuned ones), the cross-modal distillation."""
        w = self.p.tima
        text = F.normalize(model.text_embeds(), dim=-1)
        with torch.no_grad():
            image0 = model.image_embeds(x, model.teacher)
        logits = model.logits(image0, text)
        ce = F.cross_entropy(logits, y)
        energy = mhe(text, w.mhe_alpha)
        kd = kl_to(self.teacher_logits(model, image0=image0), logits)
        return ce + w.mhe_weight * energy + w.iakd_weight * kd, {"mhe": energy.detach(), "iakd": kd.detach()}

    def tai_loss(self, model, x, y):
        """CE with the text-distance adaptive margin on adversarial images + ‖φ(x_adv) − φ₀(x)‖² on normalised
        embeddings (distillation towards the pre-trained image embeddings). Closeness of classes is read from
        the pre-trained text embeddings (the semantics TIMA keeps)."""
        w = self.p.tima
        adv = self.adversarial(model, ce_sum(model, y), x)
        if not self.tai:
            return F.cross_entropy(model(adv), y), {}
        text = model.class_text()
        with torch.no_grad():
            text0 = F.normalize(model.text_embeds(model.teacher), dim=-1)
            image0 = F.normalize(model.image_embeds(x, model.teacher), dim=-1)
        image = F.normalize(model.image_embeds(adv), dim=-1)
        cos = adaptive_margin(image @ text.t(), y, text0, w.margin, w.threshold)
        ce = F.cross_entropy(model.scale() * cos, y)
        kd = embedding_l2(image, image0)
        return ce + w.takd_weight * kd, {"ce": ce.detach(), "takd": kd.detach()}


@register_vl_method
class TIMA(TIMABase):
    name = "tima"


@register_vl_method
class TIMAIAT(TIMABase):
    name = "tima_iat"
    tai = False


@register_vl_method
class TIMATAI(TIMABase):
    name = "tima_tai"
    iat = False


def build_vl_method(name: str, train_cfg, vl_cfg) -> VLMethod:
    if name not in VL_METHODS:
        raise KeyError(f"vl method: unknown {name!r}; registered: {sorted(VL_METHODS)}")
    return VL_METHODS[name](train_cfg, vl_cfg)
