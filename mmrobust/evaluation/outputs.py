"""What the evaluation stage writes: tables, figures, per-model and tidy CSVs, DVC metrics, the results page."""
from __future__ import annotations

from pathlib import Path

from mmrobust import tables
from mmrobust.attacks.specs import WORST, of_kind
from mmrobust.config import EvaluateCfg, Params
from mmrobust.evaluation.figures import analysis_figures
from mmrobust.io import atomic_dir, write_csv, write_json
from mmrobust.tables import ROW_FIELDS, Arch


def headline_metrics(rows: list[dict], cfg: EvaluateCfg) -> dict:
    """{model: {clean, <attack> (joint, joint_eps), <attack>_<m> (uni-modal, uni_eps), missing_<m>}} of the
    robust and missing-modality attacks and the per-sample worst case of the robust ones (`worst`), for DVC
    metrics and MLflow."""
    robust, missing = [*of_kind(cfg.attacks, "robust"), WORST], of_kind(cfg.attacks, "missing")
    out: dict[str, dict] = {}
    for r in rows:
        key = None
        if r["attack"] == "clean":
            key = "clean"
        elif r["attack"] in robust and r["modality"] == "all" and abs(r["eps"] - cfg.joint_eps) < 1e-9:
            key = r["attack"]
        elif r["attack"] in robust and r["modality"] != "all" and abs(r["eps"] - cfg.uni_eps) < 1e-9:
            key = f"{r['attack']}_{r['modality']}"
        elif r["attack"] in missing:
            key = f"{r['attack']}_{r['modality']}"
        if key:
            out.setdefault(r["model"], {})[key] = round(float(r["accuracy"]), 4)
    return out


def write_outputs(params: Params, ids: list[str], rows: list[dict], methods: dict[str, str],
                  archs: dict[str, Arch], models_dir: str | Path, log=print) -> dict:
    """Everything under evaluate.out_dir; each DVC out is built in a temp dir and moved into place in one
    rename. Returns the headline metrics."""
    cfg = params.evaluate
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out / "tables") as tmp:
        written = [out / "tables" / p.name for p in
                   tables.write_tables(rows, tmp, cfg.joint_eps, cfg.uni_eps, methods, archs, list(cfg.attacks),
                                       cfg.attacks["pgd"].steps if "pgd" in cfg.attacks else 4)]
    with atomic_dir(out / "figures") as tmp:
        made = tables.write_figures(rows, tmp, methods) + analysis_figures(params, ids, models_dir, tmp, log)
        figures = [out / "figures" / p.name for p in made]
    with atomic_dir(out / "plots") as tmp:  # the curves' data, for `dvc plots show`
        tables.write_curves(rows, tmp, methods, archs)
    with atomic_dir(out / "per_model") as tmp:
        for mid in ids:
            write_csv(tmp / f"{mid}.csv", [r for r in rows if r["model"] == mid], ROW_FIELDS)
    write_csv(out / "measurements.csv", rows, ROW_FIELDS)
    metrics = headline_metrics(rows, cfg)
    write_json(out / "metrics.json", metrics)
    tables.write_index(out, written, figures)
    log(f"[evaluate] {len(rows)} measurements, {len(written)} tables, {len(figures)} figures -> {out}/ "
        f"(see {out}/README.md)")
    return metrics
