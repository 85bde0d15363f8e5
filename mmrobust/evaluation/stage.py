"""`evaluate_all(params) -> metrics`: the evaluation stage of one dataset (every model, every attack)."""
from __future__ import annotations

from pathlib import Path

from mmrobust.checkpoint import MODEL_FILE, load, params_of
from mmrobust.config import Params
from mmrobust.evaluation.mlflow_log import log_to_mlflow
from mmrobust.evaluation.outputs import write_outputs
from mmrobust.evaluation.pool import evaluate_models, evaluation_costs
from mmrobust.tables import Arch, arch_of


def model_arch(path: str | Path) -> Arch:
    """The architecture (fusion, encoders, pretrained weights, modalities) a checkpoint was trained with."""
    ckpt = load(path)
    return arch_of(params_of(ckpt, path), ckpt["modalities"])


def evaluate_all(params: Params, models_dir: str | Path = "models", cache_dir: str | Path = ".cache/eval",
                 log=print) -> dict:
    """Evaluate every configured model, write tables, figures and metrics under evaluate.out_dir, log to MLflow."""
    cfg = params.evaluate
    ids = cfg.models if cfg.models is not None else list(params.all_models)
    missing = [m for m in ids if not (Path(models_dir) / m / MODEL_FILE).exists()]
    if missing:
        raise FileNotFoundError(f"no trained model for {missing} under {models_dir}/ (run the train stages first)")
    rows = [r for mid_rows in evaluate_models(ids, models_dir, cfg, cache_dir, params.dataset_id, log,
                                              evaluation_costs(params, ids)) for r in mid_rows]
    methods = {mid: next(r["method"] for r in rows if r["model"] == mid) for mid in ids}
    archs = {mid: model_arch(Path(models_dir) / mid / MODEL_FILE) for mid in ids}
    metrics = write_outputs(params, ids, rows, methods, archs, models_dir, log)
    log_to_mlflow(params, ids, metrics, Path(cfg.out_dir), models_dir, methods, log)
    return metrics
