"""The vision-language family on the shared rails: a stored task as the `Data` of the one training loop,
`fit_vl(params, method)` (pre-training or tuning a CLIP through `mmrobust.train.Trainer`), saved as a
`save_pretrained` folder that `load_clip` reads back like any user's CLIP."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mmrobust.io import atomic_dir
from mmrobust.train import Data, Trainer, run
from mmrobust.vl.clip import ImageSpec, ZeroShotCLIP, load_clip, prompt_words, save_clip, small_clip, word_tokenizer
from mmrobust.vl.data import ImageSplit, Task, load_task
from mmrobust.vl.methods import build_vl_method

ZERO_SHOT_FILE = "zero_shot.json"  # the prompt and fixed temperature a tuned CLIP was trained with
VAL_EVERY = 10  # every 10th training image (in a seeded order) is held out for model selection


class ImageDataset(Dataset):
    """Items {"visual": (3, H, W) float in [0, 1], "label", "index"}; train time: random horizontal flip, a pure
    function of (seed, epoch, index)."""

    def __init__(self, split: ImageSplit, indices: np.ndarray | None = None, train: bool = False, seed: int = 0):
        self.images, self.labels = split.images, split.labels
        self.indices = np.arange(len(self.labels)) if indices is None else indices
        self.train, self.seed, self.epoch = train, seed, 0

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        img = self.images[j]
        if self.train and np.random.default_rng([self.seed, self.epoch, i]).random() < 0.5:
            img = img[:, ::-1]
        x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)
        return {"visual": x, "label": int(self.labels[j]), "index": i}


def task_data(task: Task, seed: int) -> Data:
    train = task.splits["train"]
    order = np.random.default_rng(seed).permutation(len(train.labels))
    val_idx = np.sort(order[::VAL_EVERY])
    train_idx = np.setdiff1d(np.arange(len(train.labels)), val_idx)
    return Data(ImageDataset(train, train_idx, train=True, seed=seed), ImageDataset(train, train_idx),
                ImageDataset(train, val_idx), ImageDataset(task.splits["test"]), len(task.classes), ["visual"])


def task_dir(params, name: str) -> Path:
    return Path(params.vl.tasks_dir) / name


def clip_dir(params) -> Path:
    """The CLIP every tuning stage starts from: the user's (`vl.clip_dir`) or the pre-trained small one."""
    return Path(params.vl.clip_dir or params.vl.pretrain.out_dir)


def all_class_texts(params) -> list[str]:
    texts = []
    for name in params.vl.tasks:
        path = task_dir(params, name) / "classes.json"
        if path.exists():
            texts += json.loads(path.read_text())["classes"]
    return texts


def new_small_clip(params):
    """A fresh small CLIP and a word tokenizer over every stored task's class words (the vocabulary knows the
    held-out classes' words; which combinations are seen is decided by the pre-training task alone)."""
    pre = params.vl.pretrain
    tokenizer = word_tokenizer(prompt_words(all_class_texts(params), params.vl.prompt))
    clip = small_clip(len(tokenizer), pre.image_size, pre.patch_size, pre.width, pre.layers, pre.heads,
                      pre.embed_dim, seed=pre.train.seed)
    return clip, tokenizer, ImageSpec(pre.image_size)


def zero_shot_model(params, classes: list[str], path: str | Path | None = None) -> ZeroShotCLIP:
    """The zero-shot classifier of a CLIP folder: with the prompt and fixed temperature it was tuned with (a
    tuned model's own, e.g. vl-tune's logit_scale), else vl.prompt / vl.logit_scale."""
    path = Path(path or clip_dir(params))
    clip, tokenizer, image = load_clip(path)
    own = json.loads((path / ZERO_SHOT_FILE).read_text()) if (path / ZERO_SHOT_FILE).exists() else {}
    return ZeroShotCLIP(clip, tokenizer, image, classes, own.get("prompt", params.vl.prompt),
                        own.get("logit_scale", params.vl.logit_scale))


def make_trainer(params, method: str, device=None) -> Trainer:
    """The one training loop on a CLIP: `clip_pretrain` starts a fresh small CLIP on vl.pretrain.task, every
    other method the CLIP of `clip_dir(params)` on vl.tune_task, with the method's training settings."""
    vl = params.vl
    pretraining = method == "clip_pretrain"
    cfg = vl.train_for(method)
    task = load_task(task_dir(params, vl.pretrain.task if pretraining else vl.tune_task))

    def build(data):
        if pretraining:
            clip, tokenizer, image = new_small_clip(params)
            model = ZeroShotCLIP(clip, tokenizer, image, task.classes, vl.prompt, None)
        else:
            clip, tokenizer, image = load_clip(clip_dir(params))
            model = ZeroShotCLIP(clip, tokenizer, image, task.classes, vl.prompt, vl.logit_scale)
        m = build_vl_method(method, cfg, vl)
        m.prepare(model)
        return model, m

    trainer = Trainer(params, data=task_data(task, cfg.seed), cfg=cfg, build=build, device=device)
    trainer.task = task.name
    return trainer


def untrained_metrics(trainer: Trainer) -> dict:
    """What a method without training epochs (zero-shot CLIP) reports."""
    trainer.model.eval()
    return {"val_acc": trainer.evaluate("val")["acc"], "test_acc": trainer.evaluate("test")["acc"]}


def save_trained(model: ZeroShotCLIP, out_dir: str | Path, metrics: dict) -> Path:
    """The tuned CLIP as a `save_pretrained` folder (what `load_clip` and a user's tools read) plus metrics.json,
    written atomically."""
    with atomic_dir(out_dir) as tmp:
        save_clip(model.clip, model.tokenizer, model.image, tmp)
        (tmp / ZERO_SHOT_FILE).write_text(json.dumps({"prompt": model.prompt, "logit_scale": model.fixed_scale}))
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return Path(out_dir)


def fit_vl(params, method: str, out_dir: str | Path, log=print, device=None) -> dict:
    """Pre-train (`clip_pretrain`) or tune a CLIP with `method` in this process; writes `out_dir`."""
    start = time.perf_counter()
    trainer = make_trainer(params, method, device)
    if trainer.epochs:
        last = run(trainer, log=log)
        metrics = {"val_acc": last["best_val_acc"], "best_epoch": last["best_epoch"], "test_acc": last["test_acc"]}
    else:
        metrics = untrained_metrics(trainer)
    metrics.update(method=method, task=trainer.task, seconds=time.perf_counter() - start, epochs=trainer.epochs)
    save_trained(trainer.model.cpu(), out_dir, metrics)
    log(f"[{method}] {trainer.task}: val acc {metrics['val_acc']:.3f}, test acc {metrics['test_acc']:.3f}; "
        f"saved {out_dir}")
    return metrics
