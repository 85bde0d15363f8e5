"""Training throughput under Ray Train for the default config: samples/s per method with 1 and 2 workers, the
share of step time spent waiting for data (target < 10%), and Ray start-up overhead per training stage.

    .venv/bin/python bench/train.py [--epochs 3] [--methods jt crmt_jt]

Needs the default features (`make reproduce`, or `dvc repro extract-frames@visual extract-audio@audio`).
Each configuration is one `pipelines.train.train_method` call, as a DVC train stage makes it, on one local Ray
cluster started here; overhead = wall time − time spent in epochs (training + validation).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mmrobust import checkpoint  # noqa: E402
from mmrobust.config import load_params  # noqa: E402
from mmrobust.ray_utils import ray_session  # noqa: E402
from pipelines.train import train_method  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["jt", "crmt_jt"])
    ap.add_argument("--loader-workers", type=int, nargs="+", default=None,
                    help="DataLoader worker processes per trainer to compare (default: train.loader_workers)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--dataset", default=None, help="a `datasets` id (default: the only one configured)")
    args = ap.parse_args()
    base = load_params(args.params).for_dataset(args.dataset)
    if not (ROOT / base.extract.out_dir / "visual" / "index.csv").exists():
        raise SystemExit("no extracted features: run `make reproduce` (or the extract stages) first")
    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows = []
    with ray_session(log=lambda *_: None):
        for method, loaders, workers in [(m, lw, w) for m in args.methods
                                     for lw in (args.loader_workers or [base.train.loader_workers]) for w in (1, 2)]:
            params = base.model_copy(deep=True)
            params.train.loader_workers = loaders
            params.train.epochs = args.epochs
            params.train.num_workers = workers
            params.train.cpus_per_worker = 1.0 if workers == 1 else 0.5
            params.train.storage_dir = str(out / "ray")
            params.tracking.uri = f"sqlite:///{out / 'mlflow.db'}"
            if method.startswith("crmt"):
                params.crmt.step2_epochs = 1
            t0 = time.perf_counter()
            run_dir = out / f"{method}-{workers}-{loaders}"
            train_method(params, method, run_dir, ROOT, log=lambda *_: None)
            wall = time.perf_counter() - t0
            hist = checkpoint.load(run_dir / "model.pt")["history"]
            train_hist = [h for h in hist if not h["phase"].startswith("step2")]
            in_epochs = sum(h["epoch_seconds"] for h in hist)
            rows.append(dict(method=method, workers=workers, loaders=loaders, wall=wall,
                             sps=statistics.median(h["samples_per_s"] for h in train_hist) * workers,
                             wait=statistics.median(h["data_wait_share"] for h in train_hist),
                             overhead=wall - in_epochs))
            r = rows[-1]
            print(f"{method:8s} {workers} worker(s), {loaders} loader worker(s): {r['sps']:7.1f} samples/s (all workers), data wait "
                  f"{100 * r['wait']:4.1f}% of step time, wall {wall:5.1f} s, Ray/stage overhead "
                  f"{r['overhead']:5.1f} s", flush=True)
    for method, loaders in sorted({(r["method"], r["loaders"]) for r in rows}):
        one, two = (next(r for r in rows if (r["method"], r["loaders"], r["workers"]) == (method, loaders, w))
                    for w in (1, 2))
        print(f"{method} ({loaders} loader workers): 2 workers / 1 worker throughput = {two['sps'] / one['sps']:.2f}x "
              f"on {torch.get_num_threads()}-thread CPUs")
    print(f"max data-wait share {100 * max(r['wait'] for r in rows):.1f}% (target < 10%)")


if __name__ == "__main__":
    main()
