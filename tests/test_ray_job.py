"""The README's cluster recipe, for real: `ray start --head` (with the job server), a local MLflow tracking
server, and `ray job submit --working-dir` of `pipelines.train`; the job succeeds and its run is in MLflow."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import tiny_project
from mmrobust.tracking import _free_port, tracking_server
from pipelines.local_cluster import start_head, stop_head

pytestmark = pytest.mark.slow


def test_ray_job_submit_trains_and_logs_to_the_tracking_server(tmp_path):
    params = tiny_project(tmp_path, {"epochs": 2}, models={"jt": {"method": "jt", "group": "train"}})
    job_dir = tmp_path / "job"  # what --working-dir uploads: just the params (absolute data paths inside)
    job_dir.mkdir()
    (job_dir / "params.yaml").write_text(yaml.safe_dump(params.as_file_dict(), sort_keys=False))
    out = tmp_path / "shared" / "models" / "jt"
    dashboard = _free_port()
    head, _ = start_head(num_cpus=2, dashboard_port=dashboard)
    try:
        with tracking_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "artifacts") as mlflow_uri:
            runtime_env = json.dumps({"env_vars": {"MLFLOW_TRACKING_URI": mlflow_uri}})
            ray = str(Path(sys.executable).with_name("ray"))
            job = subprocess.run(
                [ray, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(job_dir),
                 "--runtime-env-json", runtime_env, "--", sys.executable, "-m", "pipelines.train", "--model", "jt",
                 "--params", "params.yaml", "--out", str(out)],
                capture_output=True, text=True, timeout=600)
            assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
            assert "succeeded" in job.stdout
            assert "ray: connected to" in job.stdout  # the job used the cluster, not a cluster of its own
            run_info = json.loads((out / "mlflow_run.json").read_text())
            assert run_info["tracking_uri"] == mlflow_uri
            import mlflow
            client = mlflow.MlflowClient(mlflow_uri)
            run = client.get_run(run_info["run_id"])
            assert run.info.status == "FINISHED" and run.data.tags["method"] == "jt"
            assert 0 <= run.data.metrics["test_acc"] <= 1
            assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [0, 1]
            assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")} == {"checkpoint/model.pt"}
        assert (out / "model.pt").exists()
    finally:
        stop_head(head)
