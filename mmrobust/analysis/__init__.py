"""Robustness analysis (SPEC section 5): vulnerability indicator eta, sound certified radius, t-SNE."""
from .certify import (certified_accuracy, certified_radii, certified_radius, model_lipschitz_bounds,
                      pairwise_lipschitz)
from .lipschitz import (LIPSCHITZ_RULES, circulant_embedding_bound, conv_norm_bound, fantastic_four_bound,
                        fold_conv_bn, jacobian_spectral_norm, lipschitz_upper_bound, module_lipschitz,
                        register_lipschitz)
from .representation import collect_features, plot_tsne, tsne_embeddings
from .vulnerability import eta_ratio, plot_eta_ratio, vulnerability_indicators

__all__ = [
    "LIPSCHITZ_RULES", "certified_accuracy", "certified_radii", "certified_radius", "circulant_embedding_bound",
    "collect_features", "conv_norm_bound", "eta_ratio", "fantastic_four_bound", "fold_conv_bn",
    "jacobian_spectral_norm", "lipschitz_upper_bound", "model_lipschitz_bounds", "module_lipschitz",
    "pairwise_lipschitz", "plot_eta_ratio", "plot_tsne", "register_lipschitz", "tsne_embeddings",
    "vulnerability_indicators",
]
