"""Reading and writing audio-visual clips.

Writing uses PyAV (its FFmpeg has libx264 and aac); reading video uses decord; the audio track is decoded
with PyAV (decord's AudioReader aborts on some inputs instead of raising), never with an ffmpeg binary.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class MediaError(RuntimeError):
    """A clip that cannot be used; the message says what is wrong with it."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def write_clip(path: str | Path, frames: np.ndarray, fps: int, audio: np.ndarray | None = None,
               sample_rate: int = 16000) -> None:
    """Write (T, H, W, 3) uint8 RGB frames as h264 and an optional mono float waveform as aac."""
    import av

    frames = np.ascontiguousarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"h264/yuv420p needs even width and height, got {w}x{h}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="mp4") as container:
        vs = container.add_stream("h264", rate=fps)
        vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
        # Deterministic output: single-threaded encoder, fixed options.
        # mbtree rate control depends on uninitialised memory; with it off, output is byte-identical across runs
        vs.codec_context.options = {"preset": "veryfast", "crf": "18", "threads": "1", "x264-params": "mbtree=0"}
        vs.thread_count = 1
        astream = None
        if audio is not None:
            astream = container.add_stream("aac", rate=sample_rate, layout="mono")
        for frame in frames:
            for packet in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in vs.encode():
            container.mux(packet)
        if astream is not None:
            samples = np.clip(np.asarray(audio, dtype=np.float32), -1, 1)
            chunk = 1024
            for start in range(0, len(samples), chunk):
                block = samples[start:start + chunk][None, :]
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout="mono")
                af.sample_rate = sample_rate
                af.pts = start
                for packet in astream.encode(af):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)


def video_info(path: str | Path) -> VideoInfo:
    vr = open_video(path)
    h, w = vr[0].shape[:2] if len(vr) else (0, 0)
    return VideoInfo(num_frames=len(vr), fps=float(vr.get_avg_fps()), width=w, height=h)


def open_video(path: str | Path, width: int = -1, height: int = -1):
    import decord

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: empty file")
    try:
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), width=width, height=height, num_threads=1)
    except Exception as err:  # decord raises DECORDError / RuntimeError with long C++ traces
        raise MediaError(f"{path}: unreadable video ({_short(err)})") from None
    if len(vr) == 0:
        raise MediaError(f"{path}: video has no frames")
    return vr


def read_frames(vr, indices: list[int], path: str | Path = "") -> np.ndarray:
    """Decode frames at `indices` → (N, H, W, 3) uint8, with a clear error for a truncated file."""
    try:
        return vr.get_batch(list(indices)).asnumpy()
    except Exception as err:
        raise MediaError(f"{path}: cannot decode frames {list(indices)[:4]}… ({_short(err)})") from None


def read_audio(path: str | Path, sample_rate: int) -> np.ndarray:
    """Decode the clip's own audio track to a mono float32 waveform at `sample_rate`."""
    import av

    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: file not found")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: no audio track")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks = []
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
    except MediaError:
        raise
    except Exception as err:
        raise MediaError(f"{path}: unreadable audio ({_short(err)})") from None
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise MediaError(f"{path}: audio track is empty")
    return np.concatenate(chunks).astype(np.float32)


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]
