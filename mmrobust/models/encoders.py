"""Per-modality encoders: ResNet18/34 (torchvision layout, no torchvision) and a small patch Transformer.

Every encoder maps (B, C, H, W) or (B, T, C, H, W) to (B, out_dim): each frame goes through the 2-D network on
its own and the per-frame features are averaged over time (and, inside the network, over space).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import register_encoder


class FrameEncoder(nn.Module):
    """Folds time into the batch, encodes frames with `frame_features`, averages over time."""

    out_dim: int

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, out_dim)
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return self.frame_features(x)
        if x.dim() != 5:
            raise ValueError(f"{type(self).__name__}: expected (B, C, H, W) or (B, T, C, H, W), got {tuple(x.shape)}")
        B, T = x.shape[:2]
        return self.frame_features(x.flatten(0, 1)).view(B, T, -1).mean(1)


# ---------------------------------------------------------------- ResNet
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(FrameEncoder):
    """torchvision's ResNet (same parameter names, so ImageNet state_dicts load) without the fc layer."""

    def __init__(self, layers: list[int], in_channels: int = 3, width: int = 64):
        super().__init__()
        self.in_channels, self.width, self.out_dim = in_channels, width, 8 * width
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = width
        for i, n in enumerate(layers):
            cout, stride = width * 2 ** i, (1 if i == 0 else 2)
            blocks = [BasicBlock(cin if b == 0 else cout, cout, stride if b == 0 else 1) for b in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = cout
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def frame_features(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean((2, 3))


@register_encoder("resnet18")
def resnet18(in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet([2, 2, 2, 2], in_channels, width)


@register_encoder("resnet34")
def resnet34(in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet([3, 4, 6, 3], in_channels, width)


def load_imagenet_state_dict(encoder: ResNet, path: str | Path) -> ResNet:
    """Load a torchvision-format ResNet state_dict from a local file into `encoder` (in place).

    `fc.*` is skipped. For an encoder whose input channels differ from the file's (1: audio, 2: flow), conv1 is
    averaged over the file's input channels and that mean is repeated per input channel (the TSN cross-modality
    initialisation). Everything else must match exactly; old checkpoints without `num_batches_tracked` are fine.
    """
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    target = encoder.state_dict()
    w = sd.get("conv1.weight")
    if w is not None and w.dim() == 4 and w.shape[1] != encoder.in_channels:
        sd["conv1.weight"] = w.mean(1, keepdim=True).repeat(1, encoder.in_channels, 1, 1)
    missing = [k for k in target if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
              for k, v in sd.items() if k in target and v.shape != target[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: not a state_dict for this ResNet (width {encoder.width}, "
                         f"{encoder.in_channels} input channels); missing keys {missing[:8]}, "
                         f"unexpected keys {unexpected[:8]}, shape mismatches {shapes[:8]}")
    encoder.load_state_dict(sd, strict=False)
    return encoder


# ---------------------------------------------------------------- Transformer
class PatchTransformer(FrameEncoder):
    """Conv patch embedding + learned 2-D positional embedding + pre-norm nn.TransformerEncoder, mean or CLS pool.

    The positional embedding is learned on the grid of `img_size` and bilinearly resized for other input sizes
    (e.g. audio spectrograms of another length); inputs are zero-padded up to a multiple of the patch size.
    """

    def __init__(self, in_channels: int = 3, width: int = 16, patch: int = 16, img_size=(64, 64), depth: int = 4,
                 heads: int | None = None, pool: str = "mean", dropout: float = 0.0):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        dim = self.out_dim = 8 * width  # same feature size as a ResNet of this width
        heads = heads or max(1, dim // 64)
        while dim % heads:
            heads -= 1
        self.in_channels, self.patch, self.pool = in_channels, patch, pool
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        grid = [math.ceil(s / patch) for s in (img_size if isinstance(img_size, (tuple, list)) else (img_size,) * 2)]
        self.pos = nn.Parameter(torch.randn(1, dim, *grid) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def frame_features(self, x):
        H, W = x.shape[-2:]
        x = F.pad(x, (0, -W % self.patch, 0, -H % self.patch))
        x = self.embed(x)  # (N, dim, gh, gw)
        pos = self.pos if self.pos.shape[-2:] == x.shape[-2:] else \
            F.interpolate(self.pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1)
        x = self.norm(self.blocks(x))
        return x[:, 0] if self.cls is not None else x.mean(1)


@register_encoder("transformer")
def transformer(in_channels: int = 3, width: int = 16, **kw) -> PatchTransformer:
    return PatchTransformer(in_channels, width, **kw)
