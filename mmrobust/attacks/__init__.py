"""Attacks and perturbations for evaluation (SPEC §4): registry, l2 FGM/PGD/MEA, missing/MGN/MPM, accuracy."""
from .core import ATTACKS, attack_mode, logits_of, register_attack, run_attack
from .gradient import fgm, joint_embedding, mea, perturbation_norms, pgd
from .corruptions import mgn, missing, mpm
from .evaluate import accuracy_under_attack, accuracy_under_attacks, evaluate_attacks, split_batch

__all__ = ["ATTACKS", "accuracy_under_attack", "accuracy_under_attacks", "attack_mode", "evaluate_attacks", "fgm",
           "joint_embedding", "logits_of", "mea", "mgn", "missing", "mpm", "perturbation_norms", "pgd",
           "register_attack", "run_attack", "split_batch"]
