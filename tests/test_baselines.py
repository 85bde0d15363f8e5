"""Baselines (GB, OGM-GE, PMR, Mixup, MMAT): hand-checked formulas and short training runs on tiny data."""
from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_data
from mmrobust.config import parse_params
from mmrobust.methods import baselines as B
from mmrobust.methods import build_method
from mmrobust.train import Trainer


def trainer(method: str, hparams: dict | None = None, **train) -> Trainer:
    cfg = {"method": method, "epochs": 2, "batch_size": 6, "model": {"width": 4}, **train}
    groups = {method: hparams} if hparams else {}  # params_key == name here
    return Trainer(parse_params({"train": cfg, **groups}), data=tiny_data(n=12))


def first_batch(tr: Trainer):
    return next(iter(tr.batches("train_eval")))


# ---------------------------------------------------------------- Gradient Blending

def test_blend_weights_by_hand():
    prev = {"audio": (1.0, 1.2), "visual": (1.0, 1.1), "fused": (1.0, 1.0)}
    cur = {"audio": (0.5, 0.9), "visual": (0.8, 1.2), "fused": (0.6, 0.8)}
    # audio: G = 0.3, ΔO = 0.4 − 0.2 = 0.2 -> 0.3/0.04 = 7.5; visual: G = −0.1 -> 0; fused: G = 0.2, ΔO = 0.2 -> 5
    w = B.blend_weights(prev, cur)
    assert w == pytest.approx({"audio": 0.6, "visual": 0.0, "fused": 0.4})


def test_blend_weights_guards():
    prev = {"a": (1.0, 1.0), "b": (1.0, 1.0)}
    # a: gap shrank (ΔO = −0.1) -> floor 0.1; b: ΔO = 0.2; both G = 0.2 -> 0.2/0.01 = 20 vs 0.2/0.04 = 5
    cur = {"a": (0.9, 0.8), "b": (0.6, 0.8)}
    assert B.blend_weights(prev, cur, min_overfit=0.1) == pytest.approx({"a": 0.8, "b": 0.2})
    worse = {"a": (0.9, 1.1), "b": (0.9, 1.0)}  # no head generalised -> uniform
    assert B.blend_weights(prev, worse) == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize("weights_sum,scale", [("one", 1.0), ("heads", 3.0)])
def test_gb_loss_is_the_weighted_sum(weights_sum, scale):
    """Σ_k w_k CE_k with the blend weights (sum 1) times 1 (paper) or the number of heads (the default)."""
    tr = trainer("gb", {"reestimate_every": 1, "weights_sum": weights_sum})
    model, method, ctx = tr.model, tr.method, tr.ctx
    inputs, y = first_batch(tr)
    ctx.state["gb"] = {"weights": {"audio": 0.2, "visual": 0.3, "fused": 0.5}, "prev": None}
    loss, _ = method.loss(model, inputs, y, ctx)
    loss.backward()
    assert all(p.grad.abs().sum() > 0 for p in model.gb_heads.parameters())
    out = model(inputs)
    want = scale * (0.2 * F.cross_entropy(model.gb_heads["audio"](out.features["audio"]), y)
                    + 0.3 * F.cross_entropy(model.gb_heads["visual"](out.features["visual"]), y)
                    + 0.5 * F.cross_entropy(out.logits, y))
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)


# ---------------------------------------------------------------- OGM-GE

def _scores_with_confidence(p_true: list[float], y: torch.Tensor) -> torch.Tensor:
    """Two-class logits whose softmax gives probability p_true[i] to class y[i]."""
    z = torch.zeros(len(y), 2)
    for i, p in enumerate(p_true):
        z[i, y[i]] = math.log(p / (1 - p))
    return z


def test_ogm_coefficients_by_hand():
    y = torch.tensor([0, 1])
    scores = {"audio": _scores_with_confidence([0.8, 0.8], y),    # s_a = 1.6
              "visual": _scores_with_confidence([0.4, 0.4], y)}   # s_v = 0.8 -> ρ_a = 2
    assert B.ogm_coefficients(scores, y, 0.5) == pytest.approx({"audio": 1 - math.tanh(1.0), "visual": 1.0})
    assert B.ogm_coefficients(scores, y, 0.5, shift=True) == pytest.approx({"audio": 1 - math.tanh(0.5),
                                                                           "visual": 1.0})
    swapped = {"audio": scores["visual"], "visual": scores["audio"]}
    assert B.ogm_coefficients(swapped, y, 0.3) == pytest.approx({"audio": 1.0, "visual": 1 - math.tanh(0.6)})
    # three modalities: ρ_m = s_m / mean of the others; s = (1.6, 0.8, 0.8) -> ρ = (2, 0.67, 0.67)
    three = {**scores, "flow": scores["visual"]}
    assert B.ogm_coefficients(three, y, 0.5) == pytest.approx({"audio": 1 - math.tanh(1.0), "visual": 1.0,
                                                               "flow": 1.0})
    tie = {"audio": scores["audio"], "visual": scores["audio"]}
    assert B.ogm_coefficients(tie, y, 0.5) == {"audio": 1.0, "visual": 1.0}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ge_noise", [False, True])
def test_ogm_scales_only_the_dominant_encoder(ge_noise):
    tr = trainer("ogm_ge", {"ge_noise": ge_noise, "alpha": 0.8})
    model, method, ctx = tr.model, tr.method, tr.ctx
    inputs, y = first_batch(tr)
    model.zero_grad()
    F.cross_entropy(model(inputs).logits, y).backward()
    ref = _grads(model)
    model.zero_grad()
    loss, _ = method.loss(model, inputs, y, ctx)
    loss.backward()
    method.after_backward(model, ctx)
    got = _grads(model)
    coeffs = method._coeffs
    assert coeffs == B.ogm_coefficients(model(inputs).scores, y, 0.8)
    dominant = [m for m, k in coeffs.items() if k < 1]
    assert len(dominant) == 1 and 0 < coeffs[dominant[0]] < 1
    modulated = 0
    for n, g in ref.items():
        enc = n.split(".")[1] if n.startswith("encoders.") else None
        if enc is None or g.dim() < 2:  # head, BN and biases: untouched
            torch.testing.assert_close(got[n], g, rtol=0, atol=0)
            continue
        k = coeffs[enc]
        if not ge_noise:
            torch.testing.assert_close(got[n], k * g, rtol=1e-6, atol=0)
        else:
            resid = got[n] - k * g
            if g.numel() >= 200:  # the added noise has the unscaled gradient's std
                assert resid.std() == pytest.approx(float(g.std()), rel=0.35)
        modulated += 1
    assert modulated > 0


def test_ogm_modulation_window():
    tr = trainer("ogm_ge", {"ge_noise": False, "modulation_start": 1, "modulation_end": 2})
    model, method, ctx = tr.model, tr.method, tr.ctx
    inputs, y = first_batch(tr)
    loss, _ = method.loss(model, inputs, y, ctx)
    loss.backward()
    before = _grads(model)
    ctx.epoch = 0
    method.after_backward(model, ctx)
    assert all(torch.equal(before[n], g) for n, g in _grads(model).items())
    assert [method.active(e) for e in range(4)] == [False, True, False, False]


# ---------------------------------------------------------------- PMR

def test_pmr_prototypes_are_class_means_then_ema():
    tr = trainer("pmr", {"proto_momentum": 0.25})
    model, method, ctx = tr.model, tr.method, tr.ctx
    K = tr.data.num_classes

    def means():
        model.eval()
        with torch.no_grad():
            feats = {m: [] for m in model.modalities}
            ys = []
            for inputs, y in ctx.train_batches():
                for m, f in model.encode(inputs).items():
                    feats[m].append(f)
                ys.append(y)
        model.train()
        y = torch.cat(ys)
        return {m: torch.stack([torch.cat(f)[y == k].mean(0) for k in range(K)]) for m, f in feats.items()}

    method.on_epoch_start(model, ctx)
    first = means()
    for m in model.modalities:
        torch.testing.assert_close(model.pmr_prototypes.get(m), first[m], rtol=1e-5, atol=1e-6)
        assert bool(model.pmr_prototypes.seen(m).all())
    with torch.no_grad():
        for p in model.encoders.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method.on_epoch_start(model, ctx)
    second = means()
    for m in model.modalities:
        torch.testing.assert_close(model.pmr_prototypes.get(m), 0.25 * first[m] + 0.75 * second[m],
                                   rtol=1e-5, atol=1e-6)
    assert "pmr_prototypes.proto_audio" in model.state_dict()


@pytest.mark.parametrize("cap", [None, 1e-3])
def test_pmr_loss_by_hand(cap):
    tr = trainer("pmr", {"beta": 2.0, "gamma": 0.5, "max_coefficient": cap})
    model, method, ctx = tr.model, tr.method, tr.ctx
    method.on_epoch_start(model, ctx)
    inputs, y = first_batch(tr)
    loss, logs = method.loss(model, inputs, y, ctx)
    out = model(inputs)
    plog = {m: -torch.cdist(out.features[m], model.pmr_prototypes.get(m)) for m in model.modalities}
    s = {m: F.softmax(z, 1).gather(1, y[:, None]).sum().item() for m, z in plog.items()}
    rho_a = s["audio"] / s["visual"]
    weak, strong = ("visual", "audio") if rho_a > 1 else ("audio", "visual")
    r = max(rho_a, 1 / rho_a)
    p_strong = F.softmax(plog[strong], 1)
    entropy = -(p_strong * p_strong.log()).sum(1).mean()
    coef = r - 1 if cap is None else min(r - 1, cap)
    want = (F.cross_entropy(out.logits, y) + 2.0 * coef * F.cross_entropy(plog[weak], y)
            - 0.5 * (r - 1) * entropy)
    assert loss.item() == pytest.approx(want.item(), rel=1e-4)
    assert logs[f"rho_{weak}"] == pytest.approx(1 / r, rel=1e-5)


@pytest.mark.parametrize("max_coefficient", [None, 1.0])
def test_pmr_weak_modality_with_zero_confidence_gets_a_capped_weight(monkeypatch, max_coefficient):
    """On real clips a modality's target confidence underflowed to 0 on a batch: ρ = 0 divided by zero. ρ is
    floored (coefficient 1/floor − 1 = 99 when uncapped); the default caps the coefficient at 1, the official
    code's constant weight."""
    from mmrobust.methods import baselines

    tr = trainer("pmr", {"beta": 2.0, "gamma": 0.0, "max_coefficient": max_coefficient})
    model, method, ctx = tr.model, tr.method, tr.ctx
    method.on_epoch_start(model, ctx)
    inputs, y = first_batch(tr)
    weak = model.modalities[0]
    monkeypatch.setattr(baselines, "target_confidence",
                        lambda plog, y: torch.tensor([0.0 if m == weak else 3.0 for m in plog]))
    loss, logs = method.loss(model, inputs, y, ctx)
    out = model(inputs)
    plog = -torch.cdist(out.features[weak], model.pmr_prototypes.get(weak))
    cap = 1 / baselines.PMR_RHO_FLOOR - 1 if max_coefficient is None else max_coefficient
    want = F.cross_entropy(out.logits, y) + 2.0 * cap * F.cross_entropy(plog, y)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(want.item(), rel=1e-4)


# ---------------------------------------------------------------- Mixup

class _Recorder(torch.nn.Module):
    """A stand-in model: records its inputs, logits = a fixed linear map of the flattened modalities."""
    Out = namedtuple("Out", "logits")

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, inputs):
        self.seen.append(inputs)
        flat = torch.cat([inputs[m].flatten(1) for m in sorted(inputs)], 1)
        return self.Out(flat @ torch.linspace(-1, 1, flat.shape[1] * 3).view(-1, 3))


def test_mixup_shares_lambda_and_permutation():
    torch.manual_seed(3)
    params = parse_params({"train": {"method": "mixup"}, "mixup": {"alpha": 0.7}})
    method = build_method(params)
    n = 6
    inputs = {"audio": torch.eye(n), "visual": torch.randn(n, 2, 3)}  # audio rows reveal λ and π
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    model = _Recorder()
    loss, logs = method.loss(model, inputs, y, None)
    mixed = model.seen[0]
    lam = float(logs["lam"])
    a = mixed["audio"]
    perm = torch.tensor([i if a[i, i] > 1 - 1e-6 else int(torch.argmax(a[i] - a[i, i] * torch.eye(n)[i]))
                         for i in range(n)])
    torch.testing.assert_close(a, lam * inputs["audio"] + (1 - lam) * inputs["audio"][perm])
    torch.testing.assert_close(mixed["visual"], lam * inputs["visual"] + (1 - lam) * inputs["visual"][perm])
    logits = model(mixed).logits
    want = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)


# ---------------------------------------------------------------- MMAT

def test_mmat_trains_on_joint_eps_ball(monkeypatch):
    seen, real = [], B.adversarial_inputs

    def recording(model, inputs, *args, **kw):
        adv = real(model, inputs, *args, **kw)
        seen.append((inputs, adv))
        return adv

    monkeypatch.setattr(B, "adversarial_inputs", recording)
    eps = 0.3
    tr = trainer("mmat", {"eps": eps, "steps": 3, "clean_weight": 0.25})
    model, method, ctx = tr.model, tr.method, tr.ctx
    inputs, y = first_batch(tr)
    loss, _ = method.loss(model, inputs, y, ctx)
    clean, adv = seen[0]
    assert clean is inputs
    norms = torch.sqrt(sum((adv[m] - inputs[m]).flatten(1).pow(2).sum(1) for m in inputs))
    assert bool((norms <= eps * (1 + 1e-5)).all()) and bool((norms > 0.5 * eps).all())
    want = 0.75 * F.cross_entropy(model(adv).logits, y) + 0.25 * F.cross_entropy(model(inputs).logits, y)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert model.training  # the attack restored train mode


# ---------------------------------------------------------------- every method trains

@pytest.mark.parametrize("name", ["gb", "ogm_ge", "pmr", "mixup", "mmat"])
def test_method_trains_two_epochs(name):
    hp = {"gb": {"reestimate_every": 1}, "mmat": {"steps": 1}, "pmr": {"gamma": 0.1}}.get(name)
    tr = trainer(name, hp)
    for e in range(tr.epochs):
        m = tr.run_epoch(e)
        assert math.isfinite(m["train_loss"])
    model, method, ctx = tr.model, tr.method, tr.ctx
    model.zero_grad()
    inputs, y = first_batch(tr)
    loss, _ = method.loss(model, inputs, y, ctx)
    loss.backward()
    method.after_backward(model, ctx)
    for m in model.modalities:
        # a GB encoder learns through its own head or the fused one: not at all when both weigh 0
        expect = name != "gb" or ctx.state["gb"]["weights"][m] > 0 or ctx.state["gb"]["weights"]["fused"] > 0
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoders[m].parameters()) == expect
    if name == "gb":  # each uni-modal head learns exactly when its blending weight is positive
        w = ctx.state["gb"]["weights"]
        assert any(w[m] > 0 for m in model.modalities) or w["fused"] == 1
        for m in model.modalities:
            for p in model.gb_heads[m].parameters():
                assert bool(p.grad.abs().sum() > 0) == (w[m] > 0)
    assert method.predict(model, inputs).shape == (len(y), tr.data.num_classes)
    if name == "gb":  # uniform at first, then re-estimated from the checkpoints before and after each epoch
        st = ctx.state["gb"]
        assert set(st["weights"]) == set(st["prev"]) == {"audio", "visual", "fused"}
        assert sum(st["weights"].values()) == pytest.approx(1)
        assert st["weights"] != {k: 1 / 3 for k in st["weights"]}


def test_params_are_validated():
    with pytest.raises(ValueError, match="ogm_ge"):
        parse_params({"train": {"method": "ogm_ge"}, "ogm_ge": {"alpha": -1}})
    with pytest.raises(ValueError, match="unknown key"):
        parse_params({"train": {"method": "gb"}, "gb": {"every": 1}})
