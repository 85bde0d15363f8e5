"""Pure per-clip feature maths: frame positions, audio spectrograms, optical flow, frame differences."""
from __future__ import annotations

import math

import numpy as np

from mmrobust.config import AudioCfg


def frame_positions(num_frames: int, video_fps: float, fps: float, max_frames: int) -> np.ndarray:
    """Indices of the frames to keep: `fps` frames per second, at least 3, at most `max_frames`.

    Frames are the centres of equal slices of the clip, so the test-time "centre of each third" and the
    train-time "random frame inside each third" can both be drawn from them later.
    """
    duration = num_frames / video_fps
    n = int(min(max_frames, max(3, math.floor(duration * fps + 1e-6))))
    times = (np.arange(n) + 0.5) * duration / n
    return np.minimum((times * video_fps).astype(np.int64), num_frames - 1)


def fit_length(wave: np.ndarray, length: int) -> np.ndarray:
    """Cut or zero-pad a waveform to exactly `length` samples (AAC adds priming samples)."""
    if len(wave) >= length:
        return wave[:length]
    return np.pad(wave, (0, length - len(wave)))


def audio_features(wave: np.ndarray, cfg: AudioCfg) -> np.ndarray:
    """(bins, cfg.frames) float32 normalised spectrogram of a mono waveform at cfg.sample_rate.

    `fbank`: log mel power spectrogram (AST lineage); `stft`: log(|STFT| + 1e-7) (OGM-GE lineage).
    The waveform is cut to clip_s; the spectrogram is padded with zeros (before normalisation, as AST does)
    or cut to `frames`, then mapped with
    (x - mean) / (2 * std).
    """
    import librosa

    cfg = cfg.resolved()
    win = int(round(cfg.sample_rate * cfg.win_ms / 1000))
    # cut to clip_s; a shorter clip is not padded with silence: its missing frames are padded below
    wave = wave.astype(np.float32)[: int(round(cfg.clip_s * cfg.sample_rate))]
    wave = fit_length(wave, max(len(wave), cfg.n_fft))
    hop = int(round(cfg.sample_rate * cfg.hop_ms / 1000))
    if cfg.kind == "fbank":
        mel = librosa.feature.melspectrogram(y=wave, sr=cfg.sample_rate, n_fft=cfg.n_fft, win_length=win,
                                             hop_length=hop, n_mels=cfg.n_mels, power=2.0, center=False)
        spec = np.log(mel + 1e-6)
    else:
        stft = librosa.stft(wave, n_fft=cfg.n_fft, hop_length=hop, win_length=win, center=True)
        spec = np.log(np.abs(stft) + 1e-7)
    out = np.zeros((spec.shape[0], cfg.frames), dtype=np.float32)
    n = min(cfg.frames, spec.shape[1])
    out[:, :n] = spec[:, :n]
    return (out - cfg.norm_mean) / (2 * cfg.norm_std)


def flow_algorithm(name: str) -> str:
    """The algorithm that will really run: TV-L1 needs opencv-contrib's cv2.optflow."""
    import cv2

    if name == "tvl1" and not hasattr(cv2, "optflow"):
        raise RuntimeError("extract.flow.algorithm: 'tvl1' needs opencv-contrib (cv2.optflow); "
                           "install opencv-contrib-python-headless or use 'farneback'")
    return name


def optical_flow(prev_rgb: np.ndarray, next_rgb: np.ndarray, algorithm: str) -> np.ndarray:
    """(H, W, 2) float32 flow (u = +x right, v = +y down) in pixels, from prev to next."""
    import cv2

    prev = cv2.cvtColor(prev_rgb, cv2.COLOR_RGB2GRAY)
    nxt = cv2.cvtColor(next_rgb, cv2.COLOR_RGB2GRAY)
    if algorithm == "tvl1":
        return cv2.optflow.DualTVL1OpticalFlow_create().calc(prev, nxt, None)
    return cv2.calcOpticalFlowFarneback(prev, nxt, None, pyr_scale=0.5, levels=3, winsize=15, iterations=3,
                                        poly_n=5, poly_sigma=1.2, flags=0)


def flow_to_uint8(flow: np.ndarray, bound: float) -> np.ndarray:
    """Bound to ±bound and rescale to [0, 255] (the TV-L1 dumps of the UCF101 lineage use bound 15)."""
    scaled = (np.clip(flow, -bound, bound) + bound) * (255.0 / (2 * bound))
    return np.round(scaled).astype(np.uint8)


def uint8_to_flow(code: np.ndarray, bound: float) -> np.ndarray:
    return code.astype(np.float32) * (2 * bound / 255.0) - bound


def frame_difference(prev_rgb: np.ndarray, next_rgb: np.ndarray) -> np.ndarray:
    """next − prev in [-255, 255], stored as uint8 (d + 255) / 2 rounded (one bit of precision lost)."""
    d = next_rgb.astype(np.int16) - prev_rgb.astype(np.int16)
    return ((d + 255 + 1) // 2).astype(np.uint8)


def uint8_to_difference(code: np.ndarray) -> np.ndarray:
    return code.astype(np.float32) * 2 - 255
