"""Synthetic audio-visual dataset: layout, decodability, determinism, and that the class cues are real."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import check_failed_generation_keeps_previous
from mmrobust.config import GenerateCfg
from mmrobust.data import synthetic
from mmrobust.data.media import open_video, read_audio, read_frames
from mmrobust.data.synthetic import MAX_CLASSES, class_spec, generate

AAC_FRAME = 1024


def tiny(**kw) -> GenerateCfg:
    base = dict(num_classes=3, train_per_class=2, test_per_class=1, duration_s=1.5, size=32, fps=10)
    return GenerateCfg(**{**base, **kw})


def read_list(path: Path) -> list[tuple[str, int]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    assert all(len(r) == 2 for r in rows), rows
    return [(name, int(label)) for name, label in rows]


def decode(root: Path, name: str, sr: int) -> tuple[np.ndarray, np.ndarray]:
    path = root / "videos" / f"{name}.mp4"
    vr = open_video(path)
    return read_frames(vr, range(len(vr))), read_audio(path, sr)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    cfg = tiny()
    out = tmp_path_factory.mktemp("syn") / "data"
    summary = generate(cfg, out, progress=False)
    return cfg, out, summary


def test_layout_and_lists(dataset):
    cfg, root, summary = dataset
    train, test = read_list(root / "train.txt"), read_list(root / "test.txt")
    assert len(train) == cfg.num_classes * cfg.train_per_class
    assert len(test) == cfg.num_classes * cfg.test_per_class
    for rows, per_class in ((train, cfg.train_per_class), (test, cfg.test_per_class)):
        labels = [label for _, label in rows]
        assert sorted(set(labels)) == list(range(cfg.num_classes))
        assert all(labels.count(k) == per_class for k in range(cfg.num_classes))
    names = [n for n, _ in train + test]
    assert len(set(names)) == len(names)
    assert all(n.startswith("syn_c") for n in names)
    for name, label in train + test:
        assert (root / "videos" / f"{name}.mp4").stat().st_size > 0
        assert name.startswith(f"syn_c{label:02d}_")
    assert len(list((root / "videos").iterdir())) == len(names)

    classes = [line.split() for line in (root / "classes.txt").read_text().splitlines()]
    assert [int(i) for i, _ in classes] == list(range(cfg.num_classes))
    assert len({n for _, n in classes}) == cfg.num_classes

    meta = json.loads((root / "meta.json").read_text())
    assert meta["config"] == cfg.model_dump(exclude={"workers"})  # the files do not depend on it
    assert {c["name"] for c in meta["clips"]} == set(names)
    assert meta["counts"]["train"]["clips"] == len(train) and meta["counts"]["test"]["clips"] == len(test)
    assert summary["clips"] == len(names) and summary["out_dir"] == str(root)
    assert not list(root.parent.glob(".data.tmp-*"))  # the atomic temp dir is gone


def test_clips_decode_with_expected_shape_and_audio_length(dataset):
    cfg, root, _ = dataset
    expected_frames = round(cfg.duration_s * cfg.fps)
    expected_samples = round(cfg.duration_s * cfg.sample_rate)
    for name, _ in read_list(root / "train.txt") + read_list(root / "test.txt"):
        vr = open_video(root / "videos" / f"{name}.mp4")
        assert len(vr) == expected_frames
        assert vr.get_avg_fps() == pytest.approx(cfg.fps)
        assert vr[0].shape == (cfg.size, cfg.size, 3)
        audio = read_audio(root / "videos" / f"{name}.mp4", cfg.sample_rate)
        assert abs(len(audio) - expected_samples) <= AAC_FRAME
        assert np.abs(audio).max() > 0.01


def test_same_seed_same_data_other_seed_differs(dataset, tmp_path):
    cfg, first, _ = dataset
    assert cfg.workers == 1
    second = tmp_path / "again"
    generate(cfg.model_copy(update={"workers": 2}), second, progress=False)  # clips written in 2 processes
    other = tmp_path / "other"
    generate(cfg.model_copy(update={"seed": cfg.seed + 1}), other, progress=False)
    for f in ("train.txt", "test.txt", "classes.txt", "meta.json"):
        assert (first / f).read_bytes() == (second / f).read_bytes(), f
    names = [n for n, _ in read_list(first / "train.txt") + read_list(first / "test.txt")]
    any_other_differs = False
    for name in names:
        frames_a, audio_a = decode(first, name, cfg.sample_rate)
        frames_b, audio_b = decode(second, name, cfg.sample_rate)
        np.testing.assert_array_equal(frames_a, frames_b, err_msg=name)
        np.testing.assert_array_equal(audio_a, audio_b, err_msg=name)
        frames_c, _ = decode(other, name, cfg.sample_rate)
        any_other_differs |= not np.array_equal(frames_a, frames_c)
    assert any_other_differs


def test_clip_content_does_not_depend_on_generation_order():
    cfg = tiny()
    plan = synthetic._clip_plan(cfg)
    assert len({(item["split_id"], item["clip_index"]) for item in plan}) == len(plan)  # one stream per clip
    forward = [synthetic.make_clip(cfg, item) for item in plan]
    backward = [synthetic.make_clip(cfg, item) for item in reversed(plan)][::-1]
    for (fa, aa, va, sa), (fb, ab, vb, sb) in zip(forward, backward):
        np.testing.assert_array_equal(fa, fb)
        np.testing.assert_array_equal(aa, ab)
        assert (va, sa) == (vb, sb)


def _colour_centroid(frame: np.ndarray, rgb: np.ndarray) -> np.ndarray:
    """(x, y) centroid of the pixels close to the class colour."""
    dist = np.linalg.norm(frame.astype(np.float32) / 255.0 - rgb, axis=-1)
    ys, xs = np.nonzero(dist < 0.3)
    assert len(xs) >= 5, "class-coloured object not found"
    return np.array([xs.mean(), ys.mean()])


def test_class_object_translates_in_class_direction(tmp_path):
    cfg = tiny(num_classes=4, train_per_class=1, test_per_class=1, size=64, duration_s=2.0,
               visual=dict(noise_std=0.0, distractors=0, ambiguity=0.0, object_scale=0.12))
    root = tmp_path / "clean"
    generate(cfg, root, progress=False)
    for name, label in read_list(root / "train.txt") + read_list(root / "test.txt"):
        spec = class_spec(label)
        frames, _ = decode(root, name, cfg.sample_rate)
        shift = _colour_centroid(frames[-1], spec.rgb) - _colour_centroid(frames[0], spec.rgb)
        along = shift @ spec.velocity_dir
        across = abs(shift @ spec.velocity_dir[::-1])
        assert along > 0.25 * cfg.size, (name, spec.direction, shift)
        assert across < 2.0, (name, spec.direction, shift)


def _peak_hz(audio: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.fft.rfftfreq(len(audio), 1 / sr)[np.argmax(spectrum)])


def test_audio_classes_have_their_base_frequency(tmp_path):
    cfg = tiny(num_classes=2, train_per_class=1, test_per_class=1, audio=dict(snr_db=40, ambiguity=0.0))
    root = tmp_path / "tones"
    generate(cfg, root, progress=False)
    peaks = {}
    for name, label in read_list(root / "train.txt"):
        _, audio = decode(root, name, cfg.sample_rate)
        peaks[label] = _peak_hz(audio, cfg.sample_rate)
        assert peaks[label] == pytest.approx(class_spec(label).base_hz, rel=0.03), (label, peaks[label])
    assert abs(peaks[0] - peaks[1]) > 0.2 * min(peaks.values())


@pytest.mark.parametrize("modality", ["visual", "audio"])
def test_full_ambiguity_shows_another_class_in_that_modality_only(tmp_path, modality):
    other = "audio" if modality == "visual" else "visual"
    cfg = tiny(**{modality: dict(ambiguity=1.0), other: dict(ambiguity=0.0)})
    root = tmp_path / modality
    generate(cfg, root, progress=False)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["clips"]
    for clip in meta["clips"]:
        assert clip[f"{modality}_class"] != clip["label"]
        assert 0 <= clip[f"{modality}_class"] < cfg.num_classes
        assert clip[f"{other}_class"] == clip["label"]
    assert meta["counts"]["train"][f"{modality}_agrees_with_label"] == 0.0


def test_class_specs_are_distinct_and_first_classes_differ_everywhere():
    specs = [class_spec(k) for k in range(MAX_CLASSES)]
    assert len({(s.shape, s.colour, s.direction) for s in specs}) == MAX_CLASSES
    assert len({(round(s.base_hz, 3), s.pattern) for s in specs}) == MAX_CLASSES
    assert len({s.name for s in specs}) == MAX_CLASSES
    first = specs[:4]
    for attr in ("shape", "colour", "direction", "base_hz", "pattern"):
        assert len({getattr(s, attr) for s in first}) == 4, attr
    with pytest.raises(ValueError):
        class_spec(MAX_CLASSES)


def test_failed_generation_leaves_previous_output(tmp_path, monkeypatch):
    check_failed_generation_keeps_previous(tmp_path, monkeypatch, synthetic,
                                           lambda out: generate(tiny(), out, progress=False))


def test_cli_generates_and_rejects_bad_params(tmp_path, capsys):
    from stages.generate import main

    out = tmp_path / "cli_out"
    params = tmp_path / "params.yaml"
    params.write_text(f"generate:\n  out_dir: {out}\n  num_classes: 2\n  train_per_class: 1\n"
                      f"  test_per_class: 1\n  duration_s: 1.0\n  size: 32\n")
    assert main(["--params", str(params)]) == 0
    assert len(read_list(out / "train.txt")) == 2 and (out / "meta.json").is_file()
    assert str(out) in capsys.readouterr().out

    params.write_text("generate:\n  num_classes: 200\n  sizee: 32\n")
    assert main(["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "generate.num_classes" in err and "generate.sizee" in err
    assert main(["--params", str(tmp_path / "missing.yaml")]) == 2
