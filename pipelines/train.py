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

import json
import os
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mmrobust import cli
from mmrobust.config import ConfigError, Params, parse_params
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
    p.pretrain.out_dir = str((base / p.pretrain.out_dir).resolve())
    p.train.model.pretrained = {m: str((base / f).resolve()) for m, f in p.train.model.pretrained.items()}
    p.vl.tasks_dir = str((base / p.vl.tasks_dir).resolve())
    for cfg in (p.vl.train, p.vl.pretrain.train):
        cfg.storage_dir = str((base / cfg.storage_dir).resolve())
    p.vl.pretrain.out_dir = str((base / p.vl.pretrain.out_dir).resolve())
    if p.vl.clip_dir:
        p.vl.clip_dir = str((base / p.vl.clip_dir).resolve())
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
    """Runs on every Ray Train worker (torch.distributed is initialised when num_workers > 1): resumes from
    Ray's checkpoint, then `mmrobust.train.run` with a reporter that checkpoints and calls `ray.train.report`."""
    import ray.train

    from mmrobust import checkpoint
    from mmrobust.train import Trainer, run

    _quiet_reports()
    params = parse_params(config["params"], "train_loop_config")
    rank = ray.train.get_context().get_world_rank()
    # importing MLflow and opening its store takes seconds: done beside model building and the first epoch
    mlflow = (ThreadPoolExecutor(1).submit(tracking.client, config["tracking_uri"])
              if rank == 0 and config.get("run_id") else None)
    if config.get("family") == "vl":
        from mmrobust.vl.run import make_trainer
        trainer = make_trainer(params, config["method"])
    else:
        trainer = Trainer(params, config["method"])
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = trainer.load_state_dict(checkpoint.load(Path(d) / CKPT))
        print(f"[{config['method']}] rank {rank}: resumed from epoch {start}", flush=True)
    run(trainer, start, ray_reporter(config, mlflow), objective=config.get("objective"),
        log=lambda line: print(line, flush=True))


def ray_reporter(config: dict, mlflow: Future | None):
    """`report(epoch, metrics, trainer)` for `run`: MLflow metrics from rank 0, the training state as a Ray
    checkpoint, `ray.train.report`; and the fault injection of the tests (`fail_at_epoch`)."""
    import ray.train

    from mmrobust import checkpoint

    fail_at = config.get("fail_at_epoch")
    marker = Path(config["fault_marker"]) if config.get("fault_marker") else None

    def report(epoch: int, metrics: dict, trainer) -> None:
        numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if mlflow is not None:
            tracking.log_metrics(mlflow.result(), config["run_id"], numeric, step=epoch)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if trainer.rank == 0:
                checkpoint.save(trainer.state_dict(epoch), Path(tmp) / CKPT)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(numeric, checkpoint=ckpt)
        if (fail_at is not None and epoch + 1 == fail_at and trainer.rank == trainer.world_size - 1
                and not marker.exists()):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()  # once per run, whichever checkpoint the restarted group resumes from
            print(f"fault injection: worker rank {trainer.rank} exits at epoch {fail_at}", flush=True)
            os._exit(1)

    return report


def run_name(method: str, params: Params) -> str:
    """Stable for the same method and params, so relaunching an interrupted run resumes it."""
    import hashlib

    digest = hashlib.sha1(params.model_dump_json().encode()).hexdigest()[:10]
    return f"{method}-{digest}"


def torch_trainer(params: Params, name: str, loop_config: dict, storage_dir: str | None = None,
                  callbacks: list | None = None, cfg=None):
    """The TorchTrainer of one run: ScalingConfig and failure handling from `cfg` (default `params.train`; only
    params differ between this machine and a GPU cluster)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = cfg or params.train
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
             model_id: str | None = None, family: str = "av", stage: str | None = None) -> tuple[str, str, str]:
    """The MLflow run of this training: (tracking uri, experiment id, run id). A run interrupted as a whole is
    resumed under the same run id (its id waits in a file beside the output folder until the run finishes).
    `stage`: the DVC stage it runs in when not the model's own train stage."""
    params = absolute_paths(params, base)
    uri = tracking.resolve_uri(params.tracking.uri, base)
    c = tracking.client(uri)
    exp = tracking.experiment_id(uri, params.tracking.experiment)
    run_file = _run_file(Path(out_dir))
    if run_file.exists():
        return uri, exp, json.loads(run_file.read_text())["run_id"]
    label, cfg = model_id or method, params.train
    if family == "vl":
        task = params.vl.pretrain.task if method == "clip_pretrain" else params.vl.tune_task
        tags = {"family": "vl", "method": method, "model_id": label, "dataset": task,
                "model": "clip:" + (params.vl.clip_dir or "small")}
        stage = ("vl-pretrain" if method == "clip_pretrain" else
                 f"vl-train-tuned@{method}" if label != method else f"vl-train@{method}")
        folder = Path(params.vl.tasks_dir) / task
        data_files = [folder / "classes.json"]
        rows = sum(json.loads(data_files[0].read_text())["counts"].values()) if data_files[0].exists() else None
    else:
        tags = {"family": "av", "method": method, "model_id": label, "dataset": params.dataset_name,
                "model": f"{cfg.model.encoder}-w{cfg.model.width}"}
        group = ("train-tuned" if label in params.tuned_models else
                 "train-pretrained" if label in params.pretrained_models else "train")
        stage = stage or f"{group}@{params.dataset_name}-{label}"
        folder = Path(params.data.out_dir)
        data_files = [folder / "clips.csv"]
        rows = len(data_files[0].read_text().splitlines()) - 1 if data_files[0].exists() else None
    run = c.create_run(exp, run_name=f"{label}@{tags['dataset']}",
                       tags={**tags, "ray_run": run_name(method, params), **tracking.source_tags(stage, base)})
    tracking.log_params(c, run.info.run_id, tracking.flatten(params.model_dump(mode="json")))
    if all(f.exists() for f in data_files):
        tracking.log_dataset(c, run.info.run_id, tags["dataset"], folder, data_files, rows)
    with atomic_file(run_file) as fh:
        json.dump({"run_id": run.info.run_id}, fh)
    return uri, exp, run.info.run_id


def _run_file(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.mlflow_run.json"  # survives an interrupted stage


def train_method(params: Params, method: str, out_dir: str | Path, base: Path = Path("."),
                 fail_at_epoch: int | None = None, model_id: str | None = None, log=print,
                 run: Future | None = None, family: str = "av", stage: str | None = None) -> dict:
    """Train one model with Ray Train; `run`: `open_run`'s result when the caller started it already (the
    stage CLI opens the MLflow run while it connects to Ray). `family` "vl": a CLIP method of mmrobust.vl
    (vl.train settings), saved as a CLIP folder instead of model.pt."""
    import shutil

    from mmrobust import checkpoint

    uri, exp, run_id = (run.result() if run is not None
                        else open_run(params, method, out_dir, base, model_id, family, stage))
    params = absolute_paths(params, base)
    cfg = params.vl.train_for(method) if family == "vl" else params.train
    name = run_name(method, params)
    c = tracking.client(uri)
    out_dir = Path(out_dir)
    trainer = torch_trainer(params, name, {"method": method, "run_id": run_id, "tracking_uri": uri, "family": family,
                                           "fail_at_epoch": fail_at_epoch,
                                           "fault_marker": str(Path(cfg.storage_dir) / name / ".fault_injected")},
                            cfg=cfg)
    t0 = time.perf_counter()
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        state = checkpoint.load(Path(d) / CKPT)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update(method=method, wall_seconds=time.perf_counter() - t0, num_workers=cfg.num_workers)
    if family == "vl":
        from mmrobust.vl.run import make_trainer, save_trained

        vl_trainer = make_trainer(params, method)
        model = vl_trainer.model
        model.load_state_dict(state["model"])
        save_trained(model, out_dir, metrics)
        c.log_artifacts(run_id, str(out_dir), "clip")
    else:
        checkpoint.save(checkpoint.model_file(state, metrics, mlflow_run_id=run_id), out_dir / checkpoint.MODEL_FILE)
        write_json(out_dir / "metrics.json", metrics)
        c.log_artifact(run_id, str(out_dir / "metrics.json"))
        c.log_artifact(run_id, str(out_dir / "model.pt"), "checkpoint")
    info = {"run_id": run_id, "tracking_uri": uri, "experiment": exp}
    if family == "av":
        info["model_uri"] = log_pytorch_model(params, out_dir / checkpoint.MODEL_FILE, uri, run_id, model_id or method)
    else:
        info["model_uri"] = log_clip_model(vl_trainer, uri, run_id, model_id or method)
    write_json(out_dir / "mlflow_run.json", info)
    c.set_terminated(run_id)
    _run_file(out_dir).unlink(missing_ok=True)
    shutil.rmtree(Path(cfg.storage_dir) / name, ignore_errors=True)  # finished: the next run starts fresh
    log(f"[{model_id or method}] test acc {metrics.get('test_acc', float('nan')):.3f}; model -> {out_dir}; "
        f"MLflow run {run_id} at {uri}")
    return metrics


def log_pytorch_model(params: Params, model_path: Path, uri: str, run_id: str, model_id: str) -> str:
    """The trained model on its run as an MLflow PyTorch model; the input layout from one clip."""
    from mmrobust import checkpoint, mlflow_model
    from mmrobust.train import build_data

    predictor, _, ckpt = checkpoint.load_trained(model_path)
    data = build_data(params, ckpt["modalities"])
    item = next(split for split in (data.test, data.val, data.train_eval) if len(split))[0]
    example = {m: item[m][None] for m in ckpt["modalities"]}
    return mlflow_model.log_model(uri, run_id, predictor, example, ckpt["num_classes"], name=model_id,
                                  tags={"model": model_id, "method": ckpt["method"], "dataset": params.dataset_name})


def log_clip_model(trainer, uri: str, run_id: str, model_id: str) -> str:
    """A trained (or zero-shot) CLIP on its run as an MLflow PyTorch model; the image size from one test image."""
    import copy

    from mmrobust import mlflow_model

    image = trainer.data.test[0]["visual"]
    model = copy.deepcopy(trainer.model).cpu().eval()  # loadable on a host without the GPU it trained on
    return mlflow_model.log_clip(uri, run_id, model, image, model_id,
                                 tags={"model": model_id, "family": "vl", "task": trainer.task})


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", help="an entry of `models` in params.yaml")
    which.add_argument("--method", help="a registered method (default: train.method)")
    ap.add_argument("--plan", help="the model's method-params file from the plan stage (plan/<model>.yaml)")
    ap.add_argument("--out", help="output folder (default: <train.out_dir>/<dataset>/<model or method>)")
    ap.add_argument("--fail-at-epoch", type=int, help="fault injection: the last worker exits at this epoch once")
    args = ap.parse_args(argv)
    try:
        params = cli.load(args)
        if args.plan:
            if not args.model:
                raise ConfigError("--plan needs --model")
            params = apply_plan(params, args.model, args.plan)
        if args.model:
            params = params.for_model(args.model)
    except ConfigError as err:
        return cli.fail("train", err)
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
