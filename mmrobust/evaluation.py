"""Evaluation of trained models under every configured attack: tidy result rows, resumable per batch.

`evaluate_model(path, cfg, ...)` loads `models/<id>/model.pt`, builds the attack grid from the `evaluate` params
group and appends one line per test batch to `<cache_dir>/<id>.jsonl` ({batch, n, counts: {label: correct}}), so
an interrupted evaluation restarts at the first batch it had not finished. Rows are
`dataset, method, model, attack, modality, eps, accuracy, n` (modality `all` for joint attacks and clean).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from mmrobust.attacks import evaluate_attacks
from mmrobust.config import EvaluateCfg, Params, parse_params
from mmrobust.data.dataset import AVDataset
from mmrobust.methods import Predictor, build_method
from mmrobust.models import ModelSpec, build_model
from mmrobust.progress import progress

from mmrobust.tables import ROW_FIELDS


@dataclass(frozen=True)
class AttackSpec:
    label: str       # unique key in the cache
    attack: str      # registered attack name (or "clean")
    modality: str    # "all" or the attacked modality
    eps: float       # radius / severity (sigma for mgn, p for mpm, 0 for clean and missing)
    params: tuple    # sorted (key, value) pairs passed to the attack

    def kwargs(self) -> dict:
        return dict(self.params)


def _spec(attack: str, modality: str, size: float, **params) -> AttackSpec:
    label = f"{attack}|{modality}|{size:g}"
    return AttackSpec(label, attack, modality, float(size), tuple(sorted(params.items())))


def attack_grid(cfg: EvaluateCfg, modalities: list[str], joint_curve: bool = True,
                uni_curve: bool = True) -> list[AttackSpec]:
    """Every measurement of the paper's tables and figures (SPEC §6), deduplicated. The radius grids (joint:
    T11/F5, uni-modal: F1/F4) are added only when asked for."""
    specs: dict[str, AttackSpec] = {}

    def add(s: AttackSpec) -> None:
        specs.setdefault(s.label, s)

    pgd = dict(steps=cfg.pgd_steps, restarts=cfg.pgd_restarts, random_start=cfg.pgd_random_start)

    def pgd_kw(eps: float) -> dict:
        return dict(pgd, step_size=eps * cfg.pgd_step_ratio)

    for eps in sorted({cfg.joint_eps, *(cfg.joint_grid if joint_curve else [])}):  # T1, T11, F5
        if eps > 0:
            add(_spec("fgm", "all", eps, eps=eps))
            add(_spec("pgd", "all", eps, eps=eps, **pgd_kw(eps)))
    for m in modalities:                                            # T2
        if cfg.uni_eps > 0:
            add(_spec("fgm", m, cfg.uni_eps, eps=cfg.uni_eps, modalities=[m]))
        for eps in sorted({cfg.uni_eps, *(cfg.uni_grid if uni_curve else [])}):  # T2, F1/F4
            if eps > 0:
                add(_spec("pgd", m, eps, eps=eps, modalities=[m], **pgd_kw(eps)))
        add(_spec("missing", m, 0.0, modalities=[m]))
    for sigma in cfg.mgn_sigma:                                     # T7
        add(_spec("mgn", "all", sigma, sigma=sigma))
    for p in cfg.mpm_p:
        add(_spec("mpm", "all", p, p=p))
    if cfg.mea_eps > 0:
        add(_spec("mea", "all", cfg.mea_eps, eps=cfg.mea_eps, steps=cfg.mea_steps))
    return list(specs.values())


def load_trained(path: str | Path, device: str = "cpu") -> tuple[Predictor, Params, dict]:
    ckpt = torch.load(path, map_location=device, weights_only=False)
    params = parse_params(ckpt["config"], f"{path}:config")
    method = build_method(params, ckpt["method"])
    head = params.train.model.head or method.head
    head_kwargs = {"reference_compat": True} if head == "crmt" and getattr(method.p, "reference_compat", False) else {}
    model = build_model(ModelSpec(num_classes=ckpt["num_classes"], modalities=ckpt["modalities"],
                                  encoder=params.train.model.encoder, width=params.train.model.width, head=head,
                                  head_kwargs=head_kwargs, encoder_kwargs=params.train.model.encoder_kwargs,
                                  fusion=params.train.model.fusion))
    method.prepare(model)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    return Predictor(model, method).eval(), params, ckpt


def test_loader(params: Params, modalities: list[str], cfg: EvaluateCfg) -> DataLoader:
    ds = AVDataset(params.extract.out_dir, "test", modalities, num_segments=params.train.num_segments,
                   input_size=params.train.input_size)
    if cfg.max_samples is not None and cfg.max_samples < len(ds):
        ds = Subset(ds, range(cfg.max_samples))
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=False)


def _read_cache(path: Path) -> dict[int, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
                done[rec["batch"]] = rec
            except (json.JSONDecodeError, KeyError):
                break  # a torn last line from an interrupted write: that batch is redone
    return done


def evaluate_model(path: str | Path, model_id: str, cfg: EvaluateCfg, cache_dir: str | Path,
                   log=print, stop_after: int | None = None, dataset: str | None = None) -> list[dict]:
    """All attack measurements of one trained model as tidy rows (resumable through the cache)."""
    predictor, params, ckpt = load_trained(path)
    specs = attack_grid(cfg, ckpt["modalities"], model_id in cfg.joint_grid_models, model_id in cfg.uni_grid_models)
    loader = test_loader(params, ckpt["modalities"], cfg)
    cache = Path(cache_dir) / f"{model_id}.jsonl"
    cache.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = {"labels": [s.label for s in specs], "model_mtime": os.path.getmtime(path),
                   "evaluate": cfg.model_dump(mode="json", exclude={"workers"}), "test_clips": len(loader.dataset)}
    meta = cache.with_suffix(".meta.json")
    if not meta.exists() or json.loads(meta.read_text()) != fingerprint:
        cache.unlink(missing_ok=True)  # another model or another grid: start over
        meta.write_text(json.dumps(fingerprint))
    done = _read_cache(cache)
    if done:
        log(f"[{model_id}] resuming: {len(done)} of {len(loader)} batches already evaluated")
    t0 = time.perf_counter()
    with open(cache, "a") as fh:
        for i, batch in enumerate(progress(loader, len(loader), f"evaluate {model_id}", "batches")):
            if i in done:
                continue
            if stop_after is not None and i >= stop_after:
                break
            torch.manual_seed(cfg.seed + i)  # random starts / noise: same numbers on a rerun
            inputs = {m: batch[m] for m in ckpt["modalities"]}
            y = batch["label"]
            counts = evaluate_attacks(predictor, inputs, y, [(s.label, s.attack, s.kwargs()) for s in specs])
            rec = {"batch": i, "n": len(y), "counts": {k: int(v) for k, v in counts.items()}}
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done[i] = rec
    if len(done) < len(loader):
        return []
    n = sum(r["n"] for r in done.values())
    correct = {k: sum(r["counts"][k] for r in done.values()) for k in ["clean", *(s.label for s in specs)]}
    base = dict(dataset=dataset or params.data.dataset, method=ckpt["method"], model=model_id, n=n)
    rows = [dict(base, attack="clean", modality="all", eps=0.0, accuracy=correct["clean"] / n)]
    rows += [dict(base, attack=s.attack, modality=s.modality, eps=s.eps, accuracy=correct[s.label] / n)
             for s in specs]
    if model_id in cfg.certify_models:
        rows += certified_rows(predictor, params, ckpt, loader, cfg, base, log)
    log(f"[{model_id}] {len(specs)} attacks x {n} samples in {time.perf_counter() - t0:.1f} s")
    return rows


def certified_rows(predictor: Predictor, params: Params, ckpt: dict, loader: DataLoader, cfg: EvaluateCfg,
                   base: dict, log=print) -> list[dict]:
    """CA(r) on {0} + joint_grid from the sound certificate (encoder Lipschitz upper bounds), as tidy rows
    with attack "certified"; late-fusion models whose prediction is the fused logits only."""
    from mmrobust.analysis import certified_accuracy, certified_radii, model_lipschitz_bounds
    from mmrobust.methods import Method

    model = predictor.model
    if params.train.model.fusion != "late" or type(predictor.method).predict is not Method.predict:
        log(f"[{base['model']}] certified accuracy needs late fusion and a plain prediction; skipped")
        return []
    first = next(iter(loader))
    lips = model_lipschitz_bounds(model, {m: tuple(first[m].shape[1:]) for m in ckpt["modalities"]})
    radii = certified_radii(model, loader, lips)
    grid = [0.0, *cfg.joint_grid]
    rows = [dict(base, attack="certified", modality="all", eps=r, accuracy=ca)
            for r, ca in zip(grid, certified_accuracy(radii, grid))]
    log(f"[{base['model']}] certified radius: median {float(radii.median()):.3g}, max {float(radii.max()):.3g} "
        f"(encoder Lipschitz bounds {', '.join(f'{m} {v:.3g}' for m, v in lips.items())})")
    return rows


def model_arch(path: str | Path):
    """The architecture (fusion, encoders, pretrained weights, modalities) a checkpoint was trained with."""
    from mmrobust.tables import arch_of

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return arch_of(parse_params(ckpt["config"], f"{path}:config"), ckpt["modalities"])


def _single_threaded() -> None:
    torch.set_num_threads(1)


def evaluate_models(ids: list[str], models_dir: str | Path, cfg: EvaluateCfg, cache_dir: str | Path,
                    dataset: str | None, log=print, costs: dict[str, float] | None = None) -> list[list[dict]]:
    """`evaluate_model` of every id; the rows come back in the order of `ids`. With `cfg.workers` > 1 the models
    are spread over that many processes of one torch thread each (the batches here are small, and two
    single-threaded processes go faster than one process with two threads: bench/evaluate.py), the most costly
    first by `costs` (estimates), so that no long model starts last and runs alone."""
    paths = [Path(models_dir) / mid / "model.pt" for mid in ids]
    workers = min(cfg.workers, len(ids))
    if workers <= 1:
        out = []
        for i, (mid, path) in enumerate(zip(ids, paths)):
            log(f"[evaluate] model {i + 1}/{len(ids)}: {mid}")
            out.append(evaluate_model(path, mid, cfg, cache_dir, log=log, dataset=dataset))
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    log(f"[evaluate] {len(ids)} models, {workers} at a time (one process and one torch thread each)")
    # spawn, not fork: this process has torch's thread pools running already
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_single_threaded) as pool:
        order = sorted(range(len(ids)), key=lambda i: -(costs or {}).get(ids[i], 1.0))  # stable: ties in order
        futures = {pool.submit(evaluate_model, paths[i], ids[i], cfg, cache_dir, dataset=dataset): ids[i]
                   for i in order}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                try:
                    future.result()
                except Exception as err:  # the first failed model stops the stage
                    raise RuntimeError(f"evaluating model {futures[future]} failed: {err}") from err
                log(f"[evaluate] {done}/{len(ids)} models done ({futures[future]})")
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # the models not started yet
            raise
        rows = {mid: f.result() for f, mid in futures.items()}
        return [rows[mid] for mid in ids]


def evaluation_costs(params: Params, ids: list[str]) -> dict[str, float]:
    """Estimated relative cost of evaluating each model: its number of measurements times its method's
    `predict_cost`."""
    from mmrobust.methods import METHODS

    cfg, modalities = params.evaluate, params.modalities
    return {mid: METHODS[params.all_models[mid].method].predict_cost
            * len(attack_grid(cfg, modalities, mid in cfg.joint_grid_models, mid in cfg.uni_grid_models))
            for mid in ids}


def evaluate_all(params: Params, models_dir: str | Path = "models", cache_dir: str | Path = ".cache/eval",
                 log=print) -> dict:
    """Evaluate every configured model, write tables, figures and metrics under evaluate.out_dir, log to MLflow."""
    from mmrobust import tables
    from mmrobust.io import atomic_dir, write_csv, write_json

    cfg = params.evaluate
    ids = cfg.models if cfg.models is not None else list(params.all_models)
    missing = [m for m in ids if not (Path(models_dir) / m / "model.pt").exists()]
    if missing:
        raise FileNotFoundError(f"no trained model for {missing} under {models_dir}/ (run the train stages first)")
    rows = [r for mid_rows in evaluate_models(ids, models_dir, cfg, cache_dir, params.dataset_id, log,
                                              evaluation_costs(params, ids)) for r in mid_rows]
    methods = {mid: next(r["method"] for r in rows if r["model"] == mid) for mid in ids}
    archs = {mid: model_arch(Path(models_dir) / mid / "model.pt") for mid in ids}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each output (a DVC out of its own) is built in a temp dir and moved into place in one rename.
    with atomic_dir(out / "tables") as tmp:
        written = [out / "tables" / p.name for p in
                   tables.write_tables(rows, tmp, cfg.joint_eps, cfg.uni_eps, methods, archs)]
    from mmrobust.analysis_figures import analysis_figures

    with atomic_dir(out / "figures") as tmp:
        made = tables.write_figures(rows, tmp, methods) + analysis_figures(params, ids, models_dir, tmp, log)
        figures = [out / "figures" / p.name for p in made]
    with atomic_dir(out / "per_model") as tmp:
        for mid in ids:
            write_csv(tmp / f"{mid}.csv", [r for r in rows if r["model"] == mid], ROW_FIELDS)
    write_csv(out / "measurements.csv", rows, ROW_FIELDS)
    metrics = headline_metrics(rows, cfg)
    write_json(out / "metrics.json", metrics)
    tables.write_index(out, written, figures)
    log(f"[evaluate] {len(rows)} measurements, {len(written)} tables, {len(figures)} figures -> {out}/ "
        f"(see {out}/README.md)")
    log_to_mlflow(params, ids, rows, metrics, out, models_dir, log)
    return metrics


def headline_metrics(rows: list[dict], cfg: EvaluateCfg) -> dict:
    """{model: {clean, fgm, pgd, pgd_<m> (uni-modal), missing_<m>}} for DVC metrics and MLflow."""
    out: dict[str, dict] = {}
    for r in rows:
        key = None
        if r["attack"] == "clean":
            key = "clean"
        elif r["modality"] == "all" and r["attack"] in ("fgm", "pgd") and abs(r["eps"] - cfg.joint_eps) < 1e-9:
            key = r["attack"]
        elif r["modality"] != "all" and r["attack"] in ("fgm", "pgd") and abs(r["eps"] - cfg.uni_eps) < 1e-9:
            key = f"{r['attack']}_{r['modality']}"
        elif r["attack"] == "missing":
            key = f"missing_{r['modality']}"
        if key:
            out.setdefault(r["model"], {})[key] = round(float(r["accuracy"]), 4)
    return out


def log_to_mlflow(params: Params, ids: list[str], rows: list[dict], metrics: dict, out: Path,
                  models_dir: str | Path, log=print) -> None:
    """Headline accuracies as metrics and the tables/figures as artifacts of each model's training run."""
    from mmrobust import tracking

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
