"""CRMT maths: margin regulariser, step-1/step-2 losses, tau estimation, certified bound r(x)."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mmrobust.crmt import (certified_bound, crmt_margin_loss, estimate_tau, step1_loss, step2_loss,
                           step2_parameters)
from mmrobust.models import CRMTHead, LateFusionModel, Output, build_model

torch.manual_seed(0)


class LinearEncoder(nn.Module):
    """phi(x) = U flatten(x) (or U flatten(x)^2): gradients of W~ phi are known in closed form."""

    def __init__(self, U: torch.Tensor, square: bool = False):
        super().__init__()
        self.U, self.square, self.out_dim, self.modes = nn.Parameter(U), square, U.shape[0], []

    def forward(self, x):
        self.modes.append(self.training)
        x = x.flatten(1)
        return (x * x if self.square else x) @ self.U.T


def linear_model(square_visual=False, K=3, d=5):
    encoders = {"audio": LinearEncoder(torch.randn(d, 6)), "visual": LinearEncoder(torch.randn(d, 12), square_visual)}
    model = LateFusionModel(encoders, CRMTHead({"audio": d, "visual": d}, K))
    with torch.no_grad():
        model.head.a["audio"].copy_(torch.tensor([0.7, -0.3, 1.2]))
        model.head.a["visual"].copy_(torch.tensor([0.4, 0.9, -0.6]))
    return model


def linear_batches(n=2, B=4, K=3):
    return [({"audio": torch.randn(B, 1, 2, 3), "visual": torch.randn(B, 3, 2, 2)}, torch.randint(0, K, (B,)))
            for _ in range(n)]


def margin_by_loops(scores, y, eps):
    total = 0.0
    for i in range(len(y)):
        s = 0.0
        for z in scores:
            for k in range(len(z[i])):
                if k != y[i]:
                    s += math.exp(z[i][k] - z[i][y[i]])
        total += math.log(s + eps)
    return total / len(y)


@pytest.mark.parametrize("eps", [1e-5, 0.0, 0.5])
def test_margin_loss_equals_double_loop(eps):
    scores = [torch.randn(5, 4, dtype=torch.float64) * 3 for _ in range(3)]
    y = torch.tensor([0, 3, 1, 1, 2])
    expected = margin_by_loops([z.tolist() for z in scores], y.tolist(), eps)
    assert abs(crmt_margin_loss(scores, y, eps).item() - expected) < 1e-12
    as_dict = dict(zip(["audio", "visual", "flow"], scores))
    assert abs(crmt_margin_loss(as_dict, y, eps).item() - expected) < 1e-12


def test_margin_loss_is_stable_for_large_scores():
    z = torch.zeros(2, 3)
    z[:, 1:] = 800.0  # exp(800) overflows float32 (and float64)
    loss = crmt_margin_loss([z, z.clone().requires_grad_()], torch.tensor([0, 0]))
    assert torch.isfinite(loss)
    assert abs(loss.item() - (800 + math.log(4))) < 1e-3  # 2 modalities x 2 wrong classes


def test_step1_loss_value_and_every_parameter_gets_gradient():
    for head in ["crmt", "concat"]:
        model = build_model({"num_classes": 3, "width": 4, "head": head,
                             "encoder": {"audio": "resnet18", "visual": "transformer"},
                             "encoder_kwargs": {"visual": {"patch": 8, "img_size": 32, "depth": 1}}})
        inputs = {"audio": torch.randn(4, 1, 32, 40), "visual": torch.randn(4, 2, 3, 32, 32)}
        y = torch.tensor([0, 1, 2, 1])
        out = model(inputs)
        loss = step1_loss(out, y, rho=2.0)
        expected = F.cross_entropy(out.logits, y).item() + 2.0 * margin_by_loops(
            [out.scores[m].tolist() for m in model.modalities], y.tolist(), 1e-5)
        assert abs(loss.item() - expected) < 1e-4
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{head}: no gradient for {name}"
        # The margin term alone reaches every encoder and W~ (it does not involve a or the bias).
        model.zero_grad()
        crmt_margin_loss(model(inputs).scores, y).backward()
        for name, p in model.named_parameters():
            if not (name.startswith("head.a.") or name in ("head.bias", "head.fc.bias")):
                assert p.grad is not None and p.grad.abs().sum() > 0, f"{head}: margin misses {name}"


def test_certified_bound_hand_example():
    # M = 2, K = 3, two samples; logits built with the CRMT head formula h_k = sum_m a_{m,k} z_{m,k} + b_k.
    z = {"audio": torch.tensor([[2.0, 1.0, 0.5], [0.0, 1.0, 3.0]]),
         "visual": torch.tensor([[0.5, 1.5, -1.0], [1.0, 0.0, 2.0]])}
    a = {"audio": torch.tensor([0.5, 0.2, 0.1]), "visual": torch.tensor([0.3, 0.4, 0.6])}
    tau = {"audio": torch.tensor([1.0, 2.0, 3.0]), "visual": torch.tensor([0.5, 1.0, 1.5])}
    b = torch.tensor([0.1, 0.0, -0.1])
    logits = a["audio"] * z["audio"] + a["visual"] * z["visual"] + b  # [[1.25, 0.8, -0.65], [0.4, 0.2, 1.4]]
    y = torch.tensor([0, 1])
    out = Output(logits, {}, z)
    # Sample 0: y = 0 is the top logit, the runner-up is j = 1:
    #   num = (0.5*2 - 0.2*1) + (0.3*0.5 - 0.4*1.5) + (0.1 - 0) = 0.45
    #   den = sqrt((0.5*1 + 0.2*2)^2 + (0.3*0.5 + 0.4*1)^2) = sqrt(0.81 + 0.3025)
    # Sample 1 (misclassified): y = 1, j = 2 (the prediction):
    #   num = (0.2*1 - 0.1*3) + (0.4*0 - 0.6*2) + (0 + 0.1) = -1.2
    #   den = sqrt((0.2*2 + 0.1*3)^2 + (0.4*1 + 0.6*1.5)^2) = sqrt(0.49 + 1.69)
    expected = torch.tensor([0.45 / math.sqrt(1.1125), -1.2 / math.sqrt(2.18)])
    r = certified_bound(out, y, tau, a, b)
    torch.testing.assert_close(r, expected)
    # Per-modality tensors stacked in modality order give the same result.
    r2 = certified_bound(out, y, torch.stack(list(tau.values())), torch.stack(list(a.values())), b)
    torch.testing.assert_close(r2, expected)
    torch.testing.assert_close(step2_loss(out, y, tau, a, b), -expected.mean())


def test_tau_of_linear_encoder_is_row_norm():
    model = linear_model()
    batches = linear_batches()
    tau = estimate_tau(model, batches, num_classes=3)
    # The Dataset's collated dict batches (modality keys plus label/index) work too.
    as_dicts = estimate_tau(model, [{**inputs, "label": y, "index": torch.arange(len(y))} for inputs, y in batches])
    assert all(torch.equal(as_dicts[m], tau[m]) for m in tau)
    for m in ["audio", "visual"]:
        rows = model.head.uni_weight(m) @ model.encoders[m].U  # z_m = (W~ U) x
        torch.testing.assert_close(tau[m], rows.norm(dim=1).detach())
        assert model.encoders[m].modes and not any(model.encoders[m].modes)  # ran in eval mode
    assert model.training  # previous mode restored


def test_tau_is_max_over_samples_of_per_sample_norm():
    model = linear_model(square_visual=True)  # z_v = R x^2, grad_x z_{v,k} = 2 x * R_k differs per sample
    batches = linear_batches(n=3)
    tau = estimate_tau(model, batches)
    R = (model.head.uni_weight("visual") @ model.encoders["visual"].U).detach()
    x = torch.cat([inp["visual"].flatten(1) for inp, _ in batches])  # (12, 12)
    expected = torch.stack([(2 * x * R[k]).norm(dim=1).max() for k in range(3)])
    torch.testing.assert_close(tau["visual"], expected)


def test_tau_reference_compat_reproduces_defect_2():
    model = linear_model()
    tau = estimate_tau(model, linear_batches(), reference_compat=True)
    assert torch.equal(tau["audio"], torch.zeros(3))
    # Visual: gradient of the fused logit (contains a), accumulated over classes without reset.
    rows = (model.head.uni_weight("visual") @ model.encoders["visual"].U).detach()
    acc = (model.head.a["visual"].detach()[:, None] * rows).cumsum(0)
    torch.testing.assert_close(tau["visual"], acc.norm(dim=1))


def test_step2_parameters_are_exactly_a_and_step2_improves_bound():
    model = linear_model()
    batches = linear_batches()
    tau = estimate_tau(model, batches)
    params = step2_parameters(model)
    assert len(params) == 2 and params[0] is model.head.a["audio"] and params[1] is model.head.a["visual"]
    frozen = [n for n, p in model.named_parameters() if p.requires_grad]
    assert frozen == ["head.a.audio", "head.a.visual"]
    model.eval()
    inputs, y = batches[0]
    before = certified_bound(model(inputs), y, tau, model.head.a, model.head.bias).mean().item()
    opt = torch.optim.SGD(params, lr=1e-2)
    for _ in range(3):
        loss = step2_loss(model(inputs), y, tau, model.head.a, model.head.bias)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("head.a."))
        opt.step()
    after = certified_bound(model(inputs), y, tau, model.head.a, model.head.bias).mean().item()
    assert after > before
    with pytest.raises(TypeError, match="CRMT head"):
        step2_parameters(build_model({"num_classes": 3, "width": 4, "head": "concat"}))


def test_three_modalities_end_to_end():
    model = build_model({"num_classes": 3, "width": 4, "modalities": ["visual", "flow", "diff"]})
    inputs = {"visual": torch.randn(4, 2, 3, 32, 32), "flow": torch.randn(4, 2, 2, 32, 32),
              "diff": torch.randn(4, 2, 3, 32, 32)}
    y = torch.tensor([0, 1, 2, 0])
    step1_loss(model(inputs), y, rho=1.0).backward()
    tau = estimate_tau(model, [(inputs, y)])
    assert list(tau) == ["visual", "flow", "diff"] and all((t > 0).all() for t in tau.values())
    model.eval()
    r = certified_bound(model(inputs), y, tau, model.head.a, model.head.bias)
    assert r.shape == (4,) and torch.isfinite(r).all()
