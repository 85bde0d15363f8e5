"""Several models evaluated at once: one single-threaded process each, the most costly first."""
from __future__ import annotations

from pathlib import Path

import torch

from mmrobust.checkpoint import MODEL_FILE
from mmrobust.config import EvaluateCfg, Params
from mmrobust.evaluation.certified import smoothing_grid
from mmrobust.evaluation.measure import evaluate_model, model_grid


def _single_threaded() -> None:
    torch.set_num_threads(1)


def evaluate_models(ids: list[str], models_dir: str | Path, cfg: EvaluateCfg, cache_dir: str | Path,
                    dataset: str | None, log=print, costs: dict[str, float] | None = None) -> list[list[dict]]:
    """`evaluate_model` of every id; the rows come back in the order of `ids`. With `cfg.workers` > 1 the models
    are spread over that many processes of one torch thread each (the batches here are small, and two
    single-threaded processes go faster than one process with two threads: bench/evaluate.py), the most costly
    first by `costs` (estimates), so that no long model starts last and runs alone."""
    paths = [Path(models_dir) / mid / MODEL_FILE for mid in ids]
    workers = min(cfg.workers, len(ids))
    if workers <= 1:
        out = []
        for i, (mid, path) in enumerate(zip(ids, paths)):
            log(f"[evaluate] model {i + 1}/{len(ids)}: {mid}")
            out.append(evaluate_model(path, mid, cfg, cache_dir, log=log, dataset=dataset))
        return out
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    log(f"[evaluate] {len(ids)} models, {workers} at a time (one process and one torch thread each)")
    # spawn, not fork: this process has torch's thread pools running already
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_single_threaded) as pool:
        order = sorted(range(len(ids)), key=lambda i: -(costs or {}).get(ids[i], 1.0))  # stable: ties in order
        futures = {pool.submit(evaluate_model, paths[i], ids[i], cfg, cache_dir, dataset=dataset): ids[i]
                   for i in order}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                try:
                    future.result()
                except Exception as err:  # the first failed model stops the stage
                    raise RuntimeError(f"evaluating model {futures[future]} failed: {err}") from err
                log(f"[evaluate] {done}/{len(ids)} models done ({futures[future]})")
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # the models not started yet
            raise
        rows = {mid: f.result() for f, mid in futures.items()}
        return [rows[mid] for mid in ids]


SMOOTHING_FORWARDS_PER_MEASUREMENT = 16  # measured: 432 noisy predictions per sample cost ~26 attack measurements


def evaluation_costs(params: Params, ids: list[str]) -> dict[str, float]:
    """Estimated relative cost of evaluating each model: its number of measurements, plus its randomised-smoothing
    predictions in measurement units, times its method's `predict_cost`."""
    from mmrobust.methods import METHODS

    cfg, out = params.evaluate, {}
    for mid in ids:
        units = len(model_grid(cfg, mid, params.modalities))
        if mid in cfg.smoothing.models:
            settings = len({m for _, m, _ in smoothing_grid(cfg, params.modalities)})
            units += (cfg.smoothing.n0 + cfg.smoothing.n) * settings / SMOOTHING_FORWARDS_PER_MEASUREMENT
        out[mid] = METHODS[params.all_models[mid].method].predict_cost * units
    return out
