"""MLflow helpers: where runs go, flat sortable params, and a local tracking server for concurrent writers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def resolve_uri(uri: str, base: str | Path = ".") -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path is made absolute (workers may run elsewhere)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str((Path(base) / uri[len(prefix):]).resolve())
    return uri


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """Nested params -> {"train.lr": "0.01", ...} (MLflow params are strings; dotted keys sort by group)."""
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, (list, tuple)):
        out[prefix[:-1]] = ",".join(str(v) for v in obj)
    else:
        out[prefix[:-1]] = "" if obj is None else str(obj)
    return out


def client(uri: str):
    """A client bound to `uri`. Not `mlflow.set_tracking_uri`: it also sets MLFLOW_TRACKING_URI in this process's
    environment, which would then override every later `resolve_uri` (and reach child processes)."""
    import mlflow

    return mlflow.MlflowClient(uri)


# MLflow 3 opens an experiment by its kind: model training, not the GenAI overview
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
PARENT_RUN_ENV = "MMROBUST_PARENT_RUN"  # set by pipelines.local_cluster: the run of one `dvc repro`


def experiment_id(uri: str, name: str) -> str:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
    if exp.tags.get(EXPERIMENT_KIND[0]) is None:
        c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    return exp.experiment_id


def runs_url(uri: str, name: str, host: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page that lists experiment `name`'s runs as model-training runs (the UI's home page when the
    store has no such experiment yet)."""
    exp = client(uri).get_experiment_by_name(name)
    if exp is None:
        return f"{host}/#/experiments"
    return f"{host}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"


def trained_run(folder: str | Path, uri: str) -> tuple[dict, str] | None:
    """(a trained model's mlflow_run.json, the tracking URI that reaches its run: `uri` when MLFLOW_TRACKING_URI is
    set, e.g. a server fronting the store, else the one recorded); None when the folder records no run."""
    info_file = Path(folder) / "mlflow_run.json"
    if not info_file.exists():
        return None
    import json

    info = json.loads(info_file.read_text())
    return info, resolve_uri(uri) if "MLFLOW_TRACKING_URI" in os.environ else info["tracking_uri"]


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def source_tags(stage: str, cwd: str | Path = ".") -> dict[str, str]:
    """What the runs list shows as Source: the DVC stage and the git commit; the `dvc repro` parent run when
    pipelines.local_cluster started one."""
    tags = {"mlflow.source.name": f"dvc stage {stage}", "mlflow.source.type": "PROJECT", "dvc_stage": stage}
    commit = git_commit(cwd)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    parent = os.environ.get(PARENT_RUN_ENV)
    if parent:
        tags["mlflow.parentRunId"] = parent
    return tags


def log_dataset(c, run_id: str, name: str, path: str | Path, files: list[str | Path], rows: int | None = None,
                context: str = "training") -> str:
    """The run's dataset as an MLflow dataset input: name, digest of the files that define it (manifests, class
    lists), local source path, row count; returns the digest."""
    import hashlib
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    digest = h.hexdigest()[:16]
    ds = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": str(Path(path).resolve())}),
                 profile=json.dumps({"num_rows": rows}) if rows is not None else None)
    c.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)])])
    return digest


def log_params(c, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i: i + 100])


def log_metrics(c, run_id: str, metrics: dict, step: int | None = None) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for i in range(0, len(items), 500):
        c.log_batch(run_id, metrics=items[i: i + 500])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def tracking_server(backend_uri: str, artifacts: str | Path, host: str = "127.0.0.1",
                    port: int | None = None, timeout: float = 120.0) -> Iterator[str]:
    """Run `mlflow server` (1 worker, no job runner) in its own process group; yield its http URI; stop it."""
    port = port or _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_uri, "--artifacts-destination", str(Path(artifacts).resolve())]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    uri = f"http://{host}:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"mlflow server on {uri} not healthy after {timeout:.0f} s")
            time.sleep(0.5)
        yield uri
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def concurrent_writers(uri: str, artifacts: str | Path) -> Iterator[str]:
    """A URI that many processes may write to at once: an SQLite store is fronted by a local `mlflow server`
    for the duration (SQLite alone would hit "database is locked"); any other URI is used as it is."""
    if not uri.startswith("sqlite:"):
        yield uri
        return
    with tracking_server(uri, artifacts) as server_uri:
        yield server_uri
