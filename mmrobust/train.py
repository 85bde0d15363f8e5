"""The one training loop: `Trainer` (model, method, optimiser, data; one epoch at a time) and `run(trainer, start,
report)`, the epoch loop that plain `fit(params)` and every Ray Train worker (pipelines/train.py) go through.

Data parallelism (when torch.distributed is initialised, e.g. by Ray Train's TorchTrainer) shards the train
split with a DistributedSampler and all-reduces gradients after each backward pass (DDP semantics). The sync is
done here rather than by the DDP wrapper so that methods can freeze parts of the model between phases (CRMT
step 2) and read or rescale gradients (OGM-GE) on the plain module.

Model selection: the checkpoint kept as `best` is the epoch of the final phase with the highest validation
accuracy (the validation split is carved from train; the test split is never used for selection). A phase with
`start="best"` (CRMT step 2) begins from the best validation epoch of the phase before it.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from mmrobust import checkpoint, speed
from mmrobust.config import Params
from mmrobust.data.dataset import AVDataset
from mmrobust.io import read_csv
from mmrobust.methods import Ctx, Phase


@dataclass
class Data:
    train: AVDataset          # augmented, random frame per segment
    train_eval: AVDataset     # same clips, test-time transform (for estimates such as τ)
    val: AVDataset
    test: AVDataset
    num_classes: int
    modalities: list[str]


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_data(params: Params, modalities: list[str] | None = None) -> Data:
    cfg = params.train
    modalities = modalities or params.modalities
    feats = Path(params.extract.out_dir)
    classes = read_csv(Path(params.data.out_dir) / "classes.csv")
    kw = dict(modalities=modalities, num_segments=cfg.num_segments, input_size=cfg.input_size, seed=cfg.seed)
    data = Data(AVDataset(feats, "train", train=True, crop_min_scale=cfg.crop_min_scale, **kw),
                AVDataset(feats, "train", **kw), AVDataset(feats, "val", **kw), AVDataset(feats, "test", **kw),
                len(classes), list(modalities))
    if len(data.train) == 0:
        raise ValueError(f"{feats}: no training clip has every modality {modalities}")
    return data


def split_batch(batch: dict, modalities: list[str], device) -> tuple[dict, torch.Tensor]:
    return {m: batch[m].to(device, non_blocking=True) for m in modalities}, batch["label"].to(device)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sync_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over data-parallel workers (one flat all-reduce)."""
    rank, size = world()
    if size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's BatchNorm statistics for everyone (DDP's broadcast_buffers, once per epoch)."""
    rank, size = world()
    if size > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


class Trainer:
    """Owns model, method, optimiser and data; `run_epoch(e)` trains one epoch, `state_dict()` checkpoints."""

    def __init__(self, params: Params, method: str | None = None, device: str | torch.device | None = None,
                 data: Data | None = None, cfg=None, build: Callable | None = None):
        """`cfg` (default params.train) and `build` (data -> (model, method), default checkpoint.build) let
        another family of models (mmrobust/vl: CLIP) train through this same loop."""
        self.params, self.cfg = params, cfg or params.train
        self.device = torch.device(device or ("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu"))
        self.rank, self.world_size = world()
        seed_everything(self.cfg.seed)
        self.data = data or build_data(params)
        if build is None:
            self.model, self.method = checkpoint.build(params, method, self.data.num_classes, self.data.modalities,
                                                       pretrained=True)
        else:
            self.model, self.method = build(self.data)
        self.model.to(self.device)
        speed.prepare(self.model, self.cfg.speed, self.device)
        self.scaler = speed.grad_scaler(self.device, self.cfg.speed.precision)
        if self.world_size > 1:  # identical start on every worker
            for t in self.model.state_dict().values():
                dist.broadcast(t, 0)
        self.schedule: list[tuple[Phase, int]] = [(ph, i) for ph in self.method.phases() for i in range(ph.epochs)]
        self.ctx = Ctx(num_classes=self.data.num_classes, train_batches=lambda: self.batches("train_eval"),
                       val_batches=lambda: self.batches("val"))
        self.opt = self.sched = None
        self._opt_phase: str | None = None
        self.best: dict | None = None        # the selected epoch of the final phase (the model a run ends with)
        self.phase_best: dict | None = None  # the best epoch of the phase running (Phase.start "best" reads it)
        self.history: list[dict] = []

    @property
    def epochs(self) -> int:
        return len(self.schedule)

    # ---------------------------------------------------------------- data
    def loader(self, split: str, shuffle: bool = False, epoch: int = 0) -> DataLoader:
        ds = getattr(self.data, split)
        sampler = None
        if self.world_size > 1 and split == "train":
            sampler = DistributedSampler(ds, self.world_size, self.rank, shuffle=shuffle, seed=self.cfg.seed)
            sampler.set_epoch(epoch)
            shuffle = False
        g = torch.Generator().manual_seed(self.cfg.seed + epoch)
        return DataLoader(ds, batch_size=self.cfg.batch_size, shuffle=shuffle, sampler=sampler, generator=g,
                          num_workers=self.cfg.loader_workers, drop_last=False,
                          pin_memory=speed.pin_memory(self.cfg.speed, self.device))

    def batches(self, split: str):
        for batch in self.loader(split):
            yield split_batch(batch, self.data.modalities, self.device)

    # ---------------------------------------------------------------- optimisation
    def _phase_params(self, phase: Phase) -> list[torch.nn.Parameter]:
        params = self.method.parameters(self.model, phase)
        keep = {id(p) for p in params}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in keep)
        return params

    def _start_phase(self, phase: Phase) -> None:
        cfg = self.cfg
        params = self._phase_params(phase)
        lr = phase.lr if phase.lr is not None else cfg.lr
        wd = phase.weight_decay if phase.weight_decay is not None else cfg.weight_decay
        if cfg.optimizer == "sgd":
            mom = phase.momentum if phase.momentum is not None else cfg.momentum
            self.opt = torch.optim.SGD(params, lr=lr, momentum=mom, weight_decay=wd)
        elif cfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        else:
            self.opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
        done = self.schedule_offset(phase)
        self.sched = (torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda e: cfg.lr_gamma ** ((e + done) // cfg.lr_step)) if phase.scheduler else None)
        self._opt_phase = phase.name

    def schedule_offset(self, phase: Phase) -> int:
        """Epochs already trained in earlier phases that share `phase.schedule` (0 without one)."""
        if phase.schedule is None:
            return 0
        first = next(i for i, (ph, _) in enumerate(self.schedule) if ph is phase)
        return sum(1 for ph, _ in self.schedule[:first] if ph.schedule == phase.schedule)

    def train_step(self, inputs: dict, y: torch.Tensor, params: list[torch.nn.Parameter]) -> tuple:
        """One optimisation step of the current phase on one batch: (loss, logs). The gradient scaler is a
        pass-through unless `train.speed.precision` is fp16."""
        ctx = self.ctx
        if self.cfg.noise_sigma > 0:  # Gaussian augmentation (randomised smoothing's base classifier)
            inputs = {m: x + self.cfg.noise_sigma * torch.randn_like(x) for m, x in inputs.items()}
        self.opt.zero_grad(set_to_none=True)
        with speed.autocast(self.device, self.cfg.speed.precision):
            loss, logs = self.method.loss(self.model, inputs, y, ctx)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{self.method.name}: non-finite loss {loss.item()} at epoch {ctx.epoch}")
        self.scaler.scale(loss).backward()
        sync_gradients(params)
        self.scaler.unscale_(self.opt)  # methods read and rescale true gradients (OGM-GE)
        self.method.after_backward(self.model, ctx)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.method.after_step(self.model, ctx)
        return loss, logs

    def start_epoch(self, epoch: int) -> list[torch.nn.Parameter]:
        """Enter `epoch` (its phase's optimiser, the method's epoch hook); returns the parameters it trains."""
        phase, phase_epoch = self.schedule[epoch]
        if phase_epoch == 0 and phase.start == "best" and self.phase_best is not None:
            self.model.load_state_dict(self.phase_best["model"])  # the previous phase's selected epoch
        if self._opt_phase != phase.name:
            self._start_phase(phase)
        ctx = self.ctx
        ctx.epoch, ctx.phase, ctx.phase_epoch = epoch, phase.name, phase_epoch
        self.data.train.set_epoch(epoch)
        self.model.train(phase.train_mode)
        self.method.on_epoch_start(self.model, ctx)
        self.model.train(phase.train_mode)
        return [p for g in self.opt.param_groups for p in g["params"]]

    def run_epoch(self, epoch: int) -> dict:
        phase = self.schedule[epoch][0]
        ctx = self.ctx
        params = self.start_epoch(epoch)
        sums: dict[str, float] = {}
        n_batches, n_samples, start = 0, 0, time.perf_counter()
        data_seconds, waiting_since = 0.0, start
        for i, batch in enumerate(self.loader("train", shuffle=True, epoch=epoch)):
            data_seconds += time.perf_counter() - waiting_since  # time the step waited for its batch
            if self.cfg.max_batches and i >= self.cfg.max_batches:
                break
            inputs, y = split_batch(batch, self.data.modalities, self.device)
            loss, logs = self.train_step(inputs, y, params)
            ctx.step += 1
            n_batches += 1
            n_samples += len(y)
            for k, v in {"loss": loss.detach(), **logs}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            waiting_since = time.perf_counter()
        if self.sched is not None:
            self.sched.step()
        sync_buffers(self.model)
        self.model.train(phase.train_mode)
        self.method.on_epoch_end(self.model, ctx)
        seconds = time.perf_counter() - start
        metrics = {f"train_{k}": v / max(n_batches, 1) for k, v in sums.items()}
        metrics.update(epoch=epoch, phase=phase.name, samples_per_s=n_samples / max(seconds, 1e-9),
                       epoch_seconds=seconds, data_wait_share=data_seconds / max(seconds, 1e-9))
        val = self.evaluate("val") if len(self.data.val) else self.evaluate("train_eval")
        metrics.update({f"val_{k}": v for k, v in val.items()})
        self.history.append(metrics)
        pb = self.phase_best
        if pb is None or pb["phase"] != phase.name or val["acc"] >= pb["val_acc"]:  # ties: the later epoch
            self.phase_best = {"phase": phase.name, "epoch": epoch, "val_acc": val["acc"],
                               "model": copy.deepcopy(self.model.state_dict())}
        if phase is self.schedule[-1][0]:
            self.best = self.phase_best
        return metrics

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, split: str) -> dict:
        """Clean fused accuracy (the method's own prediction) and each modality's uni-modal accuracy."""
        was = self.model.training
        self.model.eval()
        correct, uni, n = 0, {m: 0 for m in self.data.modalities}, 0
        for inputs, y in self.batches(split):
            correct += int((self.method.predict(self.model, inputs).argmax(1) == y).sum())
            out = self.model(inputs) if uni else None
            if out is not None and not hasattr(out, "scores"):  # no per-modality heads (CLIP): no second pass
                uni = {}
            for m in uni:
                uni[m] += int((out.scores[m].argmax(1) == y).sum())
            n += len(y)
        self.model.train(was)
        res = {"acc": correct / max(n, 1), "n": n}
        res.update({f"acc_{m}": c / max(n, 1) for m, c in uni.items()})
        return res

    def robust_accuracy(self, split: str, eps: float, steps: int, step_ratio: float) -> float:
        """Accuracy of the method's own prediction under its family's PGD (the tuning objective, on `val`)."""
        from mmrobust.methods import Predictor

        if split == "val" and not len(self.data.val):
            split = "train_eval"
        was = self.model.training
        predictor = Predictor(self.model, self.method).eval()
        correct, n = self.method.objective_accuracy(predictor, self.batches(split), eps, steps, step_ratio)
        self.model.train(was)
        return correct / max(n, 1)

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self, epoch: int) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict() if self.opt else None,
                "scheduler": self.sched.state_dict() if self.sched else None, "phase": self._opt_phase,
                "scaler": self.scaler.state_dict(),
                "epoch": epoch, "method": self.method.name, "config": self.params.model_dump(mode="json"),
                "method_state": self.ctx.state, "step": self.ctx.step, "best": self.best, "phase_best": self.phase_best,
                "history": self.history,
                "num_classes": self.data.num_classes, "modalities": self.data.modalities}

    def load_state_dict(self, ckpt: dict) -> int:
        """Restore a checkpoint; returns the next epoch to run."""
        self.model.load_state_dict(ckpt["model"])
        epoch = ckpt["epoch"]
        phase, _ = self.schedule[epoch]
        self._start_phase(phase)
        if ckpt["optimizer"] is not None and ckpt["phase"] == phase.name:
            self.opt.load_state_dict(ckpt["optimizer"])
            if self.sched is not None and ckpt["scheduler"] is not None:
                # a StepLR state (checkpoints before the shared schedule) carries the same epoch counter
                lambdas = {"lr_lambdas": [None] * len(self.opt.param_groups)}
                self.sched.load_state_dict({**lambdas, **ckpt["scheduler"]})
        if ckpt.get("scaler"):  # fp16's loss scale (empty when the scaler is off; absent in older checkpoints)
            self.scaler.load_state_dict(ckpt["scaler"])
        self.ctx.state, self.ctx.step = ckpt["method_state"], ckpt["step"]
        self.best, self.history = ckpt["best"], ckpt["history"]
        self.phase_best = ckpt.get("phase_best")  # absent in checkpoints before Phase.start
        return epoch + 1

    def select_final(self) -> None:
        """Put the selected weights in `self.model` (what the last checkpoint and model.pt hold), then let the
        method finish (`on_train_end`)."""
        if self.best is not None:
            self.model.load_state_dict(self.best["model"])
        was = self.model.training
        self.model.eval()
        self.method.on_train_end(self.model, self.ctx)
        self.model.train(was)


Report = Callable[[int, dict, Trainer], None]


def epoch_line(trainer: Trainer, m: dict, eta: float) -> str:
    pgd = f" val pgd acc {m['val_pgd_acc']:.3f}" if "val_pgd_acc" in m else ""
    return (f"[{trainer.method.name}] epoch {m['epoch'] + 1}/{trainer.epochs} ({m['phase']}) "
            f"loss {m.get('train_loss', math.nan):.4f} val acc {m['val_acc']:.3f}{pgd} "
            f"({m['samples_per_s']:.0f} samples/s, ETA {eta:.0f} s)")


def run(trainer: Trainer, start: int = 0, report: Report | None = None, objective: dict | None = None,
        log=print) -> dict:
    """Epochs `start`.. of `trainer`, each reported as `report(epoch, metrics, trainer)` (Ray: a checkpoint and
    `ray.train.report`); after the last one the selected model is in `trainer.model` and its test accuracy in
    the metrics. `objective` ({eps, steps, step_ratio}): a tuning trial, scored each epoch by the method's
    objective attack (`Method.objective_accuracy`: joint l2-PGD, l∞ PGD for CLIP) on the validation split (`val_pgd_acc`), which never looks at the test split. Returns the last
    epoch's metrics."""
    t0, metrics = time.perf_counter(), {}
    for epoch in range(start, trainer.epochs):
        metrics = trainer.run_epoch(epoch)
        if epoch == trainer.epochs - 1:
            trainer.select_final()
            if not objective:
                metrics.update({f"test_{k}": v for k, v in trainer.evaluate("test").items()})
            metrics["best_epoch"] = trainer.best["epoch"] if trainer.best else epoch
            metrics["best_val_acc"] = trainer.best["val_acc"] if trainer.best else metrics["val_acc"]
        if objective and trainer.rank == 0:
            metrics["val_pgd_acc"] = trainer.robust_accuracy("val", **objective)
        metrics["epochs_total"] = trainer.epochs
        if trainer.rank == 0:
            eta = (time.perf_counter() - t0) / (epoch + 1 - start) * (trainer.epochs - epoch - 1)
            log(epoch_line(trainer, metrics, eta))
        if report is not None:
            report(epoch, metrics, trainer)
    return metrics


def fit(params: Params, method: str | None = None, out_dir: str | Path | None = None, log=print) -> dict:
    """Train one method to the end in this process; returns metrics and writes `<out_dir>/model.pt`."""
    start = time.perf_counter()
    trainer = Trainer(params, method)
    last = run(trainer, log=log)
    metrics = {"method": trainer.method.name, "best_epoch": last["best_epoch"], "val_acc": last["best_val_acc"],
               **{k: v for k, v in last.items() if k.startswith("test_")}, "seconds": time.perf_counter() - start}
    if out_dir is not None:
        path = checkpoint.save(checkpoint.model_file(trainer.state_dict(trainer.epochs - 1), metrics),
                               Path(out_dir) / checkpoint.MODEL_FILE)
        log(f"[{trainer.method.name}] saved {path}")
    return metrics
