"""mmrobust: reproducible multimodal adversarial-robustness pipeline (CRMT and baselines)."""
__version__ = "0.1.0"
