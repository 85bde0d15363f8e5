"""Every registered method learns on real content: a small spoken-digit set (eSpeak NG speech, handwritten
digits) through the real stages (generate-spoken, ingest, extraction) and the one training loop. A method that
silently stops learning (issue #18: OJT, CRMT step 2, OGM-GE, VARMAT collapsed on real clips while the
synthetic set looked fine) fails here."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmrobust.config import ModelEntry, load_params
from mmrobust.methods import METHODS, catalog

pytestmark = pytest.mark.slow

# Clean accuracy a method may lose against JT on this set (JT reaches ~0.98; 100 test clips, one = 1 point).
# The paper reports no method more than a few points below JT's clean accuracy on KS; 10 points leave room for
# a short schedule and still catch the collapses of issue #18 (with the former defaults: OJT and CRMT step 2
# 0.83, VARMAT 0.78, GB 0.76, PMR 0.64). Wider, stated margins for the methods that train on mixed inputs or
# denoise at test time and lag on this short schedule (measured: Mixup 0.86, CRMT-Mix 0.84, MSEFM 0.99; MSEFM
# with its former MinSim weight 1.0: 0.85, and 0.70 on an AVX2-only machine).
MARGIN = 0.10
WIDER = {"mixup": 0.15, "crmt_mix": 0.15, "msefm": 0.15}
SET = {"num_classes": 4, "train_per_class": 40, "test_per_class": 25, "speech_snr_db": 20.0, "glyph_contrast": 1.0,
       "glyph_scale": 0.8, "distractors": 0, "pixel_noise": 0.03}


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    from stages.extract import main as extract
    from stages.generate_spoken import main as generate
    from stages.ingest import main as ingest

    d = tmp_path_factory.mktemp("real")
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    raw.update(
        spoken={**raw["spoken"], "out_dir": str(d / "spoken"), "duration_s": 1.5, "size": 32, "sets": {"rc": SET}},
        datasets={"rc": {"dataset": "ks", "root": str(d / "spoken" / "rc")}})
    raw["data"]["out_dir"], raw["extract"]["out_dir"] = str(d / "manifest"), str(d / "features")
    raw["extract"].update(visual={"size": 32}, timing={"fps": 2.0, "max_frames": 3})
    raw["extract"]["audio"] = {"preset": "cpu_fbank", "clip_s": 1.5, "frames": 64}
    raw["train"].update(epochs=12, batch_size=8, lr_step=9, crop_min_scale=0.35, out_dir=str(d / "models"),
                        model={**raw["train"]["model"], "width": 4})
    raw["crmt"]["step2_epochs"] = 2
    (d / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    p = str(d / "params.yaml")
    assert generate(["--set", "rc", "--params", p]) == 0
    assert ingest(["--dataset", "rc", "--params", p]) == 0
    for m in ("visual", "audio"):
        assert extract(["--dataset", "rc", "--modality", m, "--params", p, "--no-progress"]) == 0
    return load_params(p).for_dataset("rc")


def clean_accuracy(params, method: str) -> float:
    """The method trained as the default pipeline trains it: its `models` entry of params.yaml, overrides included."""
    from mmrobust.train import Trainer, run

    entry = params.models.get(method) or ModelEntry(method=method, group=catalog.PARAMS_KEYS[method] or "train")
    assert entry.method == method
    trainer = Trainer(params.for_entry(entry, f"models.{method}"))
    return run(trainer, log=lambda line: None)["test_acc"]


@pytest.fixture(scope="module")
def jt_accuracy(params):
    acc = clean_accuracy(params, "jt")
    assert acc >= 0.9, f"JT itself does not learn the real-content set: clean accuracy {acc:.3f} (chance 0.25)"
    return acc


@pytest.mark.parametrize("method", sorted(set(METHODS) - {"jt"}))
def test_method_learns_real_content_about_as_well_as_jt(params, jt_accuracy, method):
    acc = clean_accuracy(params, method)
    margin = WIDER.get(method, MARGIN)
    assert acc >= jt_accuracy - margin, f"{method}: clean accuracy {acc:.3f} vs JT's {jt_accuracy:.3f} (margin {margin})"
