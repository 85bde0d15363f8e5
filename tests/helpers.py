"""Fixture builders shared by the tests: tiny real clips and manifests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmrobust.data.media import write_clip
from mmrobust.io import write_csv

SR = 16000


def textured_translation(frames: int = 20, size: int = 64, dx: int = 1, dy: int = 0, seed: int = 0) -> np.ndarray:
    """A random-texture patch on a flat background that moves (dx, dy) pixels per frame."""
    rng = np.random.default_rng(seed)
    patch = (rng.random((size // 2, size // 2, 3)) * 255).astype(np.uint8)
    out = np.full((frames, size, size, 3), 90, np.uint8)
    p = size // 2
    for t in range(frames):
        y, x = size // 4 + dy * t, size // 8 + dx * t
        ys, xs = slice(max(y, 0), min(y + p, size)), slice(max(x, 0), min(x + p, size))
        out[t, ys, xs] = patch[ys.start - y: ys.stop - y, xs.start - x: xs.stop - x]
    return out


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def make_clip(path: Path, seconds: float = 2.0, fps: int = 10, size: int = 64, freq: float | None = 440.0,
              dx: int = 1, dy: int = 0, seed: int = 0) -> Path:
    frames = textured_translation(int(seconds * fps), size, dx, dy, seed)
    audio = tone(freq, seconds) if freq else None
    write_clip(path, frames, fps, audio, SR)
    return path


def write_manifest(out_dir: Path, root: Path, rows: list[dict]) -> Path:
    """A manifest as the ingest stage writes it (clips.csv + summary.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    full = [dict(clip_id=r["clip_id"], path=r["path"], label=r.get("label", 0),
                 label_name=str(r.get("label", 0)), split=r.get("split", "train")) for r in rows]
    write_csv(out_dir / "clips.csv", full, ["clip_id", "path", "label", "label_name", "split"])
    (out_dir / "summary.json").write_text(json.dumps({"root": str(root), "dataset": "ks"}))
    return out_dir


class TinyAV:
    """In-memory stand-in for AVDataset: class-dependent audio (1,16,20) and visual (3,3,16,16) tensors."""

    def __init__(self, n: int = 24, num_classes: int = 3, seed: int = 0, noise: float = 1.0,
                 modalities=("audio", "visual")):
        import torch
        protos = torch.Generator().manual_seed(1234)  # class prototypes shared by every split
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % num_classes
        shapes = {"audio": (1, 16, 20), "visual": (3, 3, 16, 16), "flow": (3, 2, 16, 16), "diff": (3, 3, 16, 16)}
        self.x = {}
        for m in modalities:
            proto = torch.randn(num_classes, *shapes[m], generator=protos)
            self.x[m] = proto[self.labels] + noise * torch.randn(n, *shapes[m], generator=g)
        self.modalities = list(modalities)

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {**{m: self.x[m][i] for m in self.modalities}, "label": int(self.labels[i]), "index": i}


def tiny_data(num_classes: int = 3, modalities=("audio", "visual"), n: int = 24):
    from mmrobust.train import Data
    mods = list(modalities)
    return Data(TinyAV(n, num_classes, 0, modalities=mods), TinyAV(n, num_classes, 0, modalities=mods),
                TinyAV(12, num_classes, 1, modalities=mods), TinyAV(12, num_classes, 2, modalities=mods),
                num_classes, mods)


def tiny_project(root: Path, train: dict | None = None, **groups):
    """12 real clips (2 classes) ingested and extracted for real into `root` as dataset `tiny`; returns the params
    resolved for it (`params.as_file_dict()` is the params file a stage CLI reads)."""
    from mmrobust.config import parse_params
    from mmrobust.data.extract import extract

    rows = []
    for i in range(12):
        make_clip(root / "v" / f"c{i}.mp4", seconds=1.5, dx=1 + i % 2, freq=300 + 400 * (i % 2), seed=i)
        split = "train" if i < 6 else ("val" if i < 8 else "test")
        rows.append(dict(clip_id=f"c{i}", path=f"v/c{i}.mp4", label=i % 2, split=split))
    params = parse_params({
        "datasets": {"tiny": {"dataset": "ks", "root": str(root)}},
        "data": {"out_dir": str(root / "manifest")},
        "extract": {"out_dir": str(root / "features"), "timing": {"fps": 2.0, "max_frames": 3},
                    "visual": {"size": 32}, "audio": {"preset": "cpu_fbank", "clip_s": 1.5, "frames": 60}},
        "train": {"epochs": 2, "batch_size": 4, "model": {"width": 2}, "storage_dir": str(root / "ray"),
                  "out_dir": str(root / "models"), **(train or {})},
        "tracking": {"uri": f"sqlite:///{root / 'mlflow.db'}"},
        **groups}).for_dataset("tiny")
    manifest = write_manifest(Path(params.data.out_dir), root, rows)
    write_csv(manifest / "classes.csv", [{"label": 0, "name": "a"}, {"label": 1, "name": "b"}], ["label", "name"])
    for m in ("visual", "audio"):
        extract(m, params.extract, manifest, progress=False)
    return params


def check_failed_generation_keeps_previous(tmp_path: Path, monkeypatch, module, generate) -> None:
    """A generator whose second clip write fails leaves the previous output folder as it was and no temp dir.
    `module` is where the generator looks up `write_clip`; `generate(out_dir)` runs it."""
    import pytest

    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    calls = []

    def failing_write(*args, **kw):
        calls.append(args[0])
        if len(calls) == 2:
            raise RuntimeError("disk full")

    monkeypatch.setattr(module, "write_clip", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        generate(out)
    assert (out / "keep.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
