"""One typed, validated configuration loaded from params.yaml: one group per stage.

Every model forbids unknown keys, so a typo stops the stage before any work, with a message that names the
key path and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from mmrobust.attacks.specs import default_attacks, validate_attacks
from mmrobust.methods import catalog


class ConfigError(ValueError):
    """A params file that does not validate; the message names every bad key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- generate (synthetic dataset)
class SyntheticAudio(_Strict):
    snr_db: float = Field(10.0, ge=-30, le=60, description="class chord power over background noise")
    ambiguity: float = Field(0.15, ge=0, le=1, description="probability that the sound belongs to another class")


class SyntheticVisual(_Strict):
    noise_std: float = Field(0.25, ge=0, le=2, description="pixel noise std on a [0,1] image")
    distractors: int = Field(2, ge=0, le=20, description="moving objects of random classes")
    object_scale: float = Field(0.10, gt=0, le=0.3, description="object radius / frame size")
    ambiguity: float = Field(0.05, ge=0, le=1, description="probability that the object belongs to another class")


def _check_even_size(group: str, size: int) -> None:
    """Generated clips are h264 in yuv420p, whose chroma planes need an even frame size."""
    if size % 2:
        raise ValueError(f"{group}.size must be even for h264/yuv420p, got {size}")


class GenerateCfg(_Strict):
    seed: int = 2024
    out_dir: str = "data/synthetic"
    num_classes: int = Field(6, ge=2, le=64)
    train_per_class: int = Field(40, ge=1)
    test_per_class: int = Field(15, ge=1)
    duration_s: float = Field(4.0, gt=0.5, le=60)
    fps: int = Field(10, ge=2, le=60)
    size: int = Field(64, ge=16, le=1024)
    sample_rate: int = Field(16000, ge=8000, le=48000)
    audio: SyntheticAudio = SyntheticAudio()
    visual: SyntheticVisual = SyntheticVisual()
    workers: int = Field(1, ge=1, le=64)  # processes writing clips; the files do not depend on it

    @model_validator(mode="after")
    def _even_size(self):
        _check_even_size("generate", self.size)
        return self


# ---------------------------------------------------------------- spoken (real-content sets)
class SpokenSet(_Strict):
    """One real-content set of mmrobust.data.spoken: which modality is easy follows from these knobs."""
    num_classes: int = Field(10, ge=2, le=10, description="digits 0..num_classes-1")
    # scikit-learn has ~180 scans per digit, half per split: more clips reuse a scan, placed and voiced anew
    train_per_class: int = Field(60, ge=1, le=1000)
    test_per_class: int = Field(20, ge=1, le=1000)
    speech_snr_db: float = Field(10.0, ge=-40, le=60, description="spoken class name over pink noise")
    babble_db: Optional[float] = Field(None, ge=0, le=60, description="another digit name this far below; null: none")
    glyph_contrast: float = Field(0.5, ge=0, le=1, description="ink opacity of the handwritten class digit")
    glyph_scale: float = Field(0.45, gt=0, le=1, description="digit height / frame size")
    distractors: int = Field(1, ge=0, le=8, description="digits of other classes at half the contrast")
    pixel_noise: float = Field(0.1, ge=0, le=2, description="pixel noise std on a [0,1] image")


class SpokenCfg(_Strict):
    seed: int = 2024
    out_dir: str = "data/spoken"
    duration_s: float = Field(3.0, ge=1.5, le=30)
    fps: int = Field(10, ge=2, le=60)
    size: int = Field(64, ge=16, le=1024)
    sample_rate: int = Field(16000, ge=8000, le=48000)
    workers: int = Field(1, ge=1, le=64)  # processes writing clips; the files do not depend on it
    sets: dict[str, SpokenSet] = {}

    @model_validator(mode="after")
    def _check(self):
        _check_even_size("spoken", self.size)
        bad = [k for k in self.sets if not k.replace("_", "").isalnum() or k != k.lower()]
        if bad:
            raise ValueError(f"spoken.sets: ids are lower-case letters, digits and _: {bad}")
        return self


# ---------------------------------------------------------------- data (ingest)
class KSLayout(_Strict):
    train_list: str = "train.txt"
    test_list: str = "test.txt"
    video_dir: str = "videos"
    classes_file: Optional[str] = "classes.txt"  # optional `<id> <name>` lines; missing file -> names = ids


class VGGSoundLayout(_Strict):
    csv: str = "vggsound.csv"
    video_dir: str = "video"


class UCF101Layout(_Strict):
    split: Literal[1, 2, 3] = 1
    list_dir: str = "ucfTrainTestlist"
    video_dir: str = "UCF-101"
    flow_dir: Optional[str] = None  # pre-extracted TV-L1: <flow_dir>/u/<video>/frame%06d.jpg and v/...


class DataCfg(_Strict):
    dataset: Literal["synthetic", "ks", "vggsound", "ucf101"] = "synthetic"
    root: str = "data/synthetic"
    out_dir: str = "data/manifest"
    val_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 2024
    ks: KSLayout = KSLayout()
    vggsound: VGGSoundLayout = VGGSoundLayout()
    ucf101: UCF101Layout = UCF101Layout()


DATASET_ID = r"^[a-z0-9_]+$"  # part of stage names (train@<dataset>-<model>) and paths
DATASET_GROUPS = ("data", "extract")  # what a dataset entry may override


class DatasetEntry(_Strict):
    """One dataset the pipeline runs on: its layout, the folder holding it, and overrides of data/extract
    (e.g. another audio preset, or fewer modalities: UCF101 has no audio)."""
    dataset: Literal["synthetic", "ks", "vggsound", "ucf101"]
    root: str
    overrides: dict[str, dict] = {}

    @model_validator(mode="after")
    def _groups(self):
        extra = sorted(set(self.overrides) - set(DATASET_GROUPS))
        if extra:
            raise ValueError(f"overrides: {extra} not allowed; a dataset overrides {list(DATASET_GROUPS)} only")
        for group, key in (("data", "dataset"), ("data", "root"), ("data", "out_dir"), ("extract", "out_dir")):
            if key in self.overrides.get(group, {}):
                raise ValueError(f"overrides.{group}.{key}: set by the pipeline (the entry's dataset/root; "
                                 f"<{group}.out_dir>/<dataset id>)")
        return self


# ---------------------------------------------------------------- extract
AUDIO_PRESETS: dict[str, dict] = {
    # Paper / AST lineage: 128-mel log filterbank, 25 ms window, 10 ms hop, 1024 frames, AudioSet statistics.
    "audioset_fbank": dict(kind="fbank", sample_rate=16000, n_mels=128, win_ms=25.0, hop_ms=10.0, frames=1024,
                           n_fft=512, clip_s=10.24, norm_mean=-4.503877, norm_std=5.141276),
    # OGM-GE lineage for VGGSound: 5 s crop, log(|STFT| + 1e-7), n_fft 256, hop 128.
    "vggsound_stft": dict(kind="stft", sample_rate=16000, n_mels=0, win_ms=16.0, hop_ms=8.0, frames=626,
                          n_fft=256, clip_s=5.0, norm_mean=0.0, norm_std=0.5),
    # CPU default: same fbank maths, fewer mel bins and a coarser hop.
    "cpu_fbank": dict(kind="fbank", sample_rate=16000, n_mels=64, win_ms=40.0, hop_ms=20.0, frames=200,
                      n_fft=1024, clip_s=4.0, norm_mean=-4.503877, norm_std=5.141276),
}


class AudioCfg(_Strict):
    preset: Literal["audioset_fbank", "vggsound_stft", "cpu_fbank"] = "cpu_fbank"
    # Any field left null takes the preset's value.
    kind: Optional[Literal["fbank", "stft"]] = None
    sample_rate: Optional[int] = Field(None, ge=8000, le=48000)
    n_mels: Optional[int] = Field(None, ge=0, le=512)
    win_ms: Optional[float] = Field(None, gt=0, le=200)
    hop_ms: Optional[float] = Field(None, gt=0, le=100)
    n_fft: Optional[int] = Field(None, ge=16, le=8192)
    frames: Optional[int] = Field(None, ge=8, le=8192)
    clip_s: Optional[float] = Field(None, gt=0, le=60)
    norm_mean: Optional[float] = None
    norm_std: Optional[float] = Field(None, gt=0)

    def resolved(self) -> "AudioCfg":
        values = dict(AUDIO_PRESETS[self.preset])
        values.update({k: v for k, v in self.model_dump().items() if v is not None and k != "preset"})
        out = AudioCfg(preset=self.preset, **values)
        if out.kind == "fbank" and out.n_mels < 1:
            raise ConfigError("extract.audio.n_mels: must be >= 1 for kind 'fbank'")
        if out.n_fft < out.sample_rate * out.win_ms / 1000:
            raise ConfigError(f"extract.audio.n_fft: {out.n_fft} is shorter than the window "
                              f"({out.sample_rate * out.win_ms / 1000:.0f} samples)")
        return out


class TimingCfg(_Strict):
    """Which time steps the frame modalities (visual, flow, diff) keep; shared so that they stay aligned."""
    fps: float = Field(2.0, gt=0, le=30, description="decode rate; the paper uses 1 fps")
    max_frames: int = Field(8, ge=3, le=300, description="frames stored per clip (padded); training samples from them")


class VisualCfg(_Strict):
    size: int = Field(64, ge=16, le=1024, description="stored frames are size x size; the paper uses 224")


class FlowCfg(_Strict):
    algorithm: Literal["farneback", "tvl1"] = "farneback"
    source: Literal["compute", "precomputed"] = "compute"
    bound: float = Field(15.0, gt=0, le=100)
    size: int = Field(64, ge=16, le=1024)
    precomputed_fps: float = Field(25.0, gt=0, le=240, description="frame rate of pre-extracted u/v jpg dumps")


class DiffCfg(_Strict):
    size: int = Field(64, ge=16, le=1024)


class ExtractCfg(_Strict):
    out_dir: str = "data/features"
    # Two lists because DVC generates one stage per entry and the two kinds declare different params.
    frame_modalities: list[Literal["visual", "flow", "diff"]] = ["visual"]
    audio_modalities: list[Literal["audio"]] = ["audio"]  # [] for a dataset without sound (UCF101)
    workers: int = Field(2, ge=1, le=256)
    max_reject_fraction: float = Field(0.2, ge=0, le=1)
    min_duration_s: float = Field(0.5, ge=0, le=60, description="shorter clips are rejected")
    timing: TimingCfg = TimingCfg()
    visual: VisualCfg = VisualCfg()
    audio: AudioCfg = AudioCfg()
    flow: FlowCfg = FlowCfg()
    diff: DiffCfg = DiffCfg()

    @property
    def modalities(self) -> list[str]:
        return [*self.frame_modalities, *self.audio_modalities]

    @model_validator(mode="after")
    def _unique(self):
        for key in ("frame_modalities", "audio_modalities"):
            values = getattr(self, key)
            if len(set(values)) != len(values):
                raise ValueError(f"extract.{key}: duplicate entries in {values}")
        return self


# ---------------------------------------------------------------- train
class ModelCfg(_Strict):
    encoder: str | dict[str, str] = "resnet18"  # one registered encoder for all modalities, or one per modality
    width: int = Field(16, ge=1, le=512, description="base channels; 64 = the paper's ResNet18 (512-d features)")
    head: Optional[Literal["concat", "crmt"]] = None  # None: the method's own head
    fusion: Literal["late", "mmtm", "mmt"] = "late"  # mmtm: ResNet encoders; mmt: encoder "transformer"
    pretrained: dict[str, str] = {}  # modality -> local torchvision-format ResNet state_dict
    encoder_kwargs: dict[str, dict] = {}
    crmt_a_init: float = Field(0.1, gt=0, le=10, description="initial modality weights a_m of the CRMT head "
                               "(paper and reference: 0.1)")


class SpeedCfg(_Strict):
    """How fast a training step runs, not what it computes (mmrobust/speed.py)."""
    channels_last: bool = Field(False, description="conv weights and activations in NHWC")
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype of forward + loss "
                                                       "(fp16: with a gradient scaler)")
    compile: bool = Field(False, description="torch.compile the model (the first steps pay the compilation)")
    compile_mode: Optional[Literal["default", "reduce-overhead", "max-autotune"]] = None
    compile_backend: str = Field("inductor", description="torch.compile backend (aot_eager: tracing only, no codegen)")
    cudnn_benchmark: bool = Field(True, description="let cuDNN pick the fastest kernels (GPU only)")
    pin_memory: Optional[bool] = Field(None, description="page-locked loader batches (None: on a GPU)")


class TrainCfg(_Strict):
    method: str = "jt"
    modalities: Optional[list[str]] = None  # None: extract.modalities
    epochs: int = Field(10, ge=1, le=10000)
    batch_size: int = Field(32, ge=1, le=4096)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(1e-2, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    lr_step: int = Field(60, ge=1, description="StepLR step (epochs)")
    lr_gamma: float = Field(0.1, gt=0, le=1)
    seed: int = 2024
    num_segments: int = Field(3, ge=1, le=64)
    input_size: Optional[int] = Field(None, ge=8, le=1024, description="None: the stored frame size")
    crop_min_scale: float = Field(0.08, gt=0, le=1, description="smallest area fraction of the train-time random "
                                  "resized crop (0.08: torchvision's and the reference's; 1: no crop)")
    noise_sigma: float = Field(0.0, ge=0, description="Gaussian noise N(0, sigma^2) added to every modality of every "
                               "training batch (the base classifier of randomised smoothing needs it; 0: off)")
    loader_workers: int = Field(0, ge=0, le=64)
    use_gpu: bool = False
    speed: SpeedCfg = SpeedCfg()
    num_workers: int = Field(1, ge=1, le=1024, description="Ray Train data-parallel workers")
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="fractions let 2 workers share 1-2 cores")
    max_failures: int = Field(1, ge=0, le=100, description="worker failures survived by resuming from the last checkpoint")
    storage_dir: str = "ray_results"
    max_batches: Optional[int] = Field(None, ge=1, description="cap batches per epoch (smoke tests)")
    out_dir: str = "models"
    model: ModelCfg = ModelCfg()


# ---------------------------------------------------------------- tracking
class TrackingCfg(_Strict):
    uri: str = "sqlite:///mlflow.db"  # MLFLOW_TRACKING_URI, when set, wins (e.g. the pipeline's server)
    experiment: str = "mmrobust"


# ---------------------------------------------------------------- models the pipeline trains and evaluates
class ModelEntry(_Strict):
    """One trained model: a method plus overrides of any params group (deep-merged, then re-validated)."""
    method: str
    # The method's hyper-parameter group (e.g. crmt for every crmt_* method; train for methods without one).
    # Required and spelled out because the DVC train stage declares it as a param dependency.
    group: str
    overrides: dict[str, dict] = {}


# ---------------------------------------------------------------- pretrain (uni-modal encoders)
PRETRAIN_STAGE = "pretrain"  # a `train.model.pretrained` value: the pretrain stage's encoder of that modality


class PretrainCfg(_Strict):
    """The pretrain stage: for every modality that a model loads as `pretrained: {<modality>: pretrain}`, a
    uni-modal JT (`train` settings, one modality) on the training split (selected on val; the test split is never
    seen), whose encoder becomes `<out_dir>/<dataset>/<modality>.pt` (torchvision-format state dict)."""
    out_dir: str = "pretrain"
    epochs: int = Field(8, ge=1, le=10000)


# ---------------------------------------------------------------- tune (Ray Tune over a method's params)
class SearchDim(_Strict):
    """One searched parameter: loguniform/uniform on [low, high], randint on [low, high), or one of `values`."""
    dist: Literal["loguniform", "uniform", "randint", "choice"]
    low: Optional[float] = None
    high: Optional[float] = None
    values: Optional[list[float | int | bool | str]] = None

    @model_validator(mode="after")
    def _complete(self):
        if self.dist == "choice":
            if not self.values:
                raise ValueError("dist 'choice' needs a non-empty `values` list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"dist {self.dist!r} needs low < high, got low={self.low}, high={self.high}")
        elif self.dist == "loguniform" and self.low <= 0:
            raise ValueError(f"dist 'loguniform' needs low > 0, got {self.low}")
        return self


class TuneCfg(_Strict):
    """ASHA search; every trial is a TorchTrainer run of `base`, scored by l2-PGD accuracy on the validation split."""
    base: ModelEntry = ModelEntry(method="crmt_jt", group="crmt")
    space: dict[str, SearchDim] = {  # "<group>.<key>" of base.group or train -> distribution
        "crmt.rho": SearchDim(dist="loguniform", low=0.1, high=10.0),
        "crmt.iterations": SearchDim(dist="choice", values=[1, 2]),
        "crmt.step2_epochs": SearchDim(dist="choice", values=[2, 4]),
        "crmt.step2_lr": SearchDim(dist="loguniform", low=0.003, high=0.03)}
    num_samples: int = Field(4, ge=1, le=100000, description="trials")
    max_concurrent: int = Field(2, ge=1, le=10000)
    grace_period: int = Field(2, ge=1, description="epochs before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1)
    seed: int = 2024
    eps: float = Field(0.5, gt=0, description="joint l2-PGD radius of the objective")
    pgd_steps: int = Field(4, ge=1, le=1000)
    pgd_step_ratio: float = Field(1 / 3, gt=0, le=1)
    trial_cpus: float = Field(0.25, ge=0, description="CPUs held by the Tune function that drives a trial")
    worker_cpus: Optional[float] = Field(0.5, gt=0, description="CPUs per Ray Train worker in a trial (None: train.cpus_per_worker)")
    out_dir: str = "tune"

    @property
    def best_params_file(self) -> Path:
        return Path(self.out_dir) / "best_params.yaml"


# ---------------------------------------------------------------- evaluate
class SmoothingCfg(_Strict):
    """Randomised-smoothing certificates (mmrobust/analysis/smoothing.py) for table CA."""
    models: list[str] = ["jt", "jt_noise"]  # models certified (those trained with train.noise_sigma fare best)
    sigma: float = Field(0.5, gt=0, description="noise std on every noised modality")
    n0: int = Field(16, ge=1, description="noisy copies that pick the class")
    n: int = Field(128, ge=1, description="noisy copies that bound its probability (the largest certifiable "
                   "radius is sigma * Phi^-1(alpha^(1/n)))")
    alpha: float = Field(0.001, gt=0, lt=0.5, description="failure probability of each certificate")
    per_modality: bool = Field(True, description="also noise one modality at a time (the others clean)")
    batch_size: int = Field(256, ge=1, le=65536, description="noisy copies per forward pass")


class EvaluateCfg(_Strict):
    out_dir: str = "results"
    models: Optional[list[str]] = None  # None: every entry of `models` and `tuned_models`
    batch_size: int = Field(64, ge=1, le=4096)
    max_samples: Optional[int] = Field(None, ge=1, description="evaluate the first N test clips only")
    seed: int = 2024
    workers: int = Field(2, ge=1, le=256, description="models evaluated at once, each in a process of its own")
    joint_eps: float = Field(0.5, ge=0, description="paper T1: joint FGM / l2-PGD radius")
    uni_eps: float = Field(1.0, ge=0, description="paper T2: uni-modal radius")
    joint_grid: list[float] = [0.25, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]  # T11 / F5 attack sizes
    uni_grid: list[float] = [0.25, 0.5, 1.0, 2.0]                    # F1/F4 uni-modal PGD radii
    # The radius grids cost most: only the models of the curve figures/tables get them.
    joint_grid_models: list[str] = ["jt", "ojt", "crmt_step1", "crmt_step2", "crmt_jt", "crmt_jt_it2", "crmt_jt_it4"]
    uni_grid_models: list[str] = ["jt", "mmat", "crmt_jt", "crmt_at"]
    # Sound certified accuracy CA(r) on {0} + joint_grid (table CA beside l2-PGD at the same radii).
    certify_models: list[str] = ["jt", "crmt_jt", "crmt_jt_it2", "crmt_jt_it4"]
    smoothing: SmoothingCfg = SmoothingCfg()  # randomised-smoothing CA(r) on the same radii
    # The attacks run, in this order: {name: its own params} (mmrobust/attacks/specs.py declares each one).
    attacks: dict[str, Any] = Field(default_factory=default_attacks)
    tsne_samples: int = Field(300, ge=10)
    eta_models: list[str] = ["jt", "ojt", "mmat", "crmt_step1", "crmt_step2", "crmt_jt", "crmt_at"]  # F3/F8
    tsne_models: list[str] = ["jt", "crmt_jt"]  # F7
    # Attacks stay fp32 by default: in bf16 an input near 1 has a spacing of 2^-8 (fp16: 2^-11), while an l2
    # budget of 0.5 over a 3x3x224x224 clip is ~1e-3 per element: autocast would round most of every step away
    # and report a weaker attack's accuracy as robust accuracy.
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="autocast dtype of the attacked model")
    channels_last: bool = False

    @field_validator("attacks", mode="before")
    @classmethod
    def _attacks(cls, raw):
        return validate_attacks(raw)

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, raw):
        old = sorted(k for k in (raw if isinstance(raw, dict) else {}) if k.split("_")[0] in ("pgd", "mgn", "mpm", "mea"))
        if old:
            raise ValueError(f"{old}: an attack's params are under evaluate.attacks.<attack> "
                             "(e.g. attacks: {pgd: {steps: 4}, mgn: {sigma: [0.5]}})")
        return raw


# ---------------------------------------------------------------- vl (zero-shot robustness of CLIP)
VL_METHOD_NAMES = ("clip_pretrain", "zeroshot", "tecoa", "pmg_aft", "fare", "tima_iat", "tima_tai", "tima")


class VLShapesCfg(_Strict):
    """The embedded ImageFolder tree: the synthetic set's 4 shapes x 4 colours as single images."""
    out_dir: str = "data/vl/shapes"
    seed: int = 2024
    size: int = Field(32, ge=16, le=512)
    train_per_class: int = Field(200, ge=1)
    test_per_class: int = Field(50, ge=1)
    distractors: int = Field(1, ge=0, le=8, description="at most this many smaller shapes of random colours")
    noise_std: float = Field(0.06, ge=0, le=1, description="per-image noise std drawn uniformly up to this")
    min_radius: float = Field(0.16, gt=0, le=0.5, description="object radius / image size, smallest")
    max_radius: float = Field(0.24, gt=0, le=0.5)


class VLTask(_Strict):
    """An image-text task: `images:<id>` (an ImageFolder root of vl.images) or `frames:<dataset id>` (the
    extracted visual frames of a `datasets` entry, class names from its manifest)."""
    source: str
    classes: Optional[list[str]] = None   # class texts to keep, in this order (None: all)
    words: Optional[int] = Field(None, ge=1, description="frames: keep the first n words of each class name")
    frames_per_clip: int = Field(2, ge=1, le=64)

    @field_validator("source")
    @classmethod
    def _source(cls, v: str):
        kind, _, ref = v.partition(":")
        if kind not in ("images", "frames") or not ref:
            raise ValueError(f"source must be images:<vl.images id> or frames:<dataset id>, got {v!r}")
        return v


class VLAttackCfg(_Strict):
    """l-inf PGD in pixel space [0, 1] (training attack; eps 1/255 as TeCoA/TIMA)."""
    eps: float = Field(1 / 255, ge=0, le=1)
    steps: int = Field(2, ge=0, le=1000)
    step_size: Optional[float] = Field(None, gt=0, description="None: 2.5 eps / steps")
    random_start: bool = True


class VLPretrainCfg(_Strict):
    """The small CLIP the embedded default pre-trains contrastively (ignored when vl.clip_dir is set)."""
    task: str = "shapes_seen"
    image_size: int = Field(32, ge=16, le=512)
    patch_size: int = Field(8, ge=2, le=64)
    width: int = Field(64, ge=8, le=2048)
    layers: int = Field(2, ge=1, le=48)
    heads: int = Field(2, ge=1, le=64)
    embed_dim: int = Field(64, ge=8, le=2048)
    word_dropout: float = Field(0.5, ge=0, le=1, description="chance that a caption keeps a random subset of the "
                                "class name's words (single factors teach compositions)")
    train: TrainCfg = TrainCfg(epochs=40, batch_size=64, optimizer="adamw", lr=1e-3, weight_decay=0.05, lr_step=30)
    out_dir: str = "models/vl_clip"


class PMGAFTCfg(_Strict):
    teacher_weight: float = Field(1.0, ge=0, description="KL(frozen model on adv || tuned on adv)")
    clean_weight: float = Field(1.0, ge=0, description="KL(tuned on clean || tuned on adv)")


class TIMACfg(_Strict):
    iat_epochs: int = Field(2, ge=1, le=10000, description="text-tuning epochs before the image epochs")
    mhe_weight: float = Field(1.0, ge=0)
    mhe_alpha: float = Field(2.0, gt=0)
    iakd_weight: float = Field(1.0, ge=0, description="image-to-text distillation (KL)")
    margin: float = Field(0.1, ge=0, le=2, description="added to the cosine of semantically close wrong classes")
    threshold: float = Field(0.5, ge=-1, le=1, description="text cosine above which two classes are close")
    takd_weight: float = Field(1.0, ge=0, description="distillation to the pre-trained image embeddings")


class VLTuneCfg(_Strict):
    """ASHA search over a VL method's params (keys are paths under `vl`), each trial a TorchTrainer run scored
    by l-inf PGD accuracy on the validation split of the tuning task (vl-tune stage)."""
    method: str = "tima"
    space: dict[str, SearchDim] = {
        "tima.margin": SearchDim(dist="uniform", low=0.0, high=0.3),
        "tima.threshold": SearchDim(dist="uniform", low=0.2, high=0.8),
        "tima.mhe_weight": SearchDim(dist="loguniform", low=0.1, high=3.0),
        "logit_scale": SearchDim(dist="loguniform", low=10.0, high=100.0)}
    num_samples: int = Field(2, ge=1, le=100000, description="trials (CPU default 2; paper presets more)")
    max_concurrent: int = Field(2, ge=1, le=10000)
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)
    seed: int = 2024
    eps: float = Field(1 / 255, gt=0, le=1, description="l-inf PGD radius of the objective (pixel space)")
    pgd_steps: int = Field(10, ge=1, le=1000)
    trial_cpus: float = Field(0.25, ge=0)
    worker_cpus: Optional[float] = Field(0.5, gt=0)
    out_dir: str = "tune/vl"

    @property
    def best_params_file(self) -> Path:
        return Path(self.out_dir) / "best_params.yaml"


class VLEvalCfg(_Strict):
    eps: list[float] = [1 / 255, 4 / 255]
    steps: list[int] = [10]           # paper presets: [10, 100]
    apgd: bool = True                 # APGD-CE (ART) at every eps
    apgd_steps: int = Field(20, ge=1, le=10000)
    batch_size: int = Field(128, ge=1, le=65536)
    max_samples: Optional[int] = Field(None, ge=1, description="first N test images per task")
    seed: int = 2024
    out_dir: str = "results/vl"


class VLCfg(_Strict):
    images: dict[str, str] = {"shapes": "data/vl/shapes"}   # ImageFolder roots
    shapes: VLShapesCfg = VLShapesCfg()
    tasks: dict[str, VLTask] = {
        "shapes_seen": VLTask(source="images:shapes", classes=[
            "red circle", "blue circle", "green square", "yellow square", "red triangle", "blue triangle",
            "green cross", "yellow cross"]),
        "shapes_unseen": VLTask(source="images:shapes", classes=[
            "green circle", "yellow circle", "red square", "blue square", "green triangle", "yellow triangle",
            "red cross", "blue cross"]),
        "synthetic": VLTask(source="frames:synthetic", words=2)}
    tasks_dir: str = "data/vl/tasks"
    clip_dir: Optional[str] = None    # a user's CLIP (save_pretrained folder); None: the vl-pretrain stage's
    prompt: str = "a photo of a {}."
    logit_scale: Optional[float] = Field(None, gt=0, le=1000, description="fixed temperature (None: CLIP's own)")
    pretrain: VLPretrainCfg = VLPretrainCfg()
    tune_task: str = "shapes_seen"
    zero_shot_tasks: list[str] = ["shapes_unseen", "synthetic"]
    methods: list[str] = ["zeroshot", "tecoa", "pmg_aft", "fare", "tima_iat", "tima_tai", "tima"]
    train: TrainCfg = TrainCfg(epochs=4, batch_size=64, optimizer="sgd", lr=2e-3, momentum=0.9, weight_decay=0.0,
                               lr_step=1000)
    # A method's own optimiser settings over vl.train (FARE's recipe is AdamW: its l2 embedding loss is ~50x
    # the scale of a cross-entropy, which plain SGD at the CE methods' rate does not survive).
    train_overrides: dict[str, dict[str, Any]] = {"fare": {"optimizer": "adamw", "lr": 1e-4, "weight_decay": 1e-4}}
    attack: VLAttackCfg = VLAttackCfg()
    pmg_aft: PMGAFTCfg = PMGAFTCfg()
    tima: TIMACfg = TIMACfg()
    evaluate: VLEvalCfg = VLEvalCfg()
    tune: VLTuneCfg = VLTuneCfg()
    # trained again with vl-tune's best params as <method>_tuned (empty: no search runs); only vl.tune.method
    tuned_methods: list[str] = ["tima"]
    out_dir: str = "models/vl"

    @model_validator(mode="after")
    def _refs(self):
        errors = []
        for name, task in self.tasks.items():
            kind, _, ref = task.source.partition(":")
            if kind == "images" and ref not in self.images:
                errors.append(f"tasks.{name}.source: no vl.images entry {ref!r} (have {sorted(self.images)})")
        for key, names in (("tune_task", [self.tune_task]), ("pretrain.task", [self.pretrain.task]),
                           ("zero_shot_tasks", self.zero_shot_tasks)):
            errors += [f"{key}: no task {n!r} in vl.tasks (have {sorted(self.tasks)})" for n in names
                       if n not in self.tasks]
        errors += [f"methods: unknown {m!r}; allowed values: {list(VL_METHOD_NAMES[1:])}" for m in self.methods
                   if m not in VL_METHOD_NAMES[1:]]
        if self.tune.method not in VL_METHOD_NAMES[2:]:
            errors.append(f"tune.method: {self.tune.method!r} is not a tuned method; allowed values: "
                          f"{list(VL_METHOD_NAMES[2:])}")
        errors += [f"tuned_methods: {m!r} is not vl.tune.method ({self.tune.method!r}), the method the search tunes"
                   for m in self.tuned_methods if m != self.tune.method]
        for key in self.tune.space:
            group, _, field = key.rpartition(".")
            model = getattr(self, group, None) if group else self
            if not isinstance(model, BaseModel) or field not in type(model).model_fields or group in ("tune", "evaluate"):
                errors.append(f"tune.space.{key}: not a key under vl (write e.g. tima.margin or logit_scale)")
        for m in self.train_overrides:
            if m not in VL_METHOD_NAMES[1:]:
                errors.append(f"train_overrides.{m}: not a tuned method (vl.pretrain.train sets clip_pretrain's); "
                              f"allowed values: {list(VL_METHOD_NAMES[1:])}")
            else:
                try:
                    self.train_for(m)
                except ValidationError as err:
                    errors.append(f"train_overrides.{m}: {_format_errors(err, 'vl.train').split(chr(10), 1)[1].strip()}")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @property
    def evaluated(self) -> list[str]:
        """Model folders under vl.out_dir that vl-evaluate reads: every method, then the tuned ones."""
        return [*self.methods, *(f"{m}_tuned" for m in self.tuned_methods)]

    def with_best(self, path: str | Path | None = None) -> dict:
        """vl.tune's best params (a `vl` overrides mapping), read from its best_params.yaml."""
        path = Path(path or self.tune.best_params_file)
        if not path.exists():
            raise ConfigError(f"vl.tuned_methods: {path} not found; run the vl-tune stage first "
                              f"(python -m pipelines.tune --family vl)")
        return yaml.safe_load(path.read_text()) or {}

    def train_for(self, method: str) -> TrainCfg:
        """The training settings of one method: vl.pretrain.train for clip_pretrain, else vl.train under the
        method's train_overrides."""
        if method == "clip_pretrain":
            return self.pretrain.train
        return TrainCfg.model_validate({**self.train.model_dump(), **self.train_overrides.get(method, {})})


# ---------------------------------------------------------------- the whole file
class Params(_Strict):
    generate: GenerateCfg = GenerateCfg()
    spoken: SpokenCfg = SpokenCfg()
    data: DataCfg = DataCfg()
    # The datasets the pipeline runs on (DVC builds every per-dataset stage from these ids); the stage CLIs
    # resolve one of them with `for_dataset`, which sets data.dataset/root and the per-dataset paths.
    datasets: dict[str, DatasetEntry] = {"synthetic": DatasetEntry(dataset="synthetic", root="data/synthetic")}
    extract: ExtractCfg = ExtractCfg()
    train: TrainCfg = TrainCfg()
    tracking: TrackingCfg = TrackingCfg()
    models: dict[str, ModelEntry] = {}
    tune: TuneCfg = TuneCfg()
    # Trained with the tune stage's best params (tune.out_dir/best_params.yaml) under their own overrides.
    tuned_models: dict[str, ModelEntry] = {}
    pretrain: PretrainCfg = PretrainCfg()
    # Models whose `train.model.pretrained` names the pretrain stage's encoders (train-pretrained stage).
    pretrained_models: dict[str, ModelEntry] = {}
    evaluate: EvaluateCfg = EvaluateCfg()
    vl: VLCfg = VLCfg()
    _dataset: Optional[str] = PrivateAttr(None)  # set by for_dataset

    @property
    def dataset_id(self) -> Optional[str]:
        """The `datasets` id these params were resolved for (None: not resolved, paths are the base folders)."""
        return self._dataset

    @property
    def modalities(self) -> list[str]:
        """What the models see: `train.modalities`, else every extracted modality."""
        return list(self.train.modalities or self.extract.modalities)

    @property
    def dataset_name(self) -> str:
        """What runs and measurements are labelled with: the `datasets` id, else (unresolved params) the layout."""
        return self._dataset or self.data.dataset

    def for_dataset(self, name: str | None = None) -> "Params":
        """The params of one dataset: data.dataset/root from its entry, its overrides merged, and every
        output folder one level deeper: <data.out_dir>/<id>, <extract.out_dir>/<id>, <train.out_dir>/<id>,
        <tune.out_dir>/<id>, <pretrain.out_dir>/<id>, <evaluate.out_dir>/datasets/<id>. `name` None: the only
        configured dataset."""
        if self._dataset is not None:
            if name in (None, self._dataset):
                return self
            raise ConfigError(f"datasets.{name}: these params are already those of dataset {self._dataset!r}")
        if name is None:
            if len(self.datasets) != 1:
                raise ConfigError(f"--dataset: {len(self.datasets)} datasets are configured "
                                  f"({', '.join(self.datasets) or 'none'}); name one")
            name = next(iter(self.datasets))
        if name not in self.datasets:
            raise ConfigError(f"datasets.{name}: no such dataset; configured: {sorted(self.datasets)}")
        entry = self.datasets[name]
        raw = deep_merge(self.model_dump(mode="json"), entry.overrides)
        raw["data"].update(dataset=entry.dataset, root=entry.root, out_dir=_join(self.data.out_dir, name))
        for group in ("extract", "train", "tune", "pretrain"):
            raw[group]["out_dir"] = _join(getattr(self, group).out_dir, name)
        raw["evaluate"]["out_dir"] = _join(self.evaluate.out_dir, "datasets", name)
        params = parse_params(raw, f"datasets.{name}.overrides")
        params._dataset = name
        return params

    def as_file_dict(self) -> dict:
        """A params-file mapping that loads back to these params: for params resolved by `for_dataset`, the
        per-dataset folders go back to their base and data.dataset/root back to the `datasets` entry, so that
        `parse_params(d).for_dataset(self.dataset_id)` equals `self` (the overrides merge again, unchanged)."""
        raw = self.model_dump(mode="json")
        del raw["data"]["dataset"], raw["data"]["root"]
        if self._dataset is not None:
            for group in ("data", "extract", "train", "tune", "pretrain"):
                raw[group]["out_dir"] = Path(raw[group]["out_dir"]).parent.as_posix()
            raw["evaluate"]["out_dir"] = Path(raw["evaluate"]["out_dir"]).parents[1].as_posix()
        return raw

    @property
    def all_models(self) -> dict[str, ModelEntry]:
        return {**self.models, **self.tuned_models, **self.pretrained_models}

    def for_model(self, model_id: str, best_params: str | Path | None = None) -> "Params":
        """The params one model trains with: (tuned models: the best params, then) its overrides, train.method set."""
        if model_id not in self.all_models:
            raise ConfigError(f"models.{model_id}: no such model; configured: {sorted(self.all_models)}")
        if model_id in self.pretrained_models:
            return self.for_entry(self.pretrained_models[model_id], f"pretrained_models.{model_id}")
        if model_id not in self.tuned_models:
            return self.for_entry(self.models[model_id], f"models.{model_id}")
        path = Path(best_params or self.tune.best_params_file)
        if not path.exists():
            raise ConfigError(f"tuned_models.{model_id}: {path} not found; run the tune stage first "
                              f"(python -m pipelines.tune)")
        return self.for_entry(self.tuned_models[model_id], f"tuned_models.{model_id}",
                              under=yaml.safe_load(path.read_text()) or {})

    def for_entry(self, entry: ModelEntry, where: str, under: dict | None = None, over: dict | None = None
                  ) -> "Params":
        """Params merged from `under`, then the entry's overrides, then `over`; train.method = the entry's."""
        raw = self.model_dump(mode="json")
        for layer in (under, entry.overrides, over):
            raw = deep_merge(raw, layer or {})
        raw["train"]["method"] = entry.method
        pretrained = raw["train"]["model"]["pretrained"]
        for m, path in pretrained.items():
            if path == PRETRAIN_STAGE:
                pretrained[m] = _join(raw["pretrain"]["out_dir"], f"{m}.pt")
        params = parse_params(raw, f"{where}.overrides")
        params._dataset = self._dataset
        return params

    def pretrain_named(self) -> set[str]:
        """The modalities that some entry of `pretrained_models` loads from the pretrain stage."""
        return {m for entry in self.pretrained_models.values() for m, path in _pretrained_of(entry).items()
                if path == PRETRAIN_STAGE}

    def pretrain_modalities(self) -> list[str]:
        """`pretrain_named` in extraction order: what the pretrain stage trains."""
        named = self.pretrain_named()
        return [m for m in self.extract.modalities if m in named]

    def method_params(self, key: str):
        return getattr(self, key)


def _join(*parts: str) -> str:
    return Path(*parts).as_posix()


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


_FULL: type[Params] | None = None


def params_model() -> type[Params]:
    """Params plus one group per method family of the catalog (crmt, ogm_ge, ...), built once on first use."""
    global _FULL
    if _FULL is None:
        from pydantic import create_model

        fields = {key: (model, model()) for key, model in catalog.GROUPS.items()}
        _FULL = create_model("Params", __base__=Params, **fields)
    return _FULL


def _check_methods(params: Params) -> list[str]:
    errors = []
    if params.train.method not in catalog.PARAMS_KEYS:
        errors.append(f"  train.method: got {params.train.method!r}; allowed values: {sorted(catalog.PARAMS_KEYS)}")
    entries = [(f"models.{k}", e) for k, e in params.models.items()]
    entries += [(f"tuned_models.{k}", e) for k, e in params.tuned_models.items()] + [("tune.base", params.tune.base)]
    entries += [(f"pretrained_models.{k}", e) for k, e in params.pretrained_models.items()]
    for where, entry in entries:
        if entry.method not in catalog.PARAMS_KEYS:
            errors.append(f"  {where}.method: got {entry.method!r}; allowed values: {sorted(catalog.PARAMS_KEYS)}")
            continue
        group = catalog.PARAMS_KEYS[entry.method] or "train"
        if entry.group != group:
            errors.append(f"  {where}.group: method {entry.method!r} reads group {group!r}, got {entry.group!r}")
    errors += _check_datasets(params)
    for mid in sorted(set(params.models) & set(params.tuned_models)):
        errors.append(f"  tuned_models.{mid}: the id is also in models; ids must be unique")
    for mid in sorted((set(params.models) | set(params.tuned_models)) & set(params.pretrained_models)):
        errors.append(f"  pretrained_models.{mid}: the id is also in models or tuned_models; ids must be unique")
    for mid, entry in params.pretrained_models.items():
        if PRETRAIN_STAGE not in _pretrained_of(entry).values():
            errors.append(f"  pretrained_models.{mid}: loads no encoder of the pretrain stage; set "
                          f"overrides.train.model.pretrained.<modality>: {PRETRAIN_STAGE} (or list it in models)")
        model = entry.overrides.get("train", {}).get("model", {})
        changed = [k for k in ("encoder", "width") if k in model and model[k] != getattr(params.train.model, k)]
        if changed:
            errors.append(f"  pretrained_models.{mid}.overrides.train.model: {changed} differ from train.model, "
                          f"with which the pretrain stage trains the encoders it loads")
    # only the train-pretrained stage runs after the pretrain stage (DVC orders stages by their deps)
    elsewhere = [f"models.{k}" for k, e in params.models.items() if PRETRAIN_STAGE in _pretrained_of(e).values()]
    elsewhere += [f"tuned_models.{k}" for k, e in params.tuned_models.items()
                  if PRETRAIN_STAGE in _pretrained_of(e).values()]
    elsewhere += ["train.model.pretrained"] * (PRETRAIN_STAGE in params.train.model.pretrained.values())
    for where in elsewhere:
        errors.append(f"  {where}: loads '{PRETRAIN_STAGE}' encoders; only pretrained_models entries may "
                      f"(their stage runs after the pretrain stage)")
    unknown = sorted(m for m in params.pretrain_named() if m not in params.extract.modalities)
    if unknown:
        errors.append(f"  train.model.pretrained: {unknown} named '{PRETRAIN_STAGE}' but not extracted "
                      f"(extract.modalities: {params.extract.modalities})")
    groups = {params.tune.base.group, "train"}
    for key in params.tune.space:
        group, _, field = key.partition(".")
        model = getattr(params, group, None) if group in groups else None
        if model is None or field not in type(model).model_fields:
            errors.append(f"  tune.space.{key}: not a key of the searched groups {sorted(groups)} "
                          f"(write <group>.<key>, e.g. crmt.rho)")
    return errors


def _pretrained_of(entry: ModelEntry) -> dict:
    return entry.overrides.get("train", {}).get("model", {}).get("pretrained", {})


def _check_datasets(params: Params) -> list[str]:
    import re

    errors = [] if params.datasets else ["  datasets: empty; name at least one dataset"]
    for name, entry in params.datasets.items():
        if not re.match(DATASET_ID, name):
            errors.append(f"  datasets.{name}: ids are lower-case letters, digits and _ (they name stages and folders)")
        ext = entry.overrides.get("extract", {})
        for key in ("frame_modalities", "audio_modalities"):
            extra = [m for m in ext.get(key, []) if m not in getattr(params.extract, key)]
            if extra:
                errors.append(f"  datasets.{name}.overrides.extract.{key}: {extra} not in extract.{key} "
                              f"{getattr(params.extract, key)}; DVC makes one extraction stage per dataset and "
                              f"modality of those lists, a dataset may use fewer")
    return errors


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid parameter(s):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "literal_error":
            msg = f"got {e.get('input')!r}; allowed values: {e['ctx']['expected']}"
        else:
            msg = f"{msg} (got {e.get('input')!r})"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def parse_params(raw: dict | None, source: str = "params") -> Params:
    try:
        params = params_model().model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    errors = _check_methods(params)
    if errors:
        raise ConfigError("\n".join([f"{source}: {len(errors)} invalid parameter(s):", *errors]))
    params.extract.audio.resolved()  # cross-field checks of the audio preset
    return params


def read_yaml(path: str | Path) -> dict:
    """A params file's mapping (empty file: {}); a missing, malformed or misplaced-key file names itself."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of stage groups")
    placed = [k for k in ("dataset", "root") if isinstance((raw or {}).get("data"), dict) and k in raw["data"]]
    if placed:
        raise ConfigError(f"{path}: data.{placed[0]}: datasets are listed under `datasets:` "
                          f"(e.g. datasets: {{ks: {{dataset: ks, root: /data/kinetics-sounds}}}})")
    return raw or {}


def load_params(path: str | Path = "params.yaml") -> Params:
    return parse_params(read_yaml(path), str(Path(path)))
