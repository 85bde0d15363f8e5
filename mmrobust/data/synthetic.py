"""Synthetic audio-visual dataset in the Kinetics-Sounds layout.

Each class has a visual signature (shape x colour x motion direction of one moving object) and an audio
signature (chord on a class base frequency, harmonic pattern, amplitude-modulation rate). The defaults make
audio the easy modality and vision the hard one (small object, pixel noise, clutter, distractors), which is
the modality-preference situation of Kinetics-Sounds. With probability `ambiguity` a clip shows (or sounds
like) another class while keeping its label, so neither modality is perfect; meta.json records what each
modality actually shows.

Layout written into out_dir: videos/<name>.mp4, train.txt and test.txt (`<name> <label>`), classes.txt
(`<id> <name>`), meta.json.
"""
from __future__ import annotations

import multiprocessing as mp
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np

from mmrobust.config import GenerateCfg
from mmrobust.data.media import write_clip
from mmrobust.io import atomic_dir, write_json

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # name -> RGB in [0, 1]; four well separated hues
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.80, 0.18),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.92, 0.85, 0.10),
}
COLOUR_NAMES = tuple(COLOURS)
DIRECTIONS = {  # name -> unit vector (dx, dy) in image coordinates (y grows downwards)
    "right": (1.0, 0.0),
    "left": (-1.0, 0.0),
    "down": (0.0, 1.0),
    "up": (0.0, -1.0),
}
DIRECTION_NAMES = tuple(DIRECTIONS)
PARTIALS = (  # harmonic patterns: (frequency ratio, amplitude); the fundamental is always the loudest
    ((1.0, 1.0), (2.0, 0.5), (3.0, 0.33), (4.0, 0.25)),   # full harmonic series
    ((1.0, 1.0), (3.0, 0.45), (5.0, 0.3), (7.0, 0.2)),    # odd harmonics
    ((1.0, 1.0), (1.25, 0.6), (1.5, 0.6), (2.0, 0.4)),    # major triad + octave
    ((1.0, 1.0), (1.5, 0.7), (2.0, 0.5), (3.0, 0.35)),    # power chord
)
PATTERN_NAMES = ("harmonic", "odd", "triad", "fifth")
BASE_HZ = 150.0          # lowest base frequency; 16 bases a quarter octave apart reach ~2 kHz
MAX_CLASSES = 64
SPLITS = ("train", "test")
DISTRACTOR_SCALE = 0.6   # distractors are smaller than the class object, which stays the dominant mover
FADE_S = 0.01            # audio fade in/out against clicks at the clip boundaries


@dataclass(frozen=True)
class ClassSpec:
    """What class k looks and sounds like."""
    index: int
    shape: str
    colour: str
    direction: str
    base_hz: float
    pattern: int
    am_hz: float

    @property
    def name(self) -> str:
        return f"{self.colour}_{self.shape}_{self.direction}_{PATTERN_NAMES[self.pattern]}{self.base_hz:.0f}"

    @property
    def rgb(self) -> np.ndarray:
        return np.array(COLOURS[self.colour], dtype=np.float32)

    @property
    def velocity_dir(self) -> np.ndarray:
        return np.array(DIRECTIONS[self.direction], dtype=np.float64)


def class_spec(k: int) -> ClassSpec:
    """Bijective map 0..63 -> (shape, colour, direction) and (base, pattern), spreading the first classes.

    Visual: with a = k % 4, b = k // 4 % 4, c = k // 16, (shape, colour, direction) = (a, a+b, a+2b+c) mod 4,
    so the first four classes differ in all three attributes. Audio: base index 5k mod 16 (5 is invertible
    mod 16, so neighbouring classes are far apart in pitch), pattern (k mod 16 + k // 16) mod 4.
    """
    if not 0 <= k < MAX_CLASSES:
        raise ValueError(f"class index must be in [0, {MAX_CLASSES}), got {k}")
    a, b, c = k % 4, (k // 4) % 4, k // 16
    base = (5 * k) % 16
    return ClassSpec(
        index=k,
        shape=SHAPES[a],
        colour=COLOUR_NAMES[(a + b) % 4],
        direction=DIRECTION_NAMES[(a + 2 * b + c) % 4],
        base_hz=BASE_HZ * 2.0 ** (base / 4.0),
        pattern=(k % 16 + c) % 4,
        am_hz=1.0 + 0.75 * (k % 7),
    )


def _shown_class(rng: np.random.Generator, label: int, k: int, ambiguity: float) -> int:
    """The class a modality shows: the label, or with probability `ambiguity` another class uniformly.

    Both random numbers are always drawn so that the rest of the stream does not depend on the outcome.
    """
    u, other = rng.random(), int(rng.integers(k - 1))
    if u >= ambiguity:
        return label
    return other if other < label else other + 1


# ---------------------------------------------------------------- audio
def synth_audio(spec: ClassSpec, cfg: GenerateCfg, rng: np.random.Generator) -> np.ndarray:
    """Class chord with small pitch/phase jitter, amplitude modulation and white noise at cfg.audio.snr_db."""
    sr = cfg.sample_rate
    n = int(round(cfg.duration_s * sr))
    t = np.arange(n) / sr
    f0 = spec.base_hz * (1.0 + rng.uniform(-0.015, 0.015))
    tone = np.zeros(n)
    for ratio, amp in PARTIALS[spec.pattern]:
        f = f0 * ratio
        if f < 0.45 * sr:
            tone += amp * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    am_rate = spec.am_hz * (1.0 + rng.uniform(-0.1, 0.1))
    tone *= 1.0 + 0.5 * np.sin(2 * np.pi * am_rate * t + rng.uniform(0, 2 * np.pi))
    tone *= 0.1 / (np.sqrt(np.mean(tone ** 2)) + 1e-12)          # signal RMS 0.1
    noise = rng.standard_normal(n) * 0.1 * 10.0 ** (-cfg.audio.snr_db / 20.0)
    wave = tone + noise
    fade = min(int(FADE_S * sr), n // 2)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        wave[:fade] *= ramp
        wave[n - fade:] *= ramp[::-1]
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------- visual
_SHIFT = 4  # cv2 drawing with fractional bits: sub-pixel positions, so slow motion is still smooth
_SUB = 1 << _SHIFT


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape of radius r centred at (cx, cy)."""
    mask = np.zeros((size, size), np.uint8)
    c = (int(round(cx * _SUB)), int(round(cy * _SUB)))
    if shape == "circle":
        cv2.circle(mask, c, int(round(r * _SUB)), 255, -1, cv2.LINE_AA, shift=_SHIFT)
        return mask.astype(np.float32) / 255.0
    if shape == "square":
        s = 0.85 * r
        pts = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        pts = [(0.0, -r), (0.87 * r, 0.6 * r), (-0.87 * r, 0.6 * r)]
    elif shape == "cross":
        w = 0.35 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w),
               (-r, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    poly = np.array([[(cx + x) * _SUB, (cy + y) * _SUB] for x, y in pts]).round().astype(np.int32)
    cv2.fillPoly(mask, [poly], 255, cv2.LINE_AA, shift=_SHIFT)
    return mask.astype(np.float32) / 255.0


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Static clutter: a smooth random colour field plus a few faint rectangles, mid grey on average."""
    coarse = rng.uniform(-0.18, 0.18, size=(6, 6, 3)).astype(np.float32)
    img = 0.45 + cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(4):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 3, 2)
        img[y0:y0 + h, x0:x0 + w] += rng.uniform(-0.12, 0.12, 3).astype(np.float32)
    return img


def _main_track(spec: ClassSpec, size: int, r: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) centres of the class object: a straight translation along the class direction."""
    u = spec.velocity_dir
    lo, hi = r + 1.0, size - r - 1.0
    travel = max(min(0.5 * size * rng.uniform(0.75, 1.25), hi - lo), 0.0)
    along = rng.uniform(lo, hi - travel)          # start coordinate along the motion axis (for +direction)
    across = rng.uniform(lo, hi)
    start_pos = along if u.sum() > 0 else size - along
    start = np.where(u != 0, start_pos, across)
    steps = np.linspace(0.0, travel, n)[:, None]
    return start[None, :] + steps * u[None, :]


def _bouncing_track(size: int, r: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) centres of a distractor moving in a random direction and reflecting off the frame edges."""
    lo, hi = r, size - r
    pos = rng.uniform(lo, hi, 2)
    angle = rng.uniform(0, 2 * np.pi)
    vel = np.array([np.cos(angle), np.sin(angle)]) * rng.uniform(0.2, 0.6) * size / max(n - 1, 1)
    out = np.empty((n, 2))
    for i in range(n):
        out[i] = pos
        pos = pos + vel
        for d in range(2):
            if not lo <= pos[d] <= hi:
                vel[d] = -vel[d]
                pos[d] = np.clip(pos[d], lo, hi)
    return out


def synth_frames(spec: ClassSpec, cfg: GenerateCfg, rng: np.random.Generator) -> np.ndarray:
    """(T, S, S, 3) uint8: clutter, distractors of random classes, the class object, pixel noise."""
    size, vis = cfg.size, cfg.visual
    n = int(round(cfg.duration_s * cfg.fps))
    r = vis.object_scale * size
    bg = _background(size, rng)
    layers = []  # (shape, rgb, track, radius), drawn in order: distractors first, class object on top
    for _ in range(vis.distractors):
        d = class_spec(int(rng.integers(MAX_CLASSES)))
        rgb = np.array(COLOURS[COLOUR_NAMES[rng.integers(4)]], np.float32)
        rd = r * DISTRACTOR_SCALE * rng.uniform(0.8, 1.1)
        layers.append((d.shape, rgb, _bouncing_track(size, rd, n, rng), rd))
    rgb = np.clip(spec.rgb * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05, 3), 0, 1).astype(np.float32)
    layers.append((spec.shape, rgb, _main_track(spec, size, r, n, rng), r))
    frames = np.empty((n, size, size, 3), np.float32)
    for i in range(n):
        img = bg.copy()
        for shape, colour, track, radius in layers:
            alpha = _shape_mask(shape, size, track[i, 0], track[i, 1], radius)[..., None]
            img = img * (1.0 - alpha) + colour * alpha
        frames[i] = img
    if vis.noise_std > 0:
        frames += rng.standard_normal(frames.shape, dtype=np.float32) * vis.noise_std
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------- dataset
def clip_name(label: int, split: str, j: int) -> str:
    return f"syn_c{label:02d}_{split}_{j:04d}"


def _clip_plan(cfg: GenerateCfg) -> list[dict]:
    """Every clip to write, in a fixed order: split, then class, then index within the class."""
    plan = []
    for split_id, split in enumerate(SPLITS):
        per_class = cfg.train_per_class if split == "train" else cfg.test_per_class
        for label in range(cfg.num_classes):
            for j in range(per_class):
                plan.append(dict(name=clip_name(label, split, j), split=split, split_id=split_id,
                                 clip_index=label * per_class + j, label=label))
    return plan


def make_clip(cfg: GenerateCfg, item: dict) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Frames, waveform and the classes shown in (visual, audio) for one planned clip.

    The per-clip generator depends only on (seed, split, clip index), so clips do not depend on generation
    order; audio and vision get independent child streams so one modality's knobs never change the other.
    """
    rng = np.random.default_rng([cfg.seed, item["split_id"], item["clip_index"]])
    v_rng, a_rng = rng.spawn(2)
    k, label = cfg.num_classes, item["label"]
    v_cls = _shown_class(v_rng, label, k, cfg.visual.ambiguity)
    a_cls = _shown_class(a_rng, label, k, cfg.audio.ambiguity)
    frames = synth_frames(class_spec(v_cls), cfg, v_rng)
    audio = synth_audio(class_spec(a_cls), cfg, a_rng)
    return frames, audio, v_cls, a_cls


def _write_one(item: dict, cfg: GenerateCfg, video_dir: Path) -> dict:
    frames, audio, v_cls, a_cls = make_clip(cfg, item)
    write_clip(video_dir / f"{item['name']}.mp4", frames, cfg.fps, audio, cfg.sample_rate)
    return dict(name=item["name"], split=item["split"], label=item["label"], visual_class=v_cls,
                audio_class=a_cls)


def _class_record(spec: ClassSpec) -> dict:
    return dict(id=spec.index, name=spec.name, shape=spec.shape, colour=spec.colour, direction=spec.direction,
                base_hz=round(spec.base_hz, 3), pattern=PATTERN_NAMES[spec.pattern], am_hz=spec.am_hz)


def _write_lists(root: Path, cfg: GenerateCfg, records: list[dict]) -> None:
    for split in SPLITS:
        lines = [f"{r['name']} {r['label']}\n" for r in records if r["split"] == split]
        (root / f"{split}.txt").write_text("".join(lines))
    specs = [class_spec(k) for k in range(cfg.num_classes)]
    (root / "classes.txt").write_text("".join(f"{s.index} {s.name}\n" for s in specs))


def _meta(cfg: GenerateCfg, records: list[dict]) -> dict:
    def agreement(split: str, key: str) -> float:
        rows = [r for r in records if r["split"] == split]
        return round(sum(r[key] == r["label"] for r in rows) / len(rows), 6)

    counts = {split: {"clips": sum(r["split"] == split for r in records),
                      "visual_agrees_with_label": agreement(split, "visual_class"),
                      "audio_agrees_with_label": agreement(split, "audio_class")} for split in SPLITS}
    return dict(
        dataset="synthetic",
        layout="kinetics-sounds",
        config=cfg.model_dump(exclude={"workers"}),  # the data does not depend on it
        frames_per_clip=int(round(cfg.duration_s * cfg.fps)),
        samples_per_clip=int(round(cfg.duration_s * cfg.sample_rate)),
        classes=[_class_record(class_spec(k)) for k in range(cfg.num_classes)],
        counts=counts,
        clips=records,
    )


def generate(cfg: GenerateCfg, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Write the dataset into out_dir (default cfg.out_dir), replacing it atomically; return a summary.

    Output files depend only on cfg (no timestamps in meta.json), so the same cfg reproduces them.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir if out_dir is not None else cfg.out_dir)
    plan = _clip_plan(cfg)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        video_dir = tmp / "videos"
        video_dir.mkdir()
        write = partial(_write_one, cfg=cfg, video_dir=video_dir)
        bar = partial(tqdm, total=len(plan), desc="synthetic clips", unit="clip", disable=not progress,
                      file=sys.stderr)
        if cfg.workers > 1:  # every clip has its own random stream: the same files with any number of workers
            with mp.get_context("forkserver").Pool(cfg.workers) as pool:
                records = list(bar(pool.imap(write, plan, chunksize=4)))
        else:
            records = [write(item) for item in bar(plan)]
        _write_lists(tmp, cfg, records)
        write_json(tmp / "meta.json", _meta(cfg, records))
    seconds = time.perf_counter() - t0
    summary = dict(clips=len(plan), train=cfg.train_per_class * cfg.num_classes,
                   test=cfg.test_per_class * cfg.num_classes, classes=cfg.num_classes,
                   seconds=round(seconds, 3), clips_per_s=round(len(plan) / max(seconds, 1e-9), 2),
                   out_dir=str(out_dir))
    print(f"generated {len(plan)} clips in {seconds:.1f} s ({summary['clips_per_s']:.1f} clips/s) -> {out_dir}")
    return summary
