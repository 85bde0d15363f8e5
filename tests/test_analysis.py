"""Robustness analysis (SPEC section 5): vulnerability indicator, sound certified radius, t-SNE."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import TinyAV
from mmrobust.analysis import (certified_accuracy, certified_radius, circulant_embedding_bound, conv_norm_bound,
                               eta_ratio, fantastic_four_bound, fold_conv_bn, jacobian_spectral_norm,
                               lipschitz_upper_bound, model_lipschitz_bounds, module_lipschitz, plot_eta_ratio,
                               plot_tsne, register_lipschitz, tsne_embeddings, vulnerability_indicators)
from mmrobust.attacks import run_attack
from mmrobust.models import ConcatHead, CRMTHead, LateFusionModel
from mmrobust.models.encoders import BasicBlock, FrameEncoder, PatchTransformer, resnet18

SHAPES = {"audio": (1, 16, 20), "visual": (3, 3, 16, 16)}  # TinyAV's per-sample shapes


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: intra-op threads only add OpenMP spin-waiting, which on a busy machine made the
    module 50x slower. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- fixtures

class FlatLinear(nn.Module):
    """phi(x) = U vec(x): a linear encoder, so eta and the Lipschitz constant are known in closed form."""

    def __init__(self, shape, d, orthonormal=False, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(d, math.prod(shape), generator=g)
        self.U = nn.Parameter(torch.linalg.qr(u.T)[0].T.contiguous() if orthonormal else u)
        self.out_dim = d

    def forward(self, x):
        return x.flatten(1) @ self.U.T


class LinearFrames(FrameEncoder):
    """Per-frame linear map with orthonormal rows, averaged over T frames: Lip = 1 / sqrt(T) exactly."""

    def __init__(self, frame_shape, d, seed=0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(frame_shape), d, bias=True))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.net[1].weight.copy_(torch.linalg.qr(torch.randn(math.prod(frame_shape), d, generator=g))[0].T)
        self.out_dim = d

    def frame_features(self, x):
        return self.net(x)


class SmallConv(FrameEncoder):
    def __init__(self, cin, width=4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(cin, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
            nn.Conv2d(width, 2 * width, 3, 2, 1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 2 * width

    def frame_features(self, x):
        return self.net(x)


@register_lipschitz(FlatLinear)
def _flat_linear_rule(enc, shape):
    return float(torch.linalg.matrix_norm(enc.U.detach().double(), ord=2)), (enc.out_dim,)


@register_lipschitz(LinearFrames, SmallConv)
def _frames_rule(enc, shape):
    return module_lipschitz(enc.net, shape)


def randomize_bn(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            c = bn.num_features
            bn.running_mean.copy_(torch.randn(c, generator=g))
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            with torch.no_grad():
                bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(c, generator=g) * 0.1)
    return module.eval()


def batch_of(ds, idx):
    items = [ds[i] for i in idx]
    return {m: torch.stack([it[m] for it in items]) for m in ds.modalities}, torch.tensor([it["label"] for it in items])


def linear_model(head="concat", K=4, orthonormal=False):
    encs = {"audio": FlatLinear(SHAPES["audio"], 6, orthonormal, 1),
            "visual": FlatLinear(SHAPES["visual"], 7, orthonormal, 2)}
    dims = {m: e.out_dim for m, e in encs.items()}
    h = ConcatHead(dims, K) if head == "concat" else CRMTHead(dims, K)
    if head == "crmt":
        with torch.no_grad():
            for m in h.modalities:
                h.a[m].uniform_(0.2, 1.5)
    return LateFusionModel(encs, h).eval()


def dense_conv_norm(w, hw, stride, padding):
    n = w.shape[1] * hw[0] * hw[1]
    basis = torch.eye(n, dtype=torch.float64).view(n, w.shape[1], *hw)
    cols = F.conv2d(basis, w.double(), stride=stride, padding=padding).flatten(1)  # row i = A e_i
    return float(torch.linalg.matrix_norm(cols, ord=2))


def empirical_lipschitz(fn, shape, n_points=3, n_pairs=64, seed=0):
    """max of Jacobian spectral norms at random points and of difference quotients over random pairs."""
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for i in range(n_points):
        x = torch.randn(1, *shape, generator=g)
        best = max(best, jacobian_spectral_norm(fn, x, iters=25, seed=i))
    with torch.no_grad():
        x = torch.randn(n_pairs, *shape, generator=g)
        for scale in (1.0, 1e-2):
            x2 = x + scale * torch.randn(x.shape, generator=g)
            q = (fn(x) - fn(x2)).flatten(1).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)
            best = max(best, float(q.max()))
    return best


# ---------------------------------------------------------------- vulnerability indicator

@pytest.mark.parametrize("head", ["concat", "crmt"])
def test_eta_is_exact_on_a_linear_model(head):
    model, K = linear_model(head), 4
    ds = TinyAV(16, K, seed=0)
    batches = [batch_of(ds, range(0, 9)), batch_of(ds, range(9, 16))]
    etas = vulnerability_indicators(model, batches, num_classes=K)
    for m in model.modalities:
        w, u = model.head.fused_weight(m).detach().double(), model.encoders[m].U.detach().double()
        expected = ((w[:, None] - w[None]) @ u).norm(dim=-1)  # ||(W_y - W_j) U||_2, (K, K)
        eta = etas[m].double()
        assert eta.shape == (K, K) and torch.isnan(eta.diagonal()).all()
        off = ~torch.eye(K, dtype=torch.bool)
        torch.testing.assert_close(eta[off], expected[off], rtol=1e-5, atol=1e-6)
    ratio = eta_ratio(etas, "visual", "audio")
    torch.testing.assert_close(ratio, etas["visual"] / etas["audio"], equal_nan=True)


def test_eta_matches_per_sample_jacobians_on_a_resnet():
    torch.manual_seed(0)
    encs = {"audio": randomize_bn(resnet18(1, 4), 1), "visual": randomize_bn(resnet18(3, 4), 2)}
    K = 4
    model = LateFusionModel(encs, CRMTHead({m: 32 for m in encs}, K))
    model.train()  # the function must switch to eval itself, and restore the mode
    ds = TinyAV(6, 3, seed=0)  # class 3 has no sample: its row is NaN
    inputs, y = batch_of(ds, range(6))
    etas = vulnerability_indicators(model, [(inputs, y)])
    assert model.training
    model.eval()
    for m in model.modalities:
        w = model.head.fused_weight(m).detach()
        ref = torch.full((K, K), float("-inf"))
        for i in range(len(y)):
            jac = torch.autograd.functional.jacobian(lambda x: model.encoders[m](x) @ w.T, inputs[m][i:i + 1],
                                                     vectorize=True)
            jac = jac.reshape(K, -1)
            for j in range(K):
                ref[y[i], j] = max(ref[y[i], j], (jac[y[i]] - jac[j]).norm())
        off = ~torch.eye(K, dtype=torch.bool)
        off[3] = False
        torch.testing.assert_close(etas[m][off], ref[off], rtol=1e-4, atol=1e-6)
        assert torch.isnan(etas[m][3]).all() and torch.isnan(etas[m].diagonal()).all()


def test_plot_eta_ratio_writes_png(tmp_path):
    ratio = torch.rand(5, 5) + 0.5
    ratio.fill_diagonal_(float("nan"))
    path = plot_eta_ratio(ratio, tmp_path / "sub" / "eta.png", "JT", class_names=list("abcde"))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- layer bounds

CONVS = [  # (c_in, c_out, kernel, stride, padding, H, W)
    (2, 3, 3, 1, 1, 6, 5), (3, 4, 3, 2, 1, 7, 7), (2, 3, 1, 2, 0, 6, 6), (1, 2, 7, 2, 3, 9, 8),
    (3, 2, 3, 1, 0, 5, 5), (2, 2, 2, 2, 0, 6, 6), (4, 4, 3, 1, 1, 10, 10), (2, 3, 3, 1, "same", 5, 6),
]


@pytest.mark.parametrize("cfg", CONVS)
def test_conv_bounds_dominate_the_dense_operator_norm(cfg):
    ci, co, k, s, p, H, W = cfg
    conv = nn.Conv2d(ci, co, k, s, p, bias=True)
    exact = dense_conv_norm(conv.weight.detach(), (H, W), s, p)
    ff = fantastic_four_bound(conv.weight)
    circ = circulant_embedding_bound(conv.weight, (H, W), p)
    assert ff >= exact * (1 - 1e-9) and circ >= exact * (1 - 1e-9)
    bound, out_shape = module_lipschitz(conv, (ci, H, W))
    assert bound == pytest.approx(min(ff, circ), rel=1e-12)
    assert out_shape == tuple(conv(torch.zeros(1, ci, H, W)).shape[1:])
    assert bound <= 3 * exact  # not vacuous on these small layers


def test_conv_bound_is_exact_for_1x1_kernels():
    w = torch.randn(5, 3, 1, 1)
    exact = float(torch.linalg.matrix_norm(w[:, :, 0, 0].double(), ord=2))
    assert conv_norm_bound(w, (4, 4), 0) == pytest.approx(exact, rel=1e-8)
    assert dense_conv_norm(w, (4, 4), 2, 0) == pytest.approx(exact, rel=1e-8)


@pytest.mark.parametrize("bias", [False, True])
def test_bn_folding_equals_the_eval_module(bias):
    conv = nn.Conv2d(3, 4, 3, 2, 1, bias=bias)
    bn = randomize_bn(nn.Sequential(nn.BatchNorm2d(4)), 3)[0]
    folded = fold_conv_bn(conv, bn)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)
    bound, _ = module_lipschitz(nn.Sequential(conv, bn), (3, 9, 9))
    assert bound >= dense_conv_norm(folded.weight.detach(), (9, 9), 2, 1) * (1 - 1e-9)


def test_maxpool_bound_is_sound_and_tight():
    pool = nn.MaxPool2d(3, 2, 1)
    bound, shape = module_lipschitz(pool, (1, 8, 8))
    assert bound == 2.0 and shape == (1, 4, 4)  # an index lies in 2 windows per axis
    spike = torch.zeros(1, 1, 8, 8)
    spike[0, 0, 3, 3] = 1.0  # odd index: inside 2 x 2 windows, the max of all four
    assert float(pool(spike).norm()) == pytest.approx(2.0)  # so "1-Lipschitz" would be unsound
    assert empirical_lipschitz(pool, (2, 8, 8)) <= bound + 1e-6
    assert module_lipschitz(nn.MaxPool2d(2, 2), (1, 8, 8))[0] == 1.0


def test_global_average_pool_and_linear_bounds_are_exact():
    seq = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))
    bound, shape = module_lipschitz(seq, (3, 4, 6))
    assert shape == (5,)
    assert bound == pytest.approx(jacobian_spectral_norm(seq, torch.randn(1, 3, 4, 6), iters=100), rel=1e-4)


def test_basic_block_bound_dominates_its_jacobian():
    for block, shape in [(BasicBlock(3, 3, 1), (3, 8, 8)), (BasicBlock(3, 5, 2), (3, 9, 8))]:
        randomize_bn(block, 4)
        bound, out = module_lipschitz(block, shape)
        assert out == tuple(block(torch.zeros(1, *shape)).shape[1:])
        assert bound >= empirical_lipschitz(block, shape)


@pytest.mark.parametrize("name", ["resnet18", "smallconv"])
def test_encoder_bound_dominates_empirical_lipschitz(name):
    torch.manual_seed(0)
    enc = randomize_bn(resnet18(3, 4) if name == "resnet18" else SmallConv(3), 5)
    frame = lipschitz_upper_bound(enc, (3, 16, 16))
    clip = lipschitz_upper_bound(enc, (3, 3, 16, 16))
    assert clip == pytest.approx(frame / math.sqrt(3))
    assert clip >= empirical_lipschitz(enc, (3, 3, 16, 16), n_points=2, n_pairs=16)
    assert frame >= empirical_lipschitz(enc, (3, 16, 16), n_points=2, n_pairs=16)


def test_frame_averaging_divides_by_sqrt_t_exactly():
    enc = LinearFrames((2, 4, 4), 6)
    bound = lipschitz_upper_bound(enc, (4, 2, 4, 4))
    assert bound == pytest.approx(0.5, rel=1e-6)  # ||U|| = 1, T = 4
    assert jacobian_spectral_norm(enc, torch.randn(1, 4, 2, 4, 4), iters=50) == pytest.approx(0.5, rel=1e-4)


def test_transformer_has_no_sound_bound():
    enc = PatchTransformer(3, width=4, patch=8, img_size=16, depth=1)
    with pytest.raises(NotImplementedError, match="attention"):
        lipschitz_upper_bound(enc, (3, 3, 16, 16))


def test_unknown_module_is_refused():
    with pytest.raises(NotImplementedError, match="register_lipschitz"):
        lipschitz_upper_bound(nn.Sequential(nn.Tanh()), (3,))


# ---------------------------------------------------------------- certified radius

def margin_pgd_flips(model, inputs, y, eps, steps=40, restarts=3, seed=0):
    """Joint l2 PGD with a per-sample radius eps (B,) on the margin max_{k != y} h_k - h_y, from the clean point
    and from random points; True where any iterate of any restart changes the prediction."""
    g = torch.Generator().manual_seed(seed)
    per_sample = lambda v, like: v.view(-1, *[1] * (like.dim() - 1))  # noqa: E731
    joint_norm = lambda d: torch.stack([v.flatten(1).norm(dim=1) for v in d]).norm(dim=0)  # noqa: E731
    flipped = torch.zeros(len(y), dtype=torch.bool)
    for r in range(restarts):
        delta = {m: torch.zeros_like(x) if r == 0 else torch.randn(x.shape, generator=g) for m, x in inputs.items()}
        for _ in range(steps + 1):
            n = joint_norm(delta.values())
            scale = torch.where(n > eps, eps / n.clamp(min=1e-30), torch.ones_like(n))  # project onto the ball
            delta = {m: (d * per_sample(scale, d)).requires_grad_(True) for m, d in delta.items()}
            logits = model({m: inputs[m] + delta[m] for m in inputs}).logits
            flipped |= logits.argmax(1) != y
            other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).max(1).values
            grads = torch.autograd.grad((other - logits.gather(1, y[:, None])[:, 0]).sum(), list(delta.values()))
            step = 2.5 / steps * eps / joint_norm(grads).clamp(min=1e-30)
            delta = {m: (d + per_sample(step, d) * gr).detach() for (m, d), gr in zip(delta.items(), grads)}
    return flipped


@pytest.mark.parametrize("head", ["concat", "crmt"])
def test_radius_is_exact_for_an_isometric_linear_model(head):
    """phi_m with orthonormal rows: Lip(phi_m) = 1 and ||(W_y - W_k) U|| = ||W_y - W_k||, so R(x) is the true
    distance to the decision boundary: 0.99 R cannot flip a prediction, the closest boundary point does."""
    model = linear_model(head, K=4, orthonormal=True)
    for p in model.parameters():
        p.requires_grad_(False)
    inputs, y = batch_of(TinyAV(12, 4, seed=3), range(12))
    with torch.no_grad():
        pred = model(inputs).logits.argmax(1)
    y = torch.where(torch.arange(12) < 9, pred, (pred + 1) % 4)  # 9 correct, 3 misclassified
    lips = model_lipschitz_bounds(model, SHAPES)
    assert lips == pytest.approx({"audio": 1.0, "visual": 1.0}, rel=1e-6)
    R = certified_radius(model, inputs, y, lips)
    assert (R[9:] == 0).all() and (R[:9] > 0).all()
    # analytic distance: min_k margin_k / ||joint gradient of h_y - h_k||
    grads = {m: model.head.fused_weight(m).double() @ model.encoders[m].U.double() for m in model.modalities}
    with torch.no_grad():
        h = model(inputs).logits.double()
    for i in range(9):
        dist = [(h[i, y[i]] - h[i, k]) / math.sqrt(sum(float((g[y[i]] - g[k]).norm()) ** 2 for g in grads.values()))
                for k in range(4) if k != y[i]]
        assert float(R[i]) == pytest.approx(float(min(dist)), rel=1e-4)
    inside = margin_pgd_flips(model, {m: v[:9] for m, v in inputs.items()}, y[:9], 0.99 * R[:9])
    assert not inside.any()
    outside = margin_pgd_flips(model, {m: v[:9] for m, v in inputs.items()}, y[:9], 1.02 * R[:9], steps=60,
                               restarts=1)
    assert outside.all()


def train_few_steps(model, ds, steps=30, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    inputs, y = batch_of(ds, range(len(ds)))
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(inputs).logits, y).backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kind", ["resnet18", "smallconv"])
def test_no_attack_succeeds_inside_the_certified_radius(kind):
    torch.manual_seed(0)
    make = (lambda c: resnet18(c, 4)) if kind == "resnet18" else (lambda c: SmallConv(c, 4))
    encs = {"audio": make(1), "visual": make(3)}
    dims = {m: e.out_dim for m, e in encs.items()}
    head = CRMTHead(dims, 3) if kind == "resnet18" else ConcatHead(dims, 3)
    # The ResNet bound is loose (R ~ 1e-11), so its attacks are kept short; the shallow net gets the full budget.
    steps, restarts = (10, 2) if kind == "resnet18" else (40, 3)
    model = train_few_steps(LateFusionModel(encs, head), TinyAV(24, 3, seed=0, noise=0.5), steps=20)
    for p in model.parameters():
        p.requires_grad_(False)
    inputs, y = batch_of(TinyAV(24, 3, seed=1, noise=0.5), range(24))
    lips = model_lipschitz_bounds(model, SHAPES)
    R = certified_radius(model, inputs, y, lips)
    with torch.no_grad():
        correct = model(inputs).logits.argmax(1) == y
    assert correct.sum() >= 12 and (R[~correct] == 0).all() and (R[correct] > 0).all()
    flips = margin_pgd_flips(model, inputs, y, 0.99 * R, steps=steps, restarts=restarts)
    assert not flips[correct].any()
    # certified accuracy never exceeds PGD robust accuracy at the same radius
    grid = [0.0] + torch.quantile(R[correct], torch.tensor([0.1, 0.5, 0.9, 1.0])).tolist() + [2 * float(R.max())]
    ca = certified_accuracy(R, grid)
    assert ca[0] == pytest.approx(float(correct.double().mean()))
    for r, c in zip(grid, ca):
        adv = inputs if r == 0 else run_attack("pgd", model, inputs, y, eps=r, steps=steps, step_size=r / 4,
                                               restarts=2, random_start=True, clamp=False, seed=0)
        with torch.no_grad():
            robust = float((model(adv).logits.argmax(1) == y).double().mean())
        assert c <= robust + 1e-12, (r, c, robust)


def test_certified_accuracy_counts_radii_strictly_above_r():
    assert certified_accuracy(torch.tensor([0.0, 0.5, 1.0]), [0, 0.4, 0.5, 0.9, 1.0]) == \
        pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3, 0.0])


# ---------------------------------------------------------------- t-SNE

def test_tsne_embeddings_are_deterministic_and_plotted(tmp_path):
    model = linear_model("concat", K=3)
    ds = TinyAV(30, 3, seed=0)
    batches = [batch_of(ds, range(0, 16)), batch_of(ds, range(16, 30))]
    emb, labels = tsne_embeddings(model, batches, max_samples=25, seed=0, max_iter=250)
    assert set(emb) == {"audio", "visual"} and labels.shape == (25,)
    assert all(e.shape == (25, 2) and np.isfinite(e).all() for e in emb.values())
    again, labels2 = tsne_embeddings(model, batches, max_samples=25, seed=0, max_iter=250)
    np.testing.assert_array_equal(labels, labels2)
    for m in emb:
        np.testing.assert_allclose(emb[m], again[m])
    path = plot_tsne(emb, labels, tmp_path / "tsne.png", "JT")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
