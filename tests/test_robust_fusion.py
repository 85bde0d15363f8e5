"""MSEFM, UME-MMA, RMTL, Jacobian fusion and VARMAT: the maths against closed forms, training and prediction."""
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import tiny_data
from mmrobust.config import ConfigError, parse_params
from mmrobust.methods.robust_fusion import (fusion_matrices_from_gram, jacobian_fusion_matrices,
                                            jacobian_fusion_residual, jacobian_grams, softmax_jacobian, sparse_code,
                                            vulnerability, vulnerability_weights)
from mmrobust.models.fusion import ConcatHead, LateFusionModel
from mmrobust.train import Trainer

NEW = ["msefm", "ume_mma", "rmtl", "jacobian_fusion", "varmat"]


def make_trainer(method: str, epochs=2, max_batches=1, **hp) -> Trainer:
    train = {"method": method, "epochs": epochs, "batch_size": 8, "lr": 1e-2, "model": {"width": 4},
             "max_batches": max_batches}
    return Trainer(parse_params({"train": train, **({method: hp} if hp else {})}), data=tiny_data())


def first_batch(tr, split="train_eval"):
    return next(tr.batches(split))


def encoder_grad(model, m):
    return torch.cat([p.grad.flatten() for p in model.encoders[m].parameters() if p.grad is not None])


def soft(u, t):
    return torch.sign(u) * torch.clamp(u.abs() - t, min=0)


# ---------------------------------------------------------------------------------------------- sparse coding
def test_sparse_code_orthonormal_atoms_closed_form():
    g = torch.Generator().manual_seed(0)
    atoms = torch.linalg.qr(torch.randn(12, 5, generator=g, dtype=torch.float64))[0].T  # (5, 12) orthonormal rows
    x = torch.randn(4, 12, generator=g, dtype=torch.float64)
    c0 = sparse_code(x, atoms, 0.0, iters=50)
    torch.testing.assert_close(c0, x @ atoms.T)  # lam 0: the orthogonal projection's coordinates
    torch.testing.assert_close(c0 @ atoms, x @ atoms.T @ atoms)
    c = sparse_code(x, atoms, 0.3, iters=50)
    torch.testing.assert_close(c, soft(x @ atoms.T, 0.3))  # orthonormal: soft thresholding of the projection


def test_sparse_code_satisfies_lasso_kkt_and_matches_scipy():
    g = torch.Generator().manual_seed(1)
    atoms = torch.randn(15, 8, generator=g, dtype=torch.float64)  # overcomplete, correlated atoms
    x = torch.randn(3, 8, generator=g, dtype=torch.float64)
    lam = torch.tensor([[0.5], [1.0], [2.0]], dtype=torch.float64)
    c = sparse_code(x, atoms, lam, iters=5000)
    r = (x - c @ atoms) @ atoms.T  # KKT: r_j = lam sign(c_j) on the support, |r_j| <= lam off it
    on = c.abs() > 1e-8
    assert on.any() and (~on).any()
    lam_b = lam.expand_as(c)
    torch.testing.assert_close(r[on], lam_b[on] * torch.sign(c[on]), atol=1e-6, rtol=0)
    assert (r[~on].abs() <= lam_b[~on] + 1e-6).all()
    A, X = atoms.numpy(), x.numpy()
    for i in range(3):  # independent solver: c = u - v, u, v >= 0, smooth objective with bounds
        li = float(lam[i])

        def f(w):
            u, v = w[:15], w[15:]
            res = X[i] - (u - v) @ A
            grad_c = -res @ A.T
            return 0.5 * res @ res + li * w.sum(), np.concatenate([grad_c + li, -grad_c + li])

        sol = scipy.optimize.minimize(f, np.zeros(30), jac=True, method="L-BFGS-B", bounds=[(0, None)] * 30,
                                      options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000})
        ours = 0.5 * float(((x[i] - c[i] @ atoms) ** 2).sum()) + li * float(c[i].abs().sum())
        assert ours <= sol.fun + 1e-7


# ---------------------------------------------------------------------------------------------- Jacobian fusion
def _random_problem(K=4, dims=(10, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    J = [torch.randn(K, d, generator=g, dtype=torch.float64) for d in dims]
    S = softmax_jacobian(torch.randn(K, generator=g, dtype=torch.float64))
    return J, S


@pytest.mark.parametrize("prob", [False, True])
def test_jacobian_fusion_solves_its_stationarity_and_sylvester_equations(prob):
    J, S = _random_problem()
    S = S if prob else None
    gamma = 0.7
    W = jacobian_fusion_matrices(J, gamma, S)
    for res in jacobian_fusion_residual(W, J, gamma, S):
        assert float(res) < 1e-10
    ss = torch.eye(4, dtype=torch.float64) if S is None else S.T @ S
    for w, j in zip(W, J):  # J full row rank: γ SᵀS W + W B⁻¹ = B⁻¹ (scipy's Bartels-Stewart)
        binv = np.linalg.inv((j @ j.T).numpy())
        ref = scipy.linalg.solve_sylvester(gamma * ss.numpy(), binv, binv)
        np.testing.assert_allclose(w.numpy(), ref, atol=1e-8)
        if S is None:  # decoupled closed form
            torch.testing.assert_close(w, torch.linalg.inv(torch.eye(4, dtype=torch.float64) + gamma * j @ j.T))


def test_jacobian_fusion_identity_at_zero_gamma_and_shrinks_with_gamma():
    J, S = _random_problem(seed=3)
    for w in jacobian_fusion_matrices(J, 0.0, S):
        torch.testing.assert_close(w, torch.eye(4, dtype=torch.float64))
    for out_jac in (None, S):
        sj = torch.eye(4, dtype=torch.float64) if out_jac is None else out_jac
        norms = [[float(torch.linalg.matrix_norm(sj @ w @ j)) for w, j in
                  zip(jacobian_fusion_matrices(J, g, out_jac), J)] for g in (0.0, 0.1, 1.0, 10.0)]
        for m in range(2):
            seq = [n[m] for n in norms]
            assert all(a > b for a, b in zip(seq, seq[1:])), seq
    # singular Gram (D < K): still exact, no inversion
    j = torch.randn(4, 2, dtype=torch.float64)
    w = fusion_matrices_from_gram(j @ j.T, 2.0)
    assert float(jacobian_fusion_residual([w], [j], 2.0)[0]) < 1e-10


class LinearEncoder(nn.Module):
    def __init__(self, shape, out_dim, seed):
        super().__init__()
        self.out_dim = out_dim
        self.fc = nn.Linear(math.prod(shape), out_dim)
        torch.manual_seed(seed)
        nn.init.normal_(self.fc.weight)

    def forward(self, x):
        return self.fc(x.flatten(1))


def linear_model(K=3):
    enc = {"audio": LinearEncoder((2, 5), 6, 0), "visual": LinearEncoder((3, 4), 5, 1)}
    return LateFusionModel(enc, ConcatHead({"audio": 6, "visual": 5}, K)).double().eval()


def linear_inputs(B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(B, 2, 5, generator=g, dtype=torch.float64),
            "visual": torch.randn(B, 3, 4, generator=g, dtype=torch.float64)}


def test_jacobian_grams_on_a_linear_model_are_analytic():
    model, x = linear_model(), linear_inputs()
    grams, logits = jacobian_grams(model, x, max_elements=40)  # forces chunks of one sample
    torch.testing.assert_close(logits, model(x).logits)
    for m in model.modalities:
        J = model.head.uni_weight(m) @ model.encoders[m].fc.weight  # ∂z_m/∂x_m = W_m E_m, the same for every x
        torch.testing.assert_close(grams[m], (J @ J.T).expand(5, -1, -1))
    assert all(p.grad is None for p in model.parameters())


def test_jacobian_fusion_predict_is_batched_and_changes_the_head():
    tr = make_trainer("jacobian_fusion", epochs=1, gamma=5.0)
    tr.run_epoch(0)
    model = tr.model.eval()
    x, _ = first_batch(tr)
    with torch.no_grad():  # predict must work under Trainer.evaluate's no_grad
        out = tr.method.predict(model, x)
        single = torch.cat([tr.method.predict(model, {m: v[i:i + 1] for m, v in x.items()}) for i in range(len(_))])
    assert out.shape == (8, 3) and torch.isfinite(out).all()
    torch.testing.assert_close(out, single, atol=1e-5, rtol=1e-4)
    plain = model(x).logits
    assert (out - plain).abs().max() > 1e-4
    tr.method.p.gamma = 0.0
    torch.testing.assert_close(tr.method.predict(model, x), plain)


def test_jacobian_fusion_calibrates_gamma_on_validation_and_keeps_it_in_the_checkpoint(tmp_path):
    """After training, gamma is the largest grid value whose validation accuracy is within max_clean_drop of
    the plain head's; predictions use it, and the saved model carries it."""
    from mmrobust import checkpoint
    from mmrobust.checkpoint import load_trained

    grid = [50.0, 5.0, 0.5]
    tr = make_trainer("jacobian_fusion", epochs=1, max_batches=2, calibrate=grid, max_clean_drop=0.0)
    tr.run_epoch(0)
    tr.select_final()
    model, method = tr.model.eval(), tr.method
    batches = list(tr.batches("val"))

    def acc(g):
        return sum(int((method.predict(model, x, g).argmax(1) == y).sum()) for x, y in batches) / sum(
            len(y) for _, y in batches)
    ok = [g for g in grid if acc(g) >= acc(0.0)]
    assert float(model.jf_gamma) == (max(ok) if ok else 0.0) == tr.ctx.state["jf_gamma"]
    x, _ = batches[0]
    torch.testing.assert_close(method.predict(model, x), method.predict(model, x, float(model.jf_gamma)))
    path = checkpoint.save(checkpoint.model_file(tr.state_dict(0), {}), tmp_path / "model.pt")
    predictor, _, _ = load_trained(path)
    assert float(predictor.model.jf_gamma) == float(model.jf_gamma)
    # without a grid the configured gamma is used as before
    fixed = make_trainer("jacobian_fusion", epochs=1, max_batches=1, calibrate=None, gamma=2.0)
    fixed.run_epoch(0)
    fixed.select_final()
    assert float(fixed.model.jf_gamma) == -1.0 and fixed.method.gamma(fixed.model) == 2.0


@pytest.mark.parametrize("prob", [False, True])
def test_fusion_matrices_by_solve_equal_the_eigenbasis_solution(prob):
    from mmrobust.methods.robust_fusion import fusion_matrices_by_solve

    J, S = _random_problem(seed=5)
    grams = torch.stack([j @ j.T for j in J])
    S = torch.stack([S, S]) if prob else None
    torch.testing.assert_close(fusion_matrices_by_solve(grams, 0.7, S), fusion_matrices_from_gram(grams, 0.7, S))
    low_rank = torch.randn(4, 2, dtype=torch.float64)  # singular Gram: the solve still has a unique answer
    torch.testing.assert_close(fusion_matrices_by_solve(low_rank @ low_rank.T, 2.0),
                               fusion_matrices_from_gram(low_rank @ low_rank.T, 2.0))


def test_jacobian_fusion_adaptive_prediction_has_the_full_gradient():
    """predict_adaptive gives the same logits as predict, but its input gradient includes W's dependence on x
    (through the softmax Jacobian S at the clean prediction): it matches finite differences (gradcheck), and the
    constant-W gradient of `predict` does not."""
    from mmrobust.methods.robust_fusion import JacobianFusion

    model, x = linear_model(), linear_inputs(B=3)
    method = JacobianFusion(None, JacobianFusion.Params(gamma=2.0, output="prob", calibrate=None))
    torch.testing.assert_close(method.predict_adaptive(model, x), method.predict(model, x))
    y = torch.tensor([0, 1, 2])

    def loss(fn, audio):
        return F.cross_entropy(fn(model, {"audio": audio, "visual": x["visual"]}), y)

    audio = x["audio"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: loss(method.predict_adaptive, a), (audio,), eps=1e-6, atol=1e-6)
    full = torch.autograd.grad(loss(method.predict_adaptive, audio), audio)[0]
    partial = torch.autograd.grad(loss(method.predict, audio), audio)[0]
    assert float((full - partial).abs().max()) > 1e-4 * float(full.abs().max())


def test_adaptive_pgd_runs_only_where_it_differs():
    """The registered adaptive attack attacks Predictor.adaptive(); the evaluation runs it only for methods
    with test-time processing (has_adaptive)."""
    from mmrobust.attacks import run_attack
    from mmrobust.methods import METHODS, Predictor

    assert {n for n, m in METHODS.items() if m.has_adaptive} == {"jacobian_fusion", "msefm"}
    model, x = linear_model(), linear_inputs(B=3)
    method = METHODS["jacobian_fusion"](None, METHODS["jacobian_fusion"].Params(gamma=2.0, calibrate=None))
    pred = Predictor(model, method)
    y = pred(x).argmax(1)
    adv = run_attack("pgd_adaptive", pred, x, y, eps=0.5, steps=3, step_size=0.2, clamp=False)
    delta = torch.cat([(adv[m] - x[m]).flatten(1) for m in x], 1).norm(dim=1)
    assert bool((delta <= 0.5 + 1e-9).all()) and bool((delta > 0).any())


@pytest.mark.parametrize("output", ["logit", "prob"])
def test_jacobian_fusion_predict_on_a_linear_model(output):
    from mmrobust.methods.robust_fusion import JacobianFusion
    model, x = linear_model(), linear_inputs()
    method = JacobianFusion(None, JacobianFusion.Params(gamma=0.5, output=output))
    out = model(x)
    S = softmax_jacobian(out.logits) if output == "prob" else torch.eye(3, dtype=torch.float64).expand(5, 3, 3)
    expected = model.head.bias.expand(5, -1).clone()
    for m in model.modalities:
        J = model.head.uni_weight(m) @ model.encoders[m].fc.weight
        for i in range(5):  # W_i solves W + γ SᵢᵀSᵢ W J Jᵀ = I: solve its vec form directly
            A, B = 0.5 * S[i].T @ S[i], J @ J.T  # row-major vec(A W B) = (A ⊗ Bᵀ) vec(W)
            vec_w = torch.linalg.solve(torch.eye(9, dtype=torch.float64) + torch.kron(A, B.T.contiguous()),
                                       torch.eye(3, dtype=torch.float64).flatten())
            expected[i] += vec_w.reshape(3, 3) @ out.scores[m][i]
    torch.testing.assert_close(method.predict(model, x), expected)


# ---------------------------------------------------------------------------------------------- VARMAT
def test_vulnerability_on_a_linear_model_is_analytic():
    model, x = linear_model(), linear_inputs()
    y = torch.tensor([0, 1, 2, 0, 1])
    v = vulnerability(model, x, y)
    p = model(x).logits.softmax(1)
    err = p - F.one_hot(y, 3).double()  # ∇_{x_m} CE = (W_m E_m)ᵀ (p − e_y)
    for m in model.modalities:
        J = model.head.uni_weight(m) @ model.encoders[m].fc.weight
        torch.testing.assert_close(v[m], (err @ J).norm(dim=1))
    w = vulnerability_weights(v, 1.0)
    torch.testing.assert_close(w["audio"], v["audio"] / (v["audio"] + v["visual"]))
    w0 = vulnerability_weights(v, 1e-3)  # T -> 0: all weight on the more vulnerable modality
    torch.testing.assert_close(w0["audio"], (v["audio"] > v["visual"]).double())


def test_varmat_regulariser_reaches_the_encoders():
    tr = make_trainer("varmat", epochs=1, steps=2)
    x, y = first_batch(tr)
    grads = {}
    for beta in (0.0, 1.0):
        tr.method.p.beta = beta
        torch.manual_seed(0)
        tr.model.zero_grad()
        loss, logs = tr.method.loss(tr.model.eval(), x, y, tr.ctx)
        loss.backward()
        grads[beta] = encoder_grad(tr.model, "visual")
    assert float(logs["reg"]) > 0 and {"v_audio", "v_visual"} <= set(logs)
    assert (grads[1.0] - grads[0.0]).abs().max() > 0  # double backprop: the penalty has a gradient


# ---------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("name", NEW)
def test_method_trains_two_epochs(name):
    hp = {"steps": 2} if name == "varmat" else {}
    tr = make_trainer(name, **hp)
    for e in range(tr.epochs):
        m = tr.run_epoch(e)
        assert math.isfinite(m["train_loss"])
    extra = {"ume_mma": "ume_heads", "rmtl": "rmtl_heads"}.get(name)
    if extra:  # the attached heads are trained
        x, y = first_batch(tr)
        tr.model.zero_grad()
        tr.method.loss(tr.model, x, y, tr.ctx)[0].backward()
        for p in getattr(tr.model, extra).parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
    out = tr.method.predict(tr.model.eval(), first_batch(tr, "val")[0])
    assert out.shape == (8, 3) and torch.isfinite(out).all()


def test_ume_mma_trains_only_encoders_and_uni_heads():
    tr = make_trainer("ume_mma", epochs=1)
    head = {k: v.clone() for k, v in tr.model.head.state_dict().items()}
    tr.run_epoch(0)
    assert all(torch.equal(head[k], v) for k, v in tr.model.head.state_dict().items())


# ---------------------------------------------------------------------------------------------- MSEFM
def test_msefm_cosine_term_and_memory():
    tr = make_trainer("msefm", epochs=1, memory_per_class=3, sim_weight=0.5)
    x, y = first_batch(tr)
    tr.model.zero_grad()
    loss, logs = tr.method.loss(tr.model, x, y, tr.ctx)
    out = tr.model(x)
    cos = F.cosine_similarity(out.features["audio"], out.features["visual"], dim=1).mean()
    torch.testing.assert_close(logs["cos"], cos.detach())
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, y) + 0.5 * cos, atol=1e-5, rtol=1e-5)
    cos.backward()
    assert encoder_grad(tr.model, "audio").abs().sum() > 0

    mem = tr.model.msefm
    assert not mem.ready
    tr.run_epoch(0)
    assert mem.filled.tolist() == [3, 3, 3]
    model = tr.model.eval()
    feats = model.encode({m: v[:9] for m, v in tr.data.train_eval.x.items()})  # labels i % 3: class k's first
    # clips are k, k + 3, k + 6
    for k in range(3):
        torch.testing.assert_close(mem.atoms("audio")[3 * k: 3 * k + 3], feats["audio"][[k, k + 3, k + 6]])
    assert "msefm.atoms_visual" in model.state_dict()

    xv = first_batch(tr, "val")[0]
    with torch.no_grad():
        out = tr.method.predict(model, xv)
    assert out.shape == (8, 3) and (out - model(xv).logits).abs().max() > 1e-4
    tr.method.p.sparse_lam, tr.method.p.sparse_iters = 0.0, 5000  # a training clip is itself an atom: lam 0
    # reconstructs it exactly (once converged: the atoms are strongly correlated)
    train_x = {m: v[:1] for m, v in first_batch(tr)[0].items()}
    torch.testing.assert_close(tr.method.predict(model, train_x), model(train_x).logits, atol=1e-3, rtol=1e-3)

    fresh = make_trainer("msefm", epochs=1, memory_per_class=3)  # the memory travels in the checkpoint
    fresh.model.load_state_dict(model.state_dict())
    fresh.method.p = tr.method.p
    torch.testing.assert_close(fresh.method.predict(fresh.model.eval(), xv), tr.method.predict(model, xv))


def test_msefm_adaptive_attack_sees_through_the_denoiser():
    """BPDA: the prediction's values, the gradient of the identity through sparse coding. With the linear concat
    head that makes the input gradient of a logit the same as the plain (undenoised) model's."""
    tr = make_trainer("msefm", epochs=1, memory_per_class=3)
    tr.run_epoch(0)
    model = tr.model.eval()
    x = {m: v.clone().requires_grad_(True) for m, v in first_batch(tr, "val")[0].items()}
    adaptive = tr.method.predict_adaptive(model, x)
    with torch.no_grad():
        torch.testing.assert_close(adaptive, tr.method.predict(model, x))
    got = torch.autograd.grad(adaptive[:, 1].sum(), list(x.values()))
    want = torch.autograd.grad(model(x).logits[:, 1].sum(), list(x.values()))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    assert tr.method.has_adaptive


def test_msefm_projects_features_of_different_dims():
    from mmrobust.methods.robust_fusion import FeatureMemory, cosine_similarity_loss
    mem = FeatureMemory({"audio": 6, "visual": 4}, 3, 2)
    p = mem.proj_audio
    torch.testing.assert_close(p @ p.T, torch.eye(4))
    assert not hasattr(mem, "proj_visual")
    f = {"audio": torch.randn(5, 6), "visual": torch.randn(5, 4)}
    expected = F.cosine_similarity(f["audio"] @ p.T, f["visual"], dim=1).mean()
    torch.testing.assert_close(cosine_similarity_loss(f, mem), expected)


# ---------------------------------------------------------------------------------------------- UME-MMA
def test_ume_mma_drops_a_missing_modality():
    tr = make_trainer("ume_mma", epochs=1)
    tr.run_epoch(0)
    model = tr.model.eval()
    x, _ = first_batch(tr, "val")
    x = {m: v.clone() for m, v in x.items()}
    x["visual"][:3] = 0  # samples 0..2 miss the visual modality
    logp = {m: F.log_softmax(z, 1) for m, z in tr.method.uni_logits(model, x).items()}
    out = tr.method.predict(model, x)
    torch.testing.assert_close(out[:3], logp["audio"][:3])
    torch.testing.assert_close(out[3:], (logp["audio"][3:] + logp["visual"][3:]) / 2)
    assert (logp["visual"][:3] - logp["audio"][:3]).abs().max() > 1e-4  # zeros still produce a visual opinion
    tr.method.p.drop_missing = False
    torch.testing.assert_close(tr.method.predict(model, x)[:3], (logp["audio"][:3] + logp["visual"][:3]) / 2)


def test_params_are_validated():
    for group, bad in [("msefm", {"sparse_lam": 1.5}), ("jacobian_fusion", {"gamma": -1}),
                       ("varmat", {"eps": 0}), ("rmtl", {"uni_weight": -0.1}), ("ume_mma", {"nope": 1})]:
        key = next(iter(bad))
        with pytest.raises(ConfigError, match=f"{group}.{key}"):
            parse_params({"train": {"method": group}, group: bad})
        parse_params({"train": {"method": group}, group: {}})  # the group itself is valid
