"""The vision-language family: losses against hand-computed values, the margin rule, frozen teachers, zero-shot
accuracy on a constructed case, the small CLIP's save/load round trip, l∞ PGD against ART, every method's
training step, ImageFolder ingest with bad files, and the params that refer to tasks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmrobust.config import VL_METHOD_NAMES, ConfigError, parse_params
from mmrobust.vl.attacks import pgd_ce, pgd_linf
from mmrobust.vl.clip import ImageSpec, ZeroShotCLIP, load_clip, prompt_words, save_clip, small_clip, word_tokenizer
from mmrobust.vl.data import ImageSplit, Task, read_image_folder, render_shapes, write_task, load_task
from mmrobust.vl.evaluate import evaluate_task
from mmrobust.vl.losses import adaptive_margin, contrastive, kl_to, mhe
from mmrobust.vl.methods import VL_METHODS, build_vl_method, image_params, text_params

CLASSES = ["red circle", "green square", "blue triangle"]


def tiny_model(classes=CLASSES, seed=0) -> ZeroShotCLIP:
    tok = word_tokenizer(prompt_words(classes + ["yellow cross"]))
    clip = small_clip(len(tok), image_size=16, patch_size=8, width=16, layers=1, heads=2, embed_dim=8, seed=seed)
    return ZeroShotCLIP(clip, tok, ImageSpec(16), classes)


def colour_images(n_per_class=4, size=16, seed=0):
    """Images whose mean colour is their class's channel (red, green, blue) plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = 0.2 + 0.1 * torch.rand(3 * n_per_class, 3, size, size, generator=g)
    y = torch.arange(3).repeat_interleave(n_per_class)
    x[torch.arange(len(y)), y] += 0.6
    return x.clamp(0, 1), y


# ---------------------------------------------------------------- losses
def test_mhe_matches_hand_computed_energy():
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]) * 3.0  # normalisation must not matter
    # squared distances: (0,1) 2, (0,2) 4, (1,2) 2 -> energies 1/3, 1/5, 1/3, mean over the 6 ordered pairs
    assert mhe(t, alpha=2.0).item() == pytest.approx((1 / 3 + 1 / 5 + 1 / 3) / 3)
    # alpha = 4: 1/(1+4), 1/(1+16), 1/(1+4)
    assert mhe(t, alpha=4.0).item() == pytest.approx((1 / 5 + 1 / 17 + 1 / 5) / 3)
    spread = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert mhe(spread) < mhe(torch.tensor([[1.0, 0.0], [0.9, 0.1]]))  # farther apart: lower energy


def test_adaptive_margin_is_added_exactly_for_close_classes():
    # class 0 and 1 close (cos 0.8), class 2 far from both (cos 0 and 0.6*0=... constructed below)
    text = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
    cos = torch.zeros(3, 3)
    y = torch.tensor([0, 1, 2])
    out = adaptive_margin(cos, y, text, margin=0.25, threshold=0.5)
    expected = torch.tensor([[0.0, 0.25, 0.0],   # y = 0: class 1 is close
                             [0.25, 0.0, 0.0],   # y = 1: class 0 is close
                             [0.0, 0.0, 0.0]])   # y = 2: nothing close, and never the true class
    assert torch.equal(out, expected)
    assert torch.equal(adaptive_margin(cos, y, text, margin=0.25, threshold=0.9), cos)  # cos 0.8 < 0.9


def test_kl_and_contrastive_values():
    a = torch.tensor([[2.0, 0.0]])
    p, q = F.softmax(a, 1), F.softmax(torch.zeros(1, 2), 1)
    assert kl_to(a, torch.zeros(1, 2)).item() == pytest.approx(float((p * (p / q).log()).sum()))
    # two pairs, orthogonal: logits s * I; each row's CE = log(1 + e^{-s})
    e = torch.eye(2)
    assert contrastive(e, e, 2.0).item() == pytest.approx(math.log(1 + math.exp(-2.0)))
    # equal captions are both positives: target 1/2 each on identical logits -> log 2
    same = torch.ones(2, 2, dtype=torch.bool)
    assert contrastive(torch.ones(2, 2), torch.ones(2, 2), 1.0, same).item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------- the model
class ColourCLIP(ZeroShotCLIP):
    """A CLIP whose towers are identities: image embedding = mean colour, text embedding = a fixed colour vector."""

    TEXT = {"red circle": [1.0, 0, 0], "green square": [0, 1.0, 0], "blue triangle": [0, 0, 1.0]}

    def image_embeds(self, x, clip=None):
        return x.mean((2, 3))

    def text_embeds(self, clip=None, input_ids=None, attention_mask=None):
        return torch.tensor([self.TEXT[c] for c in self.class_names])


def test_zero_shot_accuracy_of_identity_towers():
    base = tiny_model()
    model = ColourCLIP(base.clip, base.tokenizer, base.image, CLASSES)
    x, y = colour_images()
    y_wrong = y.clone()
    y_wrong[:2] = 2  # two images labelled blue that are red: exactly these are misclassified
    task = Task("colours", CLASSES, {"test": ImageSplit((x.permute(0, 2, 3, 1) * 255).round().byte().numpy(),
                                                        y_wrong.numpy())})
    ev = parse_params({"vl": {"evaluate": {"eps": [1 / 255], "apgd": False, "steps": [3]}}}).vl.evaluate
    out = evaluate_task(model, task, ev, log=lambda s: None)
    assert out["clean"] == pytest.approx(10 / 12)
    assert out["worst@1/255"] <= out["pgd3@1/255"] <= out["clean"]


def test_small_clip_round_trips_through_the_loading_path(tmp_path):
    model = tiny_model()
    save_clip(model.clip, model.tokenizer, model.image, tmp_path / "clip")
    clip, tok, image = load_clip(tmp_path / "clip")
    again = ZeroShotCLIP(clip, tok, image, CLASSES)
    x, _ = colour_images()
    with torch.no_grad():
        assert torch.allclose(model(x), again(x), atol=1e-6)
    assert image == model.image
    assert tok("a photo of a red circle.")["input_ids"] == model.tokenizer("a photo of a red circle.")["input_ids"]
    with pytest.raises(FileNotFoundError, match="not a CLIP directory"):
        load_clip(tmp_path)


def test_a_clip_is_an_mlflow_pytorch_model_of_its_run(tmp_path):
    """What a VL training run logs: the zero-shot classifier as an MLflow PyTorch model (flat images in, logits
    out, signature and transformers pinned) that loads back through mlflow.pytorch and predicts the same."""
    import mlflow.pytorch
    from mmrobust import mlflow_model, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    run = c.create_run(tracking.experiment_id(uri, "vl"))
    model = tiny_model().eval()
    x, _ = colour_images()
    model_uri = mlflow_model.log_clip(uri, run.info.run_id, model, x[0], "tima", {"family": "vl"})
    with mlflow_model.tracking_uri(uri):
        served = mlflow.pytorch.load_model(model_uri)
        info = mlflow.models.get_model_info(model_uri)
        requirements = open(mlflow.pyfunc.get_model_dependencies(model_uri)).read()
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 3 * 16 * 16]
    assert "transformers==" in requirements
    with torch.no_grad():
        torch.testing.assert_close(served(x.flatten(1)), model(x), atol=1e-6, rtol=1e-6)


def test_text_cache_follows_weight_updates():
    model = tiny_model().eval()
    with torch.no_grad():
        before = model.class_text().clone()
        model.clip.text_projection.weight.add_(torch.randn_like(model.clip.text_projection.weight))
        after = model.class_text()
    assert not torch.allclose(before, after)
    assert torch.allclose(after, F.normalize(model.text_embeds(), dim=-1))


# ---------------------------------------------------------------- attacks
def test_pgd_linf_stays_in_ball_and_box_and_lowers_accuracy():
    model = tiny_model().eval()
    x, y = colour_images()
    eps = 8 / 255
    adv = pgd_ce(model, x, y, eps, steps=5, seed=0)
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0 and float(adv.max()) <= 1
    with torch.no_grad():
        loss_clean = F.cross_entropy(model(x), y)
        loss_adv = F.cross_entropy(model(adv), y)
    assert loss_adv > loss_clean
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_pgd_linf_matches_art_step_for_step():
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    torch.manual_seed(0)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3)).eval()
    x = torch.rand(6, 3, 4, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    eps, step = 0.05, 0.02
    ours = pgd_linf(lambda a: F.cross_entropy(lin(a), y, reduction="sum"), x, eps, 4, step, random_start=False)
    clf = PyTorchClassifier(lin, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 4, 4), nb_classes=3,
                            clip_values=(0.0, 1.0))
    art = ProjectedGradientDescent(clf, norm=np.inf, eps=eps, eps_step=step, max_iter=4, num_random_init=0,
                                   batch_size=6, verbose=False)
    theirs = art.generate(x.numpy(), y=np.eye(3, dtype=np.float32)[y.numpy()])
    assert np.allclose(ours.numpy(), theirs, atol=1e-6)


# ---------------------------------------------------------------- methods
def vl_params(**vl):
    return parse_params({"vl": {"train": {"epochs": 1, "batch_size": 6}, "attack": {"steps": 1},
                                "tima": {"iat_epochs": 1}, **vl}}).vl


def test_every_method_name_is_declared_to_the_config():
    assert sorted(VL_METHODS) == sorted(VL_METHOD_NAMES)


@pytest.mark.parametrize("name", VL_METHOD_NAMES)
def test_method_step_trains_its_tower_only_and_keeps_the_teacher_frozen(name):
    vl = vl_params()
    model = tiny_model()
    method = build_vl_method(name, vl.train_for(name), vl)
    method.prepare(model)
    phases = method.phases()
    if name == "zeroshot":
        assert phases == []
        return
    x, y = colour_images(2)
    for phase in phases:
        params = method.parameters(model, phase)
        keep = {id(p) for p in params}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(params, lr=0.1)
        loss, logs = method.loss(model.train(), {"visual": x}, y, type("Ctx", (), {"phase": phase.name})())
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, snapshot[n])}
        assert changed, f"{name}/{phase.name}: nothing trained"
        assert not any(n.startswith("teacher.") for n in changed)
        if hasattr(model, "teacher"):
            assert all(p.grad is None for p in model.teacher.parameters())
        towers = {"image": ("clip.vision_model", "clip.visual_projection"),
                  "text": ("clip.text_model", "clip.text_projection")}
        if phase.name in towers:
            assert all(n.startswith(towers[phase.name]) for n in changed), (name, phase.name, sorted(changed)[:3])


def test_tima_phases_and_tower_parameters():
    vl = vl_params(tima={"iat_epochs": 3})
    model = tiny_model()
    tima = build_vl_method("tima", vl.train_for("tima"), vl)
    assert [(p.name, p.epochs) for p in tima.phases()] == [("text", 3), ("image", 1)]
    assert [p.name for p in build_vl_method("tima_tai", vl.train_for("tima_tai"), vl).phases()] == ["image"]
    ids = {id(p) for p in image_params(model.clip)} & {id(p) for p in text_params(model.clip)}
    assert not ids


# ---------------------------------------------------------------- data and params
def test_image_folder_ingest_skips_and_names_bad_files(tmp_path):
    cfg = parse_params({"vl": {"shapes": {"train_per_class": 2, "test_per_class": 1, "size": 16}}}).vl.shapes
    render_shapes(cfg, tmp_path / "shapes")
    (tmp_path / "shapes" / "train" / "red_circle" / "broken.png").write_bytes(b"not a png")
    names, splits, skipped = read_image_folder(tmp_path / "shapes", ["red circle", "blue square"], None)
    assert names == ["red circle", "blue square"]
    assert splits["train"].images.shape == (4, 16, 16, 3) and list(splits["train"].labels) == [0, 0, 1, 1]
    assert [(f.split("/")[-1], r) for f, r in skipped] == [("broken.png", "not a readable image")]
    out = write_task(tmp_path / "task", names, splits, skipped, "images:shapes")
    back = load_task(out)
    assert back.classes == names and np.array_equal(back.splits["test"].images, splits["test"].images)
    assert "broken.png" in (out / "skipped.csv").read_text()
    with pytest.raises(ValueError, match=r"no class folder for \['purple circle'\]"):
        read_image_folder(tmp_path / "shapes", ["purple circle"], None)


def test_class_names_read_as_prompt_words():
    from mmrobust.vl.data import class_text

    assert class_text("ApplyEyeMakeup") == "apply eye makeup"                       # UCF101 classInd.txt
    assert class_text("red_circle_right_harmonic150", words=2) == "red circle"      # the synthetic set
    assert class_text("playing bagpipes") == "playing bagpipes"                    # Kinetics-Sounds, VGGSound
    assert class_text("YoYo") == "yo yo" and class_text("PlayingDaf") == "playing daf"


def test_vl_params_name_bad_references():
    with pytest.raises(ConfigError, match="tune_task: no task 'nope'"):
        parse_params({"vl": {"tune_task": "nope"}})
    with pytest.raises(ConfigError, match="methods: unknown 'clip'"):
        parse_params({"vl": {"methods": ["clip"]}})
    with pytest.raises(ConfigError, match="train_overrides.fare"):
        parse_params({"vl": {"train_overrides": {"fare": {"optimizer": "lion"}}}})
    vl = parse_params({}).vl
    assert vl.train_for("fare").optimizer == "adamw" and vl.train_for("tecoa").optimizer == vl.train.optimizer


def test_vl_search_params_and_tuned_model_params(tmp_path):
    from pipelines.train_vl import tuned_params
    from pipelines.tune import nest, trial_params

    assert nest({"tima.margin": 0.2, "logit_scale": 50.0}) == {"tima": {"margin": 0.2}, "logit_scale": 50.0}
    base = parse_params({"vl": {"tune": {"out_dir": str(tmp_path)}}})
    trial = trial_params(base, {"tima.margin": 0.2, "logit_scale": 50.0}, family="vl")
    assert trial.vl.tima.margin == 0.2 and trial.vl.logit_scale == 50.0
    assert trial.vl.train.cpus_per_worker == base.vl.tune.worker_cpus and base.vl.tima.margin == 0.1
    with pytest.raises(ConfigError, match="run the vl-tune stage first"):
        tuned_params(base, "tima")
    (tmp_path / "best_params.yaml").write_text("tima: {margin: 0.25, threshold: 0.3}\nlogit_scale: 20.0\n")
    tuned = tuned_params(base, "tima")
    assert (tuned.vl.tima.margin, tuned.vl.tima.threshold, tuned.vl.logit_scale) == (0.25, 0.3, 20.0)
    assert tuned.vl.tima.mhe_weight == base.vl.tima.mhe_weight
    with pytest.raises(ConfigError, match="not in vl.tuned_methods"):
        tuned_params(base, "tecoa")
    with pytest.raises(ConfigError, match="tune.space.tima.margn: not a key under vl"):
        parse_params({"vl": {"tune": {"space": {"tima.margn": {"dist": "uniform", "low": 0, "high": 1}}}}})
    with pytest.raises(ConfigError, match="tuned_methods: 'tecoa' is not vl.tune.method"):
        parse_params({"vl": {"tuned_methods": ["tecoa"]}})


def test_vl_objective_is_linf_pgd_on_the_methods_prediction():
    from mmrobust.methods import Predictor

    vl = vl_params()
    model = tiny_model().eval()
    method = build_vl_method("tecoa", vl.train_for("tecoa"), vl)
    x, y = colour_images()
    predictor = Predictor(model, method).eval()
    clean, n = method.objective_accuracy(predictor, [({"visual": x}, y)], 1e-9, 1, None)
    with torch.no_grad():
        assert clean == int((model(x).argmax(1) == y).sum()) and n == len(y)
    robust, _ = method.objective_accuracy(predictor, [({"visual": x}, y)], 16 / 255, 5, None)
    assert robust <= clean


def test_pretraining_is_skipped_for_a_users_clip(tmp_path, capsys):
    from pipelines.train_vl import main

    (tmp_path / "params.yaml").write_text(f"vl: {{clip_dir: {tmp_path}/my_clip}}\n")
    out = tmp_path / "pre"
    assert main(["--method", "clip_pretrain", "--params", str(tmp_path / "params.yaml"), "--out", str(out)]) == 0
    assert "my_clip" in (out / "README.md").read_text() and "skipped" in capsys.readouterr().out


def test_a_tuned_clip_keeps_its_prompt_and_temperature(tmp_path):
    from mmrobust.vl.run import save_trained, zero_shot_model

    base = tiny_model()
    model = ZeroShotCLIP(base.clip, base.tokenizer, base.image, CLASSES, prompt="this is a {}", logit_scale=42.0)
    save_trained(model, tmp_path / "tuned", {"test_acc": 1.0})
    params = parse_params({})  # vl.logit_scale None, vl.prompt "a photo of a {}."
    back = zero_shot_model(params, CLASSES, tmp_path / "tuned")
    assert back.fixed_scale == 42.0 and back.prompt == "this is a {}"
    x, _ = colour_images()
    with torch.no_grad():
        assert torch.allclose(back(x), model(x), atol=1e-5)


def test_training_a_vl_method_without_its_inputs_is_a_clear_error(tmp_path, capsys):
    from pipelines.train_vl import main

    (tmp_path / "params.yaml").write_text(f"vl: {{tasks_dir: {tmp_path}/tasks, pretrain: {{out_dir: {tmp_path}/clip}}}}\n")
    assert main(["--method", "tecoa", "--params", str(tmp_path / "params.yaml")]) == 2
    assert "task 'shapes_seen' not ingested" in capsys.readouterr().err
    (tmp_path / "tasks/shapes_seen").mkdir(parents=True)
    (tmp_path / "tasks/shapes_seen/classes.json").write_text("{}")
    assert main(["--method", "tecoa", "--params", str(tmp_path / "params.yaml")]) == 2
    assert "no CLIP" in capsys.readouterr().err
