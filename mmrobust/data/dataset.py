"""Model-ready tensors straight from the extracted arrays (no per-sample video or audio decoding).

Item: {"visual": (T,3,H,W), "flow": (T,2,H,W), "diff": (T,3,H,W), "audio": (1,bins,frames), "label": int,
"index": int} for the requested modalities, T = num_segments (3 in the paper). The kept frames of a clip
are split into T equal thirds: test time takes the centre of each, train time a random frame in each, plus
RandomResizedCrop and horizontal flip (the same for all frames of a clip; flipping negates flow u).
"""
from __future__ import annotations

import functools

import math
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as Fn
from torch.utils.data import Dataset

from mmrobust.io import read_csv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FLOW_MEAN, FLOW_STD = 0.1307, 0.3081
# Pixel-space value range and normalisation of each modality, as the model sees it: x_model = (x - mean) / std.
NORMALISATION = {
    "visual": (IMAGENET_MEAN, IMAGENET_STD),
    "flow": ((FLOW_MEAN, FLOW_MEAN), (FLOW_STD, FLOW_STD)),
    "diff": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
FRAME_MODALITIES = ("visual", "flow", "diff")


@functools.cache
def _affine(m: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 code -> normalised value as code * scale + offset (diff codes map to [-1, 1] first)."""
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in NORMALISATION[m])
    lo, hi = (-1.0, 2.0 / 255) if m == "diff" else (0.0, 1.0 / 255)  # value = lo + hi * code
    return hi / std, (lo - mean) / std


def segment_frames(n_valid: int, num_segments: int, rng: np.random.Generator | None) -> np.ndarray:
    """One frame index per equal segment of [0, n_valid): centre (rng None) or uniform inside the segment."""
    edges = np.linspace(0, n_valid, num_segments + 1)
    lo, hi = edges[:-1], edges[1:]
    if rng is None:
        idx = np.floor((lo + hi) / 2)
    else:
        idx = np.floor(lo + rng.random(num_segments) * (hi - lo))
    return np.clip(idx.astype(np.int64), 0, n_valid - 1)


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


class AVDataset(Dataset):
    def __init__(self, features_dir: str | Path, split: str, modalities: list[str], train: bool = False,
                 num_segments: int = 3, input_size: int | None = None, seed: int = 0, crop_min_scale: float = 0.08):
        self.dir = Path(features_dir)
        self.crop_scale = (crop_min_scale, 1.0)
        self.split, self.modalities, self.train = split, list(modalities), train
        self.num_segments, self.input_size, self.seed = num_segments, input_size, seed
        self._arrays: dict[str, np.ndarray] = {}
        per_mod = {}
        for m in self.modalities:
            index_file = self.dir / m / "index.csv"
            if not index_file.exists():
                raise FileNotFoundError(f"{index_file}: modality {m!r} has not been extracted")
            per_mod[m] = {r["clip_id"]: r for r in read_csv(index_file) if r["split"] == split}
        common = set.intersection(*(set(v) for v in per_mod.values())) if per_mod else set()
        # Clips rejected by one modality's extraction are left out, and said so.
        self.excluded = sorted(set.union(*(set(v) for v in per_mod.values())) - common) if per_mod else []
        first = per_mod[self.modalities[0]]
        self.clip_ids = sorted(common, key=lambda c: int(first[c]["row"]))
        self.rows = {m: np.array([int(per_mod[m][c]["row"]) for c in self.clip_ids]) for m in self.modalities}
        self.n_frames = {m: np.array([int(per_mod[m][c]["n_frames"]) for c in self.clip_ids])
                         for m in self.modalities}
        self.labels = np.array([int(first[c]["label"]) for c in self.clip_ids], dtype=np.int64)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.clip_ids)

    def set_epoch(self, epoch: int) -> None:
        """Train-time sampling is a pure function of (seed, epoch, index): reproducible with any workers."""
        self.epoch = epoch

    def _array(self, m: str) -> np.ndarray:
        if m not in self._arrays:  # opened lazily so that each DataLoader worker maps its own view
            self._arrays[m] = np.load(self.dir / m / "data.npy", mmap_mode="r")
        return self._arrays[m]

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, i]) if self.train else None
        item = {"label": int(self.labels[i]), "index": i}
        frame_idx = None
        crop = flip = None
        for m in self.modalities:
            raw = self._array(m)[self.rows[m][i]]
            if m == "audio":
                item[m] = torch.from_numpy(raw.astype(np.float32))[None]
                continue
            if frame_idx is None:  # the same time steps for every frame modality of a clip
                frame_idx = segment_frames(int(self.n_frames[m][i]), self.num_segments, rng)
            x = raw[frame_idx]  # (T, H, W, C) uint8
            if rng is not None and crop is None:
                crop = random_resized_crop_box(x.shape[1], x.shape[2], rng, scale=self.crop_scale)
                flip = bool(rng.random() < 0.5)
            item[m] = self._to_model_space(m, x, crop, flip)
        return item

    def _to_model_space(self, m: str, x: np.ndarray, crop, flip: bool) -> torch.Tensor:
        """uint8 (T, H, W, C) -> crop, flip, resize, normalise -> float (T, C, size, size). Crop and flip act on
        the uint8 view; resizing and the affine normalisation commute, so normalising is one multiply-add."""
        size = self.input_size or x.shape[-2]
        if crop is not None:
            top, left, ch, cw = crop
            # the crop box was drawn on the first modality's grid; rescale it to this one's
            sy, sx = x.shape[1] / self._crop_grid(m), x.shape[2] / self._crop_grid(m)
            x = x[:, int(top * sy): int((top + ch) * sy), int(left * sx): int((left + cw) * sx)]
        if flip:
            x = x[:, :, ::-1]
            if m == "flow":  # mirrored motion: u changes sign around the code's zero (255 - u)
                x = np.concatenate([255 - x[..., :1], x[..., 1:]], axis=-1)
        t, h, w, c = x.shape
        if (h, w) != (size, size) and h <= size and w <= size:
            # upsampling: OpenCV's bilinear equals torch's (align_corners=False) and is 5x faster
            planes = np.ascontiguousarray(x.transpose(1, 2, 0, 3).reshape(h, w, t * c), dtype=np.float32)
            out = cv2.resize(planes, (size, size), interpolation=cv2.INTER_LINEAR).reshape(size, size, t, c)
            out = torch.from_numpy(np.ascontiguousarray(out.transpose(2, 3, 0, 1)))
        else:
            out = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32))
            if (h, w) != (size, size):  # downsampling needs antialiasing
                out = Fn.interpolate(out, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        scale, offset = _affine(m)
        return out.mul_(scale).add_(offset)

    def _crop_grid(self, m: str) -> int:
        first = next(k for k in self.modalities if k in FRAME_MODALITIES)
        return self._array(first).shape[-2]


def pixel_bounds(modality: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Valid range of a frame modality in model space (per channel), for attacks' pixel clamping; None = unbounded."""
    if modality not in NORMALISATION:
        return None
    lo_pix = -1.0 if modality == "diff" else 0.0
    mean, std = (torch.tensor(v).view(-1, 1, 1) for v in NORMALISATION[modality])
    return (lo_pix - mean) / std, (1.0 - mean) / std
