"""Table CA's rows: certified accuracy from the sound certificate (encoder Lipschitz upper bounds)."""
from __future__ import annotations

from torch.utils.data import DataLoader

from mmrobust.analysis.certify import certified_accuracy, certified_radii, model_lipschitz_bounds
from mmrobust.config import Params
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
