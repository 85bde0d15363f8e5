"""Intermediate fusion for M >= 2 modalities: MMTM (paper Table 5) and MMT (paper Table 3).

Both models keep LateFusionModel's interface, so methods, attacks and the CRMT head work on them unchanged:
`modalities`, `encoders` (nn.ModuleDict, one stream per modality), `head` (ConcatHead or CRMTHead on the final
per-modality features), `encode(inputs) -> {m: (B, d)}`, `forward(inputs) -> Output(logits, features, scores)`.

The difference that matters: phi_m depends on EVERY modality's input, because the streams exchange information
before the head. So `encoders[m](x_m)` alone is NOT modality m's feature path (it is the stream without the
exchange); use `model.encode(inputs)`. Parameters of the exchange itself that are not per-stream (MMTM's units)
live outside `encoders`, so code that selects `model.encoders[m].parameters()` (OGM-GE's gradient modulation,
UME's trainable set) does not see them. The CRMT certified bound assumes z_m depends on x_m only; on these models
it is a heuristic (the paper applies only step 1 to MMT for that reason).

Built by `build_model(ModelSpec(..., fusion="mmtm" | "mmt"))`:
  mmtm: `encoder` must name resnet18/resnet34 (one, or one per modality); encoder_kwargs[m] go to the ResNet.
  mmt:  `encoder` must be "transformer"; encoder_kwargs[m] go to MMTStream (patch, img_size, depth, cross_depth,
        heads, dropout; cross_depth must agree across modalities).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .encoders import PatchTransformer, ResNet
from .fusion import Output
from .registry import ENCODERS, HEADS, ModelSpec, _lookup, input_channels, register_fusion


def _as_clips(x: torch.Tensor, who: str) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, C, H, W); (B, T, C, H, W) unchanged."""
    if x.dim() == 4:
        return x[:, None]
    if x.dim() != 5:
        raise ValueError(f"{who}: expected (B, C, H, W) or (B, T, C, H, W), got {tuple(x.shape)}")
    return x


def _check_inputs(modalities: list[str], inputs: dict[str, torch.Tensor]) -> int:
    missing = [m for m in modalities if m not in inputs]
    if missing:
        raise KeyError(f"inputs lack modalities {missing} (model expects {modalities})")
    sizes = {m: len(inputs[m]) for m in modalities}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"all modalities need the same batch size, got {sizes}")
    return sizes[modalities[0]]


def _check_head(modalities: list[str], head: nn.Module) -> None:
    if len(modalities) < 2:
        raise ValueError(f"intermediate fusion needs at least 2 modalities, got {modalities}")
    if list(head.modalities) != modalities:
        raise ValueError(f"head modalities {list(head.modalities)} != encoder modalities {modalities}")


# ---------------------------------------------------------------- MMTM
class MMTM(nn.Module):
    """Multimodal transfer module (Vaezi Joze et al., CVPR 2020) between M >= 2 CNN streams.

        squeeze  S_m = mean of stream m's feature map over its T_m frames and H x W, per sample     (B, C_m)
        joint    Z   = ReLU(W_Z [S_1; ...; S_M] + b_Z)                     (B, C_Z), C_Z = 2 * sum_m C_m / ratio
        excite   g_m = 2 * sigmoid(W_m Z + b_m), in (0, 2)                                           (B, C_m)
        output   stream m's map times g_m, the same gate for every frame and position of a sample
    Pooling over time as well as space lets streams with different numbers of frames (audio: T = 1) exchange.
    """

    def __init__(self, channels: dict[str, int], ratio: float = 4):
        super().__init__()
        self.modalities = list(channels)
        total = sum(channels.values())
        joint = max(1, int(2 * total / ratio))
        self.squeeze = nn.Linear(total, joint)
        self.excite = nn.ModuleDict({m: nn.Linear(joint, c) for m, c in channels.items()})

    def gates(self, squeezed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = F.relu(self.squeeze(torch.cat([squeezed[m] for m in self.modalities], 1)))
        return {m: 2 * torch.sigmoid(self.excite[m](z)) for m in self.modalities}

    def forward(self, maps: dict[str, torch.Tensor], batch: int):
        """maps[m]: (B * T_m, C_m, H_m, W_m), the T_m frames of a sample contiguous -> (rescaled maps, gates)."""
        clips = {m: x.reshape(batch, -1, *x.shape[1:]) for m, x in maps.items()}  # (B, T_m, C_m, H_m, W_m)
        g = self.gates({m: c.mean((1, 3, 4)) for m, c in clips.items()})
        out = {m: (c * g[m][:, None, :, None, None]).flatten(0, 1) for m, c in clips.items()}
        return out, g


class MMTMModel(nn.Module):
    """One ResNet per modality with an MMTM unit after each ResNet stage in `stages` (default 2, 3, 4 as in the
    MMTM paper), then a late-fusion head on the time- and space-pooled final maps.

    Frames are folded into the batch for the CNN (like FrameEncoder); the units pool each stream per sample.
    With stages=() the model is exactly LateFusionModel(encoders, head).
    """

    def __init__(self, encoders: dict[str, ResNet], head: nn.Module, stages=(2, 3, 4), ratio: float = 4):
        super().__init__()
        self.modalities = list(encoders)
        _check_head(self.modalities, head)
        bad = [m for m, e in encoders.items() if not isinstance(e, ResNet)]
        if bad:
            raise TypeError(f"MMTM needs ResNet streams; modalities {bad} are not")
        if not set(stages) <= {1, 2, 3, 4}:
            raise ValueError(f"MMTM stages must be among 1..4, got {stages}")
        self.encoders = nn.ModuleDict(encoders)
        self.head = head
        self.mmtm = nn.ModuleDict({
            f"layer{s}": MMTM({m: e.width * 2 ** (s - 1) for m, e in encoders.items()}, ratio) for s in sorted(stages)})

    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        B = _check_inputs(self.modalities, inputs)
        maps = {}
        for m in self.modalities:
            e = self.encoders[m]
            x = _as_clips(inputs[m], f"MMTMModel[{m}]").flatten(0, 1)
            maps[m] = e.maxpool(F.relu(e.bn1(e.conv1(x))))
        for s in range(1, 5):
            name = f"layer{s}"
            maps = {m: getattr(self.encoders[m], name)(x) for m, x in maps.items()}
            if name in self.mmtm:
                maps, _ = self.mmtm[name](maps, B)
        return {m: x.reshape(B, -1, *x.shape[1:]).mean((1, 3, 4)) for m, x in maps.items()}

    def forward(self, inputs: dict[str, torch.Tensor]) -> Output:
        features = self.encode(inputs)
        logits, scores = self.head(features)
        return Output(logits, features, scores)


# ---------------------------------------------------------------- MMT
class CrossModalBlock(nn.Module):
    """Pre-norm transformer block whose queries are one modality's tokens and whose keys/values are the tokens of
    all modalities concatenated: x += Attn(LN(x), LN'(context)); x += MLP(LN''(x))."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(context)
        x = x + self.attn(self.norm_q(x), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class MMTStream(PatchTransformer):
    """One modality's stream of the MMT: PatchTransformer (patch embedding, positional embedding, class token,
    `depth` self-attention blocks per frame) plus `cross_depth` CrossModalBlocks run by MMTModel.

    `tokens(x)` gives the stream's sequence after self-attention: the class token averaged over the T frames, then
    every frame's patch tokens (no temporal embedding: order-free over frames, like the CNNs' time averaging).
    Called alone, the stream is the plain uni-modal PatchTransformer (cls pooling, no cross-modal layers).
    """

    def __init__(self, in_channels: int = 3, width: int = 16, patch: int = 16, img_size=(64, 64), depth: int = 2,
                 cross_depth: int = 2, heads: int | None = None, dropout: float = 0.0):
        if depth < 1:
            raise ValueError(f"MMTStream: depth (self-attention blocks) must be >= 1, got {depth}")
        super().__init__(in_channels, width, patch, img_size, depth, heads, pool="cls", dropout=dropout)
        heads = self.blocks.layers[0].self_attn.num_heads
        self.cross = nn.ModuleList(CrossModalBlock(self.out_dim, heads, dropout) for _ in range(cross_depth))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:  # (B, [T,] C, H, W) -> (B, 1 + T * n, D)
        clips = _as_clips(x, type(self).__name__)
        B, T = clips.shape[:2]
        f = clips.flatten(0, 1)
        H, W = f.shape[-2:]
        f = self.embed(F.pad(f, (0, -W % self.patch, 0, -H % self.patch)))  # (B*T, D, gh, gw)
        pos = self.pos if self.pos.shape[-2:] == f.shape[-2:] else \
            F.interpolate(self.pos, size=f.shape[-2:], mode="bilinear", align_corners=False)
        f = (f + pos).flatten(2).transpose(1, 2)
        f = self.blocks(torch.cat([self.cls.expand(len(f), -1, -1), f], 1))  # (B*T, 1 + n, D)
        f = f.view(B, T, *f.shape[1:])
        return torch.cat([f[:, :, 0].mean(1, keepdim=True), f[:, :, 1:].flatten(1, 2)], 1)


class MMTModel(nn.Module):
    """Multimodal transformer with hierarchical attention: per-modality self-attention (in each MMTStream), then
    L cross-modal layers in which every modality's tokens attend to the concatenation of all modalities' tokens
    (all modalities updated from the same previous layer). phi_m = LayerNorm(final class token of modality m);
    head: ConcatHead (the MMT baseline: class tokens concatenated and projected) or CRMTHead (CRMT-MMT)."""

    def __init__(self, streams: dict[str, MMTStream], head: nn.Module):
        super().__init__()
        self.modalities = list(streams)
        _check_head(self.modalities, head)
        if not all(isinstance(s, MMTStream) for s in streams.values()):
            raise TypeError("MMTModel needs MMTStream streams")
        dims = {m: s.out_dim for m, s in streams.items()}
        depths = {m: len(s.cross) for m, s in streams.items()}
        if len(set(dims.values())) != 1 or len(set(depths.values())) != 1:
            raise ValueError(f"MMT streams must share token dim and cross_depth, got dims {dims}, depths {depths}")
        self.encoders = nn.ModuleDict(streams)
        self.head = head
        self.cross_depth = depths[self.modalities[0]]

    def encode(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _check_inputs(self.modalities, inputs)
        tok = {m: self.encoders[m].tokens(inputs[m]) for m in self.modalities}
        for layer in range(self.cross_depth):
            context = torch.cat([tok[m] for m in self.modalities], 1)
            tok = {m: self.encoders[m].cross[layer](t, context) for m, t in tok.items()}
        return {m: self.encoders[m].norm(t[:, 0]) for m, t in tok.items()}

    def forward(self, inputs: dict[str, torch.Tensor]) -> Output:
        features = self.encode(inputs)
        logits, scores = self.head(features)
        return Output(logits, features, scores)


# ---------------------------------------------------------------- builders
def _encoder_name(spec: ModelSpec, m: str) -> str:
    return spec.encoder if isinstance(spec.encoder, str) else spec.encoder[m]


def _head(spec: ModelSpec, dims: dict[str, int]) -> nn.Module:
    return _lookup(HEADS, "head", spec.head)(dims, spec.num_classes, **spec.head_kwargs)


@register_fusion("mmtm")
def build_mmtm(spec: ModelSpec) -> MMTMModel:
    encoders = {}
    for m in spec.modalities:
        name = _encoder_name(spec, m)
        if name not in ("resnet18", "resnet34"):
            raise ValueError(f"fusion 'mmtm' needs ResNet streams: set encoder to resnet18 or resnet34 "
                             f"(modality {m!r} has {name!r})")
        encoders[m] = _lookup(ENCODERS, "encoder", name)(
            in_channels=input_channels(spec, m), width=spec.width, **spec.encoder_kwargs.get(m, {}))
    return MMTMModel(encoders, _head(spec, {m: e.out_dim for m, e in encoders.items()}))


@register_fusion("mmt")
def build_mmt(spec: ModelSpec) -> MMTModel:
    streams = {}
    for m in spec.modalities:
        if _encoder_name(spec, m) != "transformer":
            raise ValueError(f"fusion 'mmt' uses transformer streams: set encoder to 'transformer' "
                             f"(modality {m!r} has {_encoder_name(spec, m)!r})")
        streams[m] = MMTStream(input_channels(spec, m), spec.width, **spec.encoder_kwargs.get(m, {}))
    return MMTModel(streams, _head(spec, {m: s.out_dim for m, s in streams.items()}))
