"""Late-fusion heads for M >= 2 modalities and the model that wires encoders to a head.

A head maps `features: dict[name, (B, d_m)]` to `(logits (B, K), scores: dict[name, (B, K)])`, where scores[m] is
modality m's uni-modal score z_m, and exposes `uni_weight(m)` (the K x d_m matrix giving z_m), `fused_weight(m)`
(modality m's K x d_m block of the fused classifier) and `bias`, so that for every head
    logits = sum_m features[m] @ fused_weight(m).T + bias.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_head


class Output(NamedTuple):
    logits: torch.Tensor  # (B, K) fused logits h(x)
    features: dict[str, torch.Tensor]  # phi_m(x_m), (B, d_m)
    scores: dict[str, torch.Tensor]  # uni-modal scores z_m, (B, K)


@register_head("concat")
class ConcatHead(nn.Module):
    """JT: h(x) = W [phi_1; ...; phi_M] + b; z_m = W_m phi_m (W's column block of modality m, no bias)."""

    def __init__(self, dims: dict[str, int], num_classes: int):
        super().__init__()
        self.modalities, self.dims = list(dims), dict(dims)
        self.fc = nn.Linear(sum(self.dims.values()), num_classes)
        offsets = torch.tensor([0] + list(self.dims.values())).cumsum(0).tolist()
        self._cols = {m: (offsets[i], offsets[i + 1]) for i, m in enumerate(self.modalities)}

    @property
    def bias(self) -> torch.Tensor:
        return self.fc.bias

    def uni_weight(self, m: str) -> torch.Tensor:
        lo, hi = self._cols[m]
        return self.fc.weight[:, lo:hi]

    fused_weight = uni_weight

    def forward(self, features: dict[str, torch.Tensor]):
        logits = self.fc(torch.cat([features[m] for m in self.modalities], 1))
        scores = {m: F.linear(features[m], self.uni_weight(m)) for m in self.modalities}
        return logits, scores


def orthonormal_rows(v: torch.Tensor) -> torch.Tensor:
    """The K x d matrix with orthonormal rows spanning v's rows (Gram-Schmidt via QR, signs fixed so that the
    map is smooth and v itself is returned when its rows are already orthonormal)."""
    q, r = torch.linalg.qr(v.T)  # reduced: (d, K), (K, K)
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q)
    return (q * sign).T


@register_head("crmt")
class CRMTHead(nn.Module):
    """Paper eq. 8: h_k = sum_m a_{m,k} (W~_m phi_m)_k + b_k with W~_m W~_m^T = I_K; z_m = W~_m phi_m.

    Exact parametrisation: the optimiser updates an unconstrained K x d matrix V_m and W~_m = orthonormal_rows(V_m)
    is recomputed on every use, so W~ W~^T = I holds to float precision after any step. (Same guarantee as
    torch.nn.utils.parametrizations.orthogonal, whose modules cannot be pickled and whose Householder product
    is much slower on CPU for K in the hundreds.)
    reference_compat=True reproduces the released code's OWNNorm with one group per row: each row centred and
    scaled to unit norm on its own, so rows are unit-norm but not orthogonal.
    """

    def __init__(self, dims: dict[str, int], num_classes: int, a_init: float = 0.1, reference_compat: bool = False):
        super().__init__()
        for m, d in dims.items():
            if d < num_classes:
                raise ValueError(f"CRMTHead: modality {m!r} has feature dim {d} < {num_classes} classes; orthonormal "
                                 f"rows (W W^T = I_K) need d >= K: use a wider encoder")
        self.modalities, self.dims, self.reference_compat = list(dims), dict(dims), reference_compat
        init = {m: nn.init.kaiming_uniform_(torch.empty(num_classes, d), a=5 ** 0.5) for m, d in dims.items()}
        if not reference_compat:
            init = {m: orthonormal_rows(w) for m, w in init.items()}
        self.weight = nn.ParameterDict({m: nn.Parameter(w) for m, w in init.items()})
        self.a = nn.ParameterDict({m: nn.Parameter(torch.full((num_classes,), a_init)) for m in self.modalities})
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def uni_weight(self, m: str) -> torch.Tensor:
        v = self.weight[m]
        if not self.reference_compat:
            return orthonormal_rows(v)
        v = v - v.mean(1, keepdim=True)
        return v / v.norm(dim=1, keepdim=True)

    def fused_weight(self, m: str) -> torch.Tensor:
        return self.a[m][:, None] * self.uni_weight(m)

    def a_matrix(self) -> torch.Tensor:  # (M, K), rows in self.modalities order
        return torch.stack([self.a[m] for m in self.modalities])

    def forward(self, features: dict[str, torch.Tensor]):
        scores = {m: F.linear(features[m], self.uni_weight(m)) for m in self.modalities}
        logits = sum(self.a[m] * scores[m] for m in self.modalities) + self.bias
        return logits, scores


class LateFusionModel(nn.Module):
    """encoders[m] : x_m -> phi_m, then a head; forward(inputs: dict) -> Output(logits, features, scores)."""

    def __init__(self, encoders: dict[str, nn.Module], head: nn.Module):
        super().__init__()
        self.modalities = list(encoders)
        if list(head.modalities) != self.modalities:
            raise ValueError(f"head modalities {list(head.modalities)} != encoder modalities {self.modalities}")
        self.encoders = nn.ModuleDict(encoders)
        self.head = head

    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [m for m in self.modalities if m not in inputs]
        if missing:
            raise KeyError(f"inputs lack modalities {missing} (model expects {self.modalities})")
        return {m: self.encoders[m](inputs[m]) for m in self.modalities}

    def forward(self, inputs: dict[str, torch.Tensor]) -> Output:
        features = self.encode(inputs)
        logits, scores = self.head(features)
        return Output(logits, features, scores)
