"""The one training loop (`mmrobust.train.run`) and the one checkpoint owner (`mmrobust.checkpoint`)."""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_data
from mmrobust import checkpoint
from mmrobust.config import parse_params
from mmrobust.train import Trainer, run


def make_trainer(method="crmt_jt", **hp) -> Trainer:
    train = {"method": method, "epochs": 2, "batch_size": 8, "model": {"width": 4}}
    return Trainer(parse_params({"train": train, "crmt": {"step2_epochs": 1}, **hp}), data=tiny_data())


def test_run_reports_every_epoch_and_ends_on_the_selected_model():
    tr, seen = make_trainer(), []
    last = run(tr, report=lambda e, m, t: seen.append((e, dict(m))), log=lambda *_: None)
    assert [e for e, _ in seen] == list(range(tr.epochs)) == [0, 1, 2]
    assert all(m["epochs_total"] == 3 for _, m in seen) and "test_acc" in last and "test_acc" not in seen[0][1]
    best = max((m for _, m in seen if m["phase"] == seen[-1][1]["phase"]), key=lambda m: m["val_acc"])
    assert last["best_val_acc"] == best["val_acc"]
    for k, v in tr.best["model"].items():  # the model left in the trainer is the selected one
        assert torch.equal(tr.model.state_dict()[k], v)


def test_a_tuning_objective_scores_val_and_never_looks_at_test():
    tr = make_trainer("jt")
    last = run(tr, objective={"eps": 0.5, "steps": 2, "step_ratio": 0.5}, log=lambda *_: None)
    assert 0 <= last["val_pgd_acc"] <= last["val_acc"] + 1e-9
    assert not any(k.startswith("test_") for k in last)


def test_resuming_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path):
    full = make_trainer()
    run(full, log=lambda *_: None)
    first = make_trainer()
    states = {}
    run(first, report=lambda e, m, t: states.setdefault(e, checkpoint.save(t.state_dict(e), tmp_path / f"{e}.pt")),
        log=lambda *_: None)
    resumed = make_trainer()
    start = resumed.load_state_dict(checkpoint.load(states[0]))  # crosses the step-1 -> step-2 phase change
    assert start == 1
    lines = []
    run(resumed, start, log=lines.append)
    assert [line.split()[2] for line in lines] == ["2/3", "3/3"]
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=1e-6)


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned",))


def test_checkpoints_load_as_plain_data_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {}, "method": "jt", "config": Evil(), "num_classes": 2, "modalities": ["audio"]},
               tmp_path / "evil.pt")
    with pytest.raises(checkpoint.CheckpointError, match="evil.pt: not a readable mmrobust checkpoint"):
        checkpoint.load(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()  # nothing ran
    (tmp_path / "torn.pt").write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="torn.pt"):
        checkpoint.load(tmp_path / "torn.pt")


def test_model_file_round_trip_rebuilds_the_same_predictor(tmp_path):
    tr = make_trainer()
    run(tr, log=lambda *_: None)
    path = checkpoint.save(checkpoint.model_file(tr.state_dict(tr.epochs - 1), {"test_acc": 1.0}), tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)  # plain data: no pickled objects
    assert not set(checkpoint.TRAINING_ONLY) & set(raw) and raw["metrics"] == {"test_acc": 1.0}
    predictor, params, ckpt = checkpoint.load_trained(path)
    assert params.train.method == "crmt_jt" and ckpt["history"] == tr.history
    batch, _ = next(tr.batches("test"))
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(predictor(batch), tr.method.predict(tr.model, batch))


def test_repeated_step1_phases_share_one_lr_decay():
    """CRMT with 2 iterations of an 8-epoch step-1 budget and lr_step 6: step-1 epochs 0-5 at lr, 6-7 (the second
    phase's last two) at lr*gamma, as one 8-epoch phase would; step 2 keeps its own constant lr."""
    tr = make_trainer(crmt={"step2_epochs": 1, "iterations": 2, "step2_lr": 0.005},
                      train={"method": "crmt_jt", "epochs": 8, "batch_size": 8, "model": {"width": 4},
                             "lr": 0.02, "lr_step": 6, "lr_gamma": 0.1})
    lrs = []
    for epoch in range(tr.epochs):
        phase, _ = tr.schedule[epoch]
        if tr._opt_phase != phase.name:
            tr._start_phase(phase)
        lrs.append((phase.name, tr.opt.param_groups[0]["lr"]))
        if tr.sched is not None:
            tr.opt.step()
            tr.sched.step()
    assert [n for n, _ in lrs] == ["step1.0"] * 4 + ["step2.0"] + ["step1.1"] * 4 + ["step2.1"]
    step1 = [lr for n, lr in lrs if n.startswith("step1")]
    assert step1 == pytest.approx([0.02] * 6 + [0.002] * 2)
    assert [lr for n, lr in lrs if n.startswith("step2")] == pytest.approx([0.005, 0.005])


@pytest.mark.parametrize("start", ["best", "last"])
def test_crmt_step2_starts_from_step1s_best_validation_epoch(start, monkeypatch):
    """Step 1's validation accuracy 0.5, 0.9, 0.3: step 2 (encoders frozen, eval mode) trains on epoch 1's encoders
    with `step2_from: best`, epoch 2's with `last`; a run resumed at the phase boundary does the same."""
    def trainer():
        tr = make_trainer(train={"method": "crmt_jt", "epochs": 3, "batch_size": 8, "model": {"width": 4}},
                          crmt={"step2_epochs": 1, "step2_from": start})
        scripted, real = iter([0.5, 0.9, 0.3, 0.4]), tr.evaluate
        monkeypatch.setattr(tr, "evaluate", lambda split: {**real(split), "acc": next(scripted)}
                            if split != "test" else real(split))
        return tr

    def encoders(tr):
        return {k: v.clone() for k, v in tr.model.state_dict().items() if k.startswith("encoders.")}
    tr, snaps = trainer(), []
    for epoch in range(3):
        tr.run_epoch(epoch)
        snaps.append(encoders(tr))
    assert [ph.name for ph, _ in tr.schedule] == ["step1.0"] * 3 + ["step2.0"]
    assert not all(torch.equal(snaps[1][k], snaps[2][k]) for k in snaps[1])
    ckpt = tr.state_dict(2)
    tr.run_epoch(3)
    want = snaps[1] if start == "best" else snaps[2]
    assert all(torch.equal(v, want[k]) for k, v in encoders(tr).items())
    resumed = trainer()
    resumed.run_epoch(resumed.load_state_dict(ckpt))
    assert all(torch.equal(v, want[k]) for k, v in encoders(resumed).items())
