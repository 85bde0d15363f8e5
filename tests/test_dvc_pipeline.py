"""A real `dvc repro` of the whole pipeline (tiny config) in a temporary git repo: data, Ray Train stages,
evaluation tables, a no-op second run, partial re-runs, and a user's Kinetics-Sounds-layout folder with a broken
clip."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mmrobust.config import deep_merge
from mmrobust.io import read_csv

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "generate": {"num_classes": 3, "train_per_class": 3, "test_per_class": 2, "duration_s": 2.0, "fps": 8,
                 "size": 32},
    "extract": {"workers": 2, "timing": {"fps": 2.0, "max_frames": 4}, "visual": {"size": 32},
                "audio": {"preset": "cpu_fbank", "clip_s": 2.0, "frames": 100}},
    "train": {"epochs": 2, "batch_size": 8, "model": {"width": 2}, "num_workers": 1, "cpus_per_worker": 1.0},
    "crmt": {"step2_epochs": 1},
    # a 1-trial search over JT's learning rate (tests/test_tune.py runs a real ASHA search): the tune stage
    # depends on `train`, not on `crmt`
    "tune": {"base": {"method": "jt", "group": "train"}, "num_samples": 1, "grace_period": 1, "pgd_steps": 2,
             "space": {"train.lr": {"dist": "loguniform", "low": 0.001, "high": 0.1}}},
    "evaluate": {"batch_size": 8, "joint_grid": [0.5], "uni_grid": [1.0], "workers": 1,
                 "attacks": {"fgm": {}, "pgd": {}, "missing": {}, "mgn": {"sigma": [0.5]}, "mpm": {"p": [0.3]},
                             "mea": {"steps": 2}}},  # tests/test_evaluation.py runs the parallel path
    # the vision-language family: a small shapes tree, a 2-epoch CLIP, zero-shot CLIP and TIMA
    "vl": {"shapes": {"size": 16, "train_per_class": 6, "test_per_class": 3},
           "pretrain": {"image_size": 16, "width": 16, "layers": 1, "embed_dim": 16,
                        "train": {"epochs": 2, "batch_size": 16}},
           "methods": ["zeroshot", "tima"], "train": {"epochs": 1, "batch_size": 16}, "tima": {"iat_epochs": 1},
           "tune": {"num_samples": 1, "max_concurrent": 1, "pgd_steps": 2},
           "evaluate": {"eps": [0.00392156862745098], "steps": [2], "apgd_steps": 2, "max_samples": 12}},
}
VL_STAGES = {"vl-generate", "vl-ingest", "vl-pretrain", "vl-train@zeroshot", "vl-train@tima", "vl-tune",
             "vl-train-tuned@tima", "vl-evaluate"}
# one model per params group: CRMT's and the tuned JT's (the search and the tuned model depend on `train`)
MODELS = {"crmt_jt": {"method": "crmt_jt", "group": "crmt"}}
TUNED = {"jt_tuned": {"method": "jt", "group": "train"}}
# a JT whose visual encoder comes from the pretrain stage (T6)
PRETRAINED = {"jt_pre": {"method": "jt", "group": "train",
                         "overrides": {"train": {"model": {"pretrained": {"visual": "pretrain"}}}}}}


def _run(args, cwd, check=True, env: dict | None = None):
    env = env or os.environ
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _dvc(repo, *args, check=True):
    return _run([sys.executable, "-m", "dvc", *args], repo, check)


def _ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def _set_params(repo: Path, over: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(deep_merge(params, over), sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    for name in ("mmrobust", "stages", "pipelines"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    _set_params(repo, TINY)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"], params["tuned_models"] = MODELS, TUNED  # replace the default lists
    params["pretrained_models"], params["pretrain"]["epochs"] = PRETRAINED, 1
    del params["tune"]["space"]["crmt.rho"], params["tune"]["space"]["crmt.iterations"]
    del params["tune"]["space"]["crmt.step2_epochs"], params["tune"]["space"]["crmt.step2_lr"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init"], repo)
    _dvc(repo, "init", "-q")
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")  # the curves' plot template
    return repo


def _repro(repo, *targets, cluster: dict | None = None):
    """`dvc repro` as `make reproduce` runs it (local_cluster starts a head and a warm driver for it), or on the
    module's shared head and warm driver (`cluster`: ~15 s less per run)."""
    if cluster is None:
        return _run([sys.executable, "-m", "pipelines.local_cluster", "--", sys.executable, "-m", "dvc", "repro",
                     *targets], repo)
    return _run([sys.executable, "-m", "dvc", "repro", *targets], repo, env=cluster)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head and a warm driver for the module's later `dvc repro` runs, as local_cluster would start them."""
    from mmrobust.ray_utils import STARTED_HEAD
    from pipelines.local_cluster import start_head, start_warm_driver, stop_head, stop_warm_driver
    from pipelines.warm_driver import ENV_VAR

    head, address = start_head()
    env = {**os.environ, "RAY_ADDRESS": address, STARTED_HEAD: address}
    driver, path = start_warm_driver(env)
    assert path, "the warm driver did not start"
    yield {**env, ENV_VAR: path}
    stop_warm_driver(driver)
    stop_head(head)


SYN = "synthetic"
DATA_STAGES = {"generate", "plan", f"ingest@{SYN}", f"extract-frames@{SYN}-visual", f"extract-audio@{SYN}-audio"}


def test_repro_outputs_noop_and_partial_rerun(repo, request):
    first = _repro(repo)
    assert _ran(first.stdout) == DATA_STAGES | VL_STAGES | {
        f"train@{SYN}-crmt_jt", f"tune@{SYN}", f"train-tuned@{SYN}-jt_tuned", f"pretrain@{SYN}",
        f"train-pretrained@{SYN}-jt_pre", f"evaluate@{SYN}", "tables"}, first.stdout
    # every training stage ran in local_cluster's warm driver (one process), the search in its own
    drivers = {line.split("warm driver pid ")[1].split(":")[0] for line in first.stdout.splitlines()
               if "(warm driver pid " in line}
    assert len(drivers) == 1 and first.stdout.count("(warm driver pid ") == 8, first.stdout
    visual = np.load(repo / f"data/features/{SYN}/visual/data.npy", mmap_mode="r")
    audio = np.load(repo / f"data/features/{SYN}/audio/data.npy", mmap_mode="r")
    clips = read_csv(repo / f"data/manifest/{SYN}/clips.csv")
    assert visual.shape == (len(clips), 4, 32, 32, 3) and audio.shape == (len(clips), 64, 100)
    assert {c["split"] for c in clips} == {"train", "val", "test"} and len(clips) == 15
    assert read_csv(repo / f"data/features/{SYN}/visual/rejected.csv") == []
    # training and evaluation outputs: models, tables, figures, metrics, and the runs in MLflow
    for m in [*MODELS, *TUNED, *PRETRAINED]:
        assert (repo / "models" / SYN / m / "model.pt").exists()
    # the pretrained model started from the pretrain stage's uni-modal encoder, and lands in T6
    import torch
    encoder = torch.load(repo / f"pretrain/{SYN}/visual.pt", weights_only=True)
    uni = torch.load(repo / f"ray_results/pretrain-{SYN}/pretrain_visual/model.pt", weights_only=True)
    assert uni["modalities"] == ["visual"] and encoder.keys() and all(
        torch.equal(v, uni["model"][f"encoders.visual.{k}"]) for k, v in encoder.items())
    pre = torch.load(repo / f"models/{SYN}/jt_pre/model.pt", weights_only=True)
    assert pre["config"]["train"]["model"]["pretrained"]["visual"].endswith(f"pretrain/{SYN}/visual.pt")
    assert "| jt_pre |" in (repo / f"results/datasets/{SYN}/tables/T6.md").read_text()
    best = yaml.safe_load((repo / f"tune/{SYN}/best_params.yaml").read_text())
    assert 0.001 <= best["train"]["lr"] <= 0.1
    from mmrobust import checkpoint
    tuned = checkpoint.load(repo / f"models/{SYN}/jt_tuned/model.pt")
    assert tuned["config"]["train"]["lr"] == best["train"]["lr"]  # the tuned model trained with the best params
    own = repo / "results/datasets" / SYN
    t1 = (own / "tables/T1.md").read_text()
    assert "| jt_tuned |" in t1 and "| crmt_jt |" in t1
    metrics = json.loads((own / "metrics.json").read_text())
    assert set(metrics) == set(MODELS) | set(TUNED) | set(PRETRAINED) and all(0 <= v["pgd"] <= v["clean"] for v in metrics.values())
    assert (own / "figures/F5.png").stat().st_size > 1000 and (own / "README.md").exists()
    # the curves as DVC plots: `dvc plots show` reads the same accuracies, one line per series
    shown = json.loads(_dvc(repo, "plots", "show", "--json").stdout)["data"]
    f5 = shown[f"results/datasets/{SYN}/plots/F5.csv"][0]["content"]
    assert f5["encoding"]["color"]["field"] == "series"
    pgd = {float(v["radius"]): float(v["accuracy"]) for v in f5["data"]["values"] if v["series"] == "crmt_jt"}
    assert pgd[0.0] == pytest.approx(metrics["crmt_jt"]["clean"], abs=1e-4)
    assert pgd[0.5] == pytest.approx(metrics["crmt_jt"]["pgd"], abs=1e-4)
    assert f"results/datasets/{SYN}/plots/T11.csv" in shown
    # the combined T1 carries the same numbers under the dataset's column group
    combined = {r["model"]: r for r in _md_rows(repo / "results/tables/T1.md")}
    assert {r["model"]: (r["Clean"], r["PGD 0.5"]) for r in _md_rows(own / "tables/T1.md")} == \
        {m: (r[f"{SYN} Clean"], r[f"{SYN} PGD 0.5"]) for m, r in combined.items()}
    assert f"datasets/{SYN}/README.md" in (repo / "results/README.md").read_text()
    import mlflow
    runs = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}").search_runs(["1"])
    (repro,) = [r for r in runs if "dvc_repro" in r.data.tags]  # local_cluster's parent run of the reproduction
    trained = [r for r in runs if "tune_trial" not in r.data.tags and "tune" not in r.data.tags
               and r.data.tags.get("family") != "vl" and r is not repro]
    assert all(r.data.tags["mlflow.parentRunId"] == repro.info.run_id for r in runs
               if r is not repro and "tune_trial" not in r.data.tags)
    assert repro.info.status == "FINISHED"
    assert all(r.data.tags["mlflow.source.name"].startswith("dvc stage ") for r in trained)
    assert all(r.inputs.dataset_inputs[0].dataset.name == SYN for r in trained)
    assert {r.info.run_name for r in trained} == {f"{m}@{SYN}" for m in [*MODELS, *TUNED, *PRETRAINED, "pretrain_visual"]}
    assert all("eval_clean" in r.data.metrics and r.data.tags["dataset"] == SYN for r in trained
               if r.info.run_name != f"pretrain_visual@{SYN}")
    assert sum("tune_trial" in r.data.tags for r in runs) == 2  # each search's child run (AV and VL)
    # each trained model is an MLflow model of its run; the best CRMT model of the dataset is registered
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    logged = client.search_logged_models(["1"])
    vl_trained = [r for r in runs if r.data.tags.get("family") == "vl" and "tune" not in r.data.tags
                  and "tune_trial" not in r.data.tags]  # the pre-trained CLIP included
    assert {m.source_run_id for m in logged} == {r.info.run_id for r in [*trained, *vl_trained]}
    (version,) = client.search_model_versions(f"name = 'mmrobust-{SYN}-crmt'")
    assert version.tags["model"] == "crmt_jt" and version.source in {m.model_uri for m in logged}
    # the vision-language family: CLIP folders that load back, the zero-shot table, its numbers in MLflow
    from mmrobust.vl.clip import load_clip
    clip, tok, image = load_clip(repo / "models/vl/tima")
    # ... and MLflow models of their runs that predict like the folder (images flattened, the AV layout)
    import mlflow.pytorch
    import torch
    from mmrobust import mlflow_model
    from mmrobust.config import load_params
    from mmrobust.vl.run import zero_shot_model
    tima = json.loads((repo / "models/vl/tima/mlflow_run.json").read_text())
    with mlflow_model.tracking_uri(f"sqlite:///{repo / 'mlflow.db'}"):
        served = mlflow.pytorch.load_model(tima["model_uri"])
    folder = zero_shot_model(load_params(repo / "params.yaml"), served.model.class_names, repo / "models/vl/tima")
    x = torch.rand(2, 3, image.size, image.size)
    with torch.no_grad():
        torch.testing.assert_close(served(x.flatten(1)), folder.eval()({"visual": x}), atol=1e-5, rtol=1e-5)
    ids = tok("a photo of a blue square.")["input_ids"]
    assert image.size == 16 and len(ids) == 9 and tok.unk_token_id not in ids
    results = json.loads((repo / "results/vl/results.json").read_text())
    assert set(results) == {"zeroshot", "tima", "tima_tuned"}
    for per_task in results.values():
        assert set(per_task) == {"shapes_seen", "shapes_unseen", "synthetic"}
        assert all(0 <= r["worst@1/255"] <= r["pgd2@1/255"] <= r["clean"] <= 1 for r in per_task.values())
    table = (repo / "results/vl/zero_shot.md").read_text()
    assert "| tima |" in table and "zero-shot avg" in table
    vl_runs = {r.info.run_name: r for r in runs if r.data.tags.get("family") == "vl"
               and "tune" not in r.data.tags and "tune_trial" not in r.data.tags}
    assert set(vl_runs) == {"clip_pretrain@shapes_seen", "zeroshot@shapes_seen", "tima@shapes_seen",
                            "tima_tuned@shapes_seen"}
    best = yaml.safe_load((repo / "tune/vl/best_params.yaml").read_text())
    tuned_run = vl_runs["tima_tuned@shapes_seen"].data.params
    assert float(tuned_run["vl.tima.margin"]) == pytest.approx(best["tima"]["margin"])
    assert vl_runs["tima@shapes_seen"].data.metrics["zs_shapes_unseen_clean"] == results["tima"]["shapes_unseen"]["clean"]

    shared = request.getfixturevalue("cluster")
    second = _repro(repo, cluster=shared)
    assert _ran(second.stdout) == set(), second.stdout

    _set_params(repo, {"crmt": {"rho": 0.5}})  # only the CRMT model and what reads it depend on it
    third = _repro(repo, cluster=shared)
    assert "(warm driver pid " in third.stdout, third.stdout
    ran = _ran(third.stdout)
    assert {"plan", f"train@{SYN}-crmt_jt", f"evaluate@{SYN}"} <= ran <= {"plan", f"train@{SYN}-crmt_jt",
                                                                          f"evaluate@{SYN}", "tables"}, third.stdout


def _md_rows(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_second_dataset_user_ks_folder_with_broken_clip(repo, cluster, tmp_path):
    # A Kinetics-Sounds-layout folder the repo has never seen (real clips plus one broken file), added as a
    # second dataset: its own data, training and evaluation stages run; the first dataset's models stay.
    user = tmp_path / "my_ks"
    shutil.copytree(repo / f"data/{SYN}/videos", user / "videos")
    train = (repo / f"data/{SYN}/train.txt").read_text().splitlines()
    (user / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    (user / "train.txt").write_text("\n".join(train + ["broken 1"]) + "\n")
    shutil.copy(repo / f"data/{SYN}/test.txt", user / "test.txt")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["datasets"]["my_ks"] = {"dataset": "ks", "root": str(user)}
    params["tuned_models"] = params["pretrained_models"] = {}  # no search, no pretraining: keep it short
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ran = _ran(_repro(repo, cluster=cluster).stdout)
    mine = {"ingest@my_ks", "extract-frames@my_ks-visual", "extract-audio@my_ks-audio", "train@my_ks-crmt_jt",
            "tune@my_ks", "evaluate@my_ks"}
    assert mine <= ran and f"train@{SYN}-crmt_jt" not in ran, "\n".join(sorted(ran))
    for m in ("visual", "audio"):
        rejected = read_csv(repo / f"data/features/my_ks/{m}/rejected.csv")
        assert [r["clip_id"] for r in rejected] == ["broken"] and rejected[0]["stage"] == m
        index = read_csv(repo / f"data/features/my_ks/{m}/index.csv")
        assert len(index) == len(train) + 2 * 3
    rows = {r["model"]: r for r in _md_rows(repo / "results/tables/T1.md")}
    assert set(rows) == {"crmt_jt"}
    for ds in (SYN, "my_ks"):
        own = {r["model"]: r for r in _md_rows(repo / f"results/datasets/{ds}/tables/T1.md")}
        assert [rows["crmt_jt"][f"{ds} {c}"] for c in ("Clean", "PGD 0.5")] == [own["crmt_jt"][c] for c in ("Clean", "PGD 0.5")]


def test_audio_params_rerun_the_audio_stage_alone(repo, cluster):
    _set_params(repo, {"extract": {"audio": {"n_mels": 40}}})  # not the visual one, not the other dataset's
    out = _repro(repo, f"extract-audio@{SYN}-audio", cluster=cluster)
    assert _ran(out.stdout) == {f"extract-audio@{SYN}-audio"}, out.stdout
    assert np.load(repo / f"data/features/{SYN}/audio/data.npy", mmap_mode="r").shape[1] == 40


def test_real_content_set_is_a_stage_that_feeds_its_dataset(repo, cluster):
    # A spoken set and a dataset entry reading it: generate-spoken@<set> runs before the dataset's ingest and
    # extraction; a second repro does nothing; a change to that set's params regenerates it and what follows.
    _set_params(repo, {"spoken": {"duration_s": 1.5, "size": 32, "sets": {"tiny": {
        "num_classes": 3, "train_per_class": 3, "test_per_class": 2}}},
        "datasets": {"tiny": {"dataset": "ks", "root": "data/spoken/tiny"}}})
    target = "extract-audio@tiny-audio"
    first = _ran(_repro(repo, target, cluster=cluster).stdout)
    assert {"generate-spoken@tiny", "ingest@tiny", target} <= first, first
    assert len(read_csv(repo / "data/features/tiny/audio/index.csv")) == 3 * (3 + 2)
    assert _ran(_repro(repo, target, cluster=cluster).stdout) == set()
    _set_params(repo, {"spoken": {"sets": {"tiny": {"speech_snr_db": 0.0}}}})
    assert {"generate-spoken@tiny", "ingest@tiny", target} <= _ran(_repro(repo, target, cluster=cluster).stdout)
