"""Differentiable rewards for human-feedback learning (Hyper-SD's HFL stage, ReFL-style).

A reward is any callable ``reward(images, batch) -> scores``: ``images`` (N, C, H, W) floats in [-1, 1] that carry
the student's gradient, ``batch`` the training batch's conditions (``"label"`` (N,) int tensor and / or
``"caption"``, a list of N strings), ``scores`` (N,) floats, higher is better, differentiable w.r.t. ``images``.
A plain ``image -> score`` callable (one argument) is accepted too (:func:`as_reward` wraps it). Reward models are
frozen here (``requires_grad_(False)``, eval mode): the reward's gradient reaches the images only.

Adapters:

* :class:`DigitsLabelReward`: the bundled digits classifier's log-confidence in the requested label,
  log softmax(classifier(x))[label] (<= 0; log 0.99 = -0.01 is 99 % confidence).
* :class:`CLIPSimilarityReward`: cosine of open_clip's image and caption embeddings (the CLIP score's
  ``clip_cosine``), with open_clip's inference transform written in differentiable torch ops.
* :class:`AestheticReward`: a linear head on open_clip's L2-normalised image embedding (the LAION aesthetic
  predictor v1's form: ``sa_0_4_vit_l_14_linear.pth`` is one ``nn.Linear(768, 1)`` with keys weight / bias; save
  them as safetensors to pass the file here).

Weights come from local files (``pretrained``: an open_clip checkpoint file; ``head``: safetensors); an
architecture open_clip does not list can be registered from its JSON config (``model_config``). No download.

:func:`build_reward` makes one from a recipe entry ``{kind: digits | clip | aesthetic, weight, margin, ...}``.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError

KINDS = ("digits", "clip", "aesthetic")


def reward_hinge_loss(scores: torch.Tensor, margin: float) -> torch.Tensor:
    """mean ReLU(margin - r): ReFL's ``F.relu(-rewards + 2).mean()`` (THUDM/ImageReward, margin 2); Hyper-SD's
    L = sum_d E[ReLU(alpha_d - r_d)] (Ren et al. 2024, eq. of its HFL section; margins unpublished)."""
    return F.relu(margin - scores).mean()


def as_reward(fn):
    """``fn`` as a two-argument reward: a callable that takes one required argument (image -> score) is called
    on the images alone."""
    if not callable(fn):
        raise ConfigError(f"reward: expected a callable image -> score, got {type(fn).__name__}")
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
    except (TypeError, ValueError):  # builtins without a signature: call with the images alone
        params = []
    if any(p.kind == p.VAR_POSITIONAL for p in params) or len(params) >= 2:
        return fn
    return _ImageOnly(fn)


class _ImageOnly:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, images, batch=None):
        return self.fn(images)


def freeze(module):
    """A reward / perception model: eval mode, no parameter gradients."""
    if isinstance(module, nn.Module):
        module.eval().requires_grad_(False)
    return module


def _labels(batch, n: int, device) -> torch.Tensor:
    if batch is None or "label" not in batch:
        raise ConfigError("reward: a label reward needs class labels in the batch (a class-conditional dataset)")
    labels = torch.as_tensor(batch["label"]).to(device).long().reshape(-1)
    if len(labels) != n:
        raise ValueError(f"reward: {n} images but {len(labels)} labels")
    return labels


class DigitsLabelReward(nn.Module):
    """log p_classifier(label | x): the bundled digits classifier (or the one at ``path``)'s log-confidence in the
    batch's label. Images (N, 1, H, W) in [-1, 1]."""

    def __init__(self, path=None, classifier=None):
        super().__init__()
        if classifier is None:
            from .eval.fd_digits import load_classifier

            classifier = load_classifier(path)
        self.classifier = freeze(classifier)

    def forward(self, images, batch=None):
        logp = self.classifier(images).float().log_softmax(-1)
        return logp.gather(1, _labels(batch, len(images), logp.device)[:, None])[:, 0]


class DigitsPerception(nn.Module):
    """Hyper-SD's perceptual term on digits: the classifier's task loss (cross-entropy) against the real image's
    ground-truth label; per sample (N,)."""

    def __init__(self, path=None, classifier=None):
        super().__init__()
        self.reward = DigitsLabelReward(path, classifier)

    def forward(self, images, batch=None):
        return -self.reward(images, batch)


# --------------------------------------------------------------------------------------------------------
# open_clip
# --------------------------------------------------------------------------------------------------------


def load_open_clip(model_name: str, pretrained, model_config=None, device="cpu"):
    """(model, tokenizer) of an open_clip architecture with weights from a local file; ``model_config``: a JSON
    open_clip config registered first (its file stem must be ``model_name``)."""
    import open_clip

    from .eval.clip_score import check_clip_weights

    if model_config:
        path = Path(model_config).expanduser()
        if not path.is_file():
            raise ConfigError(f"reward: model_config {str(model_config)!r} does not exist")
        if path.stem != model_name:
            raise ConfigError(f"reward: model_config {path.name!r} registers {path.stem!r}, not model {model_name!r}")
        open_clip.add_model_config(str(path))
    pretrained = check_clip_weights(model_name, pretrained)
    model = open_clip.create_model(model_name, pretrained=pretrained, device=device)
    return freeze(model), open_clip.get_tokenizer(model_name)


class _OpenCLIPImage(nn.Module):
    """open_clip's inference transform (resize of the shortest side, centre crop, mean / std) as torch ops on
    images in [-1, 1], then the L2-normalised image embedding; gradients flow to the images."""

    def __init__(self, model, tokenizer=None):
        super().__init__()
        self.model = freeze(model)
        self.tokenizer = tokenizer
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        self.size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.interpolation = "bicubic" if cfg.get("interpolation", "bicubic") == "bicubic" else "bilinear"
        mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._text_cache: dict[str, torch.Tensor] = {}

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x + 1) / 2
        h, w = x.shape[-2:]
        th, tw = self.size
        scale = max(th / h, tw / w)  # the shortest side to the target side
        nh, nw = max(round(h * scale), th), max(round(w * scale), tw)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode=self.interpolation, align_corners=False, antialias=scale < 1)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x = x[..., top : top + th, left : left + tw].clamp(0, 1)
        return (x - self.mean) / self.std

    def image_embedding(self, images):
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    @torch.no_grad()
    def text_embedding(self, texts) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        if new:
            tokens = self.tokenizer(new).to(self.mean.device)
            for t, e in zip(new, F.normalize(self.model.encode_text(tokens).float(), dim=-1)):
                self._text_cache[t] = e
        return torch.stack([self._text_cache[t] for t in texts])


class CLIPSimilarityReward(_OpenCLIPImage):
    """cos(open_clip image embedding, caption embedding): the batch's captions, or its labels written with
    ``label_template`` (e.g. "a photo of the digit {label}"); ``text_prefix`` is prepended (DMD2: "A photo
    depicts ")."""

    def __init__(self, model, tokenizer, text_prefix: str = "", label_template: str = "{label}"):
        super().__init__(model, tokenizer)
        self.text_prefix, self.label_template = text_prefix, label_template

    @classmethod
    def from_files(cls, model_name, pretrained, model_config=None, device="cpu", **kw):
        return cls(*load_open_clip(model_name, pretrained, model_config, device), **kw)

    def texts(self, batch, n: int) -> list[str]:
        if batch is not None and batch.get("caption") is not None:
            texts = [str(c) for c in batch["caption"]]
        elif batch is not None and "label" in batch:
            texts = [self.label_template.format(label=int(v)) for v in torch.as_tensor(batch["label"]).reshape(-1)]
        else:
            raise ConfigError("reward: the clip reward needs captions or labels in the batch")
        if len(texts) != n:
            raise ValueError(f"reward: {n} images but {len(texts)} captions")
        return [self.text_prefix + t for t in texts]

    def forward(self, images, batch=None):
        img = self.image_embedding(images)
        return (img * self.text_embedding(self.texts(batch, len(images))).to(img)).sum(-1)


class AestheticReward(_OpenCLIPImage):
    """``head(normalize(open_clip image embedding))``, a linear head (LAION aesthetic predictor v1's form): its
    safetensors file holds ``weight`` (1, E) and ``bias`` (1,)."""

    def __init__(self, model, head: nn.Linear):
        super().__init__(model)
        self.head = freeze(head)

    @staticmethod
    def load_head(path) -> nn.Linear:
        from safetensors.torch import load_file

        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise ConfigError(f"reward: aesthetic head {path!r} does not exist (a safetensors file: weight, bias)")
        sd = load_file(path)
        w = sd.get("weight")
        if w is None or w.ndim != 2 or w.shape[0] != 1:
            raise ConfigError(f"reward: aesthetic head {path!r} needs a 'weight' of shape (1, E), got {sorted(sd)}")
        head = nn.Linear(w.shape[1], 1, bias="bias" in sd)
        head.load_state_dict(sd)
        return head

    @classmethod
    def from_files(cls, head, model_name, pretrained, model_config=None, device="cpu"):
        model, _ = load_open_clip(model_name, pretrained, model_config, device)
        return cls(model, cls.load_head(head).to(device))

    def forward(self, images, batch=None):
        emb = self.image_embedding(images)
        if emb.shape[-1] != self.head.in_features:
            raise ConfigError(
                f"reward: the aesthetic head reads {self.head.in_features}-d embeddings; the model gives "
                f"{emb.shape[-1]}-d ones"
            )
        return self.head(emb)[:, 0]


# --------------------------------------------------------------------------------------------------------
# recipe entries
# --------------------------------------------------------------------------------------------------------


@dataclass
class RewardTerm:
    """One reward of the HFL loss: weight * mean ReLU(margin - reward(images, batch))."""

    name: str
    fn: object
    weight: float = 1.0
    margin: float = 0.0

    def loss(self, images, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted hinge loss, the per-sample scores detached)."""
        scores = self.fn(images, batch)
        return self.weight * reward_hinge_loss(scores, self.margin), scores.detach()


ENTRY_KEYS = {
    "digits": {"classifier"},
    "clip": {"model", "pretrained", "model_config", "text_prefix", "label_template"},
    "aesthetic": {"head", "model", "pretrained", "model_config"},
}


def check_entry(entry, index: int = 0) -> tuple[str | None, float, float, dict]:
    """(kind, weight, margin, the other keys) of a recipe entry, checked (a ConfigError names ``rewards[i]``)."""
    key = f"rewards[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{key}: expected a mapping like {{kind: digits, weight: 1.0, margin: 0.0}}, got {entry!r}")
    entry = dict(entry)
    weight, margin = entry.pop("weight", 1.0), entry.pop("margin", 0.0)
    for name, v in (("weight", weight), ("margin", margin)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{key}.{name}: expected a number, got {v!r}")
    if "fn" in entry:
        if len(entry) > 1:
            raise ConfigError(f"{key}: unknown keys {sorted(set(entry) - {'fn'})} beside fn")
        return None, float(weight), float(margin), entry
    kind = entry.pop("kind", None)
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind must be one of {list(KINDS)}, got {kind!r}")
    unknown = set(entry) - ENTRY_KEYS[kind]
    if unknown:
        raise ConfigError(
            f"{key}: unknown keys {sorted(unknown)} for kind {kind} (allowed: {sorted(ENTRY_KEYS[kind])})"
        )
    for k in {"clip": ("model", "pretrained"), "aesthetic": ("head", "model", "pretrained")}.get(kind, ()):
        if not entry.get(k):
            raise ConfigError(f"{key}: kind {kind} needs {k!r}")
    return kind, float(weight), float(margin), entry


def build_reward(entry, device="cpu", index: int = 0) -> RewardTerm:
    """A :class:`RewardTerm` from a recipe entry ``{kind, weight (1), margin (0), ...}``: ``digits`` (optional
    ``classifier`` folder), ``clip`` (``model``, ``pretrained``, optional ``model_config``, ``text_prefix``,
    ``label_template``), ``aesthetic`` (``head``, ``model``, ``pretrained``, optional ``model_config``); or
    ``{fn: <callable>}`` (Python API: any image -> score callable; a module is frozen)."""
    kind, weight, margin, rest = check_entry(entry, index)
    if kind is None:
        fn = rest["fn"]
        return RewardTerm(getattr(fn, "__name__", type(fn).__name__), as_reward(freeze(fn)), weight, margin)
    if kind == "digits":
        fn = DigitsLabelReward(rest.get("classifier"))
    else:
        common = dict(model_config=rest.get("model_config"), device=device)
        if kind == "clip":
            fn = CLIPSimilarityReward.from_files(
                rest["model"],
                rest["pretrained"],
                text_prefix=rest.get("text_prefix", ""),
                label_template=rest.get("label_template", "{label}"),
                **common,
            )
        else:
            fn = AestheticReward.from_files(rest["head"], rest["model"], rest["pretrained"], **common)
    return RewardTerm(kind, fn.to(device), weight, margin)
