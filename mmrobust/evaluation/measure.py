"""One trained model under every configured attack: tidy result rows, resumable per batch.

`evaluate_model(path, cfg, ...)` rebuilds `models/<id>/model.pt` (mmrobust.checkpoint), takes its measurements
from the attack declarations (`attack_grid`) and appends one line per test batch to `<cache_dir>/<id>.jsonl`
({batch, n, counts: {label: correct}}), so an interrupted evaluation restarts at the first batch it had not
finished. Rows are `dataset, method, model, attack, modality, eps, accuracy, n` (modality `all` for joint
attacks and clean).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset

from mmrobust import speed
from mmrobust.attacks.evaluate import correct_under_attacks
from mmrobust.attacks.specs import ADAPTIVE, Measurement, Radii, grid, worst_case
from mmrobust.checkpoint import load_trained
from mmrobust.config import EvaluateCfg, Params
from mmrobust.data.dataset import AVDataset
from mmrobust.evaluation.certified import certified_rows, smoothed_masks, smoothing_grid
from mmrobust.progress import progress


def attack_grid(cfg: EvaluateCfg, modalities: list[str], joint_curve: bool = True,
                uni_curve: bool = True) -> list[Measurement]:
    """Every measurement of the paper's tables and figures (SPEC §6) that the configured attacks declare,
    deduplicated. The radius grids (joint: T11/F5, uni-modal: F1/F4) are added only when asked for."""
    joint = {cfg.joint_eps, *(cfg.joint_grid if joint_curve else [])}
    uni = {cfg.uni_eps, *(cfg.uni_grid if uni_curve else [])}
    return grid(cfg.attacks, Radii(tuple(sorted(joint)), tuple(sorted(uni)), cfg.joint_eps, cfg.uni_eps,
                                   tuple(modalities)))


def model_grid(cfg: EvaluateCfg, model_id: str, modalities: list[str]) -> list[Measurement]:
    """The grid of one model: the radius grids only for the models of the curve figures and tables, the
    strength report only for its models."""
    specs = attack_grid(cfg, modalities, model_id in cfg.joint_grid_models, model_id in cfg.uni_grid_models)
    strength = cfg.attacks.get("strength")
    if strength is not None and strength.models is not None and model_id not in strength.models:
        specs = [s for s in specs if s.spec != "strength"]
    return specs


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


def _open_cache(cache: Path, fingerprint: dict) -> dict[int, dict]:
    """The batches already done for exactly this model, grid and test set (else the cache starts over)."""
    cache.parent.mkdir(parents=True, exist_ok=True)
    meta = cache.with_suffix(".meta.json")
    if not meta.exists() or json.loads(meta.read_text()) != fingerprint:
        cache.unlink(missing_ok=True)
        meta.write_text(json.dumps(fingerprint))
    return _read_cache(cache)


def evaluate_model(path: str | Path, model_id: str, cfg: EvaluateCfg, cache_dir: str | Path,
                   log=print, stop_after: int | None = None, dataset: str | None = None) -> list[dict]:
    """All attack measurements of one trained model as tidy rows (resumable through the cache)."""
    predictor, params, ckpt = load_trained(path)
    predictor.requires_grad_(False)  # the attacks differentiate the inputs only
    if cfg.channels_last:  # evaluation runs on CPU (see autocast below)
        speed.to_channels_last(predictor, torch.device("cpu"), weight_grads=False)
    specs = model_grid(cfg, model_id, ckpt["modalities"])
    if not predictor.method.has_adaptive:  # an adaptive attack on a plain prediction repeats the plain one
        specs = [s for s in specs if s.attack not in ADAPTIVE]
    worst = worst_case(specs)
    smoothing = smoothing_grid(cfg, ckpt["modalities"]) if model_id in cfg.smoothing.models else []
    loader = test_loader(params, ckpt["modalities"], cfg)
    cache = Path(cache_dir) / f"{model_id}.jsonl"
    labels = [s.label for s in [*specs, *worst]] + [label for label, _, _ in smoothing]
    done = _open_cache(cache, {"labels": labels, "model_mtime": os.path.getmtime(path),
                               "evaluate": cfg.model_dump(mode="json", exclude={"workers"}),
                               "test_clips": len(loader.dataset)})
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
            with speed.autocast(torch.device("cpu"), cfg.precision):
                masks = correct_under_attacks(predictor, inputs, y, [(s.label, s.function, s.kwargs()) for s in specs])
            for w, summarised in worst.items():
                masks[w.label] = torch.stack([masks[k] for k in summarised]).all(0)
            if smoothing:
                masks.update(smoothed_masks(predictor, inputs, y, cfg, ckpt["modalities"],
                                            torch.Generator().manual_seed(cfg.seed + i)))
            rec = {"batch": i, "n": len(y), "counts": {k: int(v.sum()) for k, v in masks.items()}}
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            done[i] = rec
    if len(done) < len(loader):
        return []
    n = sum(r["n"] for r in done.values())
    specs = [*specs, *worst]
    correct = {k: sum(r["counts"][k] for r in done.values()) for k in ["clean", *labels]}
    base = dict(dataset=dataset or params.data.dataset, method=ckpt["method"], model=model_id, n=n)
    rows = [dict(base, attack="clean", modality="all", eps=0.0, accuracy=correct["clean"] / n)]
    rows += [dict(base, attack=s.attack, modality=s.modality, eps=s.eps, accuracy=correct[s.label] / n)
             for s in specs]
    rows += [dict(base, attack="smoothed", modality=m, eps=r, accuracy=correct[label] / n) for label, m, r in smoothing]
    if model_id in cfg.certify_models:
        rows += certified_rows(predictor, params, ckpt, loader, cfg.joint_grid, base, log)
    log(f"[{model_id}] {len(specs) - len(worst)} attacks x {n} samples in {time.perf_counter() - t0:.1f} s")
    return rows
