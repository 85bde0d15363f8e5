"""Table CA's rows: certified accuracy from the sound certificate (encoder Lipschitz upper bounds) and from
randomised smoothing (Monte-Carlo, per test batch, so that an interrupted evaluation resumes)."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from mmrobust.analysis.certify import certified_accuracy, certified_radii, model_lipschitz_bounds
from mmrobust.analysis.smoothing import certify, smoothed_correct
from mmrobust.config import EvaluateCfg, Params
from mmrobust.methods import Method, Predictor


def certified_rows(predictor: Predictor, params: Params, ckpt: dict, loader: DataLoader, radii_grid: list[float],
                   base: dict, log=print) -> list[dict]:
    """CA(r) on {0} + radii_grid as tidy rows with attack "certified"; late-fusion models whose prediction is
    the fused logits only."""
    model = predictor.model
    if params.train.model.fusion != "late" or type(predictor.method).predict is not Method.predict:
        log(f"[{base['model']}] certified accuracy needs late fusion and a plain prediction; skipped")
        return []
    first = next(iter(loader))
    lips = model_lipschitz_bounds(model, {m: tuple(first[m].shape[1:]) for m in ckpt["modalities"]})
    radii = certified_radii(model, loader, lips)
    grid = [0.0, *radii_grid]
    rows = [dict(base, attack="certified", modality="all", eps=r, accuracy=ca)
            for r, ca in zip(grid, certified_accuracy(radii, grid))]
    log(f"[{base['model']}] certified radius: median {float(radii.median()):.3g}, max {float(radii.max()):.3g} "
        f"(encoder Lipschitz bounds {', '.join(f'{m} {v:.3g}' for m, v in lips.items())})")
    return rows


def smoothing_grid(cfg: EvaluateCfg, modalities: list[str]) -> list[tuple[str, str, float]]:
    """(label, noised modality or "all", radius) of every randomised-smoothing measurement: the joint certificate
    on {0, joint_eps} + joint_grid, per modality on {0, uni_eps} + uni_grid (the radii of the PGD columns beside
    them)."""
    joint = sorted({0.0, cfg.joint_eps, *cfg.joint_grid})
    uni = sorted({0.0, cfg.uni_eps, *cfg.uni_grid})
    out = [(f"smoothed:all:{r:g}", "all", r) for r in joint]
    if cfg.smoothing.per_modality and len(modalities) > 1:
        out += [(f"smoothed:{m}:{r:g}", m, r) for m in modalities for r in uni]
    return out


def smoothed_masks(predictor: Predictor, inputs: dict, y: torch.Tensor, cfg: EvaluateCfg, modalities: list[str],
                   generator: torch.Generator) -> dict[str, torch.Tensor]:
    """{label: (B,) bool} certified-correct under randomised smoothing for one batch (see smoothing_grid)."""
    sc, grid = cfg.smoothing, smoothing_grid(cfg, modalities)
    out = {}
    for noised in dict.fromkeys(m for _, m, _ in grid):
        pred, radius = certify(predictor, inputs, modalities if noised == "all" else [noised], sc.sigma, sc.n0,
                               sc.n, sc.alpha, sc.batch_size, generator)
        correct = smoothed_correct(pred, radius, y, [r for _, m, r in grid if m == noised])
        out.update({label: correct[r] for label, m, r in grid if m == noised})
    return out
