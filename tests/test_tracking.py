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
    # `make ui` prints the runs page of the configured experiment, whatever id the store gave it
    assert tracking.runs_url(uri, "old").endswith(f"/#/experiments/{old}/runs?workflowType=machine_learning")
    assert tracking.runs_url(uri, "absent").endswith("/#/experiments")


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


def test_tracking_uri_is_put_back(tmp_path, monkeypatch):
    from mmrobust.mlflow_model import tracking_uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with tracking_uri(f"sqlite:///{tmp_path / 'a.db'}"):
        assert mlflow.get_tracking_uri().endswith("a.db")
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    with tracking_uri(f"sqlite:///{tmp_path / 'a.db'}"):
        assert os.environ["MLFLOW_TRACKING_URI"].endswith("a.db")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"


def test_best_crmt_model_per_dataset_is_registered_once(tmp_path, monkeypatch):
    """The CRMT model with the highest worst-case accuracy becomes a version of `<experiment>-<dataset>-crmt`
    (JT, better still, is not a CRMT model); the same best model is not registered twice; a new best is."""
    import torch

    from mmrobust.evaluation.mlflow_log import register_best_crmt, registered_name
    from mmrobust.mlflow_model import log_model, tracking_uri
    from mmrobust.models import ModelSpec, build_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # artifacts of the SQLite store go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = parse_params({"tracking": {"uri": uri, "experiment": "e"},
                           "datasets": {"toy": {"dataset": "ks", "root": str(tmp_path)}}}).for_dataset("toy")
    c = mlflow.MlflowClient(uri)
    exp = tracking.experiment_id(uri, "e")
    example = {"audio": torch.randn(1, 1, 16, 12), "visual": torch.rand(1, 3, 3, 16, 16)}
    models = {}
    for i, mid in enumerate(["jt", "crmt_a", "crmt_b"]):
        torch.manual_seed(i)
        net = build_model(ModelSpec(num_classes=3, modalities=["audio", "visual"], width=2)).eval()
        run_id = c.create_run(exp).info.run_id
        model_uri = log_model(uri, run_id, net, example, 3)
        (tmp_path / "models" / mid).mkdir(parents=True)
        (tmp_path / "models" / mid / "mlflow_run.json").write_text(
            json.dumps({"run_id": run_id, "tracking_uri": uri, "model_uri": model_uri}))
        models[mid] = (net, model_uri)
    methods = {"jt": "jt", "crmt_a": "crmt_jt", "crmt_b": "crmt_at"}
    metrics = {"jt": {"clean": 0.9, "worst": 0.8}, "crmt_a": {"clean": 0.9, "worst": 0.5},
               "crmt_b": {"clean": 0.8, "worst": 0.6}}
    ids = list(methods)
    assert register_best_crmt(params, ids, methods, metrics, tmp_path / "models", log=lambda *_: None) == "crmt_b"
    assert register_best_crmt(params, ids, methods, metrics, tmp_path / "models", log=lambda *_: None) == "crmt_b"
    name = registered_name(params)
    assert name == "e-toy-crmt"
    (v1,) = c.search_model_versions(f"name = '{name}'")
    assert v1.source == models["crmt_b"][1] and v1.tags["model"] == "crmt_b" and "0.600" in v1.description
    metrics["crmt_a"]["worst"] = 0.7
    register_best_crmt(params, ids, methods, metrics, tmp_path / "models", log=lambda *_: None)
    versions = sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    assert [v.tags["model"] for v in versions] == ["crmt_b", "crmt_a"]
    with tracking_uri(uri):  # the registered model is the logged network
        loaded = mlflow.pytorch.load_model(f"models:/{name}/2")
    flat = loaded.flatten(example)
    torch.testing.assert_close(loaded(flat), models["crmt_a"][0](example).logits)
