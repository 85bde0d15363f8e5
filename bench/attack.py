"""Overhead of our l2-PGD over the model's own cost: PGD with k steps vs k forward+backward passes.

    .venv/bin/python bench/attack.py [--batch 32] [--reps 3] [--width 8]

A small ResNet-ish late-fusion model (per modality: conv stem + 2 residual blocks, the first with stride 2;
BatchNorm, ReLU, average pooling), batch 32, visual 3 frames of 3x32x32, audio 1x64x100. Baseline: k passes
of forward + backward to the inputs (what one attack step fundamentally costs), with the model in eval mode and
its parameters frozen, as during the attack. Both are timed in the same run, in interleaved pairs; `ratio` is
the median over repetitions of the per-pair ratio (the medians of the times are printed too). Target: ratio <= 1.2.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmrobust.attacks import attack_mode, logits_of, run_attack  # noqa: E402


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.c2, self.b2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.skip = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                     if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.skip(x))


def encoder(c_in: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         Block(width, 2 * width, 2), Block(2 * width, 2 * width, 1), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten())


class Fusion(nn.Module):
    def __init__(self, width: int, num_classes: int = 10):
        super().__init__()
        self.enc = nn.ModuleDict({"visual": encoder(3, width), "audio": encoder(1, width)})
        self.head = nn.Linear(4 * width, num_classes)

    def encode(self, inputs):
        v = inputs["visual"]
        fv = self.enc["visual"](v.flatten(0, 1)).view(len(v), v.shape[1], -1).mean(1)
        return {"visual": fv, "audio": self.enc["audio"](inputs["audio"])}

    def forward(self, inputs):
        return self.head(torch.cat(list(self.encode(inputs).values()), 1))


class Trivial(nn.Module):
    """Almost free model: what PGD costs beyond the model (normalise, step, project, clamp)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, num_classes))

    def forward(self, inputs):
        pooled = torch.stack([inputs["visual"].flatten(1).mean(1), inputs["audio"].flatten(1).mean(1)], 1)
        return pooled @ self.w


def forward_backward(model, inputs, y, k: int) -> None:
    with attack_mode(model):
        for _ in range(k):
            leaves = {m: v.detach().requires_grad_(True) for m, v in inputs.items()}
            loss = F.cross_entropy(logits_of(model, leaves), y, reduction="sum")
            torch.autograd.grad(loss, list(leaves.values()))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--width", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = Fusion(args.width).eval()
    b = args.batch
    inputs = {"visual": torch.randn(b, 3, 3, 32, 32), "audio": torch.randn(b, 1, 64, 100)}
    y = torch.randint(0, 10, (b,))
    print(f"threads={torch.get_num_threads()} batch={b} width={args.width} reps={args.reps} (median seconds)")
    print(f"{'k':>3} {'pgd':>9} {'k x fwd+bwd':>12} {'ratio':>7} {'ratio of minima':>16}")
    for k in (4, 10):
        run_attack("pgd", model, inputs, y, steps=1)  # warm-up
        forward_backward(model, inputs, y, 1)
        t_pgd, t_ref = [], []
        for rep in range(args.reps):  # interleaved pairs, order alternating: load drifts hit both alike
            pair = [(t_pgd, lambda: run_attack("pgd", model, inputs, y, eps=0.5, steps=k)),
                    (t_ref, lambda: forward_backward(model, inputs, y, k))]
            for times, fn in pair[::1 if rep % 2 == 0 else -1]:
                times.append(timed(fn))
        ratio = statistics.median(p / r for p, r in zip(t_pgd, t_ref))
        print(f"{k:>3} {statistics.median(t_pgd):>9.3f} {statistics.median(t_ref):>12.3f} {ratio:>7.3f} "
              f"{min(t_pgd) / min(t_ref):>16.3f}  {'ok' if ratio <= 1.2 else 'ABOVE TARGET 1.2'}")
    trivial, k = Trivial(), 10
    t_att = statistics.median(timed(lambda: run_attack("pgd", trivial, inputs, y, steps=k)) for _ in range(args.reps))
    t_fb = statistics.median(timed(lambda: forward_backward(trivial, inputs, y, k)) for _ in range(args.reps))
    one = statistics.median(timed(lambda: forward_backward(model, inputs, y, 1)) for _ in range(args.reps))
    extra = (t_att - t_fb) / k
    # less sensitive to a loaded machine than the end-to-end ratio: both terms are short and measured alone
    print(f"attack-side work per step (PGD on a near-free model): {extra * 1e3:.1f} ms vs {one * 1e3:.1f} ms "
          f"for one forward+backward of the model above -> expected ratio {1 + extra / one:.3f}")


if __name__ == "__main__":
    main()
