"""Attack declarations (mmrobust/attacks/specs.py): one parametrised test over every declared attack, the grid
the evaluation builds from them, their params in the config, and the tables they give columns to."""
from __future__ import annotations

import pytest
import torch

from mmrobust.attacks import ATTACKS, run_attack
from mmrobust.attacks.specs import SPECS, WORST, Radii, grid, measurement, of_kind, worst_case
from mmrobust.config import ConfigError, EvaluateCfg, parse_params
from mmrobust.evaluation import attack_grid
from mmrobust.tables import write_tables

from test_attacks import conv_model, make_inputs, norms

RADII = Radii(joint=(0.5, 1.0), uni=(1.0, 2.0), joint_main=0.5, uni_main=1.0, modalities=("visual", "audio"))


def test_declarations_and_implementations_agree():
    assert set(SPECS) == set(ATTACKS), "declare each attack in specs.py and list its function in registry.py"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_declared_measurement_runs_within_its_budget(name):
    """Each measurement the declaration adds is a valid call of the attack, attacks the modality it names, and
    (robust kinds) stays in the l2 ball of its size."""
    spec = SPECS[name]
    measurements = spec.grid(spec.Params(), RADII)
    assert measurements and all(m.attack == name for m in measurements)
    model, x = conv_model(), make_inputs(6)
    y = torch.zeros(6, dtype=torch.long)
    for m in measurements:
        adv = run_attack(name, model, x, y, **m.kwargs())
        assert set(adv) == set(x) and all(adv[k].shape == x[k].shape for k in x)
        untouched = [k for k in x if m.modality not in ("all", k)]
        assert all(adv[k] is x[k] or torch.equal(adv[k], x[k]) for k in untouched)
        if spec.kind == "robust":
            attacked = list(x) if m.modality == "all" else [m.modality]
            assert float(norms(x, adv, attacked).max()) <= m.eps * (1 + 1e-5)


def test_grid_follows_each_attacks_curve_flags():
    got = {(m.attack, m.modality, m.eps) for m in grid({"fgm": SPECS["fgm"].Params(),
                                                         "pgd": SPECS["pgd"].Params(uni_curve=False)}, RADII)}
    # fgm: joint grid, uni-modal main radius only; pgd here likewise
    assert got == {(a, "all", e) for a in ("fgm", "pgd") for e in (0.5, 1.0)} | {
        (a, m, 1.0) for a in ("fgm", "pgd") for m in ("visual", "audio")}


def test_evaluate_attacks_are_validated_against_the_declarations():
    with pytest.raises(ConfigError, match="unknown attack 'cw'"):
        parse_params({"evaluate": {"attacks": {"cw": {}}}})
    with pytest.raises(ConfigError, match="steps"):
        parse_params({"evaluate": {"attacks": {"pgd": {"steps": 0}}}})
    with pytest.raises(ConfigError, match=r"evaluate.attacks.<attack>"):
        parse_params({"evaluate": {"pgd_steps": 10}})  # the former flat keys say where they went
    cfg = EvaluateCfg(attacks={"pgd": {"steps": 7}})
    assert list(cfg.attacks) == ["pgd"] and cfg.attacks["pgd"].steps == 7  # only the listed attacks run
    assert EvaluateCfg.model_validate(cfg.model_dump(mode="json")) == cfg   # params files round-trip


def test_attack_list_decides_the_grid():
    only_pgd = EvaluateCfg(attacks={"pgd": {"steps": 2}})
    specs = attack_grid(only_pgd, ["audio", "visual"])
    assert {s.attack for s in specs} == {"pgd"} and all(s.kwargs()["steps"] == 2 for s in specs)


def test_table_columns_come_from_the_attack_kinds(tmp_path):
    rows = [dict(dataset="d", method="jt", model="jt", attack=a, modality=mod, eps=e, accuracy=acc, n=4)
            for a, mod, e, acc in [("clean", "all", 0.0, 1.0), ("pgd", "all", 0.5, 0.5), ("pgd", "audio", 1.0, 0.25),
                                   ("missing", "audio", 0.0, 0.75), ("mgn", "all", 0.5, 0.75)]]
    write_tables(rows, tmp_path, 0.5, 1.0, {"jt": "jt"}, attacks=["pgd", "missing", "mgn"])
    t1 = (tmp_path / "T1.md").read_text()
    assert "| model | Clean | PGD 0.5 |" in t1 and "| jt | 1.000 | 0.500 |" in t1 and "FGM" not in t1
    t2 = (tmp_path / "T2.md").read_text()
    assert "PGD #a 1" in t2 and "Missing #a" in t2 and "0.750" in t2
    assert "MGN 0.5" in (tmp_path / "T7.md").read_text()
    assert of_kind(["pgd", "missing", "mgn"], "robust") == ["pgd"]


def test_worst_case_groups_the_robust_measurements_of_each_modality_and_radius():
    ms = [measurement("fgm", "all", 0.5, eps=0.5), measurement("pgd", "all", 0.5, eps=0.5, steps=4),
          measurement("pgd", "all", 1.0, eps=1.0), measurement("pgd", "audio", 1.0, eps=1.0, modalities=["audio"]),
          measurement("mgn", "all", 0.5, sigma=0.5), measurement("missing", "audio", 0.0, modalities=["audio"])]
    got = {(w.attack, w.modality, w.eps): labels for w, labels in worst_case(ms).items()}
    assert got == {(WORST, "all", 0.5): ["fgm|all|0.5", "pgd|all|0.5"], (WORST, "all", 1.0): ["pgd|all|1"],
                   (WORST, "audio", 1.0): ["pgd|audio|1"]}  # corruptions and missing are not adversaries
