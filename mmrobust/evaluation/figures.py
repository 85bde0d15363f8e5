"""Analysis figures of the evaluation stage: η-ratio heat maps (paper Figs. 3/8) and t-SNE (Fig. 7)."""
from __future__ import annotations

from pathlib import Path

from mmrobust.analysis.representation import plot_tsne, tsne_embeddings
from mmrobust.analysis.vulnerability import eta_ratio, plot_eta_ratio, vulnerability_indicators
from mmrobust.checkpoint import MODEL_FILE, load_trained
from mmrobust.config import Params
from mmrobust.evaluation.measure import test_loader


def ratio_pair(modalities: list[str]) -> tuple[str, str]:
    """(numerator, denominator) of the η ratio: visual over audio as in the paper, else the first two."""
    if "visual" in modalities and "audio" in modalities:
        return "visual", "audio"
    return modalities[1], modalities[0]


def analysis_figures(params: Params, ids: list[str], models_dir: str | Path, out: Path, log=print) -> list[Path]:
    cfg = params.evaluate
    written: list[Path] = []
    for mid in [m for m in ids if m in cfg.eta_models or m in cfg.tsne_models]:
        predictor, p, ckpt = load_trained(Path(models_dir) / mid / MODEL_FILE)
        model = predictor.model
        if p.train.model.fusion != "late":
            log(f"[evaluate] {mid}: η and t-SNE need a late-fusion model; skipped")
            continue
        if mid in cfg.eta_models:
            etas = vulnerability_indicators(model, test_loader(p, ckpt["modalities"], cfg), ckpt["num_classes"])
            num, den = ratio_pair(ckpt["modalities"])
            written.append(plot_eta_ratio(eta_ratio(etas, num, den), out / f"F3_F8_{mid}.png",
                                          f"{mid}: eta {num} / eta {den}"))
        if mid in cfg.tsne_models:
            emb, labels = tsne_embeddings(model, test_loader(p, ckpt["modalities"], cfg), cfg.tsne_samples,
                                          seed=cfg.seed)
            written.append(plot_tsne(emb, labels, out / f"F7_{mid}.png", f"{mid}: uni-modal features (t-SNE)"))
    return written
