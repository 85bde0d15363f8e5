"""Real Ray Train runs: 2 CPU workers (DDP-style), a worker killed mid-run, checkpoint reload, MLflow logging."""
import json

import pytest
import torch

from helpers import tiny_project
from mmrobust import checkpoint
from mmrobust.checkpoint import load_trained
from pipelines.train import run_name, train_method

pytestmark = pytest.mark.slow


def test_two_workers_survive_a_killed_worker_and_checkpoint_reloads(ray_cluster, tmp_path):
    params = tiny_project(tmp_path, {"method": "crmt_jt", "epochs": 3, "num_workers": 2, "cpus_per_worker": 0.5,
                                     "max_failures": 1}, crmt={"step2_epochs": 1})
    out = tmp_path / "models" / "crmt_jt"
    metrics = train_method(params, "crmt_jt", out, tmp_path, fail_at_epoch=2, log=lambda *_: None)
    # the last worker died at epoch 2 (after the epoch-1 checkpoint); the run resumed and finished all 4 epochs
    assert metrics["epoch"] == 3 and metrics["num_workers"] == 2 and "test_acc" in metrics
    ckpt = checkpoint.load(out / "model.pt")  # weights_only: plain data
    assert [h["epoch"] for h in ckpt["history"]] == [0, 1, 2, 3]
    predictor, loaded_params, _ = load_trained(out / "model.pt")
    assert loaded_params.train.num_workers == 2
    x = {"audio": torch.randn(2, 1, 64, 60), "visual": torch.randn(2, 3, 3, 32, 32)}
    with torch.no_grad():
        again, _, _ = load_trained(out / "model.pt")
        torch.testing.assert_close(predictor(x), again(x))
    # MLflow: one run with the params, one metric point per epoch, the checkpoint as an artifact
    import mlflow
    run_info = json.loads((out / "mlflow_run.json").read_text())
    client = mlflow.MlflowClient(run_info["tracking_uri"])
    run = client.get_run(run_info["run_id"])
    assert run.data.params["train.num_workers"] == "2" and run.data.tags["method"] == "crmt_jt"
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert sorted({m.step for m in history}) == [0, 1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}
    assert artifacts == {"checkpoint/model.pt"}
    # ... and the model as an MLflow PyTorch model of that run (the runs list's Models column) that loads back
    # with mlflow.pytorch and predicts what the checkpoint predicts, through its flat signature
    from mmrobust.mlflow_model import tracking_uri
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id and run_info["model_uri"] == logged.model_uri
    with tracking_uri(run_info["tracking_uri"]):
        model = mlflow.pytorch.load_model(logged.model_uri)
        spec = mlflow.models.get_model_info(logged.model_uri).signature.inputs.to_dict()[0]
    assert model.shapes == {m: x[m].shape[1:] for m in x}
    assert list(spec["tensor-spec"]["shape"]) == [-1, sum(t[0].numel() for t in x.values())]
    with torch.no_grad():
        torch.testing.assert_close(model(model.flatten(x)), predictor(x))
    # a finished run leaves no Ray run folder behind, so the next run with the same params starts fresh
    assert not (tmp_path / "ray" / run_name("crmt_jt", params)).exists()

