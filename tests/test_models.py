"""Encoders, fusion heads and the registry (small CPU shapes)."""
import copy
import pickle

import pytest
import torch

from mmrobust.models import (ENCODERS, HEADS, ConcatHead, CRMTHead, ModelSpec, Output, ResNet,
                             build_model, load_imagenet_state_dict, register_encoder)
from mmrobust.models.encoders import resnet18
from mmrobust.models.fusion import orthonormal_rows

torch.manual_seed(0)


def small_encoder(name, channels, width=4):
    kw = {"patch": 8, "img_size": 32, "depth": 1} if name == "transformer" else {}
    return ENCODERS[name](in_channels=channels, width=width, **kw)


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "transformer"])
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_encoder_shapes(name, channels):
    enc = small_encoder(name, channels)
    assert enc.out_dim == 8 * 4
    assert enc(torch.randn(2, channels, 32, 32)).shape == (2, 32)
    assert enc(torch.randn(2, 3, channels, 32, 32)).shape == (2, 32)
    # Non-square input (an audio spectrogram) also works, transformer included (resized positions, padding).
    assert enc(torch.randn(2, channels, 24, 40)).shape == (2, 32)


def test_every_registered_encoder_is_covered():
    assert {"resnet18", "resnet34", "transformer"} <= set(ENCODERS)
    assert {"concat", "crmt"} <= set(HEADS)


@pytest.mark.parametrize("name", ["resnet18", "transformer"])
def test_time_pooling_is_mean_of_frame_features(name):
    enc = small_encoder(name, 3).eval()  # eval: BatchNorm statistics do not couple frames
    x = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        pooled = enc(x)
        per_frame = torch.stack([enc(x[:, t]) for t in range(3)], 1).mean(1)
        assert not torch.allclose(enc(x[:, 0]), enc(x[:, 1]), atol=1e-4)  # frames really differ
    torch.testing.assert_close(pooled, per_frame, atol=1e-5, rtol=1e-5)


def test_transformer_cls_pool():
    enc = ENCODERS["transformer"](in_channels=1, width=4, patch=8, img_size=32, depth=1, pool="cls")
    assert enc(torch.randn(2, 1, 32, 32)).shape == (2, 32)


def test_crmt_head_stays_orthonormal_after_sgd():
    head = CRMTHead({"audio": 12, "visual": 20}, num_classes=5)
    before = {m: head.uni_weight(m).detach().clone() for m in head.modalities}
    opt = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
    for _ in range(5):
        feats = {"audio": torch.randn(8, 12), "visual": torch.randn(8, 20)}
        logits, scores = head(feats)
        loss = (logits * torch.randn_like(logits)).sum() + sum((s ** 2).sum() for s in scores.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for m in head.modalities:
        w = head.uni_weight(m)
        assert w.shape == (5, head.dims[m])
        assert (w - before[m]).abs().max() > 1e-2  # the optimiser really moved W~
        torch.testing.assert_close(w @ w.T, torch.eye(5), atol=1e-5, rtol=0)


def test_orthonormal_rows_is_gram_schmidt():
    v = torch.randn(4, 9, dtype=torch.float64)
    w = orthonormal_rows(v)
    torch.testing.assert_close(w @ w.T, torch.eye(4, dtype=torch.float64))
    # Gram-Schmidt (the smooth, sign-unambiguous choice): row k of W~ lies in span(v_0..v_k) with a positive
    # component along v_k, i.e. v W~^T is lower triangular with a positive diagonal; row 0 is v_0 / |v_0|.
    g = v @ w.T
    torch.testing.assert_close(g.triu(1), torch.zeros(4, 4, dtype=torch.float64))
    assert (torch.diagonal(g) > 0).all()
    torch.testing.assert_close(w[0], v[0] / v[0].norm())
    torch.testing.assert_close(orthonormal_rows(w), w)  # an orthonormal matrix is a fixed point


def test_reference_compat_head_has_unit_rows_but_is_not_orthogonal():
    head = CRMTHead({"audio": 12, "visual": 20}, num_classes=5, reference_compat=True)
    for m in head.modalities:
        w = head.uni_weight(m).detach()
        torch.testing.assert_close(w.norm(dim=1), torch.ones(5))
        off_diag = (w @ w.T - torch.eye(5)).abs().max()
        assert off_diag > 1e-2


def test_crmt_head_rejects_narrow_features():
    with pytest.raises(ValueError, match="d >= K"):
        CRMTHead({"audio": 4, "visual": 16}, num_classes=5)


def test_crmt_head_matches_formula_by_hand():
    K, dims = 3, {"audio": 4, "visual": 5}
    head = CRMTHead(dims, K)
    with torch.no_grad():
        head.a["audio"].copy_(torch.tensor([0.5, -1.0, 2.0]))
        head.a["visual"].copy_(torch.tensor([1.5, 0.25, -0.5]))
        head.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    feats = {m: torch.randn(2, d) for m, d in dims.items()}
    logits, scores = head(feats)
    W = {m: head.uni_weight(m).detach() for m in dims}
    for i in range(2):
        for k in range(K):
            z = {m: sum(W[m][k, c] * feats[m][i, c] for c in range(dims[m])) for m in dims}
            h = head.a["audio"][k] * z["audio"] + head.a["visual"][k] * z["visual"] + head.bias[k]
            for m in dims:
                assert abs(scores[m][i, k].item() - z[m].item()) < 1e-5
            assert abs(logits[i, k].item() - h.item()) < 1e-5


@pytest.mark.parametrize("head_cls", [ConcatHead, CRMTHead])
def test_heads_are_uniform(head_cls):
    dims = {"visual": 8, "flow": 6, "diff": 7}
    head = head_cls(dims, 4)
    feats = {m: torch.randn(3, d) for m, d in dims.items()}
    logits, scores = head(feats)
    fused = sum(feats[m] @ head.fused_weight(m).T for m in dims) + head.bias
    torch.testing.assert_close(logits, fused)
    for m in dims:
        torch.testing.assert_close(scores[m], feats[m] @ head.uni_weight(m).T)
    if head_cls is ConcatHead:  # JT: the fused logit is the sum of the uni-modal slices plus the bias
        torch.testing.assert_close(logits, sum(scores.values()) + head.bias)


def test_late_fusion_model_output_and_encode():
    model = build_model({"num_classes": 3, "modalities": ["audio", "visual"], "width": 4, "head": "concat"})
    inputs = {"audio": torch.randn(2, 1, 32, 40), "visual": torch.randn(2, 3, 3, 32, 32)}
    out = model(inputs)
    assert isinstance(out, Output)
    logits, features, scores = out  # a NamedTuple unpacks
    assert logits.shape == (2, 3)
    assert {m: f.shape for m, f in features.items()} == {"audio": (2, 32), "visual": (2, 32)}
    assert {m: s.shape for m, s in scores.items()} == {"audio": (2, 3), "visual": (2, 3)}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(inputs)["visual"], model(inputs).features["visual"])
    with pytest.raises(KeyError, match="visual"):
        model({"audio": inputs["audio"]})


def test_build_model_infers_channels_and_per_modality_encoders():
    spec = ModelSpec(num_classes=4, modalities=["visual", "flow", "diff"], width=4,
                     encoder={"visual": "resnet18", "flow": "resnet34", "diff": "transformer"},
                     encoder_kwargs={"diff": {"patch": 8, "img_size": 32, "depth": 1}})
    model = build_model(spec)
    assert isinstance(model.head, CRMTHead) and model.modalities == ["visual", "flow", "diff"]
    assert model.encoders["visual"].conv1.in_channels == 3
    assert model.encoders["flow"].conv1.in_channels == 2 and len(model.encoders["flow"].layer3) == 6
    assert model.encoders["diff"].embed.in_channels == 3
    out = model({"visual": torch.randn(2, 3, 3, 32, 32), "flow": torch.randn(2, 3, 2, 32, 32),
                 "diff": torch.randn(2, 3, 3, 32, 32)})
    assert out.logits.shape == (2, 4) and list(out.scores) == ["visual", "flow", "diff"]
    assert build_model({"num_classes": 2, "modalities": ["audio", "visual"], "width": 4}).encoders["audio"] \
        .conv1.in_channels == 1


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown key"):
        build_model({"num_classes": 3, "widht": 4})
    with pytest.raises(KeyError, match="unknown encoder"):
        build_model({"num_classes": 3, "encoder": "vgg"})
    with pytest.raises(KeyError, match="unknown head"):
        build_model({"num_classes": 3, "head": "gated", "width": 4})
    with pytest.raises(ValueError, match="input channels"):
        build_model({"num_classes": 3, "modalities": ["audio", "depth"], "width": 4})


def test_register_encoder_decorator():
    @register_encoder("tiny_test_mlp")
    def tiny(in_channels, width):
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(8 * width))
        net.out_dim = 8 * width
        return net

    try:
        model = build_model({"num_classes": 3, "encoder": "tiny_test_mlp", "width": 1, "head": "concat"})
        out = model({"audio": torch.randn(2, 1, 4, 4), "visual": torch.randn(2, 3, 4, 4)})
        assert out.logits.shape == (2, 3)
        with pytest.raises(KeyError, match="already registered"):
            register_encoder("tiny_test_mlp")(tiny)
    finally:
        del ENCODERS["tiny_test_mlp"]


def test_crmt_model_state_dict_roundtrip_and_deepcopy():
    spec = {"num_classes": 3, "width": 4}
    model, other = build_model(spec), build_model(spec)
    other.load_state_dict(model.state_dict())
    inputs = {"audio": torch.randn(2, 1, 32, 32), "visual": torch.randn(2, 3, 32, 32)}
    model.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(inputs).logits, model(inputs).logits)
        torch.testing.assert_close(copy.deepcopy(model)(inputs).logits, model(inputs).logits)
        torch.testing.assert_close(pickle.loads(pickle.dumps(model))(inputs).logits, model(inputs).logits)


def test_load_imagenet_state_dict(tmp_path):
    full = resnet18(in_channels=3, width=64)
    with torch.no_grad():
        for p in full.parameters():
            p.normal_()
    sd = dict(full.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512), torch.randn(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(sd, path)

    mono = load_imagenet_state_dict(resnet18(in_channels=1, width=64), path)
    torch.testing.assert_close(mono.conv1.weight, sd["conv1.weight"].mean(1, keepdim=True))
    torch.testing.assert_close(mono.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"])
    torch.testing.assert_close(mono.layer3[0].downsample[0].weight, sd["layer3.0.downsample.0.weight"])

    flow = load_imagenet_state_dict(resnet18(in_channels=2, width=64), path)
    mean = sd["conv1.weight"].mean(1)
    torch.testing.assert_close(flow.conv1.weight[:, 0], mean)
    torch.testing.assert_close(flow.conv1.weight[:, 1], mean)

    rgb = load_imagenet_state_dict(resnet18(in_channels=3, width=64), path)
    torch.testing.assert_close(rgb.conv1.weight, sd["conv1.weight"])

    # Old checkpoints without num_batches_tracked load; anything else missing or mis-shaped is an error.
    torch.save({k: v for k, v in sd.items() if "num_batches_tracked" not in k}, path)
    load_imagenet_state_dict(resnet18(in_channels=3, width=64), path)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_imagenet_state_dict(resnet18(in_channels=3, width=16), path)
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4")}, path)
    with pytest.raises(ValueError, match="layer4"):
        load_imagenet_state_dict(ResNet([2, 2, 2, 2], 3, 64), path)


def test_full_preset_configures_every_table(tmp_path):
    """configs/full.yaml over params.yaml: T3, T4, T5, T6 and T8 each get a JT-style and a CRMT model, T1 keeps
    the default's models, and every model builds and predicts on inputs of its modalities."""
    from pathlib import Path

    from mmrobust import checkpoint
    from mmrobust.config import load_params
    from mmrobust.models import IN_CHANNELS
    from mmrobust.tables import arch_of, architecture_groups, base_arch
    from stages.preset import main as preset_main

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "params.yaml"
    assert preset_main([str(root / "configs/full.yaml"), "--base", str(root / "params.yaml"), "--out", str(out)]) == 0
    params = load_params(out).for_dataset("synthetic")
    default = load_params(root / "params.yaml")
    assert set(default.models) < set(params.models) and params.pretrain_modalities() == ["visual", "audio"]
    methods, archs = {}, {}
    for mid in [*params.models, *params.pretrained_models]:
        p = params.for_model(mid)
        methods[mid], archs[mid] = p.train.method, arch_of(p)
        model, _ = checkpoint.build(p, p.train.method, 3, p.modalities)
        x = {m: torch.randn(2, 1, 32, 40) if m == "audio" else torch.rand(2, 2, IN_CHANNELS[m], 32, 32)
             for m in p.modalities}
        with torch.no_grad():
            assert model.eval()(x).logits.shape == (2, 3), mid
    groups = architecture_groups(methods, archs)
    for tid in ("T3", "T4", "T5", "T6", "T8"):
        kinds = {methods[m].startswith("crmt") for m in groups[tid]}
        assert kinds == {False, True}, (tid, groups[tid])
    base = base_arch(archs)
    assert all(archs[m] == base for m in default.models)  # the default's models stay T1's
