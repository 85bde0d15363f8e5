"""Real-content sets (spoken digit names + handwritten digits): layout, provenance, determinism, the knobs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import check_failed_generation_keeps_previous
from mmrobust.config import SpokenCfg, SpokenSet
from mmrobust.data import spoken
from mmrobust.data.media import open_video, read_audio, read_frames

AAC_FRAME = 1024


def tiny(**set_kw) -> SpokenCfg:
    s = dict(num_classes=3, train_per_class=2, test_per_class=1, **set_kw)
    return SpokenCfg(duration_s=1.5, size=32, sets={"tiny": SpokenSet(**s)})


def read_list(path: Path) -> list[tuple[str, int]]:
    rows = [line.split() for line in path.read_text().splitlines()]
    assert all(len(r) == 2 for r in rows), rows
    return [(name, int(label)) for name, label in rows]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    cfg = tiny()
    out = tmp_path_factory.mktemp("spoken") / "tiny"
    summary = spoken.generate(cfg, "tiny", out, progress=False)
    return cfg, out, summary


def test_layout_lists_and_provenance(dataset):
    cfg, root, summary = dataset
    s = cfg.sets["tiny"]
    train, test = read_list(root / "train.txt"), read_list(root / "test.txt")
    assert sorted(label for _, label in train) == sorted(list(range(s.num_classes)) * s.train_per_class)
    assert sorted(label for _, label in test) == sorted(list(range(s.num_classes)) * s.test_per_class)
    for name, label in train + test:
        assert name.startswith(spoken.WORDS[label] + "_")
        assert (root / "videos" / f"{name}.mp4").stat().st_size > 0
    assert [line.split() for line in (root / "classes.txt").read_text().splitlines()] == \
        [[str(k), spoken.WORDS[k]] for k in range(s.num_classes)]

    meta = json.loads((root / "meta.json").read_text())
    assert meta["set"] == s.model_dump()
    images, labels = spoken.handwritten_digits()
    for clip in meta["clips"]:
        # the class's own scan is the last one drawn; distractors are of other digits; the word spoken is the class's
        assert labels[clip["scans"][-1]] == clip["label"]
        assert all(labels[i] != clip["label"] for i in clip["scans"][:-1])
        assert len(clip["scans"]) == s.distractors + 1
        assert [v["word"] for v in clip["speech"]] == [spoken.WORDS[clip["label"]]]
        assert all(scan in spoken.split_pool(cfg.seed, int(labels[scan]), clip["split"]) for scan in clip["scans"])
    assert summary["clips"] == len(train) + len(test) and summary["out_dir"] == str(root)
    assert not list(root.parent.glob(".tiny.tmp-*"))


def test_clips_decode_with_expected_shape_and_audio_length(dataset):
    cfg, root, _ = dataset
    for name, _ in read_list(root / "train.txt") + read_list(root / "test.txt"):
        path = root / "videos" / f"{name}.mp4"
        vr = open_video(path)
        assert len(vr) == round(cfg.duration_s * cfg.fps)
        assert vr[0].shape == (cfg.size, cfg.size, 3)
        audio = read_audio(path, cfg.sample_rate)
        assert abs(len(audio) - round(cfg.duration_s * cfg.sample_rate)) <= AAC_FRAME
        assert np.abs(audio).max() > 0.1


def test_train_and_test_never_share_a_handwritten_scan():
    _, labels = spoken.handwritten_digits()
    for label in range(10):
        train, test = spoken.split_pool(2024, label, "train"), spoken.split_pool(2024, label, "test")
        assert not set(train) & set(test)
        assert sorted(np.concatenate([train, test])) == sorted(np.flatnonzero(labels == label))
        assert abs(len(train) - len(test)) <= 1
    assert set(spoken.split_pool(2024, 3, "train")) != set(spoken.split_pool(2025, 3, "train"))


def test_same_config_same_files_with_any_worker_count(dataset, tmp_path):
    cfg, first, _ = dataset
    second = tmp_path / "again"
    spoken.generate(cfg.model_copy(update={"workers": 2}), "tiny", second, progress=False)
    for f in ("train.txt", "test.txt", "classes.txt", "meta.json"):
        assert (first / f).read_bytes() == (second / f).read_bytes(), f
    for name, _ in read_list(first / "train.txt"):
        a, b = first / "videos" / f"{name}.mp4", second / "videos" / f"{name}.mp4"
        np.testing.assert_array_equal(read_frames(open_video(a), range(3)), read_frames(open_video(b), range(3)))
        np.testing.assert_array_equal(read_audio(a, cfg.sample_rate), read_audio(b, cfg.sample_rate))
    other = spoken.make_clip(dict(label=0, split="train", split_id=0, index=0), cfg.sets["tiny"],
                             cfg.model_copy(update={"seed": cfg.seed + 1}), spoken.set_seed_id("tiny"))
    same = spoken.make_clip(dict(label=0, split="train", split_id=0, index=0), cfg.sets["tiny"], cfg,
                            spoken.set_seed_id("tiny"))
    assert not np.array_equal(other[0], same[0])


def test_espeak_says_each_word_the_same_way_whatever_was_said_before():
    speaker = spoken._speaker()
    seven = speaker.say("seven", "en+m3", rate=170, pitch=50)
    one = speaker.say("one", "en+klatt", rate=120, pitch=20)
    slow = speaker.say("seven", "en+m3", rate=100, pitch=50)
    assert np.array_equal(seven, speaker.say("seven", "en+m3", rate=170, pitch=50))
    assert len(one) != len(seven) or not np.allclose(one, seven)
    assert len(slow) > 1.3 * len(seven)  # the rate knob is really used
    with pytest.raises(RuntimeError, match="no voice"):
        speaker.say("one", "no-such-voice", rate=170, pitch=50)


_HASH_ALL_VOICES = """
import hashlib, sys
from mmrobust.data import spoken
sp = spoken._speaker()
order = [(v, x) for v in spoken.VOICES for x in spoken.VARIANTS]
order = order[::-1] if sys.argv[1] == "reversed" else order
print(sorted(f"{v}+{x}:" + hashlib.md5(sp.say("four", f"{v}+{x}", 150, 50).tobytes()).hexdigest() for v, x in order))
"""


def test_every_voice_is_the_same_in_another_process_and_order():
    import subprocess
    import sys

    runs = [subprocess.run([sys.executable, "-c", _HASH_ALL_VOICES, order], capture_output=True, text=True,
                           check=True).stdout for order in ("forward", "reversed")]
    assert runs[0] == runs[1] and runs[0].count(":") == len(spoken.VOICES) * len(spoken.VARIANTS)


def test_speech_snr_sets_the_noise_floor():
    """Outside the spoken word the track is noise only: its level relative to the loudest part follows the SNR."""
    def quiet_share(snr: float) -> float:
        cfg = tiny(speech_snr_db=snr)
        rng = np.random.default_rng(0)
        wave = spoken.synth_audio(2, cfg.sets["tiny"], cfg, rng).astype(np.float64)
        frames = wave[: len(wave) // 400 * 400].reshape(-1, 400)
        rms = np.sqrt((frames ** 2).mean(1))
        return float(np.quantile(rms, 0.1) / rms.max())

    shares = [quiet_share(snr) for snr in (30.0, 10.0, -10.0)]
    assert shares[0] < shares[1] < shares[2]
    assert shares[0] < 0.05 and shares[2] > 0.3


@pytest.mark.parametrize("contrast", [0.0, 1.0])
def test_glyph_contrast_is_the_ink(contrast):
    cfg = tiny(glyph_contrast=contrast, distractors=0, pixel_noise=0.0)
    frames = spoken.synth_frames(1, "train", cfg.sets["tiny"], cfg, np.random.default_rng(0)).astype(np.float64)
    grey = frames.mean(-1)
    spread = grey.max() - grey.min()
    if contrast == 0:
        assert spread < 0.12 * 255  # the paper's gentle colour cast only
    else:
        assert spread > 0.4 * 255


def test_unknown_set_and_bad_params_are_named(tmp_path, capsys):
    from stages.generate_spoken import main

    params = tmp_path / "params.yaml"
    out = tmp_path / "sets"
    params.write_text(f"spoken:\n  out_dir: {out}\n  duration_s: 1.5\n  size: 32\n  sets:\n"
                      f"    mini: {{num_classes: 2, train_per_class: 1, test_per_class: 1}}\n")
    assert main(["--set", "mini", "--params", str(params)]) == 0
    assert read_list(out / "mini" / "train.txt") == [("zero_train_0000", 0), ("one_train_0000", 1)]
    assert str(out / "mini") in capsys.readouterr().out
    assert main(["--set", "other", "--params", str(params)]) == 2
    assert "spoken.sets.other" in capsys.readouterr().err
    params.write_text("spoken:\n  size: 33\n  sets:\n    mini: {num_classes: 12}\n")
    assert main(["--set", "mini", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "num_classes" in err


def test_failed_generation_leaves_previous_output(tmp_path, monkeypatch):
    check_failed_generation_keeps_previous(tmp_path, monkeypatch, spoken,
                                           lambda out: spoken.generate(tiny(), "tiny", out, progress=False))
