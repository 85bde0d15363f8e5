"""Every registered method trains on a tiny batch; CRMT-specific behaviour checked by hand."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_data
from mmrobust.config import ConfigError, parse_params
from mmrobust.methods import METHODS, MethodParams, build_method, catalog, params_models
from mmrobust.methods.crmt import mix_margin, split_epochs
from mmrobust.train import Trainer


def make_trainer(method: str, head: str | None = None, modalities=("audio", "visual"), lr=1e-2, **hp) -> Trainer:
    train = {"method": method, "epochs": 2, "batch_size": 8, "lr": lr, "model": {"width": 4, "head": head}}
    return Trainer(parse_params({"train": train, **hp}), data=tiny_data(modalities=modalities))


def _heads(name):
    return sorted({METHODS[name].head, "concat", "crmt"}) if METHODS[name].head == "concat" else ["crmt"]


@pytest.mark.parametrize("name,head", [(n, h) for n in sorted(METHODS) for h in _heads(n)])
def test_every_method_trains_and_updates_its_parameters(name, head):
    tr = make_trainer(name, head)
    for phase_idx, (phase, _) in enumerate(tr.schedule):
        if _ > 0:
            continue
        before = {k: v.detach().clone() for k, v in tr.model.named_parameters()}
        epoch = next(e for e, (p, i) in enumerate(tr.schedule) if p is phase)
        metrics = tr.run_epoch(epoch)
        assert math.isfinite(metrics["train_loss"]), metrics
        trainable = {id(p) for g in tr.opt.param_groups for p in g["params"]}
        for k, p in tr.model.named_parameters():
            moved = not torch.equal(before[k], p.detach())
            if id(p) in trainable:
                assert p.grad is not None and moved, f"{name}/{phase.name}: {k} did not train"
            else:
                assert not moved, f"{name}/{phase.name}: frozen {k} changed"
    out = tr.method.predict(tr.model.eval(), next(tr.batches("val"))[0])
    assert out.shape == (8, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_works_with_three_modalities(name):
    tr = make_trainer(name, modalities=("audio", "visual", "flow"))
    m = tr.run_epoch(0)
    assert math.isfinite(m["train_loss"]) and set(tr.model.modalities) == {"audio", "visual", "flow"}


def test_crmt_step2_changes_only_a_and_keeps_batchnorm_statistics():
    tr = make_trainer("crmt_jt", crmt={"step2_epochs": 1})
    tr.run_epoch(0)
    tr.run_epoch(1)  # step 1 done
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    m = tr.run_epoch(2)
    assert m["phase"] == "step2.0" and "tau" in tr.ctx.state
    changed = {k for k, v in tr.model.state_dict().items() if not torch.equal(v, state[k])}
    assert changed == {"head.a.audio", "head.a.visual"}, changed


def test_reference_compat_step2_lets_batchnorm_drift_and_head_is_not_orthogonal():
    tr = make_trainer("crmt_jt", crmt={"step2_epochs": 1, "reference_compat": True})
    for e in range(2):
        tr.run_epoch(e)
    state = {k: v.clone() for k, v in tr.model.state_dict().items()}
    tr.run_epoch(2)
    drifted = [k for k, v in tr.model.state_dict().items() if "running_mean" in k and not torch.equal(v, state[k])]
    assert drifted, "reference_compat step 2 runs in train mode, so BatchNorm statistics move"
    w = tr.model.head.uni_weight("audio")
    gram = w @ w.T
    torch.testing.assert_close(torch.diagonal(gram), torch.ones(3), atol=1e-5, rtol=0)
    assert (gram - torch.eye(3)).abs().max() > 1e-3


def test_orthonormality_holds_after_training():
    tr = make_trainer("crmt_jt", crmt={"step2_epochs": 0})
    tr.run_epoch(0)
    tr.run_epoch(1)
    for m in tr.model.modalities:
        w = tr.model.head.uni_weight(m)
        torch.testing.assert_close(w @ w.T, torch.eye(3), atol=1e-5, rtol=0)


def test_crmt_iterations_schedule():
    tr = make_trainer("crmt_jt", crmt={"iterations": 2, "step2_epochs": 3})
    names = [p.name for p, _ in tr.schedule]
    assert names == ["step1.0", "step2.0", "step2.0", "step2.0", "step1.1", "step2.1", "step2.1", "step2.1"]
    assert split_epochs(7, 3) == [3, 2, 2]
    # ablations: step 1 only has no step 2; step 2 only has no margin
    assert all(p.name.startswith("step1") for p, _ in make_trainer("crmt_step1").schedule)
    tr2 = make_trainer("crmt_step2")
    inputs, y = next(tr2.batches("train_eval"))
    _, logs = tr2.method.loss(tr2.model, inputs, y, tr2.ctx)
    assert "margin" not in logs


def test_mix_margin_by_hand():
    z = {"a": torch.tensor([[1.0, 2.0, 0.5, -1.0]]), "v": torch.tensor([[0.0, -0.5, 1.5, 0.25]])}
    ya, yb, lam = torch.tensor([1]), torch.tensor([2]), 0.3
    # per modality: log(exp(z0) + exp(z3)) - (0.3 z1 + 0.7 z2)
    ta = math.log(math.exp(1.0) + math.exp(-1.0)) - (0.3 * 2.0 + 0.7 * 0.5)
    tv = math.log(math.exp(0.0) + math.exp(0.25)) - (0.3 * -0.5 + 0.7 * 1.5)
    expected = math.log(math.exp(ta) + math.exp(tv) + 1e-5)
    assert mix_margin(z, ya, yb, lam).item() == pytest.approx(expected, rel=1e-6)
    # the released code's version: raw sum of exponentials minus the mixed logits, averaged over modalities
    ra = math.exp(1.0) + math.exp(-1.0) - (0.3 * 2.0 + 0.7 * 0.5)
    rv = math.exp(0.0) + math.exp(0.25) - (0.3 * -0.5 + 0.7 * 1.5)
    assert mix_margin(z, ya, yb, lam, reference_compat=True).item() == pytest.approx((ra + rv) / 2, rel=1e-6)
    # λ = 1 and y_a = y_b reduce to the step-1 margin
    from mmrobust.crmt import crmt_margin_loss
    assert mix_margin(z, ya, ya, 1.0).item() == pytest.approx(crmt_margin_loss(z, ya).item(), rel=1e-6)


def test_method_params_are_validated():
    with pytest.raises(ConfigError, match="crmt.rho: Input should be greater than or equal to 0"):
        parse_params({"train": {"method": "crmt_jt"}, "crmt": {"rho": -1}})
    with pytest.raises(ConfigError, match="crmt.rhoo: unknown key"):
        parse_params({"train": {"method": "crmt_jt"}, "crmt": {"rhoo": 1}})
    with pytest.raises(ConfigError, match="train.method: got 'crmt'; allowed values"):
        parse_params({"train": {"method": "crmt"}})
    with pytest.raises(ConfigError, match="models.x.group: method 'crmt_at' reads group 'crmt'"):
        parse_params({"models": {"x": {"method": "crmt_at", "group": "train"}}})
    params = parse_params({"train": {"method": "crmt_at"}, "crmt": {"rho": 0.5}})
    assert build_method(params).p.rho == 0.5
    # per-model overrides are merged and re-validated
    params = parse_params({"models": {"it2": {"method": "crmt_jt", "group": "crmt",
                                              "overrides": {"crmt": {"iterations": 2}}}}})
    assert params.for_model("it2").crmt.iterations == 2 and params.crmt.iterations == 1
    assert params.for_model("it2").train.method == "crmt_jt"


@pytest.mark.parametrize("name", sorted(set(METHODS) | set(catalog.PARAMS_KEYS)))
def test_catalog_and_registry_agree(name):
    """The config validates from methods/catalog.py alone: each method must be declared there as registered."""
    assert name in catalog.PARAMS_KEYS and name in METHODS, "declare the method in catalog.py and register its class"
    key = catalog.PARAMS_KEYS[name]
    assert METHODS[name].params_key == key
    assert METHODS[name].Params is (catalog.GROUPS[key] if key else MethodParams)


def test_catalog_groups_are_the_registered_families_in_order():
    assert list(catalog.GROUPS) == list(params_models())  # the order of the config's groups


def test_training_is_reproducible():
    def run():
        tr = make_trainer("crmt_jt", crmt={"step2_epochs": 1})
        return [tr.run_epoch(e)["train_loss"] for e in range(tr.epochs)], tr.model.state_dict()
    (l1, s1), (l2, s2) = run(), run()
    assert l1 == l2 and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_noise_augmentation_reaches_every_method_and_is_seeded():
    """train.noise_sigma adds N(0, sigma^2) to every modality of each training batch before the method's loss
    (randomised smoothing's base classifier); same seed, same noise."""
    def first_inputs(sigma):
        tr = Trainer(
            parse_params({"train": {"method": "jt", "epochs": 1, "batch_size": 8, "noise_sigma": sigma,
                                    "model": {"width": 4}}}), data=tiny_data())
        seen, loss = [], tr.method.loss
        tr.method.loss = lambda model, inputs, y, ctx: (seen.append({m: v.clone() for m, v in inputs.items()}),
                                                        loss(model, inputs, y, ctx))[1]
        tr.run_epoch(0)
        return seen[0]
    clean, noisy, again = first_inputs(0.0), first_inputs(0.5), first_inputs(0.5)
    for m in clean:
        assert float((noisy[m] - clean[m]).std()) == pytest.approx(0.5, rel=0.05)
        assert torch.equal(noisy[m], again[m])


def test_jt_learns_the_tiny_task():
    tr = make_trainer("jt", lr=0.01)
    tr.schedule = [tr.schedule[0]] * 20
    for e in range(20):
        tr.run_epoch(e)
    assert tr.evaluate("train_eval")["acc"] > 0.85 and tr.evaluate("val")["acc"] > 0.75
    assert F.softmax(tr.model(next(tr.batches("val"))[0]).logits, 1).max(1).values.mean() > 0.5


@pytest.mark.parametrize("projected", [True, False])
def test_crmt_keeps_modality_weights_non_negative(projected):
    """Paper eq. 10 assumes a_m >= 0. Started near zero with a large step-2 learning rate, plain SGD (the former
    code: no projection) drives some a_{m,k} below 0; CRMT projects after every optimiser step."""
    tr = make_trainer("crmt_jt", crmt={"step2_epochs": 2, "step2_lr": 1.0, "step2_momentum": 0.0,
                                       "step2_weight_decay": 0.0})
    if not projected:
        tr.method.after_step = lambda model, ctx: None
    tr.run_epoch(0)  # step 1
    with torch.no_grad():
        for a in tr.model.head.a.values():
            a.fill_(1e-3)
    lowest = []
    for e in range(1, tr.epochs):  # step 2
        tr.run_epoch(e)
        lowest.append(min(float(v.min()) for v in tr.model.head.a.values()))
    if projected:
        assert min(lowest) >= 0
    else:
        assert min(lowest) < 0, "the case must drive a below 0 without the projection"
