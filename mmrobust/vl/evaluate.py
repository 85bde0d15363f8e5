"""Zero-shot robustness of tuned CLIPs: clean and robust accuracy per task (the tuning task and every zero-shot
task) under l∞ PGD (each `steps` setting) and APGD-CE at each eps, the per-sample worst case over the attacks
of one eps, and the inter-class distance of text and image embeddings."""
from __future__ import annotations

import time

import numpy as np
import torch

from mmrobust.vl.attacks import apgd_linf, pgd_ce
from mmrobust.vl.data import Task
from mmrobust.vl.losses import inter_class_distance


def eps_label(eps: float) -> str:
    """1/255 -> '1/255' (budgets are read in 255ths)."""
    k = eps * 255
    return f"{k:g}/255" if abs(k - round(k, 3)) < 1e-6 else f"{eps:g}"


def attack_grid(ev) -> list[tuple[str, float, dict]]:
    """(column, eps, attack) for every attack of the evaluation: pgd<steps> and apgd at each eps."""
    grid = []
    for eps in ev.eps:
        for steps in ev.steps:
            grid.append((f"pgd{steps}@{eps_label(eps)}", eps, {"kind": "pgd", "steps": steps}))
        if ev.apgd:
            grid.append((f"apgd@{eps_label(eps)}", eps, {"kind": "apgd", "steps": ev.apgd_steps}))
    return grid


def _images(split, limit, seed):
    """The test images, or `limit` of them drawn at random (seeded; stored splits are ordered by class)."""
    idx = np.arange(len(split.labels))
    if limit is not None and limit < len(idx):
        idx = np.sort(np.random.default_rng(seed).choice(len(idx), limit, replace=False))
    x = torch.from_numpy(np.ascontiguousarray(split.images[idx].transpose(0, 3, 1, 2))).float().div_(255.0)
    return x, torch.from_numpy(split.labels[idx])


@torch.no_grad()
def _predict(model, x, bs):
    return torch.cat([model(x[i:i + bs]).argmax(1) for i in range(0, len(x), bs)])


def evaluate_task(model, task: Task, ev, log=print) -> dict:
    """One tuned model on one task's test split: {"clean": acc, column: acc, "worst@eps": acc, distances}."""
    model.set_classes(task.classes)
    model.eval()
    x, y = _images(task.splits["test"], ev.max_samples, ev.seed)
    bs = ev.batch_size
    correct = {"clean": (_predict(model, x, bs) == y)}
    start = time.perf_counter()
    for col, eps, a in attack_grid(ev):
        hits = []
        for i in range(0, len(x), bs):
            xb, yb = x[i:i + bs], y[i:i + bs]
            seed = ev.seed + i
            if a["kind"] == "pgd":
                adv = pgd_ce(model, xb, yb, eps, a["steps"], random_start=True, seed=seed)
            else:
                adv = apgd_linf(model, xb, yb, eps, a["steps"], seed=seed)
            if float((adv - xb).abs().max()) > eps + 1e-6:
                raise RuntimeError(f"{col}: perturbation outside the l∞ ball")
            hits.append(_predict(model, adv, bs) == yb)
        correct[col] = torch.cat(hits)
    out = {k: float(v.float().mean()) for k, v in correct.items()}
    for eps in ev.eps:  # a sample counts as robust only if every attack at this eps failed on it (RobustBench)
        cols = [c for c, e, _ in attack_grid(ev) if e == eps]
        out[f"worst@{eps_label(eps)}"] = float(torch.stack([correct[c] for c in cols]).all(0).float().mean())
    with torch.no_grad():
        out["text_distance"] = inter_class_distance(model.class_text())
        emb = torch.cat([model.image_embeds(x[i:i + bs]) for i in range(0, len(x), bs)])
        out["image_distance"] = inter_class_distance(emb, y)
    out["n"] = len(y)
    log(f"  {task.name}: clean {out['clean']:.3f} " + " ".join(
        f"{k} {v:.3f}" for k, v in out.items() if k.startswith("worst")) + f" ({time.perf_counter() - start:.0f} s)")
    return out
