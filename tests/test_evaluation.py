"""Evaluation stage: attack grid, resumable per-batch cache, tables from a fixture results file."""
import json
from pathlib import Path

import pytest
import torch

from helpers import tiny_project
from mmrobust.config import EvaluateCfg
from mmrobust.checkpoint import load_trained
from mmrobust.evaluation import attack_grid, evaluate_model, evaluate_models, headline_metrics
from mmrobust.config import parse_params
from mmrobust.tables import Arch, arch_of, markdown, pivot, write_across_datasets, write_tables, _col
from mmrobust.train import fit

CFG = EvaluateCfg(batch_size=2, joint_grid=[0.5, 1.0], uni_grid=[1.0],
                  attacks={"fgm": {}, "pgd": {}, "missing": {}, "mgn": {"sigma": [0.5]}, "mpm": {"p": [0.3]},
                           "mea": {"eps": 0.5, "steps": 2}}, joint_grid_models=["m", "crmt_jt"], uni_grid_models=["m"],
                  certify_models=["m"])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny dataset extracted for real, and a CRMT-JT model trained on it by `fit`."""
    root = tmp_path_factory.mktemp("eval")
    params = tiny_project(root, {"method": "crmt_jt"}, crmt={"step2_epochs": 1})
    metrics = fit(params, out_dir=root / "models" / "crmt_jt", log=lambda *_: None)
    return root / "models" / "crmt_jt" / "model.pt", metrics, params


def test_attack_grid_covers_every_table_once():
    specs = attack_grid(CFG, ["audio", "visual"])
    labels = [s.label for s in specs]
    assert len(labels) == len(set(labels))
    have = {(s.attack, s.modality, s.eps) for s in specs}
    assert {("fgm", "all", 0.5), ("pgd", "all", 0.5), ("fgm", "all", 1.0)} <= have          # T1, T11
    assert {("pgd", "audio", 1.0), ("fgm", "visual", 1.0), ("missing", "audio", 0.0)} <= have  # T2
    small = {(s.attack, s.modality, s.eps) for s in attack_grid(CFG, ["audio", "visual"], False, False)}
    assert ("fgm", "all", 1.0) not in small and ("fgm", "all", 0.5) in small and len(small) < len(have)
    assert {("mgn", "all", 0.5), ("mpm", "all", 0.3), ("mea", "all", 0.5)} <= have           # T7
    pgd = next(s for s in specs if s.attack == "pgd" and s.modality == "all" and s.eps == 1.0).kwargs()
    assert pgd["steps"] == 4 and pgd["step_size"] == pytest.approx(1.0 / 3)


def test_loaded_model_predicts_like_the_trained_one(trained):
    path, metrics, _ = trained
    predictor, params, ckpt = load_trained(path)
    assert ckpt["method"] == "crmt_jt" and params.crmt.step2_epochs == 1
    w = predictor.model.head.uni_weight("audio")
    torch.testing.assert_close(w @ w.T, torch.eye(2), atol=1e-5, rtol=0)
    rows = evaluate_model(path, "crmt_jt", CFG, path.parent / "cache", log=lambda *_: None)
    clean = next(r for r in rows if r["attack"] == "clean")
    assert clean["accuracy"] == pytest.approx(metrics["test_acc"]) and clean["n"] == 4


def test_attacks_never_beat_clean_and_grow_with_eps(trained, tmp_path):
    path, _, _ = trained
    rows = evaluate_model(path, "m", CFG, tmp_path, log=lambda *_: None)
    acc = {(r["attack"], r["modality"], r["eps"]): r["accuracy"] for r in rows}
    clean = acc[("clean", "all", 0.0)]
    assert all(v <= clean + 1e-9 for k, v in acc.items() if k[0] in ("fgm", "pgd", "mea"))
    assert acc[("pgd", "all", 1.0)] <= acc[("pgd", "all", 0.5)]
    assert {r["modality"] for r in rows} == {"all", "audio", "visual"}
    # the per-sample worst case of the robust attacks: at most the weakest of them, at least what their
    # failures leave when they never overlap (1 - sum of their error rates)
    worst = {k: v for k, v in acc.items() if k[0] == "worst"}
    assert {k[1:] for k in worst} == {k[1:] for k in acc if k[0] in ("fgm", "pgd")}
    for (_, mod, eps), value in worst.items():
        each = [v for (a, m, e), v in acc.items() if a in ("fgm", "pgd") and (m, e) == (mod, eps)]
        assert 1 - sum(1 - v for v in each) - 1e-9 <= value <= min(each)
    metrics = headline_metrics(rows, CFG)["m"]
    assert set(metrics) >= {"clean", "fgm", "pgd", "worst", "pgd_audio", "worst_audio", "pgd_visual", "missing_audio"}
    # the sound certificate: CA(0) <= clean, CA(r) <= accuracy under every attack of size r, non-increasing
    ca = [(r["eps"], r["accuracy"]) for r in rows if r["attack"] == "certified"]
    assert [e for e, _ in ca] == [0.0, 0.5, 1.0]
    assert ca[0][1] <= clean and all(a >= b for (_, a), (_, b) in zip(ca, ca[1:]))
    for eps, value in ca[1:]:
        assert value <= min(acc[(a, "all", eps)] for a in ("fgm", "pgd") if (a, "all", eps) in acc)


def test_smoothing_rows_are_certified_accuracies(trained, tmp_path):
    """Randomised smoothing per test batch: joint radii {0} + joint_grid, per modality {0, uni_eps} + uni_grid;
    RS(r) non-increasing, never above the largest certifiable radius sigma Phi^-1(alpha^(1/n)); tables CA/CAm."""
    from scipy.stats import norm
    from mmrobust.config import SmoothingCfg

    path, _, _ = trained
    sc = SmoothingCfg(models=["m"], sigma=0.25, n0=8, n=32, alpha=0.001, batch_size=64)
    cfg = CFG.model_copy(update={"smoothing": sc, "joint_grid": [0.1, 0.5], "uni_grid": [0.1]})
    rows = evaluate_model(path, "m", cfg, tmp_path, log=lambda *_: None)
    rs = {(r["modality"], r["eps"]): r["accuracy"] for r in rows if r["attack"] == "smoothed"}
    assert set(rs) == {("all", e) for e in (0.0, 0.1, 0.5)} | {(m, e) for m in ("audio", "visual") for e in (0.0, 0.1, 1.0)}
    largest = 0.25 * norm.ppf(0.001 ** (1 / 32))
    clean = next(r["accuracy"] for r in rows if r["attack"] == "clean")
    for mod in ("all", "audio", "visual"):
        curve = [v for (m, e), v in sorted(rs.items()) if m == mod]
        assert all(a >= b for a, b in zip(curve, curve[1:])) and 0 <= curve[0] <= 1
        assert all(v == 0 for (m, e), v in rs.items() if m == mod and e > largest)
    assert rs[("all", 0.0)] <= 1 and clean >= 0
    write_tables(rows, tmp_path / "t", 0.5, 1.0, {"m": "crmt_jt"})
    header = (tmp_path / "t" / "CA.md").read_text().splitlines()[4]
    assert "RS 0.1" in header and "RS 0.5" in header and "PGD 0.5" in header
    assert "RS #a 1" in (tmp_path / "t" / "CAm.md").read_text()


def test_models_in_parallel_processes_match_the_serial_run(trained, tmp_path):
    """evaluate.workers 2: the models go to two single-threaded processes; same rows, in the order of the ids,
    as one after another in this process (also single-threaded, so the arithmetic is the same); a broken model
    is named."""
    import shutil

    path, _, _ = trained
    models = tmp_path / "models"
    for mid in ("a", "b"):
        (models / mid).mkdir(parents=True)
        shutil.copy(path, models / mid / "model.pt")
    cfg = CFG.model_copy(update={"joint_grid_models": ["a"], "uni_grid_models": [], "certify_models": []})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = evaluate_models(["a", "b"], models, cfg.model_copy(update={"workers": 1}), tmp_path / "c1", "tiny",
                                 log=lambda *_: None)
    finally:
        torch.set_num_threads(threads)
    messages = []
    parallel = evaluate_models(["a", "b"], models, cfg.model_copy(update={"workers": 2}), tmp_path / "c2", "tiny",
                               log=messages.append, costs={"b": 9.0})  # b is submitted first
    assert [{r["model"] for r in rows} for rows in parallel] == [{"a"}, {"b"}]
    assert len(parallel[0]) > len(parallel[1])  # only "a" has the joint radius grid
    assert parallel == serial
    assert "[evaluate] 2 models, 2 at a time (one process and one torch thread each)" in messages
    (models / "b" / "model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="evaluating model b failed"):
        evaluate_models(["a", "b"], models, cfg, tmp_path / "c3", "tiny", log=lambda *_: None)


def test_evaluation_costs_put_slow_predictions_and_long_grids_first():
    from mmrobust.config import load_params
    from mmrobust.evaluation import evaluation_costs

    params = load_params(Path(__file__).parents[1] / "params.yaml").for_dataset(None)
    costs = evaluation_costs(params, ["gb", "jt", "jacobian_fusion"])
    from mmrobust.evaluation.measure import model_grid
    n_base = len(model_grid(params.evaluate, "gb", params.extract.modalities))  # no curve grids, no strength report
    assert n_base == len(attack_grid(params.evaluate, params.extract.modalities, False, False)) - 3
    assert costs["gb"] == n_base                 # no radius grid, JT-like prediction
    assert costs["jt"] > costs["gb"]             # jt has both radius grids
    assert costs["jacobian_fusion"] == 6.0 * n_base
    smoothed = evaluation_costs(params, ["jt_noise"])["jt_noise"]  # same grid as gb, plus smoothing's predictions
    sc = params.evaluate.smoothing
    assert smoothed == pytest.approx(n_base + (sc.n0 + sc.n) * 3 / 16)  # joint + one per modality


def test_evaluation_resumes_after_interruption(trained, tmp_path):
    path, _, _ = trained
    cache = tmp_path / "cache"
    assert evaluate_model(path, "m", CFG, cache, stop_after=1, log=lambda *_: None) == []  # "killed" after 1 batch
    lines = (cache / "m.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["batch"] == 0
    with open(cache / "m.jsonl", "a") as fh:
        fh.write('{"batch": 1, "n": 2, "cou')  # a torn write from the kill
    messages = []
    resumed = evaluate_model(path, "m", CFG, cache, log=messages.append)
    assert any("resuming: 1 of 2 batches" in m for m in messages)
    fresh = evaluate_model(path, "m", CFG, tmp_path / "fresh", log=lambda *_: None)
    assert resumed == fresh


FIXTURE = [dict(dataset="synthetic", method=m, model=m, attack=a, modality=mod, eps=e, accuracy=acc, n=100)
           for m, base in (("jt", 0.8), ("crmt_jt", 0.9), ("crmt_jt_it2", 0.92))
           for a, mod, e, acc in (("clean", "all", 0.0, base), ("fgm", "all", 0.5, base - 0.3),
                                  ("pgd", "all", 0.5, base - 0.4), ("fgm", "all", 1.0, base - 0.5),
                                  ("pgd", "audio", 1.0, base - 0.6), ("pgd", "visual", 1.0, base - 0.1),
                                  ("fgm", "audio", 1.0, base - 0.5), ("fgm", "visual", 1.0, base - 0.05),
                                  ("missing", "audio", 0.0, 0.3), ("missing", "visual", 0.0, base - 0.02))]


def test_tables_from_fixture_results(tmp_path):
    methods = {"jt": "jt", "crmt_jt": "crmt_jt", "crmt_jt_it2": "crmt_jt"}
    written = {p.stem for p in write_tables(FIXTURE, tmp_path, 0.5, 1.0, methods)}
    assert {"T1", "T2", "T11"} <= written and "T10" in written  # crmt_jt is one of T10's models
    t1 = (tmp_path / "T1.md").read_text().splitlines()
    assert t1[2] == "| model | Clean | FGM 0.5 | PGD 0.5 |"
    assert t1[4] == "| jt | 0.800 | 0.500 | 0.400 |" and t1[5] == "| crmt_jt | 0.900 | 0.600 | 0.500 |"
    t2 = (tmp_path / "T2.md").read_text()
    assert "| jt | 0.800 | 0.300 | 0.750 | 0.200 | 0.700 | 0.300 | 0.780 |" in t2
    t11 = (tmp_path / "T11.md").read_text()
    assert "| crmt_jt_it2 | 0.920 | 0.620 | 0.420 |" in t11 and "| jt |" not in t11
    import csv
    with open(tmp_path / "T1.csv") as fh:
        used = list(csv.DictReader(fh))
    assert len(used) == 9 and {r["attack"] for r in used} == {"clean", "fgm", "pgd"}


def test_combined_t1_has_a_column_group_per_dataset(tmp_path):
    methods = {"jt": "jt", "crmt_jt": "crmt_jt"}
    folders = {"syn": tmp_path / "datasets/syn", "ks": tmp_path / "datasets/ks"}
    write_tables(FIXTURE, folders["syn"] / "tables", 0.5, 1.0, methods)
    shifted = [dict(r, accuracy=r["accuracy"] - 0.1) for r in FIXTURE if r["model"] != "crmt_jt"]
    write_tables(shifted, folders["ks"] / "tables", 0.5, 1.0, {"jt": "jt"})
    index = write_across_datasets(folders, tmp_path, 0.5, methods)
    t1 = [line for line in (tmp_path / "tables/T1.md").read_text().splitlines() if line.startswith("|")]
    assert t1[0] == "| model | syn Clean | syn FGM 0.5 | syn PGD 0.5 | ks Clean | ks FGM 0.5 | ks PGD 0.5 |"
    assert t1[2] == "| jt | 0.800 | 0.500 | 0.400 | 0.700 | 0.400 | 0.300 |"
    assert t1[3] == "| crmt_jt | 0.900 | 0.600 | 0.500 | – | – | – |"  # not evaluated on ks
    text = index.read_text()
    assert "[T1](datasets/ks/tables/T1.md)" in text and "(datasets/syn/README.md)" in text
    with pytest.raises(FileNotFoundError, match="dvc repro evaluate@new"):
        write_across_datasets({**folders, "new": tmp_path / "datasets/new"}, tmp_path, 0.5, methods)


def test_pivot_marks_missing_measurements():
    header, body, used = pivot(FIXTURE[:1], ["jt"], [_col("clean"), _col("mea", eps=0.5)])
    assert body == [["jt", "0.800", "–"]] and len(used) == 1
    assert markdown("x", header, body).splitlines()[3] == "|---|---|---|"


def _rows(model, method, base, mods=("audio", "visual")):
    out = [dict(dataset="d", method=method, model=model, attack="clean", modality="all", eps=0.0, accuracy=base, n=10)]
    out += [dict(dataset="d", method=method, model=model, attack=a, modality="all", eps=0.5, accuracy=base - d, n=10)
            for a, d in (("fgm", 0.2), ("pgd", 0.3))]
    out += [dict(dataset="d", method=method, model=model, attack=a, modality=m, eps=e, accuracy=base - 0.1, n=10)
            for m in mods for a, e in (("pgd", 1.0), ("fgm", 1.0), ("missing", 0.0))]
    return out


def test_architecture_tables_select_models_by_their_params(tmp_path):
    r18 = (("audio", "resnet18"), ("visual", "resnet18"))
    archs = {"jt": Arch("late", r18), "crmt_jt": Arch("late", r18), "jt_mmt": Arch("mmt", r18),
             "crmt_mmt": Arch("mmt", r18), "jt_mmtm": Arch("mmtm", r18),
             "jt_r34": Arch("late", (("audio", "resnet34"), ("visual", "resnet34"))),
             "crmt_tf": Arch("late", (("audio", "transformer"), ("visual", "resnet18"))),
             "jt_pre": Arch("late", r18, ("visual",)),
             "jt_3m": Arch("late", (("diff", "resnet18"), ("flow", "resnet18"), ("visual", "resnet18")))}
    methods = {m: ("crmt_jt" if m.startswith("crmt") else "jt") for m in archs}
    rows = [r for m in archs for r in _rows(m, methods[m], 0.8, ("diff", "flow", "visual") if m == "jt_3m"
                                             else ("audio", "visual"))]
    written = {p.stem for p in write_tables(rows, tmp_path, 0.5, 1.0, methods, archs)}
    assert {"T1", "T2", "T3", "T4", "T5", "T6", "T8"} <= written

    def models_in(tid):
        return [line.split("|")[1].strip() for line in (tmp_path / f"{tid}.md").read_text().splitlines()[4:]]

    assert models_in("T1") == ["jt", "crmt_jt"] and models_in("T2") == ["jt", "crmt_jt"]
    assert models_in("T3") == ["jt_mmt", "crmt_mmt"] and models_in("T5") == ["jt_mmtm"]
    assert set(models_in("T4")) == {"jt_r34", "crmt_tf"} and models_in("T6") == ["jt_pre"]
    assert models_in("T8") == ["jt_3m"]
    t3 = (tmp_path / "T3.md").read_text()
    assert "| jt_mmt | resnet18 A+V, MMT, scratch | 0.800 | 0.600 | 0.500 |" in t3
    assert "transformer A + resnet18 V, scratch" in (tmp_path / "T4.md").read_text()
    assert "pretrained V" in (tmp_path / "T6.md").read_text()
    # T4 puts the missing-modality columns between clean and the attacks, as the paper does
    assert (tmp_path / "T4.md").read_text().splitlines()[2].startswith("| model | architecture | Clean | Missing #a")
    # a modality none of a table's models sees gets no column (flow/diff are only T8's)
    assert "#f" not in t3 and "#d" not in t3 and "#a" in t3
    assert "#f" not in (tmp_path / "T2.md").read_text() and "Missing #v" in (tmp_path / "T2.md").read_text()
    t8 = (tmp_path / "T8.md").read_text().splitlines()[2]
    assert "PGD #f 1" in t8 and "#a" not in t8


def test_arch_of_reads_the_training_params():
    p = parse_params({"train": {"model": {"encoder": {"audio": "transformer", "visual": "resnet18"},
                                          "pretrained": {"visual": "/x.pt"}}}})
    a = arch_of(p, ["audio", "visual"])
    assert a == Arch("late", (("audio", "transformer"), ("visual", "resnet18")), ("visual",))
    assert arch_of(parse_params({"train": {"model": {"fusion": "mmtm"}}}), ["audio", "visual"]).fusion == "mmtm"


def test_certified_table_pairs_ca_with_pgd(tmp_path):
    rows = _rows("crmt_jt", "crmt_jt", 0.8) + [
        dict(dataset="d", method="crmt_jt", model="crmt_jt", attack="certified", modality="all", eps=e, accuracy=a, n=10)
        for e, a in ((0.0, 0.7), (0.5, 0.1))]
    write_tables(rows, tmp_path, 0.5, 1.0, {"crmt_jt": "crmt_jt"})
    ca = (tmp_path / "CA.md").read_text().splitlines()
    assert ca[4] == "| model | CA 0 | clean | CA 0.5 | PGD 0.5 |"
    assert ca[6] == "| crmt_jt | 0.700 | 0.800 | 0.100 | 0.500 |"


def test_killed_evaluation_stage_resumes_where_it_stopped(trained, tmp_path):
    """`python -m stages.evaluate` killed (SIGKILL) after its first batch: no table appears, and the rerun
    resumes from the cache and gives the same measurements as an uninterrupted run."""
    import subprocess
    import sys
    import time

    import yaml
    path, _, params = trained
    raw = params.as_file_dict()
    raw["models"] = {"crmt_jt": {"method": "crmt_jt", "group": "crmt"}}
    raw["tuned_models"] = {}
    attacks = CFG.model_dump(mode="json")["attacks"]
    attacks["pgd"]["steps"] = 10
    raw["evaluate"] = {**CFG.model_dump(mode="json"), "batch_size": 1, "attacks": attacks, "out_dir": "results",
                       "eta_models": [], "tsne_models": [], "joint_grid_models": ["crmt_jt"],
                       "certify_models": ["crmt_jt"]}

    def stage(cwd):
        cwd.mkdir(exist_ok=True)
        (cwd / "params.yaml").write_text(yaml.safe_dump(raw))
        return subprocess.Popen([sys.executable, "-m", "stages.evaluate", "--params", "params.yaml",
                                 "--models-dir", str(path.parents[1])], cwd=cwd, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    cache = tmp_path / "run" / ".cache" / "eval" / "tiny" / "crmt_jt.jsonl"
    proc = stage(tmp_path / "run")
    deadline = time.time() + 300
    while not (cache.exists() and cache.read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    done = cache.read_text().count("\n")
    assert 1 <= done < 4, done  # 4 test clips, one per batch
    assert not (tmp_path / "run" / "results/datasets/tiny/tables").exists()  # nothing half-written that looks complete
    resumed = stage(tmp_path / "run")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"resuming: {done} of 4 batches already evaluated" in out
    fresh = stage(tmp_path / "fresh")
    out_fresh, _ = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, out_fresh
    for name in ("measurements.csv", "tables/T1.csv", "tables/CA.csv", "metrics.json"):
        own = "results/datasets/tiny/" + name
        assert (tmp_path / "run" / own).read_text() == (tmp_path / "fresh" / own).read_text()


def test_curve_data_for_dvc_plots(tmp_path):
    """The curves' CSVs carry the measured accuracies (radius 0 = clean) of the right models per figure."""
    from mmrobust.tables import write_curves
    methods = {"jt": "jt", "crmt_jt": "crmt_jt", "crmt_jt_it2": "crmt_jt"}
    rows = FIXTURE + [dict(FIXTURE[0], attack="pgd", modality=m, eps=0.5, accuracy=a)
                      for m, a in (("audio", 0.45), ("visual", 0.75))]  # jt on a 2-radius uni-modal grid
    written = {p.name for p in write_curves(rows, tmp_path, methods)}
    assert written == {"F1_F4.csv", "F5.csv", "T11.csv"}
    import csv
    read = {f: [(r["series"], float(r["radius"]), float(r["accuracy"])) for r in csv.DictReader(open(tmp_path / f))]
            for f in written}
    assert read["F5.csv"] == [("jt", 0.0, 0.8), ("jt", 0.5, pytest.approx(0.4)),
                              ("crmt_jt", 0.0, 0.9), ("crmt_jt", 0.5, pytest.approx(0.5))]
    assert {s for s, *_ in read["T11.csv"]} == {"crmt_jt", "crmt_jt_it2"}  # not jt: T11 is CRMT-JT's iterations
    assert [(x, a) for s, x, a in read["T11.csv"] if s == "crmt_jt_it2"] == \
        [(0.0, 0.92), (0.5, pytest.approx(0.62)), (1.0, pytest.approx(0.42))]
    assert [(s, x) for s, x, _ in read["F1_F4.csv"]] == [("jt #audio", 0.0), ("jt #audio", 0.5), ("jt #audio", 1.0),
                                                         ("jt #visual", 0.0), ("jt #visual", 0.5), ("jt #visual", 1.0)]


def test_evaluation_precision_is_a_param_and_fp32_is_the_default(trained, tmp_path):
    """bf16 autocast and channels-last reach every attack, the library one (ART reads numpy) included; the default
    stays fp32 (EvaluateCfg.precision says why)."""
    path, _, _ = trained
    assert EvaluateCfg().precision == "fp32"
    cfg = EvaluateCfg(batch_size=4, joint_grid=[], uni_grid=[], joint_grid_models=[], uni_grid_models=[],
                      certify_models=[], attacks={"pgd": {}, "apgd_ce": {"steps": 3}}, precision="bf16",
                      channels_last=True)
    seen = []  # every convolution the evaluation runs: its output dtype and whether its weight is NHWC

    def hook(module, args, out):
        if isinstance(module, torch.nn.Conv2d) and module.weight.shape[1] > 1:
            seen.append((out.dtype, module.weight.is_contiguous(memory_format=torch.channels_last)))
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        low = {(r["attack"], r["modality"]): r["accuracy"]
               for r in evaluate_model(path, "m", cfg, tmp_path / "bf16", log=lambda *_: None)}
    finally:
        handle.remove()
    assert seen and set(seen) == {(torch.bfloat16, True)}
    ref = {(r["attack"], r["modality"]): r["accuracy"] for r in evaluate_model(
        path, "m", cfg.model_copy(update={"precision": "fp32", "channels_last": False}), tmp_path / "fp32",
        log=lambda *_: None)}
    assert low.keys() == ref.keys() and ("apgd_ce", "all") in low
    assert abs(low[("clean", "all")] - ref[("clean", "all")]) <= 0.25  # 4 test clips: one may flip
