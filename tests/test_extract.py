import json

import numpy as np
import pytest

from helpers import SR, make_clip, tone, write_manifest
from mmrobust.config import AudioCfg, ExtractCfg
from mmrobust.data import features as F
from mmrobust.data.extract import ExtractError, Task, extract, extract_clip
from mmrobust.data.media import MediaError, write_clip
from mmrobust.io import read_csv

CFG = ExtractCfg(workers=2, timing={"fps": 2.0, "max_frames": 6}, visual={"size": 32},
                 flow={"size": 64}, diff={"size": 32}, audio={"preset": "cpu_fbank", "clip_s": 2.0, "frames": 100})


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    rows = []
    for i in range(4):
        make_clip(root / "videos" / f"good{i}.mp4", seconds=2.0, freq=300 + 200 * i, seed=i)
        rows.append(dict(clip_id=f"good{i}", path=f"videos/good{i}.mp4", label=i % 2, split="train"))
    make_clip(root / "videos" / "silent.mp4", freq=None)                      # no audio track
    (root / "videos" / "empty.mp4").write_bytes(b"")                          # zero-length file
    good = (root / "videos" / "good0.mp4").read_bytes()
    (root / "videos" / "trunc.mp4").write_bytes(good[: len(good) // 3])       # truncated
    write_clip(root / "videos" / "short.mp4", np.zeros((1, 32, 32, 3), np.uint8), 10, tone(440, 0.1), SR)
    for name in ("silent", "empty", "trunc", "short"):
        rows.append(dict(clip_id=name, path=f"videos/{name}.mp4", label=0, split="test"))
    manifest = write_manifest(root / "manifest", root, rows)
    return root, manifest


def test_frame_positions_rate_and_bounds():
    # 10 s at 25 fps, 1 fps, max 10 -> centres of 10 one-second slices
    pos = F.frame_positions(250, 25.0, 1.0, 10)
    np.testing.assert_array_equal(pos, np.arange(10) * 25 + 12)
    # a 2 s clip still yields 3 frames, and a long clip is capped and spread over the whole clip
    assert len(F.frame_positions(50, 25.0, 1.0, 10)) == 3
    long = F.frame_positions(25 * 100, 25.0, 1.0, 10)
    assert len(long) == 10 and long[0] < 250 and long[-1] > 2250


def test_fbank_peak_at_tone_frequency_and_normalisation():
    cfg = AudioCfg(preset="audioset_fbank").resolved()
    import librosa
    mel_freqs = librosa.mel_frequencies(n_mels=cfg.n_mels + 2, fmax=cfg.sample_rate / 2)[1:-1]
    for f in (440.0, 2000.0):
        spec = F.audio_features(tone(f, 3.0), cfg)
        assert spec.shape == (128, 1024)
        peak = int(np.argmax(spec[:, 50]))
        assert abs(mel_freqs[peak] - f) / f < 0.1
    # 3 s of sound = 300 frames; the rest is zero padding before normalisation
    spec = F.audio_features(tone(440, 3.0), cfg)
    pad_value = (0 - cfg.norm_mean) / (2 * cfg.norm_std)
    np.testing.assert_allclose(spec[:, 400:], pad_value, rtol=1e-6)


def test_stft_preset_shape():
    spec = F.audio_features(tone(1000, 6.0), AudioCfg(preset="vggsound_stft"))
    assert spec.shape == (129, 626)
    peak = int(np.argmax(spec[:, 100]))
    assert abs(peak * 16000 / 256 - 1000) <= 62.5


def test_flow_uint8_round_trip_and_bound():
    f = np.array([[[-20.0, 0.0], [7.5, 15.0]]], np.float32)
    code = F.flow_to_uint8(f, 15)
    assert code.dtype == np.uint8 and code.min() == 0 and code.max() == 255
    back = F.uint8_to_flow(code, 15)
    np.testing.assert_allclose(back, np.clip(f, -15, 15), atol=15 / 255 + 1e-6)


def test_frame_difference_round_trip():
    a = np.array([[[0, 255, 10]]], np.uint8)
    b = np.array([[[255, 0, 13]]], np.uint8)
    d = F.uint8_to_difference(F.frame_difference(a, b))
    np.testing.assert_allclose(d, b.astype(float) - a, atol=1)


@pytest.mark.parametrize("algorithm", ["farneback", "tvl1"])
@pytest.mark.parametrize("dx,dy", [(2, 0), (-2, 0), (0, 2)])
def test_flow_of_known_translation(tmp_path, algorithm, dx, dy):
    path = make_clip(tmp_path / "m.mp4", seconds=1.0, dx=dx, dy=dy)
    cfg = CFG.model_copy(update={"flow": CFG.flow.model_copy(update={"algorithm": algorithm})})
    code, n = extract_clip("flow", Task(0, "m", str(path), ""), cfg)
    assert code.dtype == np.uint8 and code.shape == (n, 64, 64, 2)
    flow = F.uint8_to_flow(code[:n], 15)
    moving = np.hypot(flow[..., 0], flow[..., 1]) > 0.5
    assert moving.mean() > 0.05
    u, v = np.median(flow[..., 0][moving]), np.median(flow[..., 1][moving])
    assert u == pytest.approx(dx, abs=0.5) and v == pytest.approx(dy, abs=0.5)


def test_extract_all_modalities_and_rejects(clips, tmp_path):
    root, manifest = clips
    shapes = {}
    for modality in ("visual", "audio", "flow", "diff"):
        out = tmp_path / modality
        with pytest.raises(ExtractError, match="max_reject_fraction"):
            extract(modality, CFG.model_copy(update={"max_reject_fraction": 0.1}), manifest, out, progress=False)
        assert (out / "data.npy").exists(), "good clips must be kept even when too many are rejected"
        summary = extract(modality, CFG.model_copy(update={"max_reject_fraction": 0.6}), manifest, out,
                          progress=False)
        assert summary["out_dir"] == str(out)
        data = np.load(out / "data.npy", mmap_mode="r")
        index = read_csv(out / "index.csv")
        rejected = {r["clip_id"]: r for r in read_csv(out / "rejected.csv")}
        meta = json.loads((out / "meta.json").read_text())
        assert meta["extracted"] == len(index) and meta["rejected"] == len(rejected) == 8 - len(index)
        assert {r["clip_id"] for r in index} >= {f"good{i}" for i in range(4)}
        assert {"empty", "trunc", "short"} <= set(rejected)
        assert "empty" in rejected["empty"]["reason"] and "short" in rejected["short"]["reason"]
        assert all(r["stage"] == modality for r in rejected.values())
        shapes[modality] = (data.shape, data.dtype)
        good = data[[int(r["row"]) for r in index]]
        assert np.isfinite(good.astype(np.float32)).all()
        if modality == "audio":
            assert "silent" in rejected and "no audio track" in rejected["silent"]["reason"]
            assert data.dtype == np.float16 and data.shape[1:] == (64, 100)
            assert np.abs(good.astype(np.float32)).max() < 10
        else:
            assert "silent" not in rejected  # a video without sound is fine for frame modalities
            assert data.dtype == np.uint8 and all(int(r["n_frames"]) == 4 for r in index)  # 2 s at 2 fps
        if modality == "flow":
            assert meta["algorithm"] == "farneback"
    assert shapes["visual"][0] == (8, 6, 32, 32, 3)
    assert shapes["flow"][0] == (8, 6, 64, 64, 2)
    assert shapes["diff"][0] == (8, 6, 32, 32, 3)


def test_visual_frames_match_direct_decode(clips, tmp_path):
    import decord
    root, manifest = clips
    extract("visual", CFG.model_copy(update={"max_reject_fraction": 1.0}), manifest, tmp_path / "v", progress=False)
    data = np.load(tmp_path / "v" / "data.npy")
    vr = decord.VideoReader(str(root / "videos" / "good1.mp4"), width=32, height=32)
    pos = F.frame_positions(len(vr), vr.get_avg_fps(), 2.0, 6)
    np.testing.assert_array_equal(data[1, : len(pos)], vr.get_batch(pos.tolist()).asnumpy())
    assert not data[1, len(pos):].any()


def test_corrupt_clip_error_names_file(clips):
    root, _ = clips
    for name in ("trunc", "empty"):
        with pytest.raises(MediaError, match=name):
            extract_clip("visual", Task(0, name, str(root / "videos" / f"{name}.mp4"), ""), CFG)
