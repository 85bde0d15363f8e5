"""The losses of the zero-shot robustness family (TeCoA, PMG-AFT, FARE, TIMA) as pure functions of embeddings
and logits, each checked against a hand-computed value in tests/test_vl.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mhe(text: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Minimum Hyperspherical Energy of class embeddings (K, D): the mean over ordered pairs j ≠ k of
    1 / (1 + d(t_j, t_k)^alpha), d the euclidean distance of the l2-normalised embeddings (the stabilised form
    of 1/d^alpha: bounded when two classes coincide). Lower energy: classes spread over the sphere."""
    t = F.normalize(text, dim=-1)
    k = len(t)
    if k < 2:
        return t.sum() * 0.0
    d2 = (2.0 - 2.0 * t @ t.t()).clamp_min(0.0)  # squared chord distance of unit vectors
    energy = 1.0 / (1.0 + d2.pow(alpha / 2.0))
    off = ~torch.eye(k, dtype=torch.bool, device=t.device)
    return energy[off].mean()


def adaptive_margin(cosines: torch.Tensor, y: torch.Tensor, text: torch.Tensor, margin: float,
                    threshold: float) -> torch.Tensor:
    """Text-distance based adaptive margin on cosine logits (B, K): + margin on every wrong class j whose text
    embedding is close to the true class's, cos(t_j, t_y) > threshold; no margin otherwise (nor on y). The
    loss then has to push the image embedding further from the semantically close classes."""
    t = F.normalize(text, dim=-1)
    close = (t @ t.t()).detach() > threshold          # (K, K), class-pair closeness
    close.fill_diagonal_(False)
    return cosines + margin * close[y].to(cosines.dtype)


def kl_to(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) ‖ softmax(student)), batch mean; the teacher gets no gradient."""
    p = F.log_softmax(teacher_logits.detach(), dim=-1)
    q = F.log_softmax(student_logits, dim=-1)
    return F.kl_div(q, p, reduction="batchmean", log_target=True)


def embedding_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FARE's loss: squared l2 distance of embeddings, batch mean; the teacher gets no gradient."""
    return (student - teacher.detach()).pow(2).sum(-1).mean()


def contrastive(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor | float,
                same: torch.Tensor | None = None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over a batch of (image, caption) pairs; `same` (B, B) marks pairs whose captions
    are equal, all of which count as positives (captions made from class names repeat within a batch)."""
    logits = scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()
    if same is None:
        same = torch.eye(len(image), dtype=torch.bool, device=image.device)
    target = same.to(logits.dtype) / same.sum(1, keepdim=True).to(logits.dtype)
    loss_i = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    loss_t = -(target.t() * F.log_softmax(logits.t(), 1)).sum(1).mean()
    return (loss_i + loss_t) / 2


def inter_class_distance(emb: torch.Tensor, labels: torch.Tensor | None = None) -> float:
    """Mean pairwise euclidean distance of the normalised class centres (text: one row per class; images:
    the mean embedding of each label), the quantity TIMA increases."""
    e = F.normalize(emb, dim=-1)
    if labels is not None:
        classes = labels.unique()
        e = F.normalize(torch.stack([e[labels == c].mean(0) for c in classes]), dim=-1)
    k = len(e)
    if k < 2:
        return 0.0
    d = torch.cdist(e, e)
    return float(d.sum() / (k * (k - 1)))
