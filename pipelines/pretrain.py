"""Ray Train entrypoint of the pretrain stage: the uni-modal encoders that `pretrained_models` load.

    python -m pipelines.pretrain [--dataset synthetic] [--params params.yaml]

For each modality some model names as `train.model.pretrained.<modality>: pretrain`, trains a uni-modal JT
(the `train` settings, that modality only, `pretrain.epochs`) on the training split with the same Ray Train job
as every model (MLflow run `pretrain_<modality>@<dataset>`; selected on val; its test accuracy is logged like
any model's and used for nothing; the model folder is `<train.storage_dir>/pretrain-<dataset>/`), and writes its
encoder as `<pretrain.out_dir>/<dataset>/<modality>.pt`: the torchvision-format state dict that
`train.model.pretrained` loads. `metrics.json` gives each encoder's uni-modal val accuracy. With no such
model it writes an empty `metrics.json` and trains nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

from mmrobust import checkpoint, cli
from mmrobust.config import ConfigError, ModelEntry, Params
from mmrobust.io import write_json
from mmrobust.ray_utils import ray_session


def uni_modal_params(params: Params, modality: str) -> Params:
    """JT on one modality with the train settings: late fusion, from scratch, `pretrain.epochs`."""
    over = {"train": {"modalities": [modality], "epochs": params.pretrain.epochs,
                      "model": {"fusion": "late", "head": None}}}
    uni = params.for_entry(ModelEntry(method="jt", group="train"), f"pretrain.{modality}", over=over)
    uni.train.model.pretrained = {}  # a merge cannot empty a dict: a user's global weights are not the start here
    return uni


def model_dir(params: Params, modality: str) -> Path:
    """Where the uni-modal model trains: beside the Ray run folders, not in the stage's DVC output (DVC removes
    that before a re-run, which would lose an interrupted run's MLflow run id)."""
    return Path(params.train.storage_dir) / f"pretrain-{params.dataset_name}" / f"pretrain_{modality}"


def pretrain(params: Params, base: Path = Path("."), log=print) -> dict:
    from pipelines.train import train_method

    out = Path(params.pretrain.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for m in params.pretrain_modalities():
        label, folder = f"pretrain_{m}", model_dir(params, m)
        metrics = train_method(uni_modal_params(params, m), "jt", folder, base, model_id=label, log=log,
                               stage=f"pretrain@{params.dataset_name}")
        ckpt = checkpoint.load(folder / checkpoint.MODEL_FILE)
        checkpoint.save(checkpoint.encoder_state(ckpt, m), out / f"{m}.pt")
        results[m] = {"val_acc": metrics.get("best_val_acc", metrics.get("val_acc")),
                      "best_epoch": metrics.get("best_epoch"), "epochs": params.pretrain.epochs}
        log(f"[pretrain] {m} encoder (uni-modal val acc {results[m]['val_acc']:.3f}) -> {out / f'{m}.pt'}")
    write_json(out / "metrics.json", results)
    if not results:
        log("[pretrain] no model loads an encoder of the pretrain stage (pretrained_models): nothing to train")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    args = ap.parse_args(argv)
    try:
        params = cli.load(args)
    except ConfigError as err:
        return cli.fail("pretrain", err)
    if not params.pretrain_modalities():
        pretrain(params)
        return 0
    with ray_session():
        pretrain(params, Path.cwd())
    return 0


if __name__ == "__main__":
    from pipelines.warm_driver import forward  # a warm driver (make reproduce) runs it; else this process

    status = forward("pipelines.pretrain", sys.argv[1:])
    sys.exit(main() if status is None else status)
