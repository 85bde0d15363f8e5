"""Training-step throughput: JT vs CRMT-JT step 1 with the same encoders and batch (target: CRMT ≤ 1.15× JT).

    .venv/bin/python bench/train_step.py [--width 8] [--batch 32] [--size 64] [--classes 31] [--reps 20]

Both steps run the full Trainer loss (`Method.loss`), backward and an SGD step on identical random batches;
timings are medians of interleaved repetitions measured in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmrobust.config import parse_params  # noqa: E402
from mmrobust.methods import build_method  # noqa: E402
from mmrobust.models import ModelSpec, build_model  # noqa: E402


def make_step(method_name: str, args, inputs, y):
    params = parse_params({"train": {"method": method_name}})
    method = build_method(params)
    torch.manual_seed(0)
    model = build_model(ModelSpec(num_classes=args.classes, modalities=["audio", "visual"], width=args.width,
                                  head=method.head))
    method.prepare(model)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    phase = method.phases()[0]

    def step():
        from mmrobust.methods import Ctx
        opt.zero_grad(set_to_none=True)
        loss, _ = method.loss(model, inputs, y, Ctx(phase=phase.name, num_classes=args.classes))
        loss.backward()
        opt.step()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=31)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    inputs = {"audio": torch.randn(args.batch, 1, 64, 200, generator=g),
              "visual": torch.randn(args.batch, 3, 3, args.size, args.size, generator=g)}
    y = torch.randint(0, args.classes, (args.batch,), generator=g)
    steps = {name: make_step(name, args, inputs, y) for name in ("jt", "crmt_jt")}
    for fn in steps.values():  # warm-up
        fn()
        fn()
    times = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"batch {args.batch}, width {args.width}, {args.size}x{args.size} frames, {args.classes} classes, "
          f"{torch.get_num_threads()} threads")
    for name, t in med.items():
        print(f"{name:8s} {t * 1000:8.1f} ms/step  {args.batch / t:8.1f} samples/s")
    print(f"CRMT-JT / JT step time: {med['crmt_jt'] / med['jt']:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
