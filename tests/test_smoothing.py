"""Randomised smoothing (mmrobust/analysis/smoothing.py): closed forms of linear and band classifiers, soundness
against PGD on the exactly smoothed classifier, Clopper-Pearson bounds, and the noise-augmented training option."""
import math

import pytest
import torch
import torch.nn as nn
from scipy.stats import norm

from mmrobust.analysis.smoothing import ABSTAIN, certify, lower_confidence_bound, noisy_counts, smoothed_correct
from mmrobust.attacks.registry import run_attack

SIGMA = 0.5


class Linear2(nn.Module):
    """Two classes, logits [0, w.x + b] over the concatenation of an "audio" (3) and a "visual" (2) vector."""

    def __init__(self, w_audio, w_visual, b):
        super().__init__()
        self.wa, self.wv, self.b = torch.tensor(w_audio), torch.tensor(w_visual), float(b)

    def margin(self, x):
        return x["audio"] @ self.wa + x["visual"] @ self.wv + self.b

    def forward(self, x):
        s = self.margin(x)
        return torch.stack([torch.zeros_like(s), s], 1)


def _points(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(n, 3, generator=g), "visual": torch.randn(n, 2, generator=g)}


def test_clopper_pearson_matches_its_closed_forms():
    # k = n: the bound solves p^n = alpha; k = 0 gives 0; it grows with k and with alpha
    assert lower_confidence_bound(100, 100, 0.001) == pytest.approx(0.001 ** (1 / 100), rel=1e-9)
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    assert lower_confidence_bound(60, 100, 0.01) < lower_confidence_bound(70, 100, 0.01) < 0.7
    assert lower_confidence_bound(70, 100, 0.001) < lower_confidence_bound(70, 100, 0.05)


@pytest.mark.parametrize("noised", [["audio", "visual"], ["audio"], ["visual"]])
def test_linear_model_radius_approaches_the_distance_to_its_boundary(noised):
    """For a linear f the smoothed classifier is f, and the radius with the true p is the l2 distance to the
    decision boundary over the noised modalities: |w.x + b| / ||w_noised||. The Monte-Carlo certificate is a
    lower bound of it, close with many samples."""
    model = Linear2([0.6, -0.3, 0.2], [0.5, 0.4], 0.1)
    x = _points()
    w = torch.cat([model.wa if "audio" in noised else torch.zeros(0), model.wv if "visual" in noised else torch.zeros(0)])
    exact = model.margin(x).abs() / w.norm()
    pred, radius = certify(model, x, noised, SIGMA, 64, 4000, 0.001, 4096, torch.Generator().manual_seed(1))
    truth = (model.margin(x) > 0).long()
    ok = pred != ABSTAIN
    assert torch.equal(pred[ok], truth[ok])
    assert bool((radius <= exact + 1e-6).all())                     # sound
    close = exact < 2 * SIGMA                                       # the bound loosens as p_A nears 1
    assert bool((exact[close] - radius[close] <= 0.2 * SIGMA).all())  # and tight
    assert bool((radius[~ok] == 0).all())


def test_counts_are_seeded_and_sum_to_n():
    model = Linear2([1.0, 0.0, 0.0], [0.0, 0.0], 0.0)
    x = _points(4)
    a = noisy_counts(model, x, ["audio"], SIGMA, 50, 7, torch.Generator().manual_seed(3))
    b = noisy_counts(model, x, ["audio"], SIGMA, 50, 64, torch.Generator().manual_seed(3))
    assert a.shape == b.shape == (4, 2) and bool((a.sum(1) == 50).all()) and bool((b.sum(1) == 50).all())
    assert torch.equal(a, noisy_counts(model, x, ["audio"], SIGMA, 50, 7, torch.Generator().manual_seed(3)))
    # noise on the visual input only cannot move a classifier that ignores it
    assert bool((noisy_counts(model, x, ["visual"], 5.0, 20, 64, torch.Generator()).max(1).values == 20).all())


class SmoothedBand(nn.Module):
    """The exactly smoothed version of the band classifier f(x) = 1 iff |u.x| < t (u a unit vector over the
    concatenated input) under joint N(0, sigma^2 I) noise: P(f(x + d) = 1) = Phi((t - u.x)/sigma) - Phi((-t - u.x)/sigma).
    Logits [log(1 - p), log p]."""

    def __init__(self, u, t, sigma):
        super().__init__()
        self.u, self.t, self.sigma = u / u.norm(), t, sigma
        self.dummy = nn.Parameter(torch.zeros(()))  # the attacks freeze parameters: give them one

    def p1(self, x):
        s = torch.cat([x["audio"], x["visual"]], 1) @ self.u
        n = torch.distributions.Normal(0.0, 1.0)
        return (n.cdf((self.t - s) / self.sigma) - n.cdf((-self.t - s) / self.sigma)).clamp(1e-12, 1 - 1e-12)

    def forward(self, x):
        p = self.p1(x)
        return torch.stack([torch.log1p(-p), torch.log(p)], 1)


def test_no_pgd_attack_succeeds_inside_the_radius_certified_with_the_true_p():
    """A small exact case: on the exactly smoothed band classifier, l2 PGD (50 steps) inside sigma Phi^-1(p_A)
    never changes the prediction, while the same attack slightly beyond the true distance to g's boundary does."""
    torch.manual_seed(0)
    u = torch.tensor([0.5, -1.0, 0.3, 0.8, 0.2], dtype=torch.float64)
    g = SmoothedBand(u, t=1.2, sigma=SIGMA).double()
    s = torch.linspace(-2.0, 2.0, 21, dtype=torch.float64)          # positions along u
    x0 = torch.outer(s, g.u)
    x = {"audio": x0[:, :3].clone(), "visual": x0[:, 3:].clone()}
    p1 = g.p1(x)
    pred = (p1 > 0.5).long()
    p_a = torch.where(pred == 1, p1, 1 - p1)
    radius = SIGMA * torch.from_numpy(norm.ppf(p_a.numpy()))
    # g's boundary along u, where p1 = 1/2, by bisection on the scalar function
    lo, hi = 0.0, 1.2 + 5 * SIGMA
    for _ in range(100):
        mid = (lo + hi) / 2
        val = g.p1({"audio": (mid * g.u)[None, :3], "visual": (mid * g.u)[None, 3:]})
        lo, hi = (mid, hi) if val > 0.5 else (lo, mid)
    distance = (s.abs() - lo).abs()
    keep = radius > 0.05
    assert bool((radius[keep] <= distance[keep] + 1e-6).all())      # the certificate is sound here
    for eps, must_hold in ((radius * 0.999, True), (distance * 1.05, False)):
        fooled = []
        for i in torch.nonzero(keep).flatten().tolist():
            xi = {m: v[i: i + 1] for m, v in x.items()}
            adv = run_attack("pgd", g, xi, pred[i: i + 1], eps=float(eps[i]), steps=50,
                             step_size=float(eps[i]) / 10, clamp=False)
            fooled.append(bool(g(adv).argmax(1) != pred[i]))
        if must_hold:
            assert not any(fooled)
        else:
            assert sum(fooled) >= 0.9 * len(fooled)  # the attack is strong enough to find the boundary


def test_smoothed_correct_counts_abstentions_as_wrong():
    pred = torch.tensor([1, ABSTAIN, 0, 1])
    radius = torch.tensor([0.7, 0.0, 0.2, 0.4])
    y = torch.tensor([1, 1, 0, 0])
    out = smoothed_correct(pred, radius, y, [0.0, 0.3, 0.5])
    assert out[0.0].tolist() == [True, False, True, False]
    assert out[0.3].tolist() == [True, False, False, False]
    assert out[0.5].tolist() == [True, False, False, False]


def test_the_largest_certifiable_radius_is_bounded_by_n():
    """Even a constant classifier (p = 1) certifies at most sigma Phi^-1(alpha^(1/n))."""
    model = Linear2([0.0, 0.0, 0.0], [0.0, 0.0], 1.0)
    x = _points(3)
    pred, radius = certify(model, x, ["audio", "visual"], SIGMA, 8, 100, 0.01, 512, torch.Generator().manual_seed(0))
    assert pred.tolist() == [1, 1, 1]
    assert radius.tolist() == pytest.approx([SIGMA * norm.ppf(0.01 ** (1 / 100))] * 3, rel=1e-5)
    assert math.isfinite(float(radius.max()))
