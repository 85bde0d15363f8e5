"""Ingest a user's dataset layout into one validated manifest (the only input the extraction stage reads).

Layouts, all paths relative to the dataset's root (`datasets.<id>.root`; names in <> are `data.<layout>` settings):

- `ks` and `synthetic` (Kinetics-Sounds): `<train_list>`, `<test_list>` with lines `<name> <label>` (int label);
  video `<video_dir>/<name>.mp4`. Optional `<classes_file>` with lines `<id> <name>` (ids exactly 0..K-1)
  defines the label set; without it labels must be ints >= 0, K = max label + 1 and names are the ids.
- `vggsound`: `<csv>` rows `YTID,start_sec,label,split` (no header, csv quoting, split train|test); video
  `<video_dir>/<YTID>_<start_sec:06d>.mp4`. Labels: sorted unique class names of all well-formed rows
  (present videos or not, so ids do not depend on what was downloaded) -> 0..K-1.
- `ucf101`: `<list_dir>/classInd.txt` (`1 ApplyEyeMakeup`, 1-based, stored 0-based),
  `<list_dir>/trainlist0<split>.txt` (`Class/v_X.avi <label>`; folder must match the label),
  `<list_dir>/testlist0<split>.txt` (`Class/v_X.avi`; label from the folder); video `<video_dir>/Class/v_X.avi`.
  With `<flow_dir>`: pre-extracted flow `<flow_dir>/u/v_X/frame%06d.jpg` and `<flow_dir>/v/v_X/...`; clips.csv
  then has `flow_path` = `<flow_dir>/{uv}/v_X` (replace the literal `{uv}` by `u` or `v`; see `flow_dirs`)
  and `flow_frames` (frames per component, equal for u and v).

clip_id: KS `<name>`, VGGSound `<YTID>_<start:06d>`, UCF101 the video stem `v_X`; unique over all splits.

Outputs in `data.out_dir` (written atomically): clips.csv (`clip_id,path,label,label_name,split[,flow_path,
flow_frames]`, sorted by split train/val/test then clip_id), classes.csv (`label,name`), rejected.csv
(`source,line,clip_id,reason`; reason = `<kind>: <detail>`), summary.json.

Every row is checked and each unusable one lands in rejected.csv with its file and line. A duplicate clip id
(same or other split) keeps the first occurrence, even when that one is later rejected for its file. A
missing root, list/csv/classInd/flow folder, a malformed classes file, or a result with no train or no test
clip is a fatal `IngestError`. `val` is carved from train: `val_fraction` of the train rows, stratified per
class (largest-remainder quotas, a class keeps at least one train clip), chosen by a per-class RNG seeded with
`seed`; test is never touched.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from mmrobust.config import DataCfg
from mmrobust.io import atomic_dir, read_csv, write_csv, write_json

SPLITS = ("train", "val", "test")
# fingerprint: the video's size and a hash of its first and last MiB. The extraction stages depend on the
# manifest, not on the video folder, so a video replaced under the same name must change the manifest.
CLIP_FIELDS = ["clip_id", "path", "label", "label_name", "split", "fingerprint"]
_FINGERPRINT_SPAN = 1 << 20
FLOW_FIELDS = ["flow_path", "flow_frames"]
REJECT_FIELDS = ["source", "line", "clip_id", "reason"]


class IngestError(ValueError):
    """The dataset layout cannot be ingested at all; the message names the file or the problem."""


class _Bad(Exception):
    """One unusable row; str() is the reason written to rejected.csv."""

    def __init__(self, reason: str, clip_id: str = ""):
        super().__init__(reason)
        self.clip_id = clip_id


@dataclass
class _Clip:
    source: str
    line: int
    clip_id: str
    path: str  # posix, relative to root
    label: int
    split: str
    flow_path: str = ""
    flow_frames: int = 0
    fingerprint: str = ""


@dataclass
class _Parsed:
    clips: list[_Clip]
    rejected: list[dict]
    classes: list[str]  # index = label
    sources: list[str]


# ---------------------------------------------------------------- small helpers
def _rel_path(*parts: str, clip_id: str = "") -> str:
    """Join path pieces taken from lists/config into a root-relative posix path, refusing escapes."""
    for p in parts:
        pp = PurePosixPath(p)
        problem = "is empty" if not p else "is absolute" if pp.is_absolute() else "contains '..'"
        if not p or pp.is_absolute() or ".." in pp.parts:
            raise _Bad(f"path escapes root: {p!r} {problem}", clip_id)
    return PurePosixPath(*parts).as_posix()


def _int(text: str, what: str, clip_id: str = "") -> int:
    try:
        return int(text)
    except ValueError:
        raise _Bad(f"malformed line: {what} {text!r} is not an integer", clip_id) from None


def _need_file(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise IngestError(f"{path}: required file not found")
    return path


def _source(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of every non-blank line."""
    with open(path, encoding="utf-8-sig", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if fields := line.split():
                yield n, fields


def _reject(source: str, line: int, clip_id: str, reason: str) -> dict:
    return {"source": source, "line": line, "clip_id": clip_id, "reason": reason}


def _id_table(path: Path, base: int) -> list[str]:
    """Parse `<id> <name>` lines whose ids must be exactly base..base+K-1; a bad table is fatal."""
    table: dict[int, str] = {}
    for n, fields in _lines(path):
        if len(fields) < 2 or not fields[0].lstrip("-").isdigit():
            raise IngestError(f"{path}:{n}: expected '<id> <name>', got {' '.join(fields)!r}")
        idx, name = int(fields[0]), " ".join(fields[1:])
        if idx in table or name in table.values():
            raise IngestError(f"{path}:{n}: duplicate class id or name {' '.join(fields)!r}")
        table[idx] = name
    if sorted(table) != list(range(base, base + len(table))) or not table:
        raise IngestError(f"{path}: class ids must be exactly {base}..{base}+K-1, got {sorted(table)[:5]}...")
    return [table[i] for i in sorted(table)]


# ---------------------------------------------------------------- Kinetics-Sounds / synthetic
def _ks_row(fields: list[str], known: list[str] | None, classes_name: str, video_dir: str) -> tuple[str, str, int]:
    clip_id = fields[0]
    if len(fields) != 2:
        raise _Bad(f"malformed line: expected '<name> <label>', got {len(fields)} fields", clip_id)
    label = _int(fields[1], "label", clip_id)
    if label < 0 or (known is not None and label >= len(known)):
        where = f"not in {classes_name}" if known is not None else "labels must be >= 0"
        raise _Bad(f"unknown label: {label} ({where})", clip_id)
    return clip_id, _rel_path(video_dir, clip_id + ".mp4", clip_id=clip_id), label


def _parse_ks(root: Path, cfg: DataCfg) -> _Parsed:
    lay = cfg.ks
    lists = {"train": _need_file(root, lay.train_list), "test": _need_file(root, lay.test_list)}
    cls_path = root / lay.classes_file if lay.classes_file else None
    known = _id_table(cls_path, 0) if cls_path is not None and cls_path.is_file() else None
    clips, rejected = [], []
    for split, path in lists.items():
        src = _source(path, root)
        for n, fields in _lines(path):
            try:
                clip_id, rel, label = _ks_row(fields, known, lay.classes_file or "", lay.video_dir)
            except _Bad as bad:
                rejected.append(_reject(src, n, bad.clip_id, str(bad)))
                continue
            clips.append(_Clip(src, n, clip_id, rel, label, split))
    classes = known if known is not None else [str(i) for i in range(max((c.label for c in clips), default=-1) + 1)]
    sources = [_source(p, root) for p in lists.values()] + ([_source(cls_path, root)] if known else [])
    return _Parsed(clips, rejected, classes, sources)


# ---------------------------------------------------------------- VGGSound
def _vgg_row(row: list[str]) -> tuple[str, str, str, str]:
    row = [f.strip() for f in row]
    if len(row) != 4:
        raise _Bad(f"malformed line: expected 'YTID,start_sec,label,split', got {len(row)} fields", row[0])
    ytid, start_text, name, split = row
    start = _int(start_text, "start_sec", ytid)
    clip_id = f"{ytid}_{start:06d}"
    if start < 0 or not ytid or not name:
        raise _Bad("malformed line: empty YTID/label or negative start_sec", clip_id)
    if split not in ("train", "test"):
        raise _Bad(f"malformed line: split {split!r} is not 'train' or 'test'", clip_id)
    return clip_id, ytid, name, split


def _parse_vggsound(root: Path, cfg: DataCfg) -> _Parsed:
    path = _need_file(root, cfg.vggsound.csv)
    src = _source(path, root)
    good, rejected = [], []
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as fh:
        reader = csv.reader(fh)
        for row in reader:
            if not any(f.strip() for f in row):
                continue
            try:
                good.append((reader.line_num, *_vgg_row(row)))
            except _Bad as bad:
                rejected.append(_reject(src, reader.line_num, bad.clip_id, str(bad)))
    classes = sorted({name for *_, name, _split in good})
    index = {name: i for i, name in enumerate(classes)}
    clips = []
    for n, clip_id, ytid, name, split in good:
        try:
            rel = _rel_path(cfg.vggsound.video_dir, clip_id + ".mp4")
        except _Bad as bad:
            rejected.append(_reject(src, n, clip_id, str(bad)))
            continue
        clips.append(_Clip(src, n, clip_id, rel, index[name], split))
    return _Parsed(clips, rejected, classes, [src])


# ---------------------------------------------------------------- UCF101
def _ucf_row(fields: list[str], labelled: bool, index: dict[str, int], classes: list[str],
             video_dir: str) -> tuple[str, str, int]:
    clip_id = PurePosixPath(fields[0]).stem
    expected = 2 if labelled else 1
    if len(fields) != expected:
        form = "'<Class>/<video>.avi <label>'" if labelled else "'<Class>/<video>.avi'"
        raise _Bad(f"malformed line: expected {form}, got {len(fields)} fields", clip_id)
    label = _int(fields[1], "label", clip_id) - 1 if labelled else None
    rel = _rel_path(video_dir, fields[0], clip_id=clip_id)
    parts = PurePosixPath(fields[0]).parts
    if len(parts) != 2:
        raise _Bad(f"malformed line: path {fields[0]!r} is not '<Class>/<video>'", clip_id)
    if label is not None and not 0 <= label < len(classes):
        raise _Bad(f"unknown label: {label + 1} (not in classInd.txt)", clip_id)
    if parts[0] not in index:
        raise _Bad(f"unknown label: class folder {parts[0]!r} is not in classInd.txt", clip_id)
    if label is not None and index[parts[0]] != label:
        raise _Bad(f"label mismatch: folder {parts[0]!r} but label {label + 1} is {classes[label]!r}", clip_id)
    return clip_id, rel, index[parts[0]]


def _parse_ucf101(root: Path, cfg: DataCfg) -> _Parsed:
    lay = cfg.ucf101
    cls_path = _need_file(root, f"{lay.list_dir}/classInd.txt")
    lists = {"train": _need_file(root, f"{lay.list_dir}/trainlist0{lay.split}.txt"),
             "test": _need_file(root, f"{lay.list_dir}/testlist0{lay.split}.txt")}
    classes = _id_table(cls_path, 1)
    index = {name: i for i, name in enumerate(classes)}
    clips, rejected = [], []
    for split, path in lists.items():
        src = _source(path, root)
        for n, fields in _lines(path):
            try:
                clip_id, rel, label = _ucf_row(fields, split == "train", index, classes, lay.video_dir)
            except _Bad as bad:
                rejected.append(_reject(src, n, bad.clip_id, str(bad)))
                continue
            clips.append(_Clip(src, n, clip_id, rel, label, split))
    sources = [_source(cls_path, root)] + [_source(p, root) for p in lists.values()]
    return _Parsed(clips, rejected, classes, sources)


PARSERS = {"synthetic": _parse_ks, "ks": _parse_ks, "vggsound": _parse_vggsound, "ucf101": _parse_ucf101}


# ---------------------------------------------------------------- file checks
def flow_dirs(root: str | Path, flow_path: str) -> tuple[Path, Path]:
    """The u and v frame folders of a manifest row's `flow_path`."""
    return Path(root) / flow_path.replace("{uv}", "u"), Path(root) / flow_path.replace("{uv}", "v")


def _inside(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def fingerprint(path: Path) -> str:
    """'<bytes>:<md5 of the first and last MiB>': cheap on 10^5 clips, and any re-encode changes it."""
    size = path.stat().st_size
    h = hashlib.md5()
    with open(path, "rb") as f:
        h.update(f.read(_FINGERPRINT_SPAN))
        if size > _FINGERPRINT_SPAN:
            f.seek(max(size - _FINGERPRINT_SPAN, _FINGERPRINT_SPAN))
            h.update(f.read())
    return f"{size}:{h.hexdigest()}"


def _check_video(root: Path, rel: str) -> str:
    path = root / rel
    if not _inside(path, root):
        raise _Bad(f"path escapes root: {rel} resolves to {path.resolve()}")
    if not path.is_file():
        raise _Bad(f"missing video: {rel}")
    if path.stat().st_size == 0:
        raise _Bad(f"empty video: {rel} has 0 bytes")
    return fingerprint(path)


def _check_flow(root: Path, flow_dir: str, clip_id: str) -> tuple[str, int]:
    flow_path = _rel_path(flow_dir, "{uv}", clip_id)
    counts = []
    for d in flow_dirs(root, flow_path):
        rel = d.relative_to(root).as_posix()
        if not _inside(d, root):
            raise _Bad(f"path escapes root: {rel} resolves to {d.resolve()}")
        if not d.is_dir():
            raise _Bad(f"missing flow folder: {rel}")
        counts.append(sum(1 for e in os.scandir(d) if e.name.startswith("frame") and e.name.endswith(".jpg")))
    if counts[0] != counts[1]:
        raise _Bad(f"flow frame count mismatch: u has {counts[0]}, v has {counts[1]} ({flow_path})")
    if counts[0] == 0:
        raise _Bad(f"empty flow folder: no frame*.jpg in {flow_path}")
    return flow_path, counts[0]


def _validate(root: Path, parsed: _Parsed, flow_dir: str | None) -> list[_Clip]:
    kept, first_seen = [], {}
    for c in parsed.clips:
        try:
            if c.clip_id in first_seen:
                raise _Bad(f"duplicate clip id: first seen at {first_seen[c.clip_id]}")
            first_seen[c.clip_id] = f"{c.source}:{c.line}"
            c.fingerprint = _check_video(root, c.path)
            if flow_dir is not None:
                c.flow_path, c.flow_frames = _check_flow(root, flow_dir, c.clip_id)
        except _Bad as bad:
            parsed.rejected.append(_reject(c.source, c.line, c.clip_id, str(bad)))
            continue
        kept.append(c)
    return kept


# ---------------------------------------------------------------- validation split
def _val_quotas(sizes: dict[int, int], frac: float) -> dict[int, int]:
    """Per-class val counts summing to round(N * frac) (largest remainder), each class keeping one train clip."""
    cap = {c: max(n - 1, 0) for c, n in sizes.items()}
    exact = {c: n * frac for c, n in sizes.items()}
    quota = {c: min(int(exact[c]), cap[c]) for c in sizes}
    spare = min(int(sum(sizes.values()) * frac + 0.5), sum(cap.values())) - sum(quota.values())
    for c in sorted(sizes, key=lambda c: (int(exact[c]) - exact[c], c)):
        if spare <= 0:
            break
        if quota[c] < cap[c]:
            quota[c] += 1
            spare -= 1
    return quota


def _carve_val(clips: list[_Clip], frac: float, seed: int) -> None:
    by_class: dict[int, list[_Clip]] = defaultdict(list)
    for c in clips:
        if c.split == "train":
            by_class[c.label].append(c)
    quotas = _val_quotas({k: len(v) for k, v in by_class.items()}, frac)
    for label in sorted(by_class):
        members = sorted(by_class[label], key=lambda c: c.clip_id)
        # Seeding per class keeps a class's split independent of the other classes' sizes.
        for c in random.Random(f"mmrobust-val:{seed}:{label}").sample(members, quotas[label]):
            c.split = "val"


# ---------------------------------------------------------------- entry points
def _root(cfg: DataCfg) -> Path:
    root = Path(cfg.root)
    if not root.is_dir():
        raise IngestError(f"{root}: dataset root not found (the `root` of its entry in `datasets:`)")
    return root.resolve()


def _flow_dir(root: Path, cfg: DataCfg) -> str | None:
    flow_dir = cfg.ucf101.flow_dir if cfg.dataset == "ucf101" else None
    if flow_dir is None:
        return None
    for sub in ("", "u", "v"):
        if not (root / flow_dir / sub).is_dir():
            raise IngestError(f"{root / flow_dir / sub}: flow folder not found (data.ucf101.flow_dir)")
    return flow_dir


def _fail_if_empty(kept: list[_Clip], rejected: list[dict]) -> None:
    splits = {c.split for c in kept}
    missing = [s for s in ("train", "test") if s not in splits]
    if not missing:
        return
    what = "every row was rejected" if not kept else f"no usable {' or '.join(missing)} clip"
    kinds = Counter(r["reason"].split(":")[0] for r in rejected)
    first = "".join(f"\n  {r['source']}:{r['line']}: {r['reason']}" for r in rejected[:5])
    raise IngestError(f"{what} ({len(rejected)} rejected rows: {dict(kinds)}){first}")


def _row(c: _Clip, classes: list[str], flow: bool) -> dict:
    row = {"clip_id": c.clip_id, "path": c.path, "label": c.label, "label_name": classes[c.label], "split": c.split,
           "fingerprint": c.fingerprint}
    if flow:
        row.update(flow_path=c.flow_path, flow_frames=c.flow_frames)
    return row


def _write(out_dir: str | Path, kept: list[_Clip], parsed: _Parsed, rejected: list[dict], summary: dict) -> None:
    flow = summary["flow_dir"] is not None
    classes = ({"label": i, "name": n} for i, n in enumerate(parsed.classes))
    with atomic_dir(out_dir) as tmp:
        write_csv(tmp / "clips.csv", (_row(c, parsed.classes, flow) for c in kept),
                  CLIP_FIELDS + (FLOW_FIELDS if flow else []))
        write_csv(tmp / "classes.csv", classes, ["label", "name"])
        write_csv(tmp / "rejected.csv", rejected, REJECT_FIELDS)
        write_json(tmp / "summary.json", summary)


def ingest(cfg: DataCfg, out_dir: str | Path | None = None) -> dict:
    """Validate the layout under `cfg.root`; write the manifest to `out_dir` (default `cfg.out_dir`); return summary."""
    root = _root(cfg)
    flow_dir = _flow_dir(root, cfg)
    parsed = PARSERS[cfg.dataset](root, cfg)
    kept = _validate(root, parsed, flow_dir)
    _fail_if_empty(kept, parsed.rejected)
    _carve_val(kept, cfg.val_fraction, cfg.seed)
    kept.sort(key=lambda c: (SPLITS.index(c.split), c.clip_id))
    rejected = sorted(parsed.rejected, key=lambda r: (parsed.sources.index(r["source"]), r["line"]))
    summary = {
        "dataset": cfg.dataset, "root": str(root), "num_classes": len(parsed.classes),
        "counts": {s: sum(c.split == s for c in kept) for s in SPLITS}, "rejected": len(rejected),
        "rejected_by_kind": dict(Counter(r["reason"].split(":")[0] for r in rejected)),
        "flow_dir": flow_dir, "sources": parsed.sources, "val_fraction": cfg.val_fraction, "seed": cfg.seed,
    }
    _write(out_dir if out_dir is not None else cfg.out_dir, kept, parsed, rejected, summary)
    return summary


def load_manifest(out_dir: str | Path) -> list[dict]:
    """clips.csv rows with `label` (and `flow_frames`, when present) as int."""
    path = Path(out_dir) / "clips.csv"
    if not path.is_file():
        raise IngestError(f"{path}: manifest not found; run the ingest stage first")
    rows = read_csv(path)
    for r in rows:
        r["label"] = int(r["label"])
        if "flow_frames" in r:
            r["flow_frames"] = int(r["flow_frames"])
    return rows


def load_summary(out_dir: str | Path) -> dict:
    """summary.json of a manifest (its `root` is the absolute dataset root that `path` is relative to)."""
    path = Path(out_dir) / "summary.json"
    if not path.is_file():
        raise IngestError(f"{path}: manifest not found; run the ingest stage first")
    return json.loads(path.read_text())
