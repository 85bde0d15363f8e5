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


def evaluate_all(params, models_dir: dict[str, str], log=print) -> dict:
    """{method: {task: evaluate_task(...)}} for every method's CLIP folder on the tuning task and every zero-shot
    task."""
    from mmrobust.vl.data import load_task
    from mmrobust.vl.run import task_dir, zero_shot_model

    vl = params.vl
    tasks = {n: load_task(task_dir(params, n)) for n in [vl.tune_task, *vl.zero_shot_tasks]}
    results, start = {}, time.perf_counter()
    for i, (method, folder) in enumerate(models_dir.items()):
        t0 = time.perf_counter()
        log(f"[vl-evaluate] {method} ({i + 1}/{len(models_dir)})")
        model = zero_shot_model(params, tasks[vl.tune_task].classes, folder)
        results[method] = {n: evaluate_task(model, t, vl.evaluate, log) for n, t in tasks.items()}
        took, done = time.perf_counter() - t0, time.perf_counter() - start
        rate = sum(r["n"] for r in results[method].values()) / took
        eta = done / (i + 1) * (len(models_dir) - i - 1)
        log(f"[vl-evaluate] {method}: {took:.0f} s ({rate:.0f} images/s through {len(attack_grid(vl.evaluate))} "
            f"attacks; ETA {eta:.0f} s)")
    return results


def zero_shot_table(results: dict, params) -> str:
    """TIMA's layout: methods × tasks, clean and worst-case robust accuracy at each eps, the average over the
    zero-shot tasks; the tuning task is marked (it is not zero-shot)."""
    vl = params.vl
    tasks = [vl.tune_task, *vl.zero_shot_tasks]
    grid = attack_grid(vl.evaluate)
    blocks = [("clean", "**clean accuracy**")]
    for e in vl.evaluate.eps:
        cols = ", ".join(c for c, eps, _ in grid if eps == e)
        blocks.append((f"worst@{eps_label(e)}", f"**robust accuracy, ε = {eps_label(e)}** (per-sample worst case "
                                                f"over {cols})"))
    head = [f"{vl.tune_task} (tuned)", *vl.zero_shot_tasks, "zero-shot avg"]
    lines = []
    for key, title in blocks:
        lines += [title, "", "| method | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        for method, per in results.items():
            vals = [per[t][key] for t in tasks]
            zs = [per[t][key] for t in vl.zero_shot_tasks]
            avg = sum(zs) / len(zs) if zs else float("nan")
            lines.append(f"| {method} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {avg:.3f} |")
        lines.append("")
    lines += ["**inter-class distance** (mean pairwise distance of normalised class centres, zero-shot tasks "
              "averaged)", "", "| method | text | image |", "|---|---|---|"]
    for method, per in results.items():
        zs = vl.zero_shot_tasks or [vl.tune_task]
        t = sum(per[n]["text_distance"] for n in zs) / len(zs)
        i = sum(per[n]["image_distance"] for n in zs) / len(zs)
        lines.append(f"| {method} | {t:.3f} | {i:.3f} |")
    return "\n".join(lines) + "\n"


def run_evaluation(params, log=print) -> dict:
    """The stage: every method of vl.methods, the table and results.json (atomically), MLflow logging."""
    import json
    from pathlib import Path

    from mmrobust import tracking
    from mmrobust.io import atomic_dir

    vl = params.vl
    folders = {m: str(Path(vl.out_dir) / m) for m in vl.evaluated}
    missing = [f for f in folders.values() if not (Path(f) / "config.json").exists()]
    if missing:
        raise FileNotFoundError(f"vl-evaluate: no trained CLIP in {missing}; run `python -m pipelines.train_vl`")
    t0 = time.perf_counter()
    results = evaluate_all(params, folders, log)
    out = Path(vl.evaluate.out_dir)
    table = zero_shot_table(results, params)
    with atomic_dir(out) as tmp:
        (tmp / "zero_shot.md").write_text("# Zero-shot adversarial robustness (vision-language family)\n\n" + table)
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
    for method, folder in folders.items():
        found = tracking.trained_run(folder, params.tracking.uri)
        if found is None:
            continue
        info, uri = found
        c = tracking.client(uri)
        flat = {f"zs_{task}_{k.replace('@', '_at_').replace('/', '_')}": v for task, r in results[method].items()
                for k, v in r.items() if isinstance(v, float)}
        tracking.log_metrics(c, info["run_id"], flat)
        c.log_artifact(info["run_id"], str(out / "zero_shot.md"), "evaluation")
    log(table)
    log(f"[vl-evaluate] {len(folders)} methods in {time.perf_counter() - t0:.0f} s; table -> {out / 'zero_shot.md'}")
    return results
