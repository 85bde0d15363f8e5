"""The plan stage's per-model method-params files and how a train stage reads them."""
import pytest
import yaml

from mmrobust.config import ConfigError, parse_params
from mmrobust.plan import apply_plan, method_plan, write_plans

RAW = {"models": {"jt": {"method": "jt", "group": "train"}, "crmt_jt": {"method": "crmt_jt", "group": "crmt"},
                  "gb": {"method": "gb", "group": "gb"}},
       "tuned_models": {}, "crmt": {"rho": 3.0}}


def test_plans_hold_each_models_group_and_nothing_else(tmp_path):
    params = parse_params(RAW)
    written = write_plans(params, tmp_path / "plan")
    assert sorted(p.name for p in (tmp_path / "plan").iterdir()) == sorted(p.name for p in written) == \
        ["crmt_jt.yaml", "gb.yaml", "jt.yaml"]
    assert yaml.safe_load((tmp_path / "plan/jt.yaml").read_text()) == {"model": "jt", "group": "train"}
    crmt = yaml.safe_load((tmp_path / "plan/crmt_jt.yaml").read_text())
    assert set(crmt) == {"model", "group", "crmt"} and crmt["crmt"]["rho"] == 3.0
    # a changed crmt.rho changes the CRMT model's plan only (what DVC hashes)
    other = write_plans(parse_params({**RAW, "crmt": {"rho": 0.5}}), tmp_path / "plan2")
    changed = {p.name for p, q in zip(written, other) if p.read_bytes() != q.read_bytes()}
    assert changed == {"crmt_jt.yaml"}


def test_apply_plan_reads_the_group_from_the_file(tmp_path):
    write_plans(parse_params(RAW), tmp_path)
    now = parse_params({**RAW, "crmt": {"rho": 9.0}}).for_dataset()  # params.yaml edited after the plan ran
    applied = apply_plan(now, "crmt_jt", tmp_path / "crmt_jt.yaml")
    assert applied.crmt.rho == 3.0 and applied.dataset_id == now.dataset_id == "synthetic"
    assert apply_plan(now, "jt", tmp_path / "jt.yaml") is now
    assert method_plan(applied, "crmt_jt")["crmt"] == yaml.safe_load((tmp_path / "crmt_jt.yaml").read_text())["crmt"]


def test_apply_plan_errors_name_the_file(tmp_path):
    params = parse_params(RAW)
    write_plans(params, tmp_path)
    with pytest.raises(ConfigError, match="plan file not found; run the plan stage"):
        apply_plan(params, "jt", tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"plan of model 'jt' \(group 'train'\), expected 'crmt_jt'"):
        apply_plan(params, "crmt_jt", tmp_path / "jt.yaml")
    with pytest.raises(ConfigError, match="models.nope: no such model"):
        apply_plan(params, "nope", tmp_path / "jt.yaml")
