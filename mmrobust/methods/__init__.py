"""Training methods: a registry of named objectives (see base.py for the interface).

`catalog` (every method's params group and model) imports no torch, so params validate without it; the
registry and the built-in methods load on first use of a name below (PEP 562).
"""
__all__ = ["METHODS", "Ctx", "Method", "MethodParams", "Phase", "Predictor", "build_method", "cross_entropy",
           "params_models", "register_method"]


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # Importing registers the built-in methods, in this order (the registry's).
    from . import crmt  # noqa: F401
    from . import baselines  # noqa: F401
    from . import robust_fusion  # noqa: F401
    from . import base
    return getattr(base, name)
