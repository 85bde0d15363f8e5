"""MLflow as its users expect, read back through the MLflow client from a real SQLite store: the experiment's
kind, each run's source (DVC stage, git commit), its dataset input, and the parent run of one `dvc repro`."""
import json
import os
import subprocess

import mlflow
import pytest

from mmrobust import tracking
from mmrobust.config import parse_params
from pipelines.local_cluster import close_repro_run, open_repro_run
from pipelines.train import open_run


def test_experiment_is_a_model_training_experiment(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.experiment_id(uri, "mine")
    c = mlflow.MlflowClient(uri)
    assert c.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    old = c.create_experiment("old")  # made elsewhere without the tag: it gets it
    assert tracking.experiment_id(uri, "old") == old
    assert c.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_training_run_has_source_dataset_input_and_repro_parent(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=tmp_path, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "params.yaml").write_text(f"tracking: {{uri: '{uri}', experiment: e}}\n")
    c, parent = open_repro_run(["python", "-m", "dvc", "repro"])
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    task = tmp_path / "data/vl/tasks/shapes_seen"
    task.mkdir(parents=True)
    (task / "classes.json").write_text(json.dumps({"classes": ["a", "b"], "counts": {"train": 30, "test": 12}}))
    params = parse_params({"tracking": {"uri": uri, "experiment": "e"}})
    _, _, run_id = open_run(params, "tima", tmp_path / "models/vl/tima", tmp_path, "tima", "vl")
    close_repro_run(c, parent, 0)

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == parent and tags["mlflow.source.git.commit"] == commit
    assert tags["mlflow.source.name"] == "dvc stage vl-train@tima" and tags["family"] == "vl"
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.name == "shapes_seen" and json.loads(inp.dataset.profile)["num_rows"] == 42
    assert json.loads(inp.dataset.source)["uri"] == str(task.resolve())
    import hashlib
    assert inp.dataset.digest == hashlib.sha256((task / "classes.json").read_bytes()).hexdigest()[:16]
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.info.run_name == f"dvc repro @ {commit[:8]}"
    assert open_repro_run(["python", "-m", "pytest"]) is None  # only `dvc repro` gets a parent run
