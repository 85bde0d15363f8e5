"""Ray Train entrypoint of the vision-language family: pre-train the small CLIP or tune a CLIP with one method
(mmrobust/vl), through the same TorchTrainer, checkpoints, resume and MLflow run as pipelines.train.

    python -m pipelines.train_vl --method clip_pretrain   # the embedded default's CLIP -> vl.pretrain.out_dir
    python -m pipelines.train_vl --method tima            # -> <vl.out_dir>/tima, a save_pretrained CLIP folder
    python -m pipelines.train_vl --method tima --tuned    # with vl-tune's best params -> <vl.out_dir>/tima_tuned
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m pipelines.train_vl --method tecoa

A method without training epochs (zeroshot) is evaluated and saved in this process.
"""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mmrobust import cli, tracking
from mmrobust.config import VL_METHOD_NAMES, ConfigError
from mmrobust.io import write_json
from mmrobust.ray_utils import ray_session
from pipelines.train import _run_file, log_clip_model, open_run, train_method


def out_dir(params, method: str, tuned: bool = False) -> Path:
    if method == "clip_pretrain":
        return Path(params.vl.pretrain.out_dir)
    return Path(params.vl.out_dir) / (f"{method}_tuned" if tuned else method)


def tuned_params(params, method: str):
    """The params of `<method>_tuned`: the `vl` group under vl-tune's best params."""
    from mmrobust.config import deep_merge, parse_params

    if method not in params.vl.tuned_methods:
        raise ConfigError(f"--tuned: {method!r} is not in vl.tuned_methods {params.vl.tuned_methods}")
    raw = params.model_dump(mode="json")
    raw["vl"] = deep_merge(raw["vl"], params.vl.with_best())
    return parse_params(raw, f"{params.vl.tune.best_params_file} over params")


def train_untrained(params, method: str, out: Path, run) -> dict:
    """zeroshot: the starting CLIP itself, its accuracies logged to the method's MLflow run."""
    from mmrobust.vl.run import make_trainer, save_trained, untrained_metrics

    t0 = time.perf_counter()
    trainer = make_trainer(params, method)
    metrics = {**untrained_metrics(trainer), "method": method, "wall_seconds": time.perf_counter() - t0}
    save_trained(trainer.model, out, metrics)
    uri, exp, run_id = run.result()
    c = tracking.client(uri)
    tracking.log_metrics(c, run_id, {k: v for k, v in metrics.items() if isinstance(v, float)})
    c.log_artifacts(run_id, str(out), "clip")
    model_uri = log_clip_model(trainer, uri, run_id, method)
    write_json(out / "mlflow_run.json", {"run_id": run_id, "tracking_uri": uri, "experiment": exp,
                                         "model_uri": model_uri})
    c.set_terminated(run_id)
    _run_file(out).unlink(missing_ok=True)
    print(f"[{method}] test acc {metrics['test_acc']:.3f}; model -> {out}; MLflow run {run_id} at {uri}")
    return metrics


def missing_inputs(params, method: str) -> str | None:
    """What the run would fail on, said before anything starts: its task not ingested, the CLIP not there."""
    from mmrobust.vl.run import clip_dir, task_dir

    task = params.vl.pretrain.task if method == "clip_pretrain" else params.vl.tune_task
    if not (task_dir(params, task) / "classes.json").exists():
        return f"{task_dir(params, task)}: task {task!r} not ingested (run `python -m stages.vl_ingest`)"
    if method != "clip_pretrain" and not (clip_dir(params) / "config.json").exists():
        return (f"{clip_dir(params)}: no CLIP (set vl.clip_dir to a save_pretrained folder, or run "
                f"`python -m pipelines.train_vl --method clip_pretrain`)")
    return None


def skip_pretraining(params, out: Path) -> int:
    """vl.clip_dir names the CLIP every method starts from: nothing to pre-train; the stage's output says so."""
    from mmrobust.io import atomic_dir

    with atomic_dir(out) as tmp:
        (tmp / "README.md").write_text(f"Not pre-trained: vl.clip_dir ({params.vl.clip_dir}) is the CLIP every "
                                       f"vision-language method starts from.\n")
    print(f"[clip_pretrain] skipped: vl.clip_dir = {params.vl.clip_dir}; wrote {out}/README.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, dataset=False, prog="python -m pipelines.train_vl")
    ap.add_argument("--method", required=True, choices=VL_METHOD_NAMES)
    ap.add_argument("--tuned", action="store_true", help="train with vl-tune's best params as <method>_tuned")
    ap.add_argument("--out", help="output folder (default: vl.pretrain.out_dir or <vl.out_dir>/<method>[_tuned])")
    args = ap.parse_args(argv)
    try:
        params = cli.load(args)
        if args.tuned:
            params = tuned_params(params, args.method)
    except ConfigError as err:
        return cli.fail("train_vl", err)
    out = Path(args.out or out_dir(params, args.method, args.tuned))
    if args.method == "clip_pretrain" and params.vl.clip_dir:
        return skip_pretraining(params, out)
    missing = missing_inputs(params, args.method)
    if missing:
        return cli.fail("train_vl", FileNotFoundError(missing))
    label = f"{args.method}_tuned" if args.tuned else args.method
    run = ThreadPoolExecutor(1).submit(open_run, params, args.method, out, Path.cwd(), label, "vl")
    from mmrobust.vl.methods import VL_METHODS

    if not VL_METHODS[args.method](params.vl.train_for(args.method), params.vl).phases():
        train_untrained(params, args.method, out, run)
        return 0
    with ray_session():
        train_method(params, args.method, out, Path.cwd(), model_id=label, run=run, family="vl")
    return 0


if __name__ == "__main__":
    from pipelines.warm_driver import forward

    status = forward("pipelines.train_vl", sys.argv[1:])
    sys.exit(main() if status is None else status)
