"""Ingest: fixture trees for the KS, VGGSound and UCF101 layouts, built here with placeholder video files."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mmrobust.config import DataCfg
from mmrobust.data.ingest import IngestError, flow_dirs, ingest, load_manifest, load_summary
from mmrobust.io import read_csv
from stages.ingest import main

REPO = Path(__file__).resolve().parents[1]


def touch(path: Path, data: bytes = b"\x00video") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def cfg(root: Path, dataset: str = "ks", **kw) -> DataCfg:
    return DataCfg(dataset=dataset, root=str(root), out_dir=str(root.parent / "manifest"), **kw)


def run(c: DataCfg) -> tuple[dict, list[dict], list[dict]]:
    summary = ingest(c)
    out = Path(c.out_dir)
    return summary, load_manifest(out), read_csv(out / "rejected.csv")


def by_line(rejected: list[dict]) -> dict[tuple[str, int], str]:
    return {(r["source"], int(r["line"])): r["reason"] for r in rejected}


# ---------------------------------------------------------------- Kinetics-Sounds layout
def make_ks(root: Path, train: dict[str, int], test: dict[str, int], classes: list[str] | None = None) -> Path:
    for name in [*train, *test]:
        touch(root / "videos" / f"{name}.mp4")
    write(root / "train.txt", "".join(f"{n} {y}\n" for n, y in train.items()))
    write(root / "test.txt", "".join(f"{n} {y}\n" for n, y in test.items()))
    if classes is not None:
        write(root / "classes.txt", "".join(f"{i} {c}\n" for i, c in enumerate(classes)))
    return root


def test_ks_counts_labels_and_files(tmp_path):
    train = {f"tr{i:02d}": i % 3 for i in range(12)}
    test = {f"te{i:02d}": i % 3 for i in range(6)}
    root = make_ks(tmp_path / "ks", train, test, ["playing drums", "dog barking", "laughing"])
    summary, clips, rejected = run(cfg(root, val_fraction=0.0))
    assert summary["counts"] == {"train": 12, "val": 0, "test": 6}
    assert summary["num_classes"] == 3 and summary["rejected"] == 0 and rejected == []
    assert summary["root"] == str(root.resolve()) and summary["flow_dir"] is None
    row = next(r for r in clips if r["clip_id"] == "tr04")
    video = (root / "videos/tr04.mp4").read_bytes()
    assert row == {"clip_id": "tr04", "path": "videos/tr04.mp4", "label": 1, "label_name": "dog barking",
                   "split": "train", "fingerprint": f"{len(video)}:{hashlib.md5(video).hexdigest()}"}
    assert [r["clip_id"] for r in clips] == sorted(train) + sorted(test)
    classes = read_csv(Path(summary_dir := root.parent / "manifest") / "classes.csv")
    assert classes[0] == {"label": "0", "name": "playing drums"} and len(classes) == 3
    assert json.loads((summary_dir / "summary.json").read_text()) == summary == load_summary(summary_dir)


def test_fingerprint_reads_head_and_tail_and_sees_a_replaced_video(tmp_path):
    from mmrobust.data.ingest import fingerprint

    mib = 1 << 20
    big = tmp_path / "big.mp4"
    head, middle, tail = b"h" * mib, b"m" * (mib // 2), b"t" * mib
    big.write_bytes(head + middle + tail)
    assert fingerprint(big) == f"{3 * mib - mib // 2}:{hashlib.md5(head + tail).hexdigest()}"
    root = make_ks(tmp_path / "ks", {"a": 0, "b": 1}, {"c": 0})
    before = run(cfg(root, val_fraction=0.0))[1]
    (root / "videos/b.mp4").write_bytes(b"re-encoded")
    after = run(cfg(root, val_fraction=0.0))[1]
    changed = [x["clip_id"] for x, y in zip(before, after) if x != y]
    assert changed == ["b"]


def test_ks_without_classes_file_uses_ids(tmp_path):
    root = make_ks(tmp_path / "ks", {"a": 0, "b": 4}, {"c": 2})
    summary, clips, _ = run(cfg(root, val_fraction=0.0))
    assert summary["num_classes"] == 5
    assert {r["clip_id"]: (r["label"], r["label_name"]) for r in clips} == {"a": (0, "0"), "b": (4, "4"), "c": (2, "2")}


def test_ks_every_kind_of_bad_row_is_reported_and_good_rows_kept(tmp_path):
    root = tmp_path / "ks"
    good = ["g1", "g2", "g3", "g4", "link_in"]
    for n in ["g1", "g2", "g3", "g4", "dup"]:
        touch(root / "videos" / f"{n}.mp4")
    touch(root / "videos" / "empty.mp4", b"")
    touch(tmp_path / "secret.mp4")  # outside the root
    touch(root / "elsewhere" / "target.mp4")
    os.symlink(tmp_path / "secret.mp4", root / "videos" / "link_out.mp4")
    os.symlink(root / "elsewhere" / "target.mp4", root / "videos" / "link_in.mp4")
    write(root / "classes.txt", "0 a\n1 b\n")
    write(root / "train.txt", "\n".join([
        "g1 0",            # 1
        "g2 1",            # 2
        "lonely",          # 3 malformed: one field
        "g3 0 extra",      # 4 malformed: three fields
        "g3 zero",         # 5 malformed: label not an int
        "g3 7",            # 6 unknown label
        "dup 0",           # 7
        "dup 1",           # 8 duplicate within train
        "missing 0",       # 9 missing file
        "empty 1",         # 10 empty file
        "../secret 0",     # 11 escapes with ..
        "/etc/passwd 0",   # 12 absolute
        "link_out 1",      # 13 symlink resolving outside the root
        "link_in 1",       # 14 symlink inside the root: fine
        "",                # blank lines are not rows
    ]) + "\n")
    write(root / "test.txt", "g3 0\ng4 1\ndup 1\n")  # line 3: duplicate across train/test
    summary, clips, rejected = run(cfg(root, val_fraction=0.0))
    assert sorted(r["clip_id"] for r in clips) == sorted(good + ["dup"])
    assert next(r for r in clips if r["clip_id"] == "dup")["label"] == 0  # the first occurrence wins
    reasons = by_line(rejected)
    expected = {3: "malformed", 4: "malformed", 5: "not an integer", 6: "unknown label: 7", 8: "duplicate clip id",
                9: "missing video", 10: "empty video", 11: "escapes root", 12: "escapes root", 13: "escapes root"}
    for line, words in expected.items():
        assert words in reasons[("train.txt", line)], (line, reasons.get(("train.txt", line)))
    assert "duplicate clip id: first seen at train.txt:7" in reasons[("test.txt", 3)]
    assert len(rejected) == len(expected) + 1 == summary["rejected"]
    assert [r["clip_id"] for r in rejected if r["line"] in ("9", "11", "13")] == ["missing", "../secret", "link_out"]
    assert "'../secret.mp4' contains '..'" in reasons[("train.txt", 11)]
    assert summary["rejected_by_kind"]["path escapes root"] == 3
    order = sorted(reasons, key=lambda k: (k[0] != "train.txt", k[1]))
    assert [(r["source"], int(r["line"])) for r in rejected] == order  # file order, then line


def test_ks_negative_label_without_classes_file(tmp_path):
    root = make_ks(tmp_path / "ks", {"a": 0}, {"b": 0})
    write(root / "train.txt", "a 0\nb2 -1\n")
    _, _, rejected = run(cfg(root))
    assert "unknown label: -1" in by_line(rejected)[("train.txt", 2)]


# ---------------------------------------------------------------- validation split
def test_val_split_stratified_deterministic_disjoint(tmp_path):
    sizes = {0: 10, 1: 20, 2: 1, 3: 5}
    train = {f"c{y}_{i:02d}": y for y, n in sizes.items() for i in range(n)}
    test = {f"t{y}": y for y in sizes}
    root = make_ks(tmp_path / "ks", train, test)
    c = cfg(root, val_fraction=0.2, seed=7)
    _, clips, _ = run(c)
    val = Counter(r["label"] for r in clips if r["split"] == "val")
    assert val == {0: 2, 1: 4, 3: 1}  # 36 * 0.2 = 7; the class with one clip keeps it in train
    ids = {s: {r["clip_id"] for r in clips if r["split"] == s} for s in ("train", "val", "test")}
    assert not ids["train"] & ids["val"] and ids["train"] | ids["val"] == set(train)
    assert ids["test"] == set(test) and "c2_00" in ids["train"]
    assert all(r["clip_id"] in test for r in clips if r["split"] == "test")

    assert run(c)[1] == clips  # deterministic
    other = {r["clip_id"] for r in run(cfg(root, val_fraction=0.2, seed=8))[1] if r["split"] == "val"}
    assert other != ids["val"] and len(other) == len(ids["val"])


def test_val_split_rounding_keeps_total(tmp_path):
    train = {f"c{y}_{i}": y for y in range(5) for i in range(3)}  # 15 clips, 0.2 -> 3 val over 5 classes
    root = make_ks(tmp_path / "ks", train, {"t": 0})
    _, clips, _ = run(cfg(root, val_fraction=0.2))
    val = Counter(r["label"] for r in clips if r["split"] == "val")
    assert sum(val.values()) == 3 and max(val.values()) == 1


def test_val_split_never_empties_a_class_from_train(tmp_path):
    train = {"a0": 0, "b0": 1, "c0": 2, "c1": 2, "c2": 2}
    root = make_ks(tmp_path / "ks", train, {"t": 0})
    _, clips, _ = run(cfg(root, val_fraction=0.5))
    assert Counter(r["label"] for r in clips if r["split"] == "train") == {0: 1, 1: 1, 2: 1}


# ---------------------------------------------------------------- VGGSound layout
def test_vggsound_names_with_commas_and_padding(tmp_path):
    root = tmp_path / "vgg"
    write(root / "vggsound.csv", "\n".join([
        '---g-f_I2yQ,1,"people marching, parading",train',   # 1
        "abc,30,dog barking,train",                          # 2
        'zz9,123456,"people marching, parading",test',       # 3
        "abc,30,dog barking,test",                           # 4 duplicate across splits
        "bad,xx,dog barking,train",                          # 5 malformed start
        "short,1,train",                                     # 6 field count
        "val1,5,dog barking,val",                            # 7 unknown split
        "gone,5,cat purring,train",                          # 8 missing file; its class still counts
    ]) + "\n")
    for name in ["---g-f_I2yQ_000001", "abc_000030", "zz9_123456"]:
        touch(root / "video" / f"{name}.mp4")
    summary, clips, rejected = run(cfg(root, "vggsound", val_fraction=0.0))
    assert summary["num_classes"] == 3 and summary["counts"] == {"train": 2, "val": 0, "test": 1}
    names = read_csv(root.parent / "manifest" / "classes.csv")
    assert [n["name"] for n in names] == ["cat purring", "dog barking", "people marching, parading"]
    got = {r["clip_id"]: (r["path"], r["label"], r["label_name"], r["split"]) for r in clips}
    assert got["---g-f_I2yQ_000001"] == ("video/---g-f_I2yQ_000001.mp4", 2, "people marching, parading", "train")
    assert got["zz9_123456"][1:] == (2, "people marching, parading", "test")
    assert got["abc_000030"][1] == 1
    reasons = by_line(rejected)
    assert "duplicate clip id" in reasons[("vggsound.csv", 4)]
    assert "start_sec 'xx' is not an integer" in reasons[("vggsound.csv", 5)]
    assert "malformed" in reasons[("vggsound.csv", 6)] and "'val'" in reasons[("vggsound.csv", 7)]
    assert "missing video: video/gone_000005.mp4" in reasons[("vggsound.csv", 8)]
    assert len(rejected) == 5


# ---------------------------------------------------------------- UCF101 layout
UCF_CLASSES = ["ApplyEyeMakeup", "Archery", "Basketball"]


def make_ucf(root: Path, train: list[str], test: list[str], split: int = 1) -> Path:
    lists = root / "ucfTrainTestlist"
    write(lists / "classInd.txt", "".join(f"{i + 1} {c}\r\n" for i, c in enumerate(UCF_CLASSES)))
    write(lists / f"trainlist0{split}.txt", "".join(f"{line}\r\n" for line in train))
    write(lists / f"testlist0{split}.txt", "".join(f"{line}\r\n" for line in test))
    for line in train + test:
        touch(root / "UCF-101" / line.split()[0])
    return root


def test_ucf101_labels_one_based_and_folder(tmp_path):
    train = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1", "Archery/v_Archery_g08_c01.avi 2",
             "Basketball/v_Basketball_g08_c01.avi 3", "Archery/v_Archery_g09_c01.avi 1",  # 4: mismatch
             "Archery/v_Archery_g10_c01.avi 9", "v_NoFolder.avi 1"]  # 5: unknown label, 6: malformed path
    test = ["Basketball/v_Basketball_g01_c01.avi", "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
            "Bowling/v_Bowling_g01_c01.avi", "Archery/v_Archery_g01_c01.avi 2"]  # 3: unknown folder, 4: fields
    root = make_ucf(tmp_path / "ucf", train, test, split=2)
    summary, clips, rejected = run(cfg(root, "ucf101", val_fraction=0.0, ucf101={"split": 2}))
    got = {r["clip_id"]: (r["label"], r["label_name"], r["split"]) for r in clips}
    assert got == {"v_ApplyEyeMakeup_g08_c01": (0, "ApplyEyeMakeup", "train"),
                   "v_Archery_g08_c01": (1, "Archery", "train"), "v_Basketball_g08_c01": (2, "Basketball", "train"),
                   "v_Basketball_g01_c01": (2, "Basketball", "test"),
                   "v_ApplyEyeMakeup_g01_c01": (0, "ApplyEyeMakeup", "test")}
    assert next(r for r in clips if r["clip_id"] == "v_Archery_g08_c01")["path"] == \
        "UCF-101/Archery/v_Archery_g08_c01.avi"
    reasons = by_line(rejected)
    tr, te = "ucfTrainTestlist/trainlist02.txt", "ucfTrainTestlist/testlist02.txt"
    assert "label mismatch: folder 'Archery' but label 1 is 'ApplyEyeMakeup'" in reasons[(tr, 4)]
    assert "unknown label: 9" in reasons[(tr, 5)] and "malformed" in reasons[(tr, 6)]
    assert "'Bowling' is not in classInd.txt" in reasons[(te, 3)] and "malformed" in reasons[(te, 4)]
    assert len(rejected) == 5 and summary["num_classes"] == 3


def make_flow(root: Path, stem: str, u: int, v: int | None) -> None:
    for comp, n in (("u", u), ("v", v)):
        if n is None:
            continue
        (root / "tvl1" / comp / stem).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            touch(root / "tvl1" / comp / stem / f"frame{i:06d}.jpg", b"jpg")


def test_ucf101_precomputed_flow(tmp_path):
    train = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1", "Archery/v_Archery_g08_c01.avi 2",
             "Archery/v_Archery_g09_c01.avi 2", "Basketball/v_Basketball_g08_c01.avi 3"]
    root = make_ucf(tmp_path / "ucf", train, ["Basketball/v_Basketball_g01_c01.avi"])
    make_flow(root, "v_ApplyEyeMakeup_g08_c01", 4, 4)
    make_flow(root, "v_Archery_g08_c01", 4, None)  # v folder missing
    make_flow(root, "v_Archery_g09_c01", 4, 3)  # count mismatch
    make_flow(root, "v_Basketball_g08_c01", 0, 0)  # folders without frames
    make_flow(root, "v_Basketball_g01_c01", 2, 2)
    summary, clips, rejected = run(cfg(root, "ucf101", val_fraction=0.0, ucf101={"flow_dir": "tvl1"}))
    assert summary["flow_dir"] == "tvl1"
    assert {r["clip_id"] for r in clips} == {"v_ApplyEyeMakeup_g08_c01", "v_Basketball_g01_c01"}
    row = clips[0]
    assert row["flow_path"] == "tvl1/{uv}/v_ApplyEyeMakeup_g08_c01" and row["flow_frames"] == 4
    u, v = flow_dirs(summary["root"], row["flow_path"])
    assert u == root.resolve() / "tvl1/u/v_ApplyEyeMakeup_g08_c01" and v.parent.name == "v"
    reasons = by_line(rejected)
    tr = "ucfTrainTestlist/trainlist01.txt"
    assert "missing flow folder: tvl1/v/v_Archery_g08_c01" in reasons[(tr, 2)]
    assert "empty flow folder" in reasons[(tr, 4)]
    assert "flow frame count mismatch: u has 4, v has 3" in reasons[(tr, 3)]


def test_ucf101_missing_flow_dir_is_fatal(tmp_path):
    root = make_ucf(tmp_path / "ucf", ["Archery/v_Archery_g08_c01.avi 2"], ["Archery/v_Archery_g01_c01.avi"])
    with pytest.raises(IngestError, match="tvl1"):
        ingest(cfg(root, "ucf101", ucf101={"flow_dir": "tvl1"}))


# ---------------------------------------------------------------- fatal errors, atomicity, loader
@pytest.mark.parametrize("dataset, missing", [
    ("ks", "train.txt"), ("synthetic", "test.txt"), ("vggsound", "vggsound.csv"),
    ("ucf101", "classInd.txt"), ("ucf101", "testlist01.txt")])
def test_missing_list_file_is_fatal_and_named(tmp_path, dataset, missing):
    root = tmp_path / "d"
    make_ks(root, {"a": 0}, {"b": 0})
    write(root / "vggsound.csv", "a,0,x,train\n")
    make_ucf(root, ["Archery/v_Archery_g08_c01.avi 2"], ["Archery/v_Archery_g01_c01.avi"])
    next(root.rglob(missing)).unlink()
    with pytest.raises(IngestError, match=missing.replace(".", r"\.")):
        ingest(cfg(root, dataset))


def test_missing_root_is_fatal(tmp_path):
    with pytest.raises(IngestError, match="nowhere.*root not found"):
        ingest(cfg(tmp_path / "nowhere"))


def test_all_rows_rejected_is_fatal_and_keeps_old_manifest(tmp_path):
    root = make_ks(tmp_path / "ks", {"a": 0}, {"b": 0})
    c = cfg(root)
    ingest(c)
    before = (Path(c.out_dir) / "clips.csv").read_text()
    for f in (root / "videos").iterdir():
        f.unlink()
    with pytest.raises(IngestError, match="every row was rejected.*missing video"):
        ingest(c)
    assert (Path(c.out_dir) / "clips.csv").read_text() == before
    assert not [p for p in Path(c.out_dir).parent.iterdir() if p.name.startswith(".manifest")]


def test_empty_test_split_is_fatal(tmp_path):
    root = make_ks(tmp_path / "ks", {"a": 0}, {"b": 0})
    (root / "videos" / "b.mp4").unlink()
    with pytest.raises(IngestError, match="no usable test clip"):
        ingest(cfg(root))


def test_bad_classes_file_is_fatal(tmp_path):
    root = make_ks(tmp_path / "ks", {"a": 0}, {"b": 0})
    write(root / "classes.txt", "0 a\n2 b\n")
    with pytest.raises(IngestError, match="classes.txt"):
        ingest(cfg(root))


def test_load_manifest_missing(tmp_path):
    with pytest.raises(IngestError, match="run the ingest stage"):
        load_manifest(tmp_path / "none")


def test_out_dir_argument_overrides_cfg(tmp_path):
    root = make_ks(tmp_path / "ks", {"a": 0}, {"b": 0})
    ingest(cfg(root), tmp_path / "elsewhere")
    assert [r["clip_id"] for r in load_manifest(tmp_path / "elsewhere")] == ["a", "b"]
    assert not (tmp_path / "manifest").exists()


# ---------------------------------------------------------------- CLI
def test_cli_bad_params_exits_2(tmp_path, capsys):
    params = write(tmp_path / "params.yaml", "datasets: {mine: {dataset: nope, root: .}}\n")
    assert main(["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "datasets.mine.dataset" in err and "'ucf101'" in err and "'nope'" in err


def test_cli_ingest_error_exits_2(tmp_path, capsys):
    params = write(tmp_path / "params.yaml", f"datasets: {{ks: {{dataset: ks, root: {tmp_path / 'nowhere'}}}}}\n")
    assert main(["--params", str(params)]) == 2
    assert "root not found" in capsys.readouterr().err


def test_cli_success_prints_summary(tmp_path):
    root = make_ks(tmp_path / "ks", {"a": 0, "b": 1}, {"c": 0})
    write(root / "train.txt", "a 0\nb 1\nbroken\n")
    params = write(tmp_path / "params.yaml",
                   f"datasets: {{mine: {{dataset: ks, root: {root}}}}}\n"
                   f"data: {{out_dir: {tmp_path / 'm'}, val_fraction: 0}}\n")
    proc = subprocess.run([sys.executable, "-m", "stages.ingest", "--params", str(params)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "train 2, val 0, test 1; 1 rejected" in proc.stdout
    assert "train.txt:3: malformed" in proc.stdout and str(tmp_path / "m" / "mine") in proc.stdout
