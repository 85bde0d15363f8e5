"""Extraction throughput and peak memory: mmrobust vs the reference recipe, same clips, same run.

Reference recipe (the paper's released preprocessing): ffmpeg dumps 1-fps JPEGs per clip, ffmpeg writes a
16 kHz wav, then one fbank `.npy` per clip. Ours: decord frames straight into one uint8 array + librosa fbank
from the clip's own audio track into one float16 array (`mmrobust.data.extract`). Both use the same number of
parallel workers and the paper's settings (1 fps, 224x224, 128-mel x 1024 fbank).

    .venv/bin/python bench/extract.py [--clips 24] [--duration 10] [--workers 2]

Needs an ffmpeg binary for the reference side only (`apt-get install ffmpeg`). Prints clips/s, the speed-up
(target >= 3x) and peak RSS at N and 2N clips (ours must not grow with the number of clips).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mmrobust.config import ExtractCfg, GenerateCfg  # noqa: E402
from mmrobust.io import write_csv  # noqa: E402

PAPER = dict(timing={"fps": 1.0, "max_frames": 10}, visual={"size": 224}, audio={"preset": "audioset_fbank"})


def make_clips(root: Path, n: int, duration: float, size: int) -> Path:
    from mmrobust.data.synthetic import generate

    per_class = max(1, n // 4)
    cfg = GenerateCfg(num_classes=4, train_per_class=per_class, test_per_class=1, duration_s=duration, fps=25,
                      size=size, out_dir=str(root / "clips"))
    generate(cfg)
    return root / "clips"


def write_manifest(clips: Path, names: list[str], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(clip_id=n, path=f"videos/{n}.mp4", label=0, label_name="0", split="train") for n in names]
    write_csv(out / "clips.csv", rows, ["clip_id", "path", "label", "label_name", "split"])
    (out / "summary.json").write_text(json.dumps({"root": str(clips)}))
    return out


def run_ours(manifest: Path, out: Path, workers: int) -> None:
    from mmrobust.data.extract import extract

    cfg = ExtractCfg(workers=workers, out_dir=str(out), **PAPER)
    for m in ("visual", "audio"):
        extract(m, cfg, manifest, progress=False)


def _reference_clip(video: Path, out: Path) -> None:
    import soundfile as sf

    from mmrobust.config import AudioCfg
    from mmrobust.data.features import audio_features

    frames = out / "frames" / video.stem
    frames.mkdir(parents=True, exist_ok=True)
    q = ["-loglevel", "error", "-y", "-threads", "1"]
    subprocess.run(["ffmpeg", *q, "-i", str(video), "-vf", "fps=1,scale=224:224", "-q:v", "2",
                    str(frames / "%03d.jpg")], check=True)
    wav = out / "wav" / f"{video.stem}.wav"
    wav.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", *q, "-i", str(video), "-ac", "1", "-ar", "16000", str(wav)], check=True)
    wave, _ = sf.read(wav, dtype="float32")
    spec = audio_features(wave, AudioCfg(preset="audioset_fbank"))
    (out / "fbank").mkdir(exist_ok=True)
    np.save(out / "fbank" / f"{video.stem}.npy", spec)


def run_reference(manifest: Path, out: Path, workers: int) -> None:
    import csv

    root = Path(json.loads((manifest / "summary.json").read_text())["root"])
    with open(manifest / "clips.csv") as fh:
        videos = [root / r["path"] for r in csv.DictReader(fh)]
    with ThreadPoolExecutor(workers) as pool:  # each task runs ffmpeg processes; threads only wait on them
        list(pool.map(lambda v: _reference_clip(v, out), videos))


def measure(recipe: str, manifest: Path, workers: int) -> dict:
    """Run one recipe in a fresh process; wall time and peak RSS (its own and its largest child's)."""
    out = Path(tempfile.mkdtemp(prefix=f"bench-{recipe}-"))
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import extract as b, resource, json, "
            f"time; from pathlib import Path; t=time.perf_counter(); b.run_{recipe}(Path({str(manifest)!r}), "
            f"Path({str(out)!r}), {workers}); dt=time.perf_counter()-t; "
            f"print(json.dumps(dict(seconds=dt, self_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024, "
            f"child_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{recipe} failed:\n{proc.stderr[-3000:]}")
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    stats["disk_mb"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    shutil.rmtree(out, ignore_errors=True)
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=24)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=320, help="source video size (frames are resized to 224)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if shutil.which("ffmpeg") is None:
        raise SystemExit("the reference recipe needs an ffmpeg binary: apt-get install ffmpeg")
    work = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    print(f"generating {2 * args.clips} clips ({args.duration:.0f} s, {args.size}x{args.size}, 25 fps, aac) ...")
    clips = make_clips(work, 2 * args.clips, args.duration, args.size)
    names = sorted(p.stem for p in (clips / "videos").glob("*.mp4"))
    small = write_manifest(clips, names[: args.clips], work / "m_small")
    large = write_manifest(clips, names[: 2 * args.clips], work / "m_large")
    rows = []
    for recipe in ("reference", "ours"):
        for label, manifest, n in (("N", small, args.clips), ("2N", large, 2 * args.clips)):
            s = measure(recipe, manifest, args.workers)
            rows.append(dict(recipe=recipe, clips=n, **s))
            print(f"{recipe:9s} {label:2s} {n:4d} clips: {n / s['seconds']:7.2f} clips/s  peak RSS self "
                  f"{s['self_mb']:6.0f} MB, largest child {s['child_mb']:6.0f} MB, output {s['disk_mb']:7.1f} MB")
    ref = {r["clips"]: r for r in rows if r["recipe"] == "reference"}
    ours = {r["clips"]: r for r in rows if r["recipe"] == "ours"}
    for n in (args.clips, 2 * args.clips):
        print(f"speed-up at {n} clips: {ref[n]['seconds'] / ours[n]['seconds']:.2f}x (target >= 3x)")
    growth = max(ours[2 * args.clips]["self_mb"], ours[2 * args.clips]["child_mb"]) / max(
        ours[args.clips]["self_mb"], ours[args.clips]["child_mb"])
    print(f"ours: peak memory at 2N / at N = {growth:.2f} (1.0 = does not grow with the number of clips)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
