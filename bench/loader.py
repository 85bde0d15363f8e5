"""Paper-scale data loading: samples/s of the training loader (AVDataset, train transform: 3 random frames per
clip, random resized crop, flip, resize back to 224², normalise; 128x1024 fbank) per loader worker, and how many
cores a training step of a given rate needs for its data wait to stay under 10%.

    .venv/bin/python bench/loader.py [--clips 256] [--workers 0 1 2] [--step-rate 3.1 1500]

The store is written here in the extract stage's format (uint8 frames of 10 x 224 x 224 x 3 per clip and a
float16 fbank, `mmrobust.data.extract.row_shape` of the paper preset), filled with random values: loading cost
does not depend on content. `--step-rate`: training samples/s to size the loader for (default: this machine's
paper-scale step from bench/train_step.py, and a GPU's).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmrobust.config import ExtractCfg  # noqa: E402
from mmrobust.data.dataset import AVDataset  # noqa: E402
from mmrobust.data.extract import row_shape  # noqa: E402
from mmrobust.io import write_csv  # noqa: E402

PAPER = ExtractCfg(timing={"fps": 1.0, "max_frames": 10}, visual={"size": 224}, audio={"preset": "audioset_fbank"})


def write_store(root: Path, clips: int) -> None:
    rng = np.random.default_rng(0)
    for m in ("visual", "audio"):
        shape, dtype = row_shape(m, PAPER)
        (root / m).mkdir(parents=True)
        data = np.lib.format.open_memmap(root / m / "data.npy", mode="w+", dtype=dtype, shape=(clips, *shape))
        for i in range(clips):
            data[i] = (rng.integers(0, 256, shape, dtype=np.uint8) if dtype == np.uint8
                       else rng.standard_normal(shape).astype(dtype))
        data.flush()
        rows = [dict(clip_id=f"c{i}", row=i, split="train", label=i % 31, n_frames=shape[0] if m == "visual" else 0)
                for i in range(clips)]
        write_csv(root / m / "index.csv", rows, ["clip_id", "row", "split", "label", "n_frames"])


def rate(root: Path, workers: int, batch: int, batches: int) -> float:
    ds = AVDataset(root, "train", ["audio", "visual"], train=True, num_segments=3, seed=0)
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                        persistent_workers=False, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # worker start-up and the first batch are not the steady rate
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        b = next(it)
        n += len(b["label"])
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--step-rate", type=float, nargs="+", default=None,
                    help="training samples/s to size the loader for")
    args = ap.parse_args()
    if args.clips < (args.batches + 1) * args.batch:
        ap.error(f"--clips must be >= (batches + 1) x batch = {(args.batches + 1) * args.batch}")
    torch.set_num_threads(1)  # a loader worker is one core
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_store(root, args.clips)
        print(f"paper-scale store: {args.clips} clips, visual {row_shape('visual', PAPER)[0]} uint8, audio "
              f"{row_shape('audio', PAPER)[0]} float16; batch {args.batch}")
        rates = {w: rate(root, w, args.batch, args.batches) for w in args.workers}
    for w, r in rates.items():
        cores = max(w, 1)
        print(f"loader_workers {w}: {r:7.1f} samples/s  ({r / cores:6.1f} per core)")
    per_core = max(r / max(w, 1) for w, r in rates.items())
    for step in args.step_rate or []:
        # prefetching workers hide loading when they produce >= the step's rate; 10% wait = 0.9 of it suffices
        # on average, a margin for jitter is left to the user
        print(f"a step at {step:.1f} samples/s needs {step / per_core:.1f} loader cores "
              f"(synchronous loading, loader_workers 0, would wait {step / (step + per_core):.0%} of the time)")


if __name__ == "__main__":
    main()
