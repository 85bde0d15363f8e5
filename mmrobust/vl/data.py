"""Image-text zero-shot tasks: images with class names, from an ImageFolder tree or from the extracted visual
frames of a configured dataset, stored as one uint8 array per split (`vl-ingest` stage).

ImageFolder layout: `<root>/<split>/<class name>/<image>` (png/jpg/bmp; `_` in a class folder name reads as a
space). The embedded default tree (`render_shapes`) draws the synthetic set's shapes and colours as single
images: 4 shapes × 4 colours, one class per combination.

A stored task folder holds `<split>.npy` (N, H, W, 3) uint8, `<split>_labels.npy`, `classes.json` (names as
prompts read them) and `skipped.csv` (file, reason) for what could not be read.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmrobust.io import atomic_dir, read_csv

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
SPLITS = ("train", "test")


def class_text(name: str, words: int | None = None) -> str:
    """A class name as prompts read it: `_` and CamelCase boundaries as spaces (UCF101's "ApplyEyeMakeup" ->
    "apply eye makeup"), lower case, optionally only the first `words` words."""
    parts = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name.replace("_", " ")).lower().split()
    return " ".join(parts[:words] if words else parts)


# ---------------------------------------------------------------- the embedded ImageFolder tree
def shape_classes() -> list[tuple[str, str]]:
    from mmrobust.data.synthetic import COLOUR_NAMES, SHAPES

    return [(c, s) for s in SHAPES for c in COLOUR_NAMES]


def render_shapes(cfg, out_dir: str | Path) -> dict:
    """Write the embedded ImageFolder tree: per class and split, images of one coloured shape at a random place
    and size over the synthetic set's clutter, up to `cfg.distractors` smaller shapes of random colours, pixel
    noise of a random std up to `cfg.noise_std` (sizes and noise span the synthetic set's video frames)."""
    import cv2

    from mmrobust.data.synthetic import COLOURS, COLOUR_NAMES, SHAPES, _background, _shape_mask

    rng = np.random.default_rng(cfg.seed)
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for split, n in (("train", cfg.train_per_class), ("test", cfg.test_per_class)):
            for colour, shape in shape_classes():
                folder = tmp / split / f"{colour}_{shape}"
                folder.mkdir(parents=True)
                for j in range(n):
                    img = _background(cfg.size, rng)
                    r = cfg.size * rng.uniform(cfg.min_radius, cfg.max_radius)
                    for _ in range(int(rng.integers(cfg.distractors + 1))):
                        rd = r * rng.uniform(0.4, 0.7)
                        rgb = np.array(COLOURS[COLOUR_NAMES[rng.integers(4)]], np.float32)
                        a = _shape_mask(SHAPES[rng.integers(4)], cfg.size, *rng.uniform(rd, cfg.size - rd, 2), rd)
                        img = img * (1 - a[..., None]) + rgb * a[..., None]
                    rgb = np.clip(np.array(COLOURS[colour], np.float32) * rng.uniform(0.85, 1.1), 0, 1)
                    a = _shape_mask(shape, cfg.size, *rng.uniform(r + 1, cfg.size - r - 1, 2), r)
                    img = img * (1 - a[..., None]) + rgb * a[..., None]
                    img = img + rng.standard_normal(img.shape).astype(np.float32) * rng.uniform(0, cfg.noise_std)
                    code = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
                    cv2.imwrite(str(folder / f"{j:04d}.png"), code[..., ::-1])
                counts[f"{split}/{colour}_{shape}"] = n
    return counts


# ---------------------------------------------------------------- ingest into stored tasks
@dataclass
class ImageSplit:
    images: np.ndarray       # (N, H, W, 3) uint8
    labels: np.ndarray       # (N,) int64, indices into the task's classes


def read_image_folder(root: str | Path, classes: list[str] | None, size: int | None
                      ) -> tuple[list[str], dict[str, ImageSplit], list[tuple[str, str]]]:
    """(class texts, {split: ImageSplit}, skipped [(file, reason)]) of an ImageFolder tree; `classes` selects
    and orders classes by their text (None: every class folder of the train split, sorted)."""
    import cv2

    root = Path(root)
    if not (root / "train").is_dir():
        raise FileNotFoundError(f"{root}: no train/ folder (ImageFolder layout <root>/<split>/<class>/<image>)")
    folders = {class_text(p.name): p.name for p in sorted((root / "train").iterdir()) if p.is_dir()}
    names = list(classes) if classes is not None else sorted(folders)
    missing = [c for c in names if c not in folders]
    if missing:
        raise ValueError(f"{root}/train: no class folder for {missing}; found {sorted(folders)}")
    skipped, splits = [], {}
    for split in SPLITS:
        images, labels = [], []
        for k, name in enumerate(names):
            folder = root / split / folders[name]
            if not folder.is_dir():
                skipped.append((str(folder), "class folder missing in this split"))
                continue
            for f in sorted(folder.iterdir()):
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                img = cv2.imread(str(f), cv2.IMREAD_COLOR)
                if img is None:
                    skipped.append((str(f), "not a readable image"))
                    continue
                img = img[..., ::-1]
                if size and img.shape[:2] != (size, size):
                    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
                if images and img.shape != images[0].shape:
                    skipped.append((str(f), f"size {img.shape[:2]} differs from the split's first image "
                                            f"{images[0].shape[:2]}"))
                    continue
                images.append(np.ascontiguousarray(img))
                labels.append(k)
        if not images:
            raise ValueError(f"{root}/{split}: no readable image of the classes {names}")
        splits[split] = ImageSplit(np.stack(images), np.array(labels, np.int64))
    return names, splits, skipped


def read_frames(features_dir: str | Path, classes_csv: str | Path, classes: list[str] | None, words: int | None,
                frames_per_clip: int) -> tuple[list[str], dict[str, ImageSplit], list[tuple[str, str]]]:
    """Frames of the extracted visual arrays of a dataset (`<features>/visual/{data.npy,index.csv}`): per clip
    `frames_per_clip` frames at the centres of equal segments, labelled with the clip's class."""
    from mmrobust.data.dataset import segment_frames

    features_dir = Path(features_dir)
    index = features_dir / "visual" / "index.csv"
    if not index.exists():
        raise FileNotFoundError(f"{index}: the dataset's visual frames have not been extracted")
    all_names = {int(r["label"]): class_text(r["name"], words) for r in read_csv(classes_csv)}
    names = list(classes) if classes is not None else [all_names[k] for k in sorted(all_names)]
    if len(set(names)) != len(names):
        raise ValueError(f"{classes_csv}: several classes read the same with words={words}; use more words")
    by_text: dict[str, int] = {}
    for k in sorted(all_names):
        by_text.setdefault(all_names[k], k)
    missing = [c for c in names if c not in by_text]
    if missing:
        raise ValueError(f"{classes_csv}: no class reads {missing} (with words={words}); found {sorted(by_text)}")
    selected = [k for k in sorted(all_names) if all_names[k] in names]
    if len(selected) != len(names):
        raise ValueError(f"{classes_csv}: several classes read the same with words={words}; use more words")
    label_of = {by_text[c]: i for i, c in enumerate(names)}  # dataset label -> task label
    data = np.load(features_dir / "visual" / "data.npy", mmap_mode="r")
    splits = {}
    rows = read_csv(index)
    for split in SPLITS:
        images, labels = [], []
        for r in rows:
            if r["split"] != split or int(r["label"]) not in label_of:
                continue
            idx = segment_frames(int(r["n_frames"]), frames_per_clip, None)
            images.extend(np.asarray(data[int(r["row"])][idx]))
            labels.extend([label_of[int(r["label"])]] * len(idx))
        if not images:
            raise ValueError(f"{index}: no {split} clip of the classes {names}")
        splits[split] = ImageSplit(np.stack(images), np.array(labels, np.int64))
    return names, splits, []


def write_task(out_dir: str | Path, names: list[str], splits: dict[str, ImageSplit],
               skipped: list[tuple[str, str]], source: str) -> Path:
    """One stored task, written atomically."""
    with atomic_dir(out_dir) as tmp:
        for split, s in splits.items():
            np.save(tmp / f"{split}.npy", s.images)
            np.save(tmp / f"{split}_labels.npy", s.labels)
        (tmp / "classes.json").write_text(json.dumps({"classes": names, "source": source,
                                                       "counts": {k: len(s.labels) for k, s in splits.items()}},
                                                      indent=2))
        with open(tmp / "skipped.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["file", "reason"])
            w.writerows(skipped)
    return Path(out_dir)


@dataclass
class Task:
    name: str
    classes: list[str]
    splits: dict[str, ImageSplit]


def load_task(path: str | Path, name: str | None = None) -> Task:
    path = Path(path)
    meta = path / "classes.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta}: task not ingested (run the vl-ingest stage)")
    classes = json.loads(meta.read_text())["classes"]
    splits = {s: ImageSplit(np.load(path / f"{s}.npy"), np.load(path / f"{s}_labels.npy"))
              for s in SPLITS if (path / f"{s}.npy").exists()}
    return Task(name or path.name, classes, splits)


def ingest_task(params, name: str) -> tuple[Path, dict, list[tuple[str, str]]]:
    """Store task `name` of `vl.tasks` under vl.tasks_dir: (folder, counts per split, skipped files)."""
    vl = params.vl
    task = vl.tasks[name]
    kind, _, ref = task.source.partition(":")
    if kind == "images":
        names, splits, skipped = read_image_folder(vl.images[ref], task.classes, None)
    else:
        if ref not in params.datasets:
            raise ValueError(f"vl.tasks.{name}.source: no dataset {ref!r} in `datasets` "
                             f"(have {sorted(params.datasets)})")
        ds = params.for_dataset(ref)
        names, splits, skipped = read_frames(ds.extract.out_dir, Path(ds.data.out_dir) / "classes.csv", task.classes,
                                             task.words, task.frames_per_clip)
    out = write_task(Path(vl.tasks_dir) / name, names, splits, skipped, task.source)
    return out, {k: len(s.labels) for k, s in splits.items()}, skipped
