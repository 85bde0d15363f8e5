"""A real 4-trial ASHA search (Ray Tune driving Ray Train trials) on real extracted clips: best params file,
trials table, one MLflow parent run with a child run per trial (through a local tracking server), and a
tuned model that trains with the best params."""

from pathlib import Path

import pytest
import yaml

from helpers import tiny_project
from mmrobust.config import ConfigError, parse_params
from mmrobust.io import read_csv
from pipelines.tune import METRIC, nest, trial_params, tune_method

pytestmark = pytest.mark.slow

SPACE = {"crmt.rho": {"dist": "loguniform", "low": 0.5, "high": 4.0},
         "crmt.iterations": {"dist": "choice", "values": [1, 2]}}


def test_asha_search_writes_best_params_and_parent_child_runs(ray_cluster, tmp_path):
    params = tiny_project(tmp_path, {"epochs": 2}, crmt={"step2_epochs": 1},
                          tune={"num_samples": 4, "max_concurrent": 2, "grace_period": 1, "space": SPACE,
                                "out_dir": str(tmp_path / "tune"), "eps": 0.5, "pgd_steps": 2},
                          tuned_models={"crmt_tuned": {"method": "crmt_jt", "group": "crmt"}})
    summary = tune_method(params, tmp_path, log=lambda *_: None)

    out = Path(params.tune.out_dir)  # <tune.out_dir>/<dataset>
    assert out == tmp_path / "tune" / "tiny"
    rows = read_csv(out / "trials.csv")
    assert len(rows) == 4 and summary["trials"] == 4 and summary["failed"] == 0
    for r in rows:
        assert r["status"] in ("completed", "stopped") and int(r["epochs"]) >= 1
        assert (r["status"] == "completed") == (int(r["epochs"]) == int(r["epochs_total"]))
        # the objective is accuracy under attack: never above the clean validation accuracy
        assert 0 <= float(r[METRIC]) <= float(r["val_acc"]) <= 1
        assert 0.5 <= float(r["crmt.rho"]) <= 4.0 and int(r["crmt.iterations"]) in (1, 2)
    assert summary[METRIC] == max(float(r[METRIC]) for r in rows)
    best_row = next(r for r in rows if r["trial_id"] == summary["best_trial"])

    best = yaml.safe_load((out / "best_params.yaml").read_text())
    assert set(best) == {"crmt"} and set(best["crmt"]) == {"rho", "iterations"}
    assert best["crmt"]["rho"] == pytest.approx(float(best_row["crmt.rho"]))
    tuned = params.for_model("crmt_tuned")
    assert tuned.crmt.rho == best["crmt"]["rho"] and tuned.crmt.iterations == best["crmt"]["iterations"]
    assert tuned.train.method == "crmt_jt" and params.crmt.rho == 2.0  # the base params are untouched

    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("mmrobust").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == summary["mlflow_parent_run"]
    assert len(children) == 4 and {r.data.tags["mlflow.parentRunId"] for r in children} == {summary["mlflow_parent_run"]}
    assert {r.info.run_id for r in children} == {r["mlflow_run"] for r in rows}
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    for child, row in zip(sorted(children, key=lambda r: r.info.run_id), sorted(rows, key=lambda r: r["mlflow_run"])):
        history = client.get_metric_history(child.info.run_id, METRIC)
        assert len(history) == int(row["epochs"])  # one point per epoch the trial ran
        assert child.data.params["crmt.rho"] == row["crmt.rho"]
    parent = parents[0]
    assert parent.data.metrics[f"best_{METRIC}"] == pytest.approx(summary[METRIC])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"best_params.yaml", "trials.csv"}


def test_search_space_and_tuned_models_are_validated(tmp_path):
    with pytest.raises(ConfigError, match=r"tune.space.crmt.rhoo"):
        parse_params({"tune": {"space": {"crmt.rhoo": {"dist": "uniform", "low": 0, "high": 1}}}})
    with pytest.raises(ConfigError, match=r"tune.space.crmt.rho.*low < high"):
        parse_params({"tune": {"space": {"crmt.rho": {"dist": "loguniform", "low": 2, "high": 1}}}})
    with pytest.raises(ConfigError, match=r"tuned_models.jt: the id is also in models"):
        parse_params({"models": {"jt": {"method": "jt", "group": "train"}},
                      "tuned_models": {"jt": {"method": "jt", "group": "train"}}})
    params = parse_params({"tune": {"out_dir": str(tmp_path)},
                           "tuned_models": {"t": {"method": "crmt_jt", "group": "crmt",
                                                  "overrides": {"crmt": {"iterations": 3}}}}})
    with pytest.raises(ConfigError, match="run the tune stage first"):
        params.for_model("t")
    (tmp_path / "best_params.yaml").write_text("crmt: {rho: 0.75, iterations: 2}\n")
    tuned = params.for_model("t")
    assert tuned.crmt.rho == 0.75 and tuned.crmt.iterations == 3  # the entry's own overrides win
    assert nest({"crmt.rho": 1.0, "train.lr": 0.1}) == {"crmt": {"rho": 1.0}, "train": {"lr": 0.1}}
    trial = trial_params(params, {"crmt.rho": 1.5})
    assert trial.crmt.rho == 1.5 and trial.train.cpus_per_worker == params.tune.worker_cpus


def test_search_is_skipped_when_no_tuned_model_needs_it(tmp_path):
    params = parse_params({"tune": {"out_dir": str(tmp_path / "tune")}})
    assert params.tuned_models == {}
    summary = tune_method(params, tmp_path, log=lambda *_: None)  # no Ray cluster needed: nothing is started
    assert summary == {"skipped": True, "trials": 0}
    assert yaml.safe_load((tmp_path / "tune" / "best_params.yaml").read_text()) == {}
    assert read_csv(tmp_path / "tune" / "trials.csv") == []


def test_tracking_client_leaves_the_environment_alone(tmp_path, monkeypatch):
    from mmrobust import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking.client(f"sqlite:///{tmp_path / 'a.db'}")
    # a later stage in the same process still resolves its own store
    assert tracking.resolve_uri("sqlite:///b.db", tmp_path) == f"sqlite:///{tmp_path / 'b.db'}"
