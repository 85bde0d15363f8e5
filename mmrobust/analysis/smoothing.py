"""Randomised-smoothing certificates (Cohen, Rosenfeld & Kolter 2019) for multimodal inputs.

The smoothed classifier g(x) = argmax_k P(f(x + d) = k), with d_m ~ N(0, sigma^2 I) on the noised modalities (all of
them: a joint certificate; one: a per-modality certificate, the others left clean) and f any base classifier (a
method's own prediction). CERTIFY: c = the most frequent class of f over n0 noisy copies; p_A = the one-sided
Clopper-Pearson lower bound (level 1 - alpha) on P(f(x + d) = c) from n further copies; if p_A > 1/2, g(x) = c on the
whole l2 ball of radius sigma * Phi^-1(p_A) around x (the norm taken over the noised modalities together), with
probability at least 1 - alpha; otherwise CERTIFY abstains. An abstention counts as a wrong prediction.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from scipy.stats import binomtest, norm

Inputs = Mapping[str, torch.Tensor]
ABSTAIN = -1


@torch.no_grad()
def noisy_counts(predict: Callable[[dict], torch.Tensor], inputs: Inputs, noised: Sequence[str], sigma: float,
                 n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """(B, K) counts of the base classifier's predicted class over n Gaussian copies of each sample; noise on the
    modalities in `noised` only. At most `batch_size` copies go through `predict` at once."""
    B = len(next(iter(inputs.values())))
    owner = torch.arange(B).repeat_interleave(n)  # copy j belongs to sample owner[j]
    counts = None
    for s in range(0, len(owner), batch_size):
        idx = owner[s: s + batch_size]
        xs = {}
        for m, x in inputs.items():
            rep = x[idx.to(x.device)]
            if m in noised:
                rep = rep + sigma * torch.randn(rep.shape, generator=generator, dtype=rep.dtype).to(rep.device)
            xs[m] = rep
        logits = predict(xs)
        if counts is None:
            counts = torch.zeros(B, logits.shape[1], dtype=torch.long)
        counts.index_put_((idx, logits.argmax(1).cpu()), torch.ones(len(idx), dtype=torch.long), accumulate=True)
    return counts


def lower_confidence_bound(successes: int, trials: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion (scipy's exact interval)."""
    return float(binomtest(int(successes), int(trials), alternative="greater")
                 .proportion_ci(confidence_level=1 - alpha, method="exact").low)


def certify(predict: Callable[[dict], torch.Tensor], inputs: Inputs, noised: Sequence[str], sigma: float, n0: int,
            n: int, alpha: float, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) predictions of the smoothed classifier (ABSTAIN where it abstains) and (B,) certified l2 radii
    (0 where it abstains), by Cohen et al.'s CERTIFY."""
    if sigma <= 0:
        raise ValueError(f"smoothing sigma must be > 0, got {sigma}")
    top = noisy_counts(predict, inputs, noised, sigma, n0, batch_size, generator).argmax(1)
    counts = noisy_counts(predict, inputs, noised, sigma, n, batch_size, generator)
    n_top = counts.gather(1, top[:, None]).squeeze(1)
    p_low = torch.tensor([lower_confidence_bound(k, n, alpha) for k in n_top.tolist()], dtype=torch.float64)
    ok = p_low > 0.5
    radius = torch.where(ok, sigma * torch.from_numpy(norm.ppf(p_low.clamp(max=1.0).numpy())), torch.zeros(()))
    pred = torch.where(ok, top, torch.full_like(top, ABSTAIN))
    return pred, radius.float()


def smoothed_correct(pred: torch.Tensor, radius: torch.Tensor, y: torch.Tensor, radii: Sequence[float]
                     ) -> dict[float, torch.Tensor]:
    """{r: (B,) bool} certified-correct at radius r: the smoothed prediction is the label and its radius is
    at least r (r = 0: the smoothed classifier's accuracy, abstentions wrong)."""
    right = pred == y.cpu()
    return {float(r): right & (radius >= float(r)) for r in radii}
