"""Attacks and perturbations for evaluation (SPEC §4): registry, l2 FGM/PGD/MEA, missing/MGN/MPM, accuracy.

`specs` (what each attack declares to the evaluation) imports no torch, so params validate without it; the
implementations load on first use of a name below (PEP 562).
"""
from importlib import import_module

_WHERE = {
    **dict.fromkeys(["attack_mode", "logits_of"], "core"),
    **dict.fromkeys(["ATTACKS", "run_attack"], "registry"),
    **dict.fromkeys(["fgm", "joint_embedding", "mea", "perturbation_norms", "pgd"], "gradient"),
    **dict.fromkeys(["mgn", "missing", "mpm"], "corruptions"),
    **dict.fromkeys(["apgd", "apgd_ce", "apgd_dlr"], "library"),
    **dict.fromkeys(["accuracy_under_attack", "accuracy_under_attacks", "evaluate_attacks", "split_batch"], "evaluate"),
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
