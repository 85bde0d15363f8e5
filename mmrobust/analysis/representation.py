"""t-SNE of each modality's uni-modal representation phi_m(x_m) (paper Fig. 7)."""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mmrobust.attacks.evaluate import split_batch
from mmrobust.io import save_png


@torch.no_grad()
def collect_features(model: nn.Module, batches: Iterable, max_samples: int) -> tuple[dict[str, np.ndarray],
                                                                                      np.ndarray]:
    """({m: (N, d_m) features}, (N,) labels) for the first N <= max_samples samples, model in eval mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    feats: dict[str, list[np.ndarray]] = {m: [] for m in model.modalities}
    labels, n = [], 0
    try:
        for batch in batches:
            if n >= max_samples:
                break
            inputs, y = split_batch(batch)
            take = min(len(y), max_samples - n)
            out = model.encode({m: v[:take].to(device) for m, v in inputs.items()})
            for m in model.modalities:
                feats[m].append(out[m].flatten(1).double().cpu().numpy())
            labels.append(np.asarray(y[:take]))
            n += take
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("collect_features: no samples")
    return {m: np.concatenate(f) for m, f in feats.items()}, np.concatenate(labels)


def tsne_embeddings(model: nn.Module, batches: Iterable, max_samples: int = 1000, seed: int = 0,
                    perplexity: float | None = None, **tsne_kwargs) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({m: (N, 2) t-SNE embedding of phi_m}, (N,) labels). The default perplexity min(30, (N - 1) / 3) stays
    below N as sklearn requires (30 is sklearn's default for large N); PCA initialisation and a fixed seed make
    the result deterministic. tsne_kwargs go to sklearn.manifold.TSNE (e.g. max_iter)."""
    from sklearn.manifold import TSNE

    feats, labels = collect_features(model, batches, max_samples)
    N = len(labels)
    if N < 2:
        raise ValueError(f"t-SNE needs at least 2 samples, got {N}")
    perp = perplexity if perplexity is not None else min(30.0, max(1.0, (N - 1) / 3))
    emb = {m: TSNE(n_components=2, perplexity=perp, init="pca", random_state=seed, **tsne_kwargs).fit_transform(f)
           for m, f in feats.items()}
    return emb, labels


def plot_tsne(embeddings: dict[str, np.ndarray], labels: np.ndarray, path: str | Path,
              title: str | None = None) -> Path:
    """One scatter subplot per modality, points coloured by class; PNG."""
    from matplotlib.figure import Figure

    names = list(embeddings)
    fig = Figure(figsize=(4 * len(names), 4))
    labels = np.asarray(labels)
    cmap = "tab10" if labels.max(initial=0) < 10 else "tab20" if labels.max(initial=0) < 20 else "nipy_spectral"
    for i, m in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        e = np.asarray(embeddings[m])
        ax.scatter(e[:, 0], e[:, 1], c=labels, cmap=cmap, s=6, vmin=0, vmax=max(int(labels.max(initial=0)), 1))
        ax.set_title(m)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_png(fig, path)
