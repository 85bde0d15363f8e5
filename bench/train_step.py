"""Training-step speed: the full Trainer step (`Trainer.train_step`: the method's loss under the configured
precision, backward, gradient sync, the method's hooks, the optimiser step) on identical random batches.

    .venv/bin/python bench/train_step.py                  # CPU shapes: CRMT-JT step 1 vs JT (target <= 1.15x)
    .venv/bin/python bench/train_step.py --preset paper   # paper shapes: every speed option vs fp32 NCHW
    .venv/bin/python bench/train_step.py --preset paper --options fp32 cl+bf16 --reps 3 --compile
    .venv/bin/python bench/train_step.py --preset paper --gpu        # use_gpu: true, + peak GPU memory

Presets: `cpu` = the default pipeline's shapes (width 8, 3 frames of 64², 64x200 fbank, batch 32); `paper` = the
paper's (ResNet18 width 64 per modality, 3 frames of 224², 1x128x1024 fbank, 31 classes, batch 16). With
`--preset paper` each option is a `train.speed` setting of the same CRMT step-1 step (the released code's
arithmetic is the fp32 NCHW row: issue #16 measured it at 1.00x the released code); the run also counts the
step's FLOPs (torch's FlopCounterMode) and measures this machine's GEMM and convolution peak in fp32 and bf16, so
"achieved / peak" is in the same run. Timings are medians of interleaved repetitions.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmrobust.config import parse_params  # noqa: E402
from mmrobust.train import Data, Trainer  # noqa: E402

PRESETS = {
    "cpu": dict(width=8, batch=32, size=64, frames=3, mels=64, audio_frames=200, classes=31),
    "paper": dict(width=64, batch=16, size=224, frames=3, mels=128, audio_frames=1024, classes=31),
}
# option -> train.speed
OPTIONS = {
    "fp32": {},
    "cl": {"channels_last": True},
    "bf16": {"precision": "bf16"},
    "cl+bf16": {"channels_last": True, "precision": "bf16"},
    "compile": {"compile": True},
    "cl+bf16+compile": {"channels_last": True, "precision": "bf16", "compile": True},
}


class _NoData:
    """The bench feeds batches itself; the trainer only asks the train split to set its epoch."""
    def set_epoch(self, epoch: int) -> None:
        pass


def batch(shape: dict, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = {"audio": torch.randn(shape["batch"], 1, shape["mels"], shape["audio_frames"], generator=g),
              "visual": torch.randn(shape["batch"], shape["frames"], 3, shape["size"], shape["size"], generator=g)}
    return inputs, torch.randint(0, shape["classes"], (shape["batch"],), generator=g)


def make_step(method: str, shape: dict, speed: dict, inputs, y, use_gpu: bool = False):
    params = parse_params({"train": {"method": method, "lr": 1e-3, "speed": speed, "use_gpu": use_gpu,
                                     "model": {"encoder": "resnet18", "width": shape["width"]}}})
    data = Data(_NoData(), None, None, None, shape["classes"], ["audio", "visual"])
    trainer = Trainer(params, data=data)
    trained = trainer.start_epoch(0)
    inputs, y = {m: v.to(trainer.device) for m, v in inputs.items()}, y.to(trainer.device)

    def step():
        trainer.train_step(inputs, y, trained)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
    return step


def step_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def best(fn, reps: int) -> float:
    """Fastest of `reps` runs: a peak is what the machine can do, not what it did while something else ran."""
    return min(timed(fn, 1) for _ in range(reps))


def machine_peak(dtype: torch.dtype, device: str = "cpu", reps: int = 10) -> dict[str, float]:
    """GFLOP/s of a large GEMM and of a ResNet-like 3x3 convolution (64 -> 64 channels, 56², batch 16, NHWC)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = 2048 if device == "cpu" else 8192
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b), sync()
    gemm = 2 * n ** 3 / best(lambda: (torch.mm(a, b), sync()), reps) / 1e9
    batch = 16 if device == "cpu" else 256
    x = torch.randn(batch, 64, 56, 56, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    F.conv2d(x, w, padding=1), sync()
    conv = 2 * batch * 64 * 56 * 56 * 64 * 9 / best(lambda: (F.conv2d(x, w, padding=1), sync()), reps) / 1e9
    return {"gemm": gemm, "conv": conv}


def compare_methods(shape: dict, reps: int) -> None:
    inputs, y = batch(shape)
    steps = {m: make_step(m, shape, {}, inputs, y) for m in ("jt", "crmt_jt")}
    for fn in steps.values():
        fn(), fn()
    times = {m: [] for m in steps}
    for _ in range(reps):
        for m, fn in steps.items():
            times[m].append(timed(fn, 1))
    med = {m: statistics.median(v) for m, v in times.items()}
    for m, t in med.items():
        print(f"{m:8s} {t * 1000:8.1f} ms/step  {shape['batch'] / t:8.1f} samples/s")
    print(f"CRMT-JT / JT step time: {med['crmt_jt'] / med['jt']:.3f} (target <= 1.15)")


def compare_speed(shape: dict, options: list[str], reps: int, use_gpu: bool = False) -> None:
    inputs, y = batch(shape)
    device = "cuda" if use_gpu else "cpu"
    peaks = {"fp32": machine_peak(torch.float32, device), "bf16": machine_peak(torch.bfloat16, device)}
    for p, v in peaks.items():
        print(f"machine peak {p}: GEMM {v['gemm']:.0f} GFLOP/s, 3x3 conv {v['conv']:.0f} GFLOP/s")
    steps, warm, memory = {}, {}, {}
    for opt in options:
        if use_gpu:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        steps[opt] = make_step("crmt_jt", shape, OPTIONS[opt], inputs, y, use_gpu)
        steps[opt]()  # the first steps pay compilation / kernel selection
        steps[opt]()
        warm[opt] = time.perf_counter() - t0
        if use_gpu:  # this option's step (plus the weights of the options built before it)
            memory[opt] = torch.cuda.max_memory_allocated() / 2**30
    flops = step_flops(steps[options[0]])
    times = {opt: [] for opt in options}
    for _ in range(reps):
        for opt in options:
            times[opt].append(timed(steps[opt], 1))
    med = {opt: statistics.median(v) for opt, v in times.items()}
    base_name = "fp32" if "fp32" in med else options[0]
    base = med[base_name]
    print(f"step: {flops / 1e9:.1f} GFLOP (forward + backward, counted by torch)")
    print(f"{'option':18s} {'s/step':>8s} {'samples/s':>10s} {'GFLOP/s':>8s} {'/peak':>6s} {'speed-up':>9s} {'warm-up s':>9s}")
    for opt in options:
        t, precision = med[opt], "bf16" if "bf16" in opt else "fp32"
        peak = max(peaks[precision].values())
        print(f"{opt:18s} {t:8.3f} {shape['batch'] / t:10.2f} {flops / t / 1e9:8.0f} {flops / t / 1e9 / peak:6.2f} "
              f"{base / t:8.2f}x {warm[opt]:9.1f}")
    if use_gpu:
        print(f"GPU ({torch.cuda.get_device_name()}) peak memory allocated per option: "
              + ", ".join(f"{o} {m:.1f} GiB" for o, m in memory.items()))
    print(f"speed-up: vs {base_name}" + (" (NCHW, the released code's arithmetic)" if base_name == "fp32" else "")
          + "; /peak: vs the faster of GEMM and conv at the option's precision")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--options", nargs="+", choices=list(OPTIONS), default=None,
                    help="speed options to compare (default: all but compile; --preset cpu: JT vs CRMT-JT)")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile options")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gpu", action="store_true", help="train.use_gpu: true (the same Trainer step on CUDA)")
    args = ap.parse_args()
    if args.gpu and not torch.cuda.is_available():
        ap.error("--gpu: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = PRESETS[args.preset]
    print(f"preset {args.preset}: batch {shape['batch']}, ResNet18 width {shape['width']}, {shape['frames']} frames "
          f"of {shape['size']}², 1x{shape['mels']}x{shape['audio_frames']} fbank, {shape['classes']} classes, "
          f"{torch.get_num_threads()} threads")
    if args.preset == "cpu" and args.options is None:
        compare_methods(shape, args.reps or 20)
        return
    options = args.options or [o for o in OPTIONS if "compile" not in o]
    if args.compile:
        options += [o for o in OPTIONS if "compile" in o and o not in options]
    compare_speed(shape, options, args.reps or (20 if args.gpu else 3), args.gpu)


if __name__ == "__main__":
    main()
