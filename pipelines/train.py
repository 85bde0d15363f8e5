"""Ray Train entrypoint: train one method with `TorchTrainer` (DDP-style data parallelism over
`train.num_workers` workers, CPU or GPU by `train.use_gpu`), a checkpoint each epoch, resume after worker
failures and after an interrupted run, MLflow logging from rank 0.

    python -m pipelines.train --model crmt_jt [--dataset synthetic] [--params params.yaml]
    python -m pipelines.train --method jt            # train.* params as they are, no `models` entry
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m pipelines.train --model jt

`--model ID` trains the `models.ID` entry of params.yaml (its method, group and overrides) on dataset
`--dataset` (an id of `datasets`; default: the only one); `--plan FILE` reads the method group from the plan
stage's file (what the DVC stage declares). Writes `<out>/model.pt` (selected model + config + metrics),
`<out>/metrics.json` and `<out>/mlflow_run.json`; default out: <train.out_dir>/<dataset>/<model>.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mmrobust.config import ConfigError, Params, load_params, parse_params
from mmrobust.io import atomic_file, write_json
from mmrobust.plan import apply_plan
from mmrobust.ray_utils import ray_session
from mmrobust import tracking

CKPT = "checkpoint.pt"


def absolute_paths(params: Params, base: Path) -> Params:
    """Workers may run in another directory: make every data path absolute before shipping params."""
    p = params.model_copy(deep=True)
    p.data.out_dir = str((base / p.data.out_dir).resolve())
    p.extract.out_dir = str((base / p.extract.out_dir).resolve())
    p.train.storage_dir = str((base / p.train.storage_dir).resolve())
    p.tune.out_dir = str((base / p.tune.out_dir).resolve())
    p.train.model.pretrained = {m: str((base / f).resolve()) for m, f in p.train.model.pretrained.items()}
    return p


def _quiet_reports() -> None:
    """Ray Train logs every `report` (metrics and checkpoint path) at INFO under a logger named after its source
    file, which LoggingConfig does not reach; our own epoch line says the same in one line."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # another Ray layout: keep its logging as it is
        pass


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker; torch.distributed is already initialised when num_workers > 1."""
    import ray.train
    import torch

    from mmrobust.train import Trainer

    _quiet_reports()
    params = parse_params(config["params"], "train_loop_config")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # importing MLflow and opening its store takes seconds: done beside model building and the first epoch
    mlflow = (ThreadPoolExecutor(1).submit(tracking.client, config["tracking_uri"])
              if rank == 0 and config.get("run_id") else None)
    trainer = Trainer(params, config["method"])
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = trainer.load_state_dict(torch.load(Path(d) / CKPT, weights_only=False))
        print(f"[{config['method']}] rank {rank}: resumed from epoch {start}", flush=True)
    objective = config.get("objective")  # {eps, steps, step_ratio}: report val_pgd_acc each epoch (tuning)
    fail_at = config.get("fail_at_epoch")
    marker = Path(config["fault_marker"]) if config.get("fault_marker") else None
    t0 = time.perf_counter()
    for epoch in range(start, trainer.epochs):
        if fail_at is not None and epoch == fail_at and rank == ctx.get_world_size() - 1 and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()  # once per run, whichever checkpoint the restarted group resumes from
            print(f"fault injection: worker rank {rank} exits at epoch {epoch}", flush=True)
            os._exit(1)
        metrics = trainer.run_epoch(epoch)
        final = epoch == trainer.epochs - 1
        if final:
            trainer.model.load_state_dict(trainer.final_model().state_dict())
            if not objective:  # a tuning trial never looks at the test split
                metrics.update({f"test_{k}": v for k, v in trainer.evaluate("test").items()})
            metrics["best_epoch"] = trainer.best["epoch"] if trainer.best else epoch
        if objective and rank == 0:
            metrics["val_pgd_acc"] = trainer.robust_accuracy("val", **objective)
        metrics["epochs_total"] = trainer.epochs
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if mlflow is not None:
            tracking.log_metrics(mlflow.result(), config["run_id"], numeric, step=epoch)
        eta = (time.perf_counter() - t0) / (epoch + 1 - start) * (trainer.epochs - epoch - 1)
        if rank == 0:
            print(f"[{trainer.method.name}] epoch {epoch + 1}/{trainer.epochs} ({metrics['phase']}) "
                  f"loss {metrics.get('train_loss', float('nan')):.4f} val acc {metrics['val_acc']:.3f} "
                  + (f" val pgd acc {metrics['val_pgd_acc']:.3f}" if objective else "")
                  + f" ({metrics['samples_per_s']:.0f} samples/s, ETA {eta:.0f} s)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                torch.save(trainer.state_dict(epoch), Path(tmp) / CKPT)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(numeric, checkpoint=checkpoint)


def run_name(method: str, params: Params) -> str:
    """Stable for the same method and params, so relaunching an interrupted run resumes it."""
    import hashlib

    digest = hashlib.sha1(params.model_dump_json().encode()).hexdigest()[:10]
    return f"{method}-{digest}"


def torch_trainer(params: Params, name: str, loop_config: dict, storage_dir: str | None = None,
                  callbacks: list | None = None):
    """The TorchTrainer of one run: ScalingConfig and failure handling from `params.train` (only params differ
    between this machine and a GPU cluster)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = params.train
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"params": params.model_dump(mode="json"), **loop_config},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_dir or cfg.storage_dir,
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                                       callbacks=callbacks or None,
                                       # per-report INFO lines would drown the epoch progress lines
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )


def open_run(params: Params, method: str, out_dir: str | Path, base: Path = Path("."),
             model_id: str | None = None) -> tuple[str, str, str]:
    """The MLflow run of this training: (tracking uri, experiment id, run id). A run interrupted as a whole is
    resumed under the same run id (its id waits in a file beside the output folder until the run finishes)."""
    params = absolute_paths(params, base)
    uri = tracking.resolve_uri(params.tracking.uri, base)
    c = tracking.client(uri)
    exp = tracking.experiment_id(uri, params.tracking.experiment)
    run_file = _run_file(Path(out_dir))
    if run_file.exists():
        return uri, exp, json.loads(run_file.read_text())["run_id"]
    label, cfg = model_id or method, params.train
    run = c.create_run(exp, run_name=f"{label}@{params.dataset_name}",
                       tags={"method": method, "model_id": label, "dataset": params.dataset_name,
                             "model": f"{cfg.model.encoder}-w{cfg.model.width}", "ray_run": run_name(method, params)})
    tracking.log_params(c, run.info.run_id, tracking.flatten(params.model_dump(mode="json")))
    with atomic_file(run_file) as fh:
        json.dump({"run_id": run.info.run_id}, fh)
    return uri, exp, run.info.run_id


def _run_file(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.mlflow_run.json"  # survives an interrupted stage


def train_method(params: Params, method: str, out_dir: str | Path, base: Path = Path("."),
                 fail_at_epoch: int | None = None, model_id: str | None = None, log=print,
                 run: Future | None = None) -> dict:
    """Train one model with Ray Train; `run`: `open_run`'s result when the caller started it already (the
    stage CLI opens the MLflow run while it connects to Ray)."""
    import shutil

    import torch

    uri, exp, run_id = run.result() if run is not None else open_run(params, method, out_dir, base, model_id)
    params = absolute_paths(params, base)
    cfg = params.train
    name = run_name(method, params)
    c = tracking.client(uri)
    out_dir = Path(out_dir)
    trainer = torch_trainer(params, name, {"method": method, "run_id": run_id, "tracking_uri": uri,
                                           "fail_at_epoch": fail_at_epoch,
                                           "fault_marker": str(Path(cfg.storage_dir) / name / ".fault_injected")})
    t0 = time.perf_counter()
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CKPT, weights_only=False)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update(method=method, wall_seconds=time.perf_counter() - t0, num_workers=cfg.num_workers)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_state = state["best"]["model"] if state.get("best") else state["model"]
    with atomic_file(out_dir / "model.pt", "wb") as fh:
        torch.save({**state, "model": model_state, "metrics": metrics, "mlflow_run_id": run_id}, fh)
    write_json(out_dir / "metrics.json", metrics)
    write_json(out_dir / "mlflow_run.json", {"run_id": run_id, "tracking_uri": uri, "experiment": exp})
    c.log_artifact(run_id, str(out_dir / "metrics.json"))
    c.log_artifact(run_id, str(out_dir / "model.pt"), "checkpoint")
    c.set_terminated(run_id)
    _run_file(out_dir).unlink(missing_ok=True)
    shutil.rmtree(Path(cfg.storage_dir) / name, ignore_errors=True)  # finished: the next run starts fresh
    log(f"[{model_id or method}] test acc {metrics.get('test_acc', float('nan')):.3f}; model -> {out_dir / 'model.pt'}; "
        f"MLflow run {run_id} at {uri}")
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", help="an entry of `models` in params.yaml")
    which.add_argument("--method", help="a registered method (default: train.method)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dataset", help="an id of `datasets` (default: the only one)")
    ap.add_argument("--plan", help="the model's method-params file from the plan stage (plan/<model>.yaml)")
    ap.add_argument("--out", help="output folder (default: <train.out_dir>/<dataset>/<model or method>)")
    ap.add_argument("--fail-at-epoch", type=int, help="fault injection: the last worker exits at this epoch once")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params).for_dataset(args.dataset)
        if args.plan:
            if not args.model:
                raise ConfigError("--plan needs --model")
            params = apply_plan(params, args.model, args.plan)
        if args.model:
            params = params.for_model(args.model)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    method = args.method or params.train.method
    out = Path(args.out or Path(params.train.out_dir) / (args.model or method))
    run = ThreadPoolExecutor(1).submit(open_run, params, method, out, Path.cwd(), args.model or method)
    with ray_session():
        train_method(params, method, out, Path.cwd(), args.fail_at_epoch, model_id=args.model or method, run=run)
    return 0


if __name__ == "__main__":
    from pipelines.warm_driver import forward  # a warm driver (make reproduce) runs it; else this process

    status = forward("pipelines.train", sys.argv[1:])
    sys.exit(main() if status is None else status)
