"""The evaluation in MLflow: headline accuracies and the tables/figures on each model's training run."""
from __future__ import annotations

from pathlib import Path

from mmrobust import tracking
from mmrobust.config import Params
from mmrobust.attacks.specs import WORST


def run_info(params: Params, models_dir: str | Path, mid: str) -> tuple[dict, str] | None:
    return tracking.trained_run(Path(models_dir) / mid, params.tracking.uri)


def log_to_mlflow(params: Params, ids: list[str], metrics: dict, out: Path, models_dir: str | Path,
                  methods: dict[str, str] | None = None, log=print) -> None:
    for mid in ids:
        found = run_info(params, models_dir, mid)
        if found is None:
            log(f"[evaluate] {mid}: no MLflow run recorded ({Path(models_dir) / mid / 'mlflow_run.json'}); not logged")
            continue
        info, uri = found
        c = tracking.client(uri)
        tracking.log_metrics(c, info["run_id"], {f"eval_{k}": v for k, v in metrics.get(mid, {}).items()})
        c.log_artifact(info["run_id"], str(out / "per_model" / f"{mid}.csv"), "evaluation")
        for folder in ("tables", "figures"):
            if (out / folder).exists():
                c.log_artifacts(info["run_id"], str(out / folder), f"evaluation/{folder}")
    log(f"[evaluate] logged to MLflow ({params.tracking.experiment})")
    if methods:
        register_best_crmt(params, ids, methods, metrics, models_dir, log)


def registered_name(params: Params) -> str:
    return f"{params.tracking.experiment}-{params.dataset_name}-crmt"


def register_best_crmt(params: Params, ids: list[str], methods: dict[str, str], metrics: dict,
                       models_dir: str | Path, log=print) -> str | None:
    """Register the CRMT model with the highest worst-case robust accuracy (ties: clean accuracy) as a new version
    of `<experiment>-<dataset>-crmt`, unless that model is already the latest version. Returns the model id."""
    from mmrobust import mlflow_model

    scored = [(metrics[m].get(WORST, 0.0), metrics[m].get("clean", 0.0), m) for m in ids
              if methods.get(m, "").startswith("crmt") and m in metrics]
    found = {m: run_info(params, models_dir, m) for *_, m in scored}
    scored = [s for s in scored if found[s[2]] is not None and "model_uri" in found[s[2]][0]]
    if not scored:
        return None
    worst, clean, best = max(scored)
    info, uri = found[best]
    name = registered_name(params)
    c = tracking.client(uri)
    latest = c.search_model_versions(f"name = '{name}'", max_results=1, order_by=["version_number DESC"])
    if latest and latest[0].source == info["model_uri"]:
        log(f"[evaluate] registry: {name} v{latest[0].version} is {best} already")
        return best
    description = (f"{best} ({methods[best]}): the best CRMT model on {params.dataset_name} by worst-case robust "
                   f"accuracy over the evaluated attacks at joint eps {params.evaluate.joint_eps}: {worst:.3f} "
                   f"(clean {clean:.3f})")
    version = mlflow_model.register(uri, info["model_uri"], name, description,
                                    tags={"model": best, "method": methods[best], "dataset": params.dataset_name,
                                          "worst_case_acc": f"{worst:.4f}", "clean_acc": f"{clean:.4f}"})
    log(f"[evaluate] registry: {name} v{version.version} <- {best} (worst-case {worst:.3f}, clean {clean:.3f})")
    return best
