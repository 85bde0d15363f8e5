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
    functions = {m.function for spec in SPECS.values() for m in spec.grid(spec.Params(), RADII)}
    assert functions <= set(ATTACKS), "list each declared attack's function in registry.py"
    assert set(ATTACKS) <= set(SPECS), "declare each attack of registry.py in specs.py"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_declared_measurement_runs_within_its_budget(name):
    """Each measurement the declaration adds is a valid call of the attack, attacks the modality it names, and
    (robust kinds) stays in the l2 ball of its size."""
    spec = SPECS[name]
    measurements = spec.grid(spec.Params(), RADII)
    assert measurements and all((m.spec or m.attack) == name for m in measurements)
    assert len({m.label for m in measurements}) == len(measurements)
    model, x = conv_model(), make_inputs(6)
    y = torch.zeros(6, dtype=torch.long)
    for m in measurements:
        adv = run_attack(m.function, model, x, y, **m.kwargs())
        assert set(adv) == set(x) and all(adv[k].shape == x[k].shape for k in x)
        untouched = [k for k in x if m.modality not in ("all", k)]
        assert all(adv[k] is x[k] or torch.equal(adv[k], x[k]) for k in untouched)
        if spec.kind in ("robust", "strength"):
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


def test_strength_report_grid_and_worst_case():
    p = SPECS["strength"].Params(steps=[50, 20], restarts=3)
    ms = SPECS["strength"].grid(p, RADII)
    got = {m.attack: m.kwargs() for m in ms}
    assert list(got) == ["pgd20", "pgd50", "pgd20x3"] and all(m.eps == 0.5 and m.modality == "all" for m in ms)
    assert got["pgd50"]["step_size"] == pytest.approx(2.5 * 0.5 / 50) and got["pgd50"]["restarts"] == 1
    assert got["pgd20x3"]["restarts"] == 3 and got["pgd20x3"]["random_start"] and not got["pgd20"]["random_start"]
    worst = worst_case(grid({"pgd": SPECS["pgd"].Params(), "strength": p}, RADII))
    joint = next(v for k, v in worst.items() if k.modality == "all" and k.eps == 0.5)
    assert set(joint) == {"pgd|all|0.5", "pgd20|all|0.5", "pgd50|all|0.5", "pgd20x3|all|0.5"}
    with pytest.raises(ConfigError, match="steps"):
        parse_params({"evaluate": {"attacks": {"strength": {"steps": [20, 20]}}}})


def test_strength_report_runs_only_for_its_models():
    from mmrobust.evaluation.measure import model_grid

    cfg = EvaluateCfg(attacks={"pgd": {}, "strength": {"steps": [10], "restarts": 1, "models": ["a"]}})
    assert {s.attack for s in model_grid(cfg, "a", ["audio"])} == {"pgd", "pgd10"}
    assert {s.attack for s in model_grid(cfg, "b", ["audio"])} == {"pgd"}


def _strength_rows(model, pgd, steps: dict, apgd):
    base = dict(dataset="d", method="jt", model=model, modality="all", eps=0.5, n=100)
    rows = [dict(base, attack="clean", eps=0.0, accuracy=0.9), dict(base, attack="pgd", accuracy=pgd),
            dict(base, attack="apgd_ce", accuracy=apgd)]
    return rows + [dict(base, attack=a, accuracy=v) for a, v in steps.items()]


def test_gradient_masking_flags_by_hand(tmp_path):
    from mmrobust.tables import strength_flags

    rows = (_strength_rows("falling", 0.50, {"pgd20": 0.45, "pgd50": 0.42, "pgd20x2": 0.44}, 0.47)
            + _strength_rows("apgd", 0.50, {"pgd20": 0.47, "pgd50": 0.465}, 0.44)
            + _strength_rows("sound", 0.50, {"pgd20": 0.47, "pgd50": 0.465, "pgd20x2": 0.46}, 0.46))
    flags = strength_flags(rows, 0.5, pgd_steps=4)
    assert set(flags) == {"falling", "apgd"}
    assert "PGD-50 3.0 points below PGD-20" in flags["falling"][0]
    assert flags["apgd"] == ["APGD-CE 6.0 points below PGD-4"]
    # a model outside the strength runs (PGD-4 and APGD only) is listed and named when APGD flags it
    base = dict(dataset="d", method="jt", model="plain", modality="all", eps=0.5, n=100)
    rows += [dict(base, attack="clean", eps=0.0, accuracy=0.9), dict(base, attack="pgd", accuracy=0.5),
             dict(base, attack="apgd_ce", accuracy=0.42)]
    write_tables(rows, tmp_path, 0.5, 1.0, {"falling": "jt", "apgd": "jt", "sound": "jt", "plain": "jt"},
                 pgd_steps=4)
    s = (tmp_path / "S.md").read_text().splitlines()
    assert "Possibly gradient-masked: falling, apgd, plain." in s[2]
    assert any(line.startswith("| plain | 0.900 | 0.500 | – |") and "APGD-CE 8.0 points below" in line for line in s)
    assert s[4].startswith("| model | Clean | PGD-4 | PGD-20 | PGD-50 | PGD-20 ×2 restarts | APGD-CE |")
    (sound,) = [line for line in s if line.startswith("| sound |")]
    assert sound.startswith("| sound | 0.900 | 0.500 | 0.470 | 0.465 | 0.460 | 0.460 |") and sound.endswith("| – |")
