"""Real-content audio-visual sets: spoken digit names and handwritten digits, in the Kinetics-Sounds layout.

The material ships with installable packages, so nothing is downloaded:
- **audio**: the class's English digit name ("zero" ... "nine") spoken by eSpeak NG (the `espeakng-loader`
  wheel bundles libespeak-ng and its voice data), with a random voice variant, speaking rate and pitch, at a
  random onset, over pink background noise at `speech_snr_db` and, optionally, another digit name murmured
  by another voice (`babble_db` below the speech);
- **video**: a handwritten digit of the class from scikit-learn's digits set (1797 8x8 scans of 43 writers:
  the writers' own strokes) drawn as solid strokes, scaled, rotated and drifting over paper of a random grey,
  at `glyph_contrast` (0 invisible, 1 full ink), with fainter handwritten digits of other classes as distractors and pixel noise.

Train and test clips draw disjoint handwritten samples (every scan is used by one split only). A set's knobs
decide which modality is the easy, preferred one (`sets` in the `spoken` params group): clear speech with a
faint glyph is the Kinetics-Sounds situation (audio preferred), a clear glyph with speech buried in noise the
opposite. Layout written into out_dir: videos/<name>.mp4, train.txt, test.txt, classes.txt, meta.json.
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import sys
import time
import zlib
from functools import lru_cache, partial
from pathlib import Path

import cv2
import numpy as np

from mmrobust.config import SpokenCfg, SpokenSet
from mmrobust.data.media import write_clip
from mmrobust.io import atomic_dir, write_json

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# eSpeak NG English voices crossed with its variants (pitch/formant/breathiness profiles of the data folder)
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp")
# (f2, f3, f5 and whisper are left out: their breath noise differs from run to run, so the files would too)
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f4", "klatt", "klatt2", "croak",
            "Andy", "Annie", "Denis", "Mike", "linda", "ian", "john", "max")
SPLITS = ("train", "test")
_ESPEAK_RATE, _ESPEAK_PITCH = 1, 3          # espeak_PARAMETER
_SYNCHRONOUS = 2                            # AUDIO_OUTPUT_SYNCHRONOUS
_POS_CHARACTER = 1


class Speaker:
    """eSpeak NG through ctypes, one fresh library instance per utterance.

    The library keeps synthesis state in globals that neither espeak_Terminate nor a new voice resets: the same
    word, voice, rate and pitch come out a few samples different after other utterances, so a clip would depend
    on which clips its process spoke before. Loading the library anew (dlopen/dlclose, ~3 ms) makes every
    utterance a pure function of its arguments, in any process and any order.
    """

    def __init__(self):
        import espeakng_loader

        self._path, self._data = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
        self._callback = callback_type(self._collect)   # kept alive as long as a library may call it
        self._chunks: list[np.ndarray] = []
        self.sample_rate = 0

    def _collect(self, wav, n, _events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.float32) / 32768.0)
        return 0

    def say(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        """Mono float waveform at self.sample_rate."""
        import _ctypes

        lib = ctypes.CDLL(self._path, mode=ctypes.RTLD_LOCAL)
        self.sample_rate = 0
        try:
            self.sample_rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, self._data.encode(), 0)
            if self.sample_rate <= 0:
                raise RuntimeError(f"eSpeak NG did not initialise (library {self._path}, data folder {self._data})")
            lib.espeak_SetSynthCallback(self._callback)
            if lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
            lib.espeak_SetParameter(_ESPEAK_RATE, int(rate), 0)
            lib.espeak_SetParameter(_ESPEAK_PITCH, int(pitch), 0)
            self._chunks = []
            data = text.encode()
            if lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, 0, None, None) != 0:
                raise RuntimeError(f"eSpeak NG could not speak {text!r} with voice {voice!r}")
            lib.espeak_Synchronize()
        finally:
            if self.sample_rate > 0:
                lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)
        if not self._chunks:
            raise RuntimeError(f"eSpeak NG returned no audio for {text!r} with voice {voice!r}")
        return np.concatenate(self._chunks)


@lru_cache(maxsize=1)
def _speaker() -> Speaker:
    return Speaker()


@lru_cache(maxsize=1)
def handwritten_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (1797, 8, 8) float32 ink in [0, 1] and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


def split_pool(seed: int, label: int, split: str) -> np.ndarray:
    """Indices of the scans of `label` that `split` may draw from: a seeded half each, never shared."""
    _, labels = handwritten_digits()
    idx = np.flatnonzero(labels == label)
    idx = np.random.default_rng([seed, 7, label]).permutation(idx)
    half = len(idx) // 2
    return idx[:half] if split == "train" else idx[half:]


def _voice(rng: np.random.Generator) -> str:
    return f"{VOICES[rng.integers(len(VOICES))]}+{VARIANTS[rng.integers(len(VARIANTS))]}"


def _speech(word: str, rng: np.random.Generator, sr: int, info: dict) -> np.ndarray:
    from scipy.signal import resample_poly

    speaker = _speaker()
    voice = dict(word=word, voice=_voice(rng), rate=int(rng.integers(120, 230)), pitch=int(rng.integers(15, 85)))
    info.setdefault("speech", []).append(voice)
    wave = speaker.say(word, voice["voice"], rate=voice["rate"], pitch=voice["pitch"])
    g = np.gcd(sr, speaker.sample_rate)
    wave = resample_poly(wave, sr // g, speaker.sample_rate // g).astype(np.float32)
    return wave / (np.sqrt(np.mean(wave ** 2)) + 1e-9)        # unit RMS


def _pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.size, dtype=np.float64)
    spectrum /= np.sqrt(np.maximum(f, 1.0))
    noise = np.fft.irfft(spectrum, n)
    return noise / (np.sqrt(np.mean(noise ** 2)) + 1e-12)


def _place(track: np.ndarray, sound: np.ndarray, rng: np.random.Generator) -> None:
    sound = sound[: track.size]
    start = int(rng.integers(0, track.size - sound.size + 1))
    track[start:start + sound.size] += sound


def synth_audio(label: int, s: SpokenSet, cfg: SpokenCfg, rng: np.random.Generator,
                info: dict | None = None) -> np.ndarray:
    """The spoken class name over pink noise at s.speech_snr_db (relative to the unit-RMS speech); what was
    said by which voice goes into `info`."""
    info = {} if info is None else info
    n = int(round(cfg.duration_s * cfg.sample_rate))
    speech = np.zeros(n, np.float64)
    _place(speech, _speech(WORDS[label], rng, cfg.sample_rate, info), rng)
    if s.babble_db is not None:
        other = (label + 1 + int(rng.integers(len(WORDS) - 1))) % len(WORDS)
        babble = np.zeros(n, np.float64)
        _place(babble, _speech(WORDS[other], rng, cfg.sample_rate, info) * 10.0 ** (-s.babble_db / 20.0), rng)
        speech += babble
    noise = _pink_noise(n, rng) * 10.0 ** (-s.speech_snr_db / 20.0)
    wave = speech + noise
    return (0.9 * wave / (np.abs(wave).max() + 1e-9)).astype(np.float32)


def _glyph_layer(ink: np.ndarray, size: int, px: float, angle: float, centre: np.ndarray) -> np.ndarray:
    """(size, size) pen coverage of one 8x8 scan drawn `px` pixels tall, rotated by `angle` degrees at `centre`.

    The scan is upsampled, smoothed and thresholded into solid strokes: a blurry 64-fold upsampled blob is
    legible to people but a slow start for a small network trained from scratch."""
    scale = px / 8.0
    m = cv2.getRotationMatrix2D((4.0, 4.0), angle, scale)
    m[:, 2] += centre - 4.0                   # the scan's centre (4, 4) lands on `centre`
    up = cv2.warpAffine(np.ascontiguousarray(ink), m, (size, size), flags=cv2.INTER_CUBIC,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    up = cv2.GaussianBlur(up, (0, 0), 0.8)
    return np.clip((up - 0.25) * 4.0, 0.0, 1.0)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Paper of a random grey level with a gentle colour cast that varies across the frame."""
    coarse = rng.uniform(-0.05, 0.05, size=(3, 3, 3)).astype(np.float32)
    tint = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(rng.uniform(0.55, 0.8) + tint, 0.0, 1.0).astype(np.float32)


def synth_frames(label: int, split: str, s: SpokenSet, cfg: SpokenCfg, rng: np.random.Generator,
                 info: dict | None = None) -> np.ndarray:
    """(T, S, S, 3) uint8: background, faint distractor digits, the class's handwritten digit drifting; the
    scans drawn (indices into scikit-learn's digits, the class's last) go into `info`."""
    info = {} if info is None else info
    images, labels = handwritten_digits()
    size, n = cfg.size, int(round(cfg.duration_s * cfg.fps))
    bg = _background(size, rng)
    layers = []                               # (ink 8x8, contrast, px, angle, track (n, 2)), drawn in order
    for _ in range(s.distractors):
        other = (label + 1 + int(rng.integers(len(WORDS) - 1))) % len(WORDS)
        layers.append((int(rng.choice(split_pool(cfg.seed, other, split))), 0.5 * s.glyph_contrast))
    layers.append((int(rng.choice(split_pool(cfg.seed, label, split))), s.glyph_contrast))
    info["scans"] = [scan for scan, _ in layers]
    frames = np.repeat(bg[None], n, axis=0)
    for scan, contrast in layers:
        ink = images[scan]
        px = s.glyph_scale * size * rng.uniform(0.85, 1.15)
        angle = rng.uniform(-10.0, 10.0)
        margin = 0.5 * px
        start = rng.uniform(margin, size - margin, 2)
        end = np.clip(start + rng.uniform(-0.3, 0.3, 2) * size, margin, size - margin)
        colour = rng.uniform(0.0, 0.25, 3).astype(np.float32)   # dark ink of a random hue
        for i, t in enumerate(np.linspace(0.0, 1.0, n)):
            alpha = contrast * _glyph_layer(ink, size, px, angle, start + t * (end - start))[..., None]
            frames[i] = frames[i] * (1.0 - alpha) + colour * alpha
    if s.pixel_noise > 0:
        frames = frames + rng.standard_normal(frames.shape).astype(np.float32) * s.pixel_noise
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def clip_name(label: int, split: str, j: int) -> str:
    return f"{WORDS[label]}_{split}_{j:04d}"


def _plan(s: SpokenSet) -> list[dict]:
    per = {"train": s.train_per_class, "test": s.test_per_class}
    return [dict(name=clip_name(label, split, j), split=split, split_id=sid, label=label, index=label * per[split] + j)
            for sid, split in enumerate(SPLITS) for label in range(s.num_classes) for j in range(per[split])]


def make_clip(item: dict, s: SpokenSet, cfg: SpokenCfg, set_id: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Frames, waveform and provenance (scans drawn, words and voices) of one planned clip; its random stream
    depends on (seed, set, split, index) only."""
    rng = np.random.default_rng([cfg.seed, set_id, item["split_id"], item["index"]])
    v_rng, a_rng = rng.spawn(2)
    info: dict = {}
    frames = synth_frames(item["label"], item["split"], s, cfg, v_rng, info)
    return frames, synth_audio(item["label"], s, cfg, a_rng, info), info


def _write_one(item: dict, s: SpokenSet, cfg: SpokenCfg, set_id: int, video_dir: Path) -> dict:
    frames, audio, info = make_clip(item, s, cfg, set_id)
    write_clip(video_dir / f"{item['name']}.mp4", frames, cfg.fps, audio, cfg.sample_rate)
    return dict(name=item["name"], split=item["split"], label=item["label"], **info)


def set_seed_id(name: str) -> int:
    """A stable integer per set name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode())


def generate(cfg: SpokenCfg, name: str, out_dir: str | Path | None = None, progress: bool = True) -> dict:
    """Write set `name` of cfg.sets into out_dir (default <cfg.out_dir>/<name>), replaced atomically."""
    from tqdm import tqdm

    if name not in cfg.sets:
        raise KeyError(f"spoken.sets.{name}: no such set; configured: {sorted(cfg.sets)}")
    s = cfg.sets[name]
    out_dir = Path(out_dir if out_dir is not None else Path(cfg.out_dir) / name)
    plan = _plan(s)
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        (tmp / "videos").mkdir()
        write = partial(_write_one, s=s, cfg=cfg, set_id=set_seed_id(name), video_dir=tmp / "videos")
        bar = partial(tqdm, total=len(plan), desc=f"{name} clips", unit="clip", disable=not progress, file=sys.stderr)
        if cfg.workers > 1:                   # every clip has its own stream: the same files with any number
            with mp.get_context("forkserver").Pool(cfg.workers) as pool:
                records = list(bar(pool.imap(write, plan, chunksize=4)))
        else:
            records = [write(item) for item in bar(plan)]
        for split in SPLITS:
            (tmp / f"{split}.txt").write_text("".join(f"{r['name']} {r['label']}\n" for r in records
                                                     if r["split"] == split))
        (tmp / "classes.txt").write_text("".join(f"{k} {WORDS[k]}\n" for k in range(s.num_classes)))
        write_json(tmp / "meta.json", dict(
            dataset=f"spoken/{name}", layout="kinetics-sounds",
            material={"audio": "eSpeak NG (espeakng-loader) digit names", "video": "scikit-learn digits"},
            config=cfg.model_dump(exclude={"workers", "sets"}), set=s.model_dump(), clips=records))
    seconds = time.perf_counter() - t0
    print(f"generated {len(plan)} clips of set {name} in {seconds:.1f} s "
          f"({len(plan) / max(seconds, 1e-9):.1f} clips/s) -> {out_dir}")
    return dict(clips=len(plan), train=s.train_per_class * s.num_classes, test=s.test_per_class * s.num_classes,
                classes=s.num_classes, seconds=round(seconds, 3), out_dir=str(out_dir))
