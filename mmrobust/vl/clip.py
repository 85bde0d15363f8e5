"""CLIP through Hugging Face `transformers`, from local directories only, and the zero-shot classifier on top.

One loading path for every CLIP: `load_clip(dir)` reads a `save_pretrained` directory (the small CLIP the
pipeline pre-trains, or a user's ViT-B/32) with `local_files_only=True`. `ZeroShotCLIP` turns it into a
classifier over a set of class prompts: logits = s · cos(image embedding, text embedding), images in pixel space
[0, 1] (attack budgets such as l∞ 1/255 are pixel budgets); the CLIP normalisation happens inside.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

PROMPT = "a photo of a {}."
SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")  # <eos> = 3: CLIP pools the text at its first <eos>
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = 100.0  # CLIP clamps its learned temperature at ln 100


@dataclass(frozen=True)
class ImageSpec:
    """What the vision tower expects: side length and the normalisation of its pixel values."""
    size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD


def quiet_transformers() -> None:
    """No download attempts and no progress bars from transformers / huggingface_hub."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def word_tokenizer(words, max_length: int = 16):
    """A word-level tokenizer (lower-cased, split on whitespace and punctuation) over `words`, as a
    `PreTrainedTokenizerFast` that `save_pretrained`/`AutoTokenizer` round-trip; unknown words map to <unk>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in sorted({w.lower() for w in words}):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=max_length)


def prompt_words(texts, prompt: str = PROMPT) -> list[str]:
    """Every word of the prompts made from `texts` (class names) with `prompt`, for `word_tokenizer`."""
    from tokenizers import pre_tokenizers

    split = pre_tokenizers.Whitespace()
    words = set()
    for t in [prompt.format(t) for t in texts] + [prompt.format("")]:
        words.update(w for w, _ in split.pre_tokenize_str(t))
    return sorted(words)


def small_clip(vocab_size: int, image_size: int = 32, patch_size: int = 8, width: int = 64, layers: int = 2,
               heads: int = 2, embed_dim: int = 32, max_length: int = 16, seed: int = 0):
    """A freshly initialised small CLIP (ViT image tower, transformer text tower) for the CPU default."""
    from transformers import CLIPConfig, CLIPModel

    quiet_transformers()
    torch.manual_seed(seed)
    common = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers, num_attention_heads=heads)
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab_size, max_position_embeddings=max_length, pad_token_id=0,
                                      bos_token_id=2, eos_token_id=3, **common),
                     vision_config=dict(image_size=image_size, patch_size=patch_size, **common),
                     projection_dim=embed_dim)
    return CLIPModel(cfg)


def save_clip(clip, tokenizer, image: ImageSpec, path: str | Path) -> Path:
    """`save_pretrained` of model and tokenizer plus the image preprocessing a CLIP processor would read."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(path)
    tokenizer.save_pretrained(path)
    spec = {"image_processor_type": "CLIPImageProcessor", "do_normalize": True, "image_mean": list(image.mean),
            "image_std": list(image.std), "size": {"shortest_edge": image.size},
            "crop_size": {"height": image.size, "width": image.size}}
    (path / "preprocessor_config.json").write_text(json.dumps(spec, indent=2))
    return path


def load_clip(path: str | Path):
    """(CLIPModel, tokenizer, ImageSpec) from a local directory; nothing is downloaded."""
    from transformers import AutoTokenizer, CLIPModel

    quiet_transformers()
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: not a CLIP directory (no config.json); give a `save_pretrained` folder "
                                f"(the vl-pretrain stage writes one, or a downloaded openai/clip-vit-base-patch32)")
    clip = CLIPModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    size = clip.config.vision_config.image_size
    image = ImageSpec(size)
    pre = path / "preprocessor_config.json"
    if pre.exists():
        spec = json.loads(pre.read_text())
        image = ImageSpec(size, tuple(spec.get("image_mean", OPENAI_MEAN)), tuple(spec.get("image_std", OPENAI_STD)))
    return clip, tokenizer, image


class ZeroShotCLIP(nn.Module):
    """A classifier over class prompts: `forward({"visual": x})` or `forward(x)`, x (B, 3, H, W) in [0, 1]."""

    modalities = ["visual"]

    def __init__(self, clip, tokenizer, image: ImageSpec, class_names: list[str], prompt: str = PROMPT,
                 logit_scale: float | None = None):
        super().__init__()
        self.clip, self.tokenizer, self.image, self.prompt = clip, tokenizer, image, prompt
        self.fixed_scale = logit_scale
        self.register_buffer("mean", torch.tensor(image.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image.std).view(1, 3, 1, 1), persistent=False)
        self._text_cache: tuple | None = None
        self.set_classes(class_names)

    def set_classes(self, class_names: list[str]) -> None:
        self.class_names = list(class_names)
        tok = self.tokenizer([self.prompt.format(c) for c in class_names], padding=True, return_tensors="pt")
        device = self.mean.device
        self.register_buffer("input_ids", tok["input_ids"].to(device), persistent=False)
        self.register_buffer("attention_mask", tok["attention_mask"].to(device), persistent=False)
        self._text_cache = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def scale(self) -> torch.Tensor:
        if self.fixed_scale is not None:
            return torch.tensor(float(self.fixed_scale), device=self.mean.device)
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    # ---- embeddings (unnormalised, as CLIP's projections give them)
    def image_embeds(self, x: torch.Tensor, clip=None) -> torch.Tensor:
        clip = clip or self.clip
        if x.shape[-1] != self.image.size or x.shape[-2] != self.image.size:
            x = F.interpolate(x, size=(self.image.size, self.image.size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.image.size)
        pooled = clip.vision_model(pixel_values=(x - self.mean) / self.std).pooler_output
        return clip.visual_projection(pooled)

    def text_embeds(self, clip=None, input_ids=None, attention_mask=None) -> torch.Tensor:
        clip = clip or self.clip
        ids = self.input_ids if input_ids is None else input_ids
        mask = self.attention_mask if attention_mask is None else attention_mask
        return clip.text_projection(clip.text_model(input_ids=ids, attention_mask=mask).pooler_output)

    def class_text(self) -> torch.Tensor:
        """Normalised class text embeddings (K, D); cached while the text tower's weights are unchanged and no
        gradient can flow into them (evaluation and attacks)."""
        text_params = list(self.clip.text_model.parameters()) + list(self.clip.text_projection.parameters())
        trainable = torch.is_grad_enabled() and any(p.requires_grad for p in text_params)
        key = (tuple(p._version for p in text_params), tuple(p.data_ptr() for p in text_params[:1]), self.mean.device)
        if not trainable and self._text_cache is not None and self._text_cache[0] == key:
            return self._text_cache[1]
        t = F.normalize(self.text_embeds(), dim=-1)
        if not trainable:
            self._text_cache = (key, t.detach())
        return t

    def logits(self, image_embeds: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        text = self.class_text() if text is None else text
        return self.scale() * F.normalize(image_embeds, dim=-1) @ text.t()

    def forward(self, inputs) -> torch.Tensor:
        x = inputs["visual"] if isinstance(inputs, dict) else inputs
        return self.logits(self.image_embeds(x))
