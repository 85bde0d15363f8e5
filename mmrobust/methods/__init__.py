"""Training methods: a registry of named objectives (see base.py for the interface)."""
from .base import (METHODS, Ctx, Method, MethodParams, Phase, Predictor, build_method, cross_entropy, params_models,
                   register_method)
from . import crmt  # noqa: F401  (importing registers the built-in methods)
from . import baselines  # noqa: F401
from . import robust_fusion  # noqa: F401

__all__ = ["METHODS", "Ctx", "Method", "MethodParams", "Phase", "Predictor", "build_method", "cross_entropy", "params_models",
           "register_method"]
