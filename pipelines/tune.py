"""Ray Tune entrypoint: ASHA search over a method's params (default: CRMT's rho, iterations and step-2
settings), each trial a Ray Train `TorchTrainer` run scored by joint l2-PGD accuracy on the validation split;
`--family vl`: over a vision-language method's params (`vl.tune`, default TIMA's margin, threshold, MHE weight
and temperature), scored by l∞ PGD accuracy on the validation split of the tuning task.

    python -m pipelines.tune [--dataset synthetic] [--params params.yaml]
    python -m pipelines.tune --family vl
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m pipelines.tune --params /shared/params.yaml

Writes `<tune.out_dir>/<dataset>/best_params.yaml` (the best trial's values as params overrides, read by every
`tuned_models` entry), `trials.csv` (one row per trial) and `summary.json`. MLflow: one parent run with a
child run per trial. Trials write concurrently, so unless MLFLOW_TRACKING_URI names a server, a local
`mlflow server` on 127.0.0.1 fronts the SQLite store for the duration of the search.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path

import yaml

from mmrobust import cli, tracking
from mmrobust.config import ConfigError, Params, SearchDim, deep_merge, load_params, parse_params
from mmrobust.io import atomic_file, write_csv, write_json
from mmrobust.ray_utils import ray_session
from pipelines.train import absolute_paths, torch_trainer

METRIC = "val_pgd_acc"


def search_space(space: dict[str, SearchDim]) -> dict:
    from ray import tune

    def dim(d: SearchDim):
        if d.dist == "choice":
            return tune.choice(d.values)
        if d.dist == "randint":
            return tune.randint(int(d.low), int(d.high))
        return (tune.loguniform if d.dist == "loguniform" else tune.uniform)(d.low, d.high)

    return {key: dim(d) for key, d in space.items()}


def search_cfg(params: Params, family: str):
    """The search settings: `tune` (audio-visual) or `vl.tune`."""
    return params.vl.tune if family == "vl" else params.tune


def base_method(params: Params, family: str) -> str:
    return params.vl.tune.method if family == "vl" else params.tune.base.method


def trial_params(base: Params, sample: dict, family: str = "av") -> Params:
    """The params one trial trains with: tune.base's overrides (vl: the `vl` group), the sampled values, the
    trial's worker CPUs."""
    cfg = search_cfg(base, family)
    if family == "vl":
        over = nest(sample)
        raw = base.model_dump(mode="json")
        raw["vl"] = deep_merge(raw["vl"], over)
        if cfg.worker_cpus is not None:
            raw["vl"]["train"]["cpus_per_worker"] = cfg.worker_cpus
        params = parse_params(raw, "vl.tune trial")
        params._dataset = base.dataset_id
        return params
    over = nest(sample)
    if cfg.worker_cpus is not None:
        over = deep_merge(over, {"train": {"cpus_per_worker": cfg.worker_cpus}})
    return base.for_entry(base.tune.base, "tune.base", over=over)


def nest(flat: dict) -> dict:
    """{"crmt.rho": 2.0} -> {"crmt": {"rho": 2.0}}, {"tima.margin": 0.1, "logit_scale": 50} -> {"tima": {"margin":
    0.1}, "logit_scale": 50} (the shape of params overrides)."""
    out: dict = {}
    for key, value in flat.items():
        *groups, field = key.split(".")
        node = out
        for g in groups:
            node = node.setdefault(g, {})
        node[field] = value
    return out


def run_trial(sample: dict, base: dict, tracking_uri: str, parent_run: str, experiment: str,
              family: str = "av") -> None:
    """One Tune trial: a child MLflow run, then a TorchTrainer whose per-epoch reports reach Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    params = trial_params(parse_params(base, "tune base"), sample, family)
    method = base_method(params, family)
    trial_id = ray.tune.get_context().get_trial_id()
    c = tracking.client(tracking_uri)
    run = c.create_run(experiment, run_name=f"trial-{trial_id}",
                       tags={"mlflow.parentRunId": parent_run, "tune_trial": trial_id, "method": method,
                             "family": family})
    tracking.log_params(c, run.info.run_id, {**tracking.flatten(params.model_dump(mode="json")),
                                             **{f"tune.sample.{k}": str(v) for k, v in sample.items()}})
    cfg = search_cfg(params, family)
    objective = ({"eps": cfg.eps, "steps": cfg.pgd_steps, "step_ratio": None} if family == "vl" else
                 {"eps": cfg.eps, "steps": cfg.pgd_steps, "step_ratio": cfg.pgd_step_ratio})
    trainer = torch_trainer(
        params, f"trial-{trial_id}",
        {"method": method, "run_id": run.info.run_id, "tracking_uri": tracking_uri, "family": family,
         "objective": objective},
        storage_dir=str(Path(ray.tune.get_context().get_trial_dir()) / "train"), callbacks=[TuneReportCallback()],
        cfg=params.vl.train_for(method) if family == "vl" else None)
    trainer.fit()
    c.set_terminated(run.info.run_id)


def tune_method(params: Params, base: Path = Path("."), log=print, family: str = "av") -> dict:
    """Run the search; write best_params.yaml, trials.csv, summary.json; return the summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    params = absolute_paths(params, base)
    cfg = search_cfg(params, family)
    method = base_method(params, family)
    out = Path(base / cfg.out_dir) if family == "vl" else Path(cfg.out_dir)
    if not (params.vl.tuned_methods if family == "vl" else params.tuned_models):
        return skip_search(out, log)
    digest = hashlib.sha1(params.model_dump_json().encode()).hexdigest()[:10]
    name = f"tune-{method}-{digest}"
    storage = Path(params.vl.train.storage_dir if family == "vl" else params.train.storage_dir)
    shutil.rmtree(storage / name, ignore_errors=True)  # an interrupted search starts over (trials are short)
    uri = tracking.resolve_uri(params.tracking.uri, base)
    experiment = tracking.experiment_id(uri, params.tracking.experiment)  # created on the store: local artifacts
    t0 = time.perf_counter()
    with tracking.concurrent_writers(uri, base / "mlartifacts") as server_uri:
        c = tracking.client(server_uri)
        dataset = params.vl.tune_task if family == "vl" else params.dataset_name
        stage = "vl-tune" if family == "vl" else f"tune@{dataset}"
        parent = c.create_run(experiment, run_name=f"tune-{method}@{dataset}",
                              tags={"method": method, "dataset": dataset, "tune": "asha", "family": family,
                                    **tracking.source_tags(stage, base)})
        parent_id = parent.info.run_id
        tracking.log_params(c, parent_id, {
            **{f"tune.{k}": str(v) for k, v in cfg.model_dump(mode="json").items() if k not in ("space", "base")},
            **{f"tune.space.{k}": d.model_dump_json(exclude_none=True) for k, d in cfg.space.items()},
            "tune.base.method": method})
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, base=params.model_dump(mode="json"), tracking_uri=server_uri,
                                 parent_run=parent_id, experiment=experiment, family=family),
            {"CPU": cfg.trial_cpus})
        tuner = tune.Tuner(
            trainable,
            param_space=search_space(cfg.space),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode="max", num_samples=cfg.num_samples,
                # the generator limits concurrency itself (TuneConfig.max_concurrent_trials is ignored with it)
                search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=cfg.max_concurrent),
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=10_000, grace_period=cfg.grace_period,
                                        reduction_factor=cfg.reduction_factor)),
            run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1),
        )
        log(f"[tune] {cfg.num_samples} trials of {method} (ASHA, {cfg.max_concurrent} at a time), objective {METRIC} "
            f"({'l-inf' if family == 'vl' else 'l2'}-PGD eps {cfg.eps:.4g} on the validation split); MLflow parent "
            f"run {parent_id}")
        grid = tuner.fit()
        rows = trial_rows(grid, c, parent_id, list(cfg.space))
        ok = [r for r in rows if r[METRIC] is not None]
        if not ok:
            errors = "; ".join(f"{r['trial_id']}: {r['error']}" for r in rows)
            c.set_terminated(parent_id, "FAILED")
            raise RuntimeError(f"tune: no trial reported {METRIC} ({errors})")
        best = max(ok, key=lambda r: (r[METRIC], r["epochs"], -rows.index(r)))
        best_values = {k: best[k] for k in cfg.space}
        summary = {"best_trial": best["trial_id"], METRIC: best[METRIC], "best": best_values,
                   "trials": len(rows), "completed": sum(r["status"] == "completed" for r in rows),
                   "stopped_early": sum(r["status"] == "stopped" for r in rows),
                   "failed": sum(r["status"] == "failed" for r in rows), "mlflow_parent_run": parent_id,
                   "tracking_uri": uri, "wall_seconds": round(time.perf_counter() - t0, 1)}
        out.mkdir(parents=True, exist_ok=True)
        with atomic_file(out / "best_params.yaml") as fh:
            fh.write(f"# best of {len(rows)} ASHA trials of {method} by {METRIC} "
                     f"(trial {best['trial_id']}); written by pipelines/tune.py\n")
            yaml.safe_dump(nest(best_values), fh, sort_keys=True)
        write_csv(out / "trials.csv", rows, ["trial_id", "status", "epochs", "epochs_total", METRIC, "val_acc",
                                              *cfg.space, "mlflow_run", "error"])
        write_json(out / "summary.json", summary)
        tracking.log_params(c, parent_id, {f"best.{k}": str(v) for k, v in best_values.items()})
        tracking.log_metrics(c, parent_id, {f"best_{METRIC}": best[METRIC], "trials_completed": summary["completed"],
                                            "trials_stopped_early": summary["stopped_early"]})
        for f in ("best_params.yaml", "trials.csv", "summary.json"):
            c.log_artifact(parent_id, str(out / f))
        c.set_terminated(parent_id)
    shutil.rmtree(storage / name, ignore_errors=True)  # finished: results are in out_dir and MLflow
    log(f"[tune] best {METRIC} {best[METRIC]:.3f} with {best_values} ({summary['completed']} completed, "
        f"{summary['stopped_early']} stopped by ASHA, {summary['failed']} failed; {summary['wall_seconds']:.0f} s) "
        f"-> {out / 'best_params.yaml'}; MLflow parent run {parent_id} at {uri}")
    return summary


def skip_search(out: Path, log=print) -> dict:
    """No `tuned_models` (vl.tuned_methods) consume a search: write empty outputs (the DVC outs exist) without
    starting trials."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "best_params.yaml") as fh:
        fh.write("# no tuned_models are configured: the search was skipped (pipelines/tune.py)\n{}\n")
    write_csv(out / "trials.csv", [], ["trial_id", "status", "epochs", "epochs_total", METRIC, "val_acc"])
    summary = {"skipped": True, "trials": 0}
    write_json(out / "summary.json", summary)
    log(f"[tune] nothing consumes a search (tuned_models / vl.tuned_methods empty): skipped; wrote empty outputs "
        f"in {out}")
    return summary


def trial_rows(grid, c, parent_id: str, keys: list[str]) -> list[dict]:
    """One row per trial; child runs of trials that ASHA stopped (or that failed) are closed as KILLED/FAILED."""
    children = {r.data.tags.get("tune_trial"): r for r in
                c.search_runs([c.get_run(parent_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")}
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or Path(result.path).name
        epochs, total = m.get("training_iteration", 0), m.get("epochs_total")
        status = "failed" if result.error else ("completed" if total and epochs >= total else "stopped")
        child = children.get(trial_id)
        if child is not None and child.info.status == "RUNNING":
            c.set_tag(child.info.run_id, "tune_status", status)
            c.set_terminated(child.info.run_id, "FAILED" if status == "failed" else "KILLED")
        rows.append({"trial_id": trial_id, "status": status, "epochs": epochs, "epochs_total": total,
                     METRIC: m.get(METRIC), "val_acc": m.get("val_acc"),
                     **{k: result.config.get(k) for k in keys},
                     "mlflow_run": child.info.run_id if child is not None else "",
                     "error": str(result.error).splitlines()[0][:300] if result.error else ""})
    return sorted(rows, key=lambda r: r["trial_id"])


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--family", choices=("av", "vl"), default="av", help="vl: the vision-language family (vl.tune)")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params) if args.family == "vl" else cli.load(args)
    except ConfigError as err:
        return cli.fail("tune", err)
    with ray_session():
        tune_method(params, Path.cwd(), family=args.family)
    return 0


if __name__ == "__main__":
    sys.exit(main())
