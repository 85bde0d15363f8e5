"""What each attack declares to the evaluation (torch-free, so params validate without loading torch): its
title in tables, its kind, its own params (the `evaluate.attacks.<name>` group) and its grid, the measurements it
contributes to a model's evaluation. The implementation is listed under the same name in registry.py; a
test checks that both agree.

Kinds: `robust` attacks are l2-bounded adversaries, measured jointly at every joint radius and per modality at
the uni-modal radii (T1/T2 columns and headline metrics); `missing` removes a modality (T2 columns);
`corruption` attacks have their own sizes (T7 columns). The radii are the evaluation's (`evaluate.joint_eps`,
`uni_eps` and, for the curve models, `joint_grid`/`uni_grid`); an attack's `joint_curve`/`uni_curve` says
whether it is run on those grids.

Adding an attack: one `AttackSpec` here and its function in the attacks package; nothing else changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class AttackParams(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


@dataclass(frozen=True)
class Measurement:
    """One measured perturbation of a model: attack `attack` on `modality` ("all": joint) of size `eps`
    (radius, sigma or masking probability; 0 for missing), called with `params`. A declaration that runs one
    function in several settings (the strength report) names each setting in `attack` and the function in `fn`."""
    attack: str
    modality: str
    eps: float
    params: tuple  # sorted (key, value) pairs passed to the attack function
    fn: str = ""   # the attack function (registry name); "" = attack
    spec: str = ""  # the declaration it comes from; "" = attack

    @property
    def label(self) -> str:  # unique key of a measurement in the evaluation cache
        return f"{self.attack}|{self.modality}|{self.eps:g}"

    @property
    def function(self) -> str:
        return self.fn or self.attack

    @property
    def kind(self) -> str:
        return SPECS[self.spec or self.attack].kind

    def kwargs(self) -> dict:
        return dict(self.params)


def measurement(attack: str, modality: str, size: float, fn: str = "", spec: str = "", **params) -> Measurement:
    return Measurement(attack, modality, float(size), tuple(sorted(params.items())), fn, spec)


@dataclass(frozen=True)
class Radii:
    """The l2 radii the evaluation asks of robust attacks for one model."""
    joint: tuple[float, ...]        # joint_eps, plus joint_grid for the joint-curve models
    uni: tuple[float, ...]          # uni_eps, plus uni_grid for the uni-curve models
    joint_main: float               # joint_eps (T1 and the headline metrics)
    uni_main: float                 # uni_eps (T2)
    modalities: tuple[str, ...]


@dataclass(frozen=True)
class AttackSpec:
    name: str
    title: str
    kind: Literal["robust", "missing", "corruption", "strength"]
    Params: type[AttackParams]
    grid: Callable[[AttackParams, Radii], list[Measurement]]


SPECS: dict[str, AttackSpec] = {}


def declare(name: str, title: str, kind: str, params: type[AttackParams]):
    def deco(grid):
        if name in SPECS:
            raise ValueError(f"attack {name!r} declared twice")
        SPECS[name] = AttackSpec(name, title, kind, params, grid)
        return grid
    return deco


def _radii(r: Radii, curve: bool, uni: bool) -> list[float]:
    if uni:
        return sorted(set(r.uni) if curve else {r.uni_main})
    return sorted(set(r.joint) if curve else {r.joint_main})


def l2_grid(name: str, p, r: Radii, kw: Callable[[float], dict]) -> list[Measurement]:
    """A robust attack at every joint radius (all modalities in one ball), then per modality at the uni-modal
    radii; `kw(eps)` gives the attack's own arguments at radius eps."""
    out = [measurement(name, "all", e, eps=e, **kw(e)) for e in _radii(r, p.joint_curve, False) if e > 0]
    for m in r.modalities:
        out += [measurement(name, m, e, eps=e, modalities=[m], **kw(e))
                for e in _radii(r, p.uni_curve, True) if e > 0]
    return out


class FGMParams(AttackParams):
    joint_curve: bool = Field(True, description="also at joint_grid for the curve models (T11, F5)")
    uni_curve: bool = Field(False, description="also at uni_grid for the curve models")


@declare("fgm", "FGM", "robust", FGMParams)
def _fgm_grid(p: FGMParams, r: Radii) -> list[Measurement]:
    return l2_grid("fgm", p, r, lambda e: {})


class PGDParams(AttackParams):
    steps: int = Field(4, ge=1, le=10000)
    step_ratio: float = Field(1 / 3, gt=0, le=1, description="step size = ratio * eps (reference: eps/3)")
    restarts: int = Field(1, ge=1, le=100)
    random_start: bool = False
    joint_curve: bool = Field(True, description="also at joint_grid for the curve models (T11, F5)")
    uni_curve: bool = Field(True, description="also at uni_grid for the curve models (F1/F4)")


@declare("pgd", "PGD", "robust", PGDParams)
def _pgd_grid(p: PGDParams, r: Radii) -> list[Measurement]:
    return l2_grid("pgd", p, r, lambda e: dict(steps=p.steps, step_size=e * p.step_ratio, restarts=p.restarts,
                                                  random_start=p.random_start))


class AdaptivePGDParams(AttackParams):
    steps: int = Field(4, ge=1, le=10000)
    step_ratio: float = Field(1 / 3, gt=0, le=1, description="step size = ratio * eps")
    uni: bool = Field(False, description="also per modality at uni_eps (joint at joint_eps always)")


# Attacks that only differ from their plain version for methods with test-time processing (`has_adaptive`).
ADAPTIVE = {"pgd_adaptive"}


@declare("pgd_adaptive", "PGD (adaptive)", "robust", AdaptivePGDParams)
def _pgd_adaptive_grid(p: AdaptivePGDParams, r: Radii) -> list[Measurement]:
    """l2 PGD through the full test-time computation of a defence (Jacobian fusion's fusion matrices as
    functions of x); run only for methods that have such a computation."""
    kw = lambda e: dict(eps=e, steps=p.steps, step_size=e * p.step_ratio)  # noqa: E731
    out = [measurement("pgd_adaptive", "all", r.joint_main, **kw(r.joint_main))] if r.joint_main > 0 else []
    if p.uni and r.uni_main > 0:
        out += [measurement("pgd_adaptive", m, r.uni_main, modalities=[m], **kw(r.uni_main)) for m in r.modalities]
    return out


class MissingParams(AttackParams):
    pass


@declare("missing", "Missing", "missing", MissingParams)
def _missing_grid(p: MissingParams, r: Radii) -> list[Measurement]:
    return [measurement("missing", m, 0.0, modalities=[m]) for m in r.modalities]


class MGNParams(AttackParams):
    sigma: list[float] = Field([0.1, 0.5], description="Gaussian noise std on every modality (T7)")


@declare("mgn", "MGN", "corruption", MGNParams)
def _mgn_grid(p: MGNParams, r: Radii) -> list[Measurement]:
    return [measurement("mgn", "all", s, sigma=s) for s in p.sigma]


class MPMParams(AttackParams):
    p: list[float] = Field([0.1, 0.3], description="pixel masking probability (T7)")


@declare("mpm", "MPM", "corruption", MPMParams)
def _mpm_grid(p: MPMParams, r: Radii) -> list[Measurement]:
    return [measurement("mpm", "all", q, p=q) for q in p.p]


class MEAParams(AttackParams):
    eps: float = Field(0.5, ge=0, description="embedding attack radius (T7); 0: not run")
    steps: int = Field(10, ge=1, le=10000)


@declare("mea", "MEA", "corruption", MEAParams)
def _mea_grid(p: MEAParams, r: Radii) -> list[Measurement]:
    return [measurement("mea", "all", p.eps, eps=p.eps, steps=p.steps)] if p.eps > 0 else []


class APGDParams(AttackParams):
    steps: int = Field(100, ge=1, le=10000, description="iterations (AutoAttack: 100)")
    restarts: int = Field(1, ge=1, le=100, description="random restarts (AutoAttack's APGD-CE: 5 in 'rand')")
    joint_curve: bool = Field(False, description="also at joint_grid for the curve models")


def _apgd_grid(name: str):
    def grid(p: APGDParams, r: Radii) -> list[Measurement]:  # joint only: ART perturbs every input feature
        return [measurement(name, "all", e, eps=e, steps=p.steps, restarts=p.restarts)
                for e in _radii(r, p.joint_curve, False) if e > 0]
    return grid


declare("apgd_ce", "APGD-CE", "robust", APGDParams)(_apgd_grid("apgd_ce"))
declare("apgd_dlr", "APGD-DLR", "robust", APGDParams)(_apgd_grid("apgd_dlr"))


class StrengthParams(AttackParams):
    steps: list[int] = Field([20, 50], description="PGD iterations beside the main PGD's (joint, at joint_eps)")
    restarts: int = Field(2, ge=1, le=100, description="random-start restarts at the smallest of `steps` (1: none)")
    step_factor: float = Field(2.5, gt=0, description="step size = factor * eps / steps (Madry et al.)")
    models: list[str] | None = Field(None, description="the models measured (None: every model)")

    @field_validator("steps")
    @classmethod
    def _steps(cls, v):
        if not v or any(s < 1 for s in v) or len(set(v)) != len(v):
            raise ValueError("steps: distinct iteration counts >= 1")
        return sorted(v)


def strength_name(steps: int, restarts: int = 1) -> str:
    return f"pgd{steps}" + (f"x{restarts}" if restarts > 1 else "")


def parse_strength(attack: str) -> tuple[int, int] | None:
    """(steps, restarts) of a strength-report measurement name ("pgd50" -> (50, 1), "pgd20x2" -> (20, 2)), else
    None."""
    steps, _, restarts = attack.removeprefix("pgd").partition("x")
    if not attack.startswith("pgd") or not steps.isdigit() or (restarts and not restarts.isdigit()):
        return None
    return int(steps), int(restarts or 1)


@declare("strength", "strength", "strength", StrengthParams)
def _strength_grid(p: StrengthParams, r: Radii) -> list[Measurement]:
    """Attack-strength report (joint, joint_eps): PGD with more iterations, and with random restarts; read beside
    the main PGD and APGD to flag possible gradient masking (mmrobust/tables.py: strength_flags)."""
    e = r.joint_main
    runs = [(s, 1) for s in p.steps] + ([(p.steps[0], p.restarts)] if p.restarts > 1 else [])
    return [measurement(strength_name(s, k), "all", e, fn="pgd", spec="strength", eps=e, steps=s,
                        step_size=p.step_factor * e / s, restarts=k, random_start=k > 1) for s, k in runs if e > 0]


# Not an attack: per sample, the worst of every robust attack run at the same modality and radius (a sample
# counts as robust only if no attack fooled it), as RobustBench reports robust accuracy.
WORST = "worst"


def worst_case(measurements: list[Measurement]) -> dict[Measurement, list[str]]:
    """{worst-case measurement: labels of the robust (and strength-report) measurements it takes the minimum
    over}."""
    groups: dict[tuple[str, float], list[str]] = {}
    for m in measurements:
        if m.kind in ("robust", "strength"):
            groups.setdefault((m.modality, m.eps), []).append(m.label)
    return {measurement(WORST, mod, eps): labels for (mod, eps), labels in groups.items()}


def default_attacks() -> dict[str, AttackParams]:
    return {name: spec.Params() for name, spec in SPECS.items()}


def validate_attacks(raw: dict) -> dict[str, AttackParams]:
    """`evaluate.attacks` ({name: params}) checked against the declarations; the message names the key."""
    out = {}
    for name, values in (raw or {}).items():
        if name not in SPECS:
            raise ValueError(f"unknown attack {name!r}; declared: {sorted(SPECS)}")
        out[name] = values if isinstance(values, SPECS[name].Params) else SPECS[name].Params.model_validate(
            values or {})
    return out


def grid(attacks: dict[str, AttackParams], radii: Radii) -> list[Measurement]:
    """Every measurement of the configured attacks, in their order, deduplicated by label."""
    out: dict[str, Measurement] = {}
    for name, p in attacks.items():
        for m in SPECS[name].grid(p, radii):
            out.setdefault(m.label, m)
    return list(out.values())


def titles() -> dict[str, str]:
    return {"clean": "Clean", **{name: s.title for name, s in SPECS.items()}, WORST: "Worst", "certified": "CA",
            "smoothed": "RS"}


def strength_title(attack: str) -> str:
    """"pgd50" -> "PGD-50", "pgd20x2" -> "PGD-20 ×2 restarts"."""
    steps, restarts = parse_strength(attack)
    return f"PGD-{steps}" + (f" ×{restarts} restarts" if restarts > 1 else "")


def of_kind(attacks, kind: str) -> list[str]:
    return [a for a in attacks if a in SPECS and SPECS[a].kind == kind]
