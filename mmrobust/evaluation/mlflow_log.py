"""The evaluation in MLflow: headline accuracies and the tables/figures on each model's training run."""
from __future__ import annotations

import json
import os
from pathlib import Path

from mmrobust import tracking
from mmrobust.config import Params


def log_to_mlflow(params: Params, ids: list[str], metrics: dict, out: Path, models_dir: str | Path,
                  log=print) -> None:
    for mid in ids:
        info_file = Path(models_dir) / mid / "mlflow_run.json"
        if not info_file.exists():
            log(f"[evaluate] {mid}: no MLflow run recorded ({info_file}); not logged")
            continue
        info = json.loads(info_file.read_text())
        uri = tracking.resolve_uri(params.tracking.uri) if "MLFLOW_TRACKING_URI" in os.environ else info["tracking_uri"]
        c = tracking.client(uri)
        tracking.log_metrics(c, info["run_id"], {f"eval_{k}": v for k, v in metrics.get(mid, {}).items()})
        c.log_artifact(info["run_id"], str(out / "per_model" / f"{mid}.csv"), "evaluation")
        for folder in ("tables", "figures"):
            if (out / folder).exists():
                c.log_artifacts(info["run_id"], str(out / folder), f"evaluation/{folder}")
    log(f"[evaluate] logged to MLflow ({params.tracking.experiment})")
