"""Evaluation stage throughput: the attack grid of several trained models evaluated one after another in this
process (torch's default threads) vs spread over `--workers` single-threaded processes (`evaluate.workers`).

    .venv/bin/python bench/evaluate.py [--models jt crmt_jt mmat ojt] [--workers 2]

Needs trained default models (`make reproduce`). Both runs start from an empty attack cache and evaluate the same
models with the same grid; the measurements must agree, and the ratio of wall times is printed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmrobust.config import load_params  # noqa: E402
from mmrobust.evaluation import evaluate_models  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["jt", "crmt_jt", "mmat", "ojt"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--dataset", default=None, help="a `datasets` id (default: the only one configured)")
    args = ap.parse_args()
    params = load_params(args.params).for_dataset(args.dataset)
    models_dir = ROOT / params.train.out_dir
    missing = [m for m in args.models if not (models_dir / m / "model.pt").exists()]
    if missing:
        raise SystemExit(f"no trained model for {missing} under {models_dir}: run `make reproduce` first")
    quiet = lambda *_: None  # noqa: E731
    walls, results = {}, {}
    for workers in (1, args.workers):
        cfg = params.evaluate.model_copy(update={"workers": workers})
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            results[workers] = evaluate_models(args.models, models_dir, cfg, cache, params.dataset_id, quiet)
            walls[workers] = time.perf_counter() - t0
        label = (f"1 process, {torch.get_num_threads()} torch threads" if workers == 1
                 else f"{workers} processes, 1 torch thread each")
        print(f"{len(args.models)} models, {label}: {walls[workers]:6.1f} s", flush=True)
    same = all(a["accuracy"] == b["accuracy"] for x, y in zip(results[1], results[args.workers]) for a, b in zip(x, y))
    print(f"speed-up {walls[1] / walls[args.workers]:.2f}x; measurements identical: {same}")


if __name__ == "__main__":
    main()
