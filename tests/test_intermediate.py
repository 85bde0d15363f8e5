"""Intermediate fusion (MMTM, MMT): interface, coupling between streams, MMTM time pooling, gradients, CRMT."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_data
from mmrobust.config import parse_params
from mmrobust.models import ModelSpec, build_model
from mmrobust.models.intermediate import MMTM, MMTModel, MMTMModel
from mmrobust.train import Trainer

SHAPES = {"audio": (1, 16, 20), "visual": (3, 3, 16, 16), "flow": (3, 2, 16, 16)}  # as tests/helpers.TinyAV
MMT_KW = {"patch": 8, "img_size": 16, "depth": 1, "cross_depth": 2}
ENCODER = {"mmtm": "resnet18", "mmt": "transformer", "late": "resnet18"}
K = 3


def build(fusion, head="crmt", modalities=("audio", "visual"), **kw):
    torch.manual_seed(0)
    ekw = {m: MMT_KW for m in modalities} if fusion == "mmt" else {}
    return build_model(ModelSpec(num_classes=K, modalities=list(modalities), encoder=ENCODER[fusion], width=4,
                                 head=head, fusion=fusion, encoder_kwargs=ekw, **kw))


def batch(modalities=("audio", "visual"), B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(B, *SHAPES[m], generator=g) for m in modalities}


@pytest.mark.parametrize("fusion,cls", [("mmtm", MMTMModel), ("mmt", MMTModel)])
@pytest.mark.parametrize("head", ["concat", "crmt"])
@pytest.mark.parametrize("modalities", [("audio", "visual"), ("audio", "visual", "flow")])
def test_output_shapes(fusion, cls, head, modalities):
    model = build(fusion, head, modalities)
    assert isinstance(model, cls) and model.modalities == list(modalities)
    assert set(model.encoders) == set(modalities) and list(model.head.modalities) == list(modalities)
    out = model(batch(modalities))
    assert out.logits.shape == (4, K) and torch.isfinite(out.logits).all()
    assert {m: f.shape for m, f in out.features.items()} == {m: (4, 32) for m in modalities}
    assert {m: s.shape for m, s in out.scores.items()} == {m: (4, K) for m in modalities}
    # the head sees exactly encode()'s features
    torch.testing.assert_close(model.head(model.encode(batch(modalities)))[0], out.logits)


def test_mmtm_gates_are_in_0_2_per_sample_and_channel():
    model = build("mmtm", modalities=("audio", "visual", "flow"))
    assert list(model.mmtm) == ["layer2", "layer3", "layer4"]
    seen = {}
    for name, unit in model.mmtm.items():
        unit.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out[1]))
    model(batch(("audio", "visual", "flow")))
    for s, name in enumerate(model.mmtm, start=2):
        for m, g in seen[name].items():
            assert g.shape == (4, 4 * 2 ** (s - 1)), (name, m)
            assert ((g > 0) & (g < 2)).all() and g.std() > 0
            assert 0.75 < g.mean() < 1.25  # 2 * sigmoid(~0) at init: close to the identity


@pytest.mark.parametrize("fusion", ["mmtm", "mmt"])
def test_intermediate_fusion_couples_streams_late_fusion_does_not(fusion):
    x = batch()
    x2 = {**x, "audio": x["audio"] + 1.0}
    for f, coupled in [(fusion, True), ("late", False)]:
        model = build(f).eval()
        with torch.no_grad():
            a, b = model.encode(x), model.encode(x2)
        assert not torch.allclose(a["audio"], b["audio"])
        assert (not torch.equal(a["visual"], b["visual"])) == coupled, f
        if coupled:
            assert (a["visual"] - b["visual"]).abs().max() > 1e-4


def test_without_exchange_intermediate_models_reduce_to_late_fusion():
    late = build("late").eval()
    mmtm = MMTMModel(dict(late.encoders), late.head, stages=()).eval()
    x = batch()
    with torch.no_grad():
        for m, f in late.encode(x).items():
            torch.testing.assert_close(mmtm.encode(x)[m], f)
    no_cross = {m: {**MMT_KW, "cross_depth": 0} for m in x}
    mmt = build_model(ModelSpec(num_classes=K, encoder="transformer", width=4, fusion="mmt",
                                encoder_kwargs=no_cross)).eval()
    x2 = {**x, "audio": x["audio"] + 1.0}
    with torch.no_grad():
        torch.testing.assert_close(mmt.encode(x)["visual"], mmt.encode(x2)["visual"])


def test_mmtm_squeeze_averages_each_sample_over_time_and_space():
    unit = MMTM({"audio": 3, "visual": 5})
    B, T = 2, 4
    a = torch.randn(B, 3, 2, 2)
    v = torch.randn(B, T, 5, 3, 3)
    # different frames with the same per-sample mean over (time, space) must give the same gates
    r = torch.randn(B, T, 5, 3, 3)
    v2 = r - r.mean((1, 3, 4), keepdim=True) + v.mean((1, 3, 4), keepdim=True)
    out, g = unit({"audio": a, "visual": v.flatten(0, 1)}, B)
    out2, g2 = unit({"audio": a, "visual": v2.flatten(0, 1)}, B)
    assert not torch.allclose(v, v2)
    for m in g:
        torch.testing.assert_close(g[m], g2[m])
    # one gate per (sample, channel), applied to every frame and position
    torch.testing.assert_close(out["visual"].view(B, T, 5, 3, 3), v * g["visual"][:, None, :, None, None])
    torch.testing.assert_close(out["audio"], a * g["audio"][:, :, None, None])


def test_mmtm_identical_frames_equal_a_single_frame():
    """A clip of T identical frames = that frame alone (T = 1): the squeeze averages, not sums, over time."""
    model = build("mmtm").eval()
    x = batch()
    frame = x["visual"][:, :1]
    with torch.no_grad():
        one = model({**x, "visual": frame})
        many = model({**x, "visual": frame.expand(-1, 5, -1, -1, -1).contiguous()})
        bare = model({**x, "visual": frame[:, 0]})
    for m in x:
        torch.testing.assert_close(many.features[m], one.features[m])
        torch.testing.assert_close(bare.features[m], one.features[m])
    torch.testing.assert_close(many.logits, one.logits)


@pytest.mark.parametrize("fusion", ["mmtm", "mmt"])
@pytest.mark.parametrize("head", ["concat", "crmt"])
def test_every_parameter_gets_a_gradient_from_ce(fusion, head):
    model = build(fusion, head).train()
    out = model(batch())
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, f"{name}: zero gradient"


def trainer(fusion: str) -> Trainer:
    ekw = {m: {k: v for k, v in MMT_KW.items() if k != "cross_depth"} for m in ("audio", "visual")} \
        if fusion == "mmt" else {}
    model = {"width": 4, "encoder": ENCODER[fusion], "encoder_kwargs": ekw, "fusion": fusion}
    train = {"method": "crmt_jt", "epochs": 1, "batch_size": 8, "lr": 1e-2, "model": model}
    tr = Trainer(parse_params({"train": train, "crmt": {"step2_epochs": 1, "tau_batches": 1}}),
                 data=tiny_data())
    return tr


@pytest.mark.parametrize("fusion", ["mmtm", "mmt"])
def test_crmt_jt_trains_intermediate_models_and_head_stays_orthonormal(fusion):
    tr = trainer(fusion)
    assert isinstance(tr.model, MMTMModel if fusion == "mmtm" else MMTModel)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    m1 = tr.run_epoch(0)  # step 1: CE + margin
    assert math.isfinite(m1["train_loss"])
    assert not torch.equal(before["head.bias"], tr.model.state_dict()["head.bias"])
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    m2 = tr.run_epoch(1)  # step 2: tau through the coupled model, then only a_m moves
    assert m2["phase"] == "step2.0" and math.isfinite(m2["train_loss"])
    assert all(torch.isfinite(t).all() for t in tr.ctx.state["tau"].values())
    changed = {k for k, v in tr.model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == {"head.a.audio", "head.a.visual"}, changed
    for m in tr.model.modalities:
        w = tr.model.head.uni_weight(m)
        torch.testing.assert_close(w @ w.T, torch.eye(K), atol=1e-5, rtol=0)
