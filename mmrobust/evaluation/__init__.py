"""The evaluation stage: measure (one model, resumable), pool (several at once), certified (table CA),
outputs (tables, figures, metrics), figures (η ratio, t-SNE), mlflow_log, stage (`evaluate_all`)."""
from .measure import attack_grid, evaluate_model, model_grid, test_loader
from .outputs import headline_metrics
from .pool import evaluate_models, evaluation_costs
from .stage import evaluate_all

__all__ = ["attack_grid", "evaluate_all", "evaluate_model", "evaluate_models", "evaluation_costs",
           "headline_metrics", "model_grid", "test_loader"]
