"""What each training method declares to the config, without torch: its params group (the top-level params key
it reads, None: none of its own) and each group's pydantic model. The methods (crmt.py, baselines.py,
robust_fusion.py) set the same `params_key` and `Params`; a test checks that both agree.

Adding a method: its name (and its group's `Params`, if it has one) here, its class in a method module.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CRMTParams(MethodParams):
    rho: float = Field(2.0, ge=0, description="weight of the margin regulariser (paper 2.0)")
    iterations: int = Field(1, ge=1, le=32, description="alternations of step 1 and step 2 (paper Table 11)")
    step2_epochs: int = Field(5, ge=0, le=10000, description="reference: 45")
    step2_lr: float = Field(1e-3, gt=0, description="reference: 3e-5 (with 45 epochs); see docs/decisions.md")
    step2_momentum: float = Field(0.9, ge=0, lt=1)
    step2_weight_decay: float = Field(1e-2, ge=0)
    step2_from: Literal["best", "last"] = Field("best", description="step 2 starts from step 1's best validation "
                                                "epoch (as JT's model is selected) or its last one")
    tau_batches: int | None = Field(None, ge=1, description="batches used to estimate τ (None: whole train split)")
    adv_eps: float = Field(0.1, gt=0, description="CRMT-AT training radius (joint l2)")
    adv_steps: int = Field(5, ge=1)
    mix_alpha: float = Field(1.0, gt=0, description="CRMT-Mix: λ ~ Beta(α, α)")
    margin_eps: float = Field(1e-5, ge=0, description="added inside the margin log, as the reference does")
    reference_compat: bool = False


class GBParams(MethodParams):
    reestimate_every: int = Field(2, ge=1, le=1000, description="epochs between weight re-estimations")
    min_overfit: float = Field(1e-2, gt=0, description="floor of ΔO in w ∝ G/ΔO²")
    estimate_batches: int | None = Field(None, ge=1, description="batches per split for the estimates (None: all)")
    weights_sum: Literal["one", "heads"] = Field("heads", description="the blend weights sum to 1 (paper) or to the "
                                                 "number of heads (uniform start = JT's loss scale per head)")


class OGMParams(MethodParams):
    alpha: float = Field(0.1, gt=0, le=2, description="modulation strength (paper range 0.1–0.8)")
    modulation_start: int = Field(0, ge=0, description="first modulated epoch")
    modulation_end: int | None = Field(None, ge=0, description="first epoch no longer modulated (None: never stops)")
    ge_noise: bool = Field(True, description="GE: add N(0, std(grad)²) to the encoders' gradients")
    shift: bool = Field(False, description="1 − tanh(α(ρ−1)) instead of the official 1 − tanh(α ρ)")


class PMRParams(MethodParams):
    beta: float = Field(1.0, ge=0, description="PCE scale: weak modality m gets β·min(1/ρ_m − 1, max_coefficient)")
    max_coefficient: float | None = Field(1.0, gt=0, description="cap of 1/ρ_m − 1 (the official code's weight is "
                                          "the constant β; None: uncapped, up to 1/PMR_RHO_FLOOR − 1)")
    gamma: float = Field(0.0, ge=0, description="PER scale: dominant modality m gets γ·(ρ_m − 1) (0: off)")
    per_epochs: int | None = Field(None, ge=0, description="PER only in the first epochs (None: all)")
    proto_momentum: float = Field(0.5, ge=0, lt=1, description="C ← μ C_old + (1 − μ) class mean")
    proto_batches: int | None = Field(None, ge=1, description="train batches for the prototypes (None: all)")
    squared_distance: bool = Field(False, description="−‖φ − c‖² logits instead of the official −‖φ − c‖")


class MixupParams(MethodParams):
    alpha: float = Field(0.2, gt=0, description="λ ~ Beta(α, α)")


class MMATParams(MethodParams):
    eps: float = Field(0.1, gt=0, description="joint l2 radius (as CRMT-AT's adv_eps, for a like comparison)")
    steps: int = Field(5, ge=1, le=100)
    step_size: float | None = Field(None, gt=0, description="None: eps / steps")
    clean_weight: float = Field(0.0, ge=0, le=1, description="loss = (1 − c) CE(adv) + c CE(clean)")


class MSEFMParams(MethodParams):
    sim_weight: float = Field(0.1, ge=0, description="λ of the MinSim cosine term (paper presets: 1.0; "
                              "docs/decisions.md)")
    memory_per_class: int = Field(16, ge=1, le=4096, description="clean training features stored per class")
    sparse_lam: float = Field(0.1, ge=0, lt=1, description="l1 weight relative to max_j |<a_j, φ>| (1: all-zero code)")
    sparse_iters: int = Field(100, ge=1, le=10000, description="FISTA iterations at test time")
    memory_batches: int | None = Field(None, ge=1, description="cap on train batches read to fill the memory")


class UMEParams(MethodParams):
    drop_missing: bool = Field(True, description="MMA: leave all-zero (missing) modalities out of the ensemble")


class RMTLParams(MethodParams):
    uni_weight: float = Field(1.0, ge=0, description="w of each modality-specific task")


class JacobianFusionParams(MethodParams):
    gamma: float = Field(1.0, ge=0, description="weight of the Jacobian penalty (0: the plain head); with a "
                         "calibration grid, the value used until training ends")
    calibrate: list[float] | None = Field([1.0, 0.3, 0.1, 0.03, 0.01], description="after training, the largest "
                                          "gamma here whose validation accuracy is within max_clean_drop of "
                                          "the plain head's (0 if none); None: always `gamma`")
    max_clean_drop: float = Field(0.01, ge=0, le=1, description="validation accuracy the calibration may give up")
    output: Literal["prob", "logit"] = Field("prob", description="p whose Jacobian is penalised: softmax or logits")
    max_elements: int = Field(2 ** 26, ge=1, description="Jacobian entries held at once (memory bound)")


class VARMATParams(MethodParams):
    eps: float = Field(0.1, gt=0, description="joint l2 PGD training radius")
    steps: int = Field(5, ge=1, le=100, description="PGD steps of eps/steps")
    beta: float = Field(0.1, ge=0, description="weight of the vulnerability regulariser")
    temperature: float = Field(1.0, gt=0, description="T of the vulnerability weights")


# Group -> its params model, in the order the groups are added to the config.
GROUPS: dict[str, type[MethodParams]] = {
    "crmt": CRMTParams, "gb": GBParams, "ogm_ge": OGMParams, "pmr": PMRParams, "mixup": MixupParams,
    "mmat": MMATParams, "msefm": MSEFMParams, "ume_mma": UMEParams, "rmtl": RMTLParams,
    "jacobian_fusion": JacobianFusionParams, "varmat": VARMATParams,
}

# Method name -> the group it reads (None: train only).
PARAMS_KEYS: dict[str, str | None] = {
    "jt": None, "ojt": None,
    **dict.fromkeys(["crmt_jt", "crmt_step1", "crmt_step2", "crmt_at", "crmt_mix"], "crmt"),
    **{key: key for key in ["gb", "ogm_ge", "pmr", "mixup", "mmat", "msefm", "ume_mma", "rmtl", "jacobian_fusion",
                            "varmat"]},
}
