import numpy as np
import pytest
import torch

from helpers import make_clip, write_manifest
from mmrobust.config import ExtractCfg
from mmrobust.data.dataset import AVDataset, pixel_bounds, random_resized_crop_box, segment_frames
from mmrobust.data.extract import extract

CFG = ExtractCfg(timing={"fps": 3.0, "max_frames": 6}, visual={"size": 32}, flow={"size": 32},
                 diff={"size": 32}, audio={"preset": "cpu_fbank", "clip_s": 2.0, "frames": 100},
                 max_reject_fraction=0.5)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    rows = []
    for i in range(4):
        make_clip(root / "v" / f"c{i}.mp4", seconds=2.0, dx=2, freq=300 + 100 * i, seed=i)
        rows.append(dict(clip_id=f"c{i}", path=f"v/c{i}.mp4", label=i, split="train" if i < 3 else "test"))
    make_clip(root / "v" / "mute.mp4", seconds=2.0, freq=None)
    rows.append(dict(clip_id="mute", path="v/mute.mp4", label=1, split="train"))
    manifest = write_manifest(root / "manifest", root, rows)
    out = root / "features"
    for m in ("visual", "audio", "flow", "diff"):
        extract(m, CFG, manifest, out / m, progress=False)
    return out


def test_segment_frames_centre_and_random():
    np.testing.assert_array_equal(segment_frames(6, 3, None), [1, 3, 5])
    np.testing.assert_array_equal(segment_frames(10, 3, None), [1, 5, 8])
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = segment_frames(9, 3, rng)
        assert 0 <= idx[0] < 3 <= idx[1] < 6 <= idx[2] < 9


def test_crop_box_inside_image():
    rng = np.random.default_rng(1)
    for _ in range(100):
        top, left, h, w = random_resized_crop_box(40, 30, rng)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 30 and h > 0 and w > 0


def test_test_items_shapes_and_normalisation(features):
    ds = AVDataset(features, "train", ["visual", "audio", "flow", "diff"], train=False)
    # the muted clip has no audio, so it is left out of an audio-visual dataset, and reported
    assert ds.excluded == ["mute"] and ds.clip_ids == ["c0", "c1", "c2"]
    item = ds[1]
    assert item["label"] == 1
    assert item["visual"].shape == (3, 3, 32, 32) and item["flow"].shape == (3, 2, 32, 32)
    assert item["diff"].shape == (3, 3, 32, 32) and item["audio"].shape == (1, 64, 100)
    raw = np.load(features / "visual" / "data.npy")[1]
    centre = raw[[1, 3, 5]].transpose(0, 3, 1, 2) / 255.0  # 6 frames kept -> centres 1, 3, 5
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(item["visual"].numpy(), (centre - mean) / std, atol=1e-5)
    for m in ("visual", "flow", "diff"):
        lo, hi = pixel_bounds(m)
        assert (item[m] >= lo - 1e-5).all() and (item[m] <= hi + 1e-5).all()
    # test items are deterministic
    assert torch.equal(ds[1]["visual"], item["visual"])


def test_train_items_reproducible_and_augmented(features):
    ds = AVDataset(features, "train", ["visual", "flow"], train=True, seed=7)
    a, b = ds[0], ds[0]
    assert torch.equal(a["visual"], b["visual"]) and torch.equal(a["flow"], b["flow"])
    variants = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        variants.add(ds[0]["visual"].sum().item())
    assert len(variants) > 1


def test_flip_negates_flow_u(features):
    ds = AVDataset(features, "train", ["flow"], train=False)
    x = np.load(features / "flow" / "data.npy")[0, :3]  # (T, H, W, 2) uint8
    plain = ds._to_model_space("flow", x, None, False)
    flipped = ds._to_model_space("flow", x, None, True)
    # a crop resized back up (OpenCV path) flips the same way
    crop_plain = ds._to_model_space("flow", x, (2, 3, 20, 17), False)
    crop_flip = ds._to_model_space("flow", x, (2, 3, 20, 17), True)
    torch.testing.assert_close(crop_flip[:, 1], crop_plain[:, 1].flip(-1), atol=1e-4, rtol=0)
    # u in pixels: code/255 * 30 - 15 ; after flip u(x) = -u(W-1-x), v(x) = v(W-1-x)
    to_u = lambda t: (t * 0.3081 + 0.1307) * 30 - 15
    torch.testing.assert_close(to_u(flipped[:, 0]), -to_u(plain[:, 0]).flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(flipped[:, 1], plain[:, 1].flip(-1))
    # the clip moves right at 2 px/frame at 64 px, i.e. 1 px/frame on the 32 px flow grid
    assert to_u(plain[:, 0]).median().item() == pytest.approx(1.0, abs=0.3)


def test_missing_modality_is_a_clear_error(features, tmp_path):
    with pytest.raises(FileNotFoundError, match="has not been extracted"):
        AVDataset(tmp_path, "train", ["visual"])
