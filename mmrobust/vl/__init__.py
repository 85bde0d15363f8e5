"""Zero-shot adversarial robustness of vision-language models (CLIP): TIMA and its baselines, on the same
rails as the audio-visual family (DVC stages, the one training loop, Ray, MLflow, tables)."""
