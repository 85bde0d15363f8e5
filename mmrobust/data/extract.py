"""Extraction of one modality for every clip of a manifest into one compact array plus an index.

Output folder `<extract.out_dir>/<modality>/` (written atomically):
  data.npy      (N, ...) array, one row per manifest clip (rows of rejected clips stay zero)
  index.csv     clip_id,row,split,label,n_frames   — only clips that were extracted
  rejected.csv  clip_id,path,stage,reason          — clips that could not be processed, and why
  meta.json     shape, dtype, layout, algorithm, parameters, counts, throughput
Clips run in a process pool; results are written straight into a memory-mapped array, so memory does not
grow with the number of clips.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmrobust.config import ExtractCfg
from mmrobust.data import features as F
from mmrobust.data.media import MediaError, open_video, read_audio, read_frames
from mmrobust.io import atomic_dir, read_csv, write_csv, write_json
from mmrobust.progress import progress as track

MODALITIES = ("visual", "audio", "flow", "diff")


class ExtractError(RuntimeError):
    pass


@dataclass(frozen=True)
class Task:
    row: int
    clip_id: str
    path: str          # absolute video path
    flow_path: str     # absolute prefix of pre-extracted flow ("" when computed)


def row_shape(modality: str, cfg: ExtractCfg) -> tuple[tuple[int, ...], np.dtype]:
    if modality == "visual":
        return (cfg.timing.max_frames, cfg.visual.size, cfg.visual.size, 3), np.dtype(np.uint8)
    if modality == "flow":
        return (cfg.timing.max_frames, cfg.flow.size, cfg.flow.size, 2), np.dtype(np.uint8)
    if modality == "diff":
        return (cfg.timing.max_frames, cfg.diff.size, cfg.diff.size, 3), np.dtype(np.uint8)
    if modality == "audio":
        a = cfg.audio.resolved()
        bins = a.n_mels if a.kind == "fbank" else a.n_fft // 2 + 1
        return (bins, a.frames), np.dtype(np.float16)
    raise ExtractError(f"unknown modality {modality!r}; allowed: {MODALITIES}")


# ------------------------------------------------------------------ per-clip work (runs in workers)
def _video_positions(vr, cfg: ExtractCfg, path: str) -> np.ndarray:
    n = len(vr)
    fps = float(vr.get_avg_fps())
    if n < 2 or fps <= 0:
        raise MediaError(f"{path}: too short ({n} frame(s))")
    if n / fps < cfg.min_duration_s:
        raise MediaError(f"{path}: too short ({n / fps:.2f} s < extract.min_duration_s={cfg.min_duration_s})")
    return F.frame_positions(n, fps, cfg.timing.fps, cfg.timing.max_frames)


def _pairs(vr, cfg: ExtractCfg, path: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Frames at the kept positions and the frames right after them (for flow and differences)."""
    pos = _video_positions(vr, cfg, path)
    first = np.minimum(pos, len(vr) - 2)
    frames = read_frames(vr, np.concatenate([first, first + 1]).tolist(), path)
    return frames[: len(first)], frames[len(first):]


def extract_clip(modality: str, task: Task, cfg: ExtractCfg) -> tuple[np.ndarray, int]:
    """→ (array for one row, number of valid frames). Raises MediaError for a clip that cannot be used."""
    if modality == "audio":
        a = cfg.audio.resolved()
        wave = read_audio(task.path, a.sample_rate)
        if len(wave) < cfg.min_duration_s * a.sample_rate:
            raise MediaError(f"{task.path}: audio too short ({len(wave) / a.sample_rate:.2f} s)")
        return F.audio_features(wave, a).astype(np.float16), 1
    if modality == "visual":
        vr = open_video(task.path, width=cfg.visual.size, height=cfg.visual.size)
        frames = read_frames(vr, _video_positions(vr, cfg, task.path).tolist(), task.path)
        return frames, len(frames)
    if modality == "diff":
        vr = open_video(task.path, width=cfg.diff.size, height=cfg.diff.size)
        prev, nxt = _pairs(vr, cfg, task.path, cfg.diff.size)
        return np.stack([F.frame_difference(p, q) for p, q in zip(prev, nxt)]), len(prev)
    if modality == "flow":
        if cfg.flow.source == "precomputed":
            return _precomputed_flow(task, cfg)
        vr = open_video(task.path, width=cfg.flow.size, height=cfg.flow.size)
        prev, nxt = _pairs(vr, cfg, task.path, cfg.flow.size)
        flows = [F.flow_to_uint8(F.optical_flow(p, q, cfg.flow.algorithm), cfg.flow.bound) for p, q in zip(prev, nxt)]
        return np.stack(flows), len(flows)
    raise ExtractError(f"unknown modality {modality!r}")


def _precomputed_flow(task: Task, cfg: ExtractCfg) -> tuple[np.ndarray, int]:
    """Read TV-L1 jpg dumps (<prefix u>/frame%06d.jpg, <prefix v>/...), already bounded and in [0, 255]."""
    import cv2

    if not task.flow_path:
        raise MediaError(f"{task.clip_id}: extract.flow.source is 'precomputed' but the manifest has no flow_path "
                         "(set data.ucf101.flow_dir)")
    u_dir, v_dir = (Path(task.flow_path.replace("{uv}", c)) for c in ("u", "v"))
    u_files = sorted(u_dir.glob("frame*.jpg"))
    v_files = sorted(v_dir.glob("frame*.jpg"))
    if not u_files or len(u_files) != len(v_files):
        raise MediaError(f"{u_dir}: {len(u_files)} u frames vs {len(v_files)} v frames")
    n = len(u_files)
    fps = cfg.flow.precomputed_fps
    pos = F.frame_positions(n, fps, cfg.timing.fps, cfg.timing.max_frames)
    out = []
    for i in pos:
        u = cv2.imread(str(u_files[i]), cv2.IMREAD_GRAYSCALE)
        v = cv2.imread(str(v_files[i]), cv2.IMREAD_GRAYSCALE)
        if u is None or v is None:
            raise MediaError(f"{u_files[i]}: unreadable flow jpg")
        uv = np.stack([u, v], -1)
        out.append(cv2.resize(uv, (cfg.flow.size, cfg.flow.size), interpolation=cv2.INTER_AREA))
    return np.stack(out), len(out)


_WORKER: dict = {}


def _init_worker(modality: str, cfg_json: str) -> None:
    import cv2

    cv2.setNumThreads(1)
    _WORKER["modality"] = modality
    _WORKER["cfg"] = ExtractCfg.model_validate_json(cfg_json)


def _run_task(task: Task):
    try:
        arr, n = extract_clip(_WORKER["modality"], task, _WORKER["cfg"])
        return task, arr, n, None
    except MediaError as err:
        return task, None, 0, str(err)
    except Exception as err:  # a decoder bug must not kill the whole batch; it is reported per clip
        return task, None, 0, f"{type(err).__name__}: {err}"


# ------------------------------------------------------------------ the batch job
def load_tasks(manifest_dir: str | Path) -> tuple[list[dict], list[Task]]:
    manifest_dir = Path(manifest_dir)
    summary = json.loads((manifest_dir / "summary.json").read_text())
    root = Path(summary["root"])
    rows = read_csv(manifest_dir / "clips.csv")
    tasks = []
    for i, r in enumerate(rows):
        flow = r.get("flow_path") or ""
        tasks.append(Task(i, r["clip_id"], str(root / r["path"]), str(root / flow) if flow else ""))
    return rows, tasks


def extract(modality: str, cfg: ExtractCfg, manifest_dir: str | Path, out_dir: str | Path | None = None,
            progress: bool = True) -> dict:
    if modality not in MODALITIES:
        raise ExtractError(f"unknown modality {modality!r}; allowed: {', '.join(MODALITIES)}")
    if modality == "flow" and cfg.flow.source == "compute":
        F.flow_algorithm(cfg.flow.algorithm)
    out_dir = Path(out_dir or Path(cfg.out_dir) / modality)
    rows, tasks = load_tasks(manifest_dir)
    if not tasks:
        raise ExtractError(f"{manifest_dir}/clips.csv: no clips to extract")
    shape, dtype = row_shape(modality, cfg)
    index, rejected = [], []
    start = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        data = np.lib.format.open_memmap(tmp / "data.npy", mode="w+", dtype=dtype, shape=(len(tasks), *shape))
        ctx = mp.get_context("forkserver")
        with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(modality, cfg.model_dump_json()),
                      maxtasksperchild=200) as pool:
            results = pool.imap_unordered(_run_task, tasks, chunksize=1)
            for task, arr, n, err in track(results, len(tasks), f"extract {modality}", "clips", enabled=progress):
                row = rows[task.row]
                if err is not None:
                    rejected.append(dict(clip_id=task.clip_id, path=row["path"], stage=modality, reason=err))
                    continue
                data[task.row, : arr.shape[0]] = arr
                index.append(dict(clip_id=task.clip_id, row=task.row, split=row["split"], label=row["label"],
                                  n_frames=n))
        data.flush()
        del data
        index.sort(key=lambda r: r["row"])
        rejected.sort(key=lambda r: r["clip_id"])
        seconds = time.perf_counter() - start
        write_csv(tmp / "index.csv", index, ["clip_id", "row", "split", "label", "n_frames"])
        write_csv(tmp / "rejected.csv", rejected, ["clip_id", "path", "stage", "reason"])
        summary = dict(modality=modality, shape=[len(tasks), *shape], dtype=str(dtype), layout=_layout(modality),
                       algorithm=_algorithm(modality, cfg), params=_params(modality, cfg), clips=len(tasks),
                       extracted=len(index), rejected=len(rejected), seconds=round(seconds, 3),
                       clips_per_s=round(len(tasks) / max(seconds, 1e-9), 2), manifest=str(manifest_dir))
        write_json(tmp / "meta.json", summary)
    summary["out_dir"] = str(out_dir)
    frac = len(rejected) / len(tasks)
    if frac > cfg.max_reject_fraction:
        reasons = "; ".join(r["reason"] for r in rejected[:3])
        raise ExtractError(f"extract {modality}: rejected {len(rejected)} of {len(tasks)} clips ({frac:.0%} > "
                           f"extract.max_reject_fraction={cfg.max_reject_fraction}); the {len(index)} good clips "
                           f"are kept in {out_dir}; see {out_dir / 'rejected.csv'} (e.g. {reasons})")
    return summary


def _layout(modality: str) -> str:
    return {"visual": "N,T,H,W,RGB uint8", "flow": "N,T,H,W,(u,v) uint8 = (clip(f,-b,b)+b)*255/(2b)",
            "diff": "N,T,H,W,RGB uint8 = (next-prev+255)/2", "audio": "N,bins,frames float16 normalised"}[modality]


def _algorithm(modality: str, cfg: ExtractCfg) -> str:
    if modality == "flow":
        return "precomputed-tvl1" if cfg.flow.source == "precomputed" else cfg.flow.algorithm
    if modality == "audio":
        return cfg.audio.resolved().kind
    return "decord"


def _params(modality: str, cfg: ExtractCfg) -> dict:
    group = {"audio": cfg.audio.resolved(), "flow": cfg.flow, "diff": cfg.diff, "visual": cfg.visual}[modality]
    out = {modality: group.model_dump()}
    if modality != "audio":
        out["timing"] = cfg.timing.model_dump()
    out["min_duration_s"] = cfg.min_duration_s
    return out
