import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mmrobust.config import AUDIO_PRESETS, ConfigError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_repo_params_validate_and_round_trip():
    params = load_params(ROOT / "params.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    # every key of the file reaches the typed config unchanged
    assert params.model_dump(include=set(raw))["generate"] == {**params.generate.model_dump(), **raw["generate"]}
    assert params.extract.modalities == raw["extract"]["frame_modalities"] + raw["extract"]["audio_modalities"]


@pytest.mark.parametrize("preset_file", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_preset_files_validate(preset_file):
    load_params(preset_file)


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def test_real_content_preset_differs_from_the_default_only_where_it_says():
    base = _leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    preset = _leaves(yaml.safe_load((ROOT / "configs" / "real-content.yaml").read_text()))
    changed = {k for k in base.keys() | preset.keys() if base.get(k, "absent") != preset.get(k, "absent")}
    allowed = ("spoken.sets", "datasets.", "train.epochs", "train.lr_step", "train.crop_min_scale",
               "ogm_ge.modulation_end")
    assert changed and all(k.startswith(allowed) for k in changed), sorted(changed)
    params = load_params(ROOT / "configs" / "real-content.yaml")
    assert {e.root for e in params.datasets.values()} == {f"{params.spoken.out_dir}/{s}" for s in params.spoken.sets}


@pytest.mark.parametrize("raw,key,fragment", [
    ({"data": {"datset": "ks"}}, "data.datset", "unknown key"),
    ({"data": {"dataset": "kinetics"}}, "data.dataset", "'synthetic', 'ks', 'vggsound' or 'ucf101'"),
    ({"generate": {"num_classes": "many"}}, "generate.num_classes", "valid integer"),
    ({"generate": {"num_classes": 1}}, "generate.num_classes", "greater than or equal to 2"),
    ({"extract": {"audio": {"preset": "mfcc"}}}, "extract.audio.preset", "audioset_fbank"),
    ({"extract": {"frame_modalities": ["visual", "sound"]}}, "extract.frame_modalities.1", "'visual', 'flow' or 'diff'"),
    ({"extract": {"timing": {"max_frames": 2}}}, "extract.timing.max_frames", "greater than or equal to 3"),
    ({"trian": {}}, "trian", "unknown key"),
    ({"spoken": {"sets": {"Bad-Id": {}}}}, "spoken", "lower-case"),
    ({"spoken": {"sets": {"a": {"num_classes": 11}}}}, "spoken.sets.a.num_classes", "less than or equal to 10"),
    ({"train": {"crop_min_scale": 0}}, "train.crop_min_scale", "greater than 0"),
])
def test_bad_params_name_key_and_allowed_values(raw, key, fragment):
    with pytest.raises(ConfigError) as err:
        parse_params(raw, "params.yaml")
    text = str(err.value)
    assert f"  {key}:" in text and fragment in text


def test_odd_frame_size_and_short_fft_are_rejected():
    with pytest.raises(ConfigError, match="even"):
        parse_params({"generate": {"size": 33}})
    with pytest.raises(ConfigError, match="extract.audio.n_fft"):
        parse_params({"extract": {"audio": {"preset": "audioset_fbank", "n_fft": 128}}})
    with pytest.raises(ConfigError, match="duplicate"):
        parse_params({"extract": {"frame_modalities": ["visual", "visual"]}})


def test_audio_preset_values_and_override():
    paper = parse_params({"extract": {"audio": {"preset": "audioset_fbank"}}}).extract.audio.resolved()
    assert (paper.n_mels, paper.win_ms, paper.hop_ms, paper.frames, paper.sample_rate) == (128, 25.0, 10.0, 1024, 16000)
    assert (paper.norm_mean, paper.norm_std) == (-4.503877, 5.141276)
    vggs = parse_params({"extract": {"audio": {"preset": "vggsound_stft"}}}).extract.audio.resolved()
    assert (vggs.kind, vggs.n_fft, vggs.hop_ms * 16, vggs.clip_s) == ("stft", 256, 128, 5.0)
    custom = parse_params({"extract": {"audio": {"preset": "cpu_fbank", "n_mels": 40}}}).extract.audio.resolved()
    assert custom.n_mels == 40 and custom.hop_ms == AUDIO_PRESETS["cpu_fbank"]["hop_ms"]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)


TWO = {"datasets": {"syn": {"dataset": "synthetic", "root": "data/synthetic"},
                    "ucf": {"dataset": "ucf101", "root": "/data/ucf",
                            "overrides": {"extract": {"audio_modalities": [], "visual": {"size": 32}},
                                          "data": {"ucf101": {"split": 2}}}}},
       "extract": {"frame_modalities": ["visual", "flow"]}, "models": {"jt": {"method": "jt", "group": "train"}}}


def test_for_dataset_sets_layout_paths_and_overrides():
    params = parse_params(TWO)
    ucf = params.for_dataset("ucf")
    assert (ucf.dataset_id, ucf.data.dataset, ucf.data.root, ucf.data.ucf101.split) == ("ucf", "ucf101", "/data/ucf", 2)
    assert (ucf.data.out_dir, ucf.extract.out_dir, ucf.train.out_dir, ucf.tune.out_dir, ucf.evaluate.out_dir) == \
        ("data/manifest/ucf", "data/features/ucf", "models/ucf", "tune/ucf", "results/datasets/ucf")
    assert ucf.extract.modalities == ["visual", "flow"] and ucf.extract.visual.size == 32
    syn = params.for_dataset("syn")  # the other dataset keeps the global values
    assert syn.extract.modalities == ["visual", "flow", "audio"] and syn.extract.visual.size == 64
    assert syn.for_dataset() is syn and syn.for_dataset("syn") is syn
    assert syn.for_model("jt").dataset_id == "syn" and syn.for_model("jt").train.out_dir == "models/syn"
    assert params.dataset_id is None and params.extract.out_dir == "data/features"  # the base is untouched
    with pytest.raises(ConfigError, match="2 datasets are configured"):
        params.for_dataset()
    with pytest.raises(ConfigError, match=r"datasets.nope: no such dataset; configured: \['syn', 'ucf'\]"):
        params.for_dataset("nope")
    with pytest.raises(ConfigError, match="already those of dataset 'syn'"):
        syn.for_dataset("ucf")


@pytest.mark.parametrize("entry,fragment", [
    ({"Bad-Id": {"dataset": "ks", "root": "x"}}, "datasets.Bad-Id: ids are lower-case"),
    ({"k": {"dataset": "kinetics", "root": "x"}}, "datasets.k.dataset"),
    ({"k": {"dataset": "ks"}}, "datasets.k.root"),
    ({"k": {"dataset": "ks", "root": "x", "overrides": {"train": {"lr": 1}}}}, "['train'] not allowed"),
    ({"k": {"dataset": "ks", "root": "x", "overrides": {"data": {"root": "y"}}}}, "overrides.data.root: set by"),
    ({"k": {"dataset": "ks", "root": "x", "overrides": {"extract": {"frame_modalities": ["flow"]}}}},
     "['flow'] not in extract.frame_modalities"),
    ({}, "datasets: empty"),
])
def test_bad_dataset_entries(entry, fragment):
    with pytest.raises(ConfigError) as err:
        parse_params({"datasets": entry}, "params.yaml")
    assert fragment in str(err.value)


def test_bad_override_value_names_the_dataset():
    params = parse_params({"datasets": {"k": {"dataset": "ks", "root": "x",
                                              "overrides": {"extract": {"visual": {"size": "big"}}}}}})
    with pytest.raises(ConfigError, match=r"datasets.k.overrides: 1 invalid(.|\n)*extract.visual.size"):
        params.for_dataset("k")


def test_data_root_in_the_file_points_to_datasets(tmp_path):
    old = tmp_path / "params.yaml"
    old.write_text("data:\n  dataset: ks\n  root: /data/ks\n")
    with pytest.raises(ConfigError, match="data.dataset: datasets are listed under `datasets:`"):
        load_params(old)


def test_as_file_dict_loads_back_to_the_same_params(tmp_path):
    ucf = parse_params(TWO).for_dataset("ucf").for_model("jt")
    file = tmp_path / "params.yaml"
    file.write_text(yaml.safe_dump(ucf.as_file_dict()))
    again = load_params(file).for_dataset("ucf")
    assert again.model_dump() == ucf.model_dump() and again.extract.out_dir == "data/features/ucf"
    assert parse_params(ucf.as_file_dict()).extract.out_dir == "data/features"


def test_model_modalities_default_to_the_extracted_ones():
    both = parse_params({"extract": {"frame_modalities": ["visual", "flow"], "audio_modalities": []}})
    assert both.modalities == ["visual", "flow"]
    assert parse_params({"train": {"modalities": ["flow"]}}).modalities == ["flow"]  # train.modalities wins


def test_params_validate_without_torch():
    """Stages that need no model (generate, ingest, plan) load and validate params without importing torch."""
    code = ("import sys; import mmrobust.config, mmrobust.plan, stages.generate, stages.ingest, stages.plan; "
            "from mmrobust.config import load_params; load_params('params.yaml'); "
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("preset_file", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_expanded_presets_load_back_and_dvc_reads_them(preset_file, tmp_path):
    # DVC interpolates dvc.yaml from params.yaml alone: a preset must become a complete file first
    from stages.preset import main as preset_main

    out = tmp_path / "params.yaml"
    assert preset_main([str(preset_file), "--out", str(out)]) == 0
    assert load_params(out) == load_params(preset_file)
    assert out.read_text().startswith("#")  # the preset's own comment stays on top
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    env = {**__import__("os").environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    dag = subprocess.run([sys.executable, "-m", "dvc", "dag"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert dag.returncode == 0 and "vl-evaluate" in dag.stdout, dag.stderr


def test_pretrained_models_name_the_pretrain_stage_per_dataset():
    """`pretrained: {visual: pretrain}` resolves to <pretrain.out_dir>/<dataset>/visual.pt for the dataset at hand;
    the pretrain stage trains exactly the named modalities, in extraction order; an entry that names none, an
    unextracted modality (for any dataset), or an id used twice is an error naming the key."""
    pre = {"method": "jt", "group": "train", "overrides": {"train": {"model": {"pretrained": {"flow": "pretrain",
                                                                                              "visual": "pretrain"}}}}}
    params = parse_params({**TWO, "pretrained_models": {"jt_pre": pre}})
    syn = params.for_dataset("syn")
    assert syn.pretrain.out_dir == "pretrain/syn" and syn.pretrain_modalities() == ["visual", "flow"]
    assert syn.for_model("jt_pre").train.model.pretrained == {"flow": "pretrain/syn/flow.pt",
                                                              "visual": "pretrain/syn/visual.pt"}
    assert params.for_dataset("ucf").for_model("jt_pre").train.model.pretrained["visual"] == "pretrain/ucf/visual.pt"
    assert syn.for_model("jt").train.model.pretrained == {} and "jt_pre" in syn.all_models
    assert parse_params(syn.as_file_dict()).for_dataset("syn").pretrain.out_dir == "pretrain/syn"
    bad = [({"jt_pre": {"method": "jt", "group": "train"}}, "pretrained_models.jt_pre: loads no encoder"),
           ({"jt": pre}, "pretrained_models.jt: the id is also in models"),
           ({"p": {**pre, "overrides": {"train": {"model": {"pretrained": {"diff": "pretrain"}}}}}},
            "['diff'] named 'pretrain' but not extracted"),
           ({"p": {**pre, "overrides": {"train": {"model": {"pretrained": {"visual": "pretrain"}, "width": 64}}}}},
            "['width'] differ from train.model"),
           ({"p": pre, "q": {"method": "jt", "group": "train"}}, "pretrained_models.q: loads no encoder")]
    for models, fragment in bad:
        with pytest.raises(ConfigError) as err:
            parse_params({**TWO, "pretrained_models": models})
        assert fragment in str(err.value)
    # outside pretrained_models the keyword is refused: no other train stage runs after the pretrain stage
    with pytest.raises(ConfigError, match="models.jt2: loads 'pretrain' encoders; only pretrained_models"):
        parse_params({**TWO, "models": {"jt2": pre}})
    with pytest.raises(ConfigError, match="train.model.pretrained: loads 'pretrain' encoders"):
        parse_params({**TWO, "train": {"model": {"pretrained": {"visual": "pretrain"}}}})
