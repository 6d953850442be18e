"""Conditioning = the literal keyword arguments of a denoiser network.

A :class:`Cond` holds the kwargs for the conditional branch (``kwargs``) and the same structure for the
unconditional branch (``null``). Model wrappers call ``net(x, timestep, **cond.kwargs)``; a classifier-free
guided step runs ``net(cat([x, x]), cat([t, t]), **cond.with_cfg_batch())`` (order: ``[cond; uncond]``).

Conditioners turn raw inputs into a :class:`Cond`:

* :class:`ClassConditioner` -- integer labels (``class_labels`` of ``UNet2DModel`` /
  ``DiTTransformer2DModel``).
* :class:`TextConditioner` -- prompts, for SD1.5 (``kind="sd"``), SDXL (``"sdxl"``) and SD3 (``"sd3"``)
  models; produces exactly the embeddings of the stock diffusers pipelines' ``encode_prompt``.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..trainers import randomness as rnd

__all__ = ["TEXT_KINDS", "ClassConditioner", "Cond", "TextConditioner", "cat_kwargs"]


# ----------------------------------------------------------------------------------------------------------
# nested-kwargs helpers
# ----------------------------------------------------------------------------------------------------------


def _map_tensors(d: dict, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict:
    """Apply ``fn`` to every tensor of a (one-level nested) kwargs dict; other values are kept."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out[key] = _map_tensors(value, fn)
        elif isinstance(value, torch.Tensor):
            out[key] = fn(value)
        else:
            out[key] = value
    return out


def _zip_tensors(a: dict, b: dict, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prefix: str = "") -> dict:
    """Combine two kwargs dicts of identical structure tensor-by-tensor; non-tensors must be equal."""
    if set(a) != set(b):
        raise ValueError(
            f"conditioning dicts have different keys{' under ' + repr(prefix) if prefix else ''}: "
            f"{sorted(a)} vs {sorted(b)}"
        )
    out = {}
    for key, va in a.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        vb = b[key]
        if isinstance(va, dict) and isinstance(vb, dict):
            out[key] = _zip_tensors(va, vb, fn, name)
        elif isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            out[key] = fn(va, vb)
        elif isinstance(va, (torch.Tensor, dict)) or isinstance(vb, (torch.Tensor, dict)):
            raise TypeError(
                f"conditioning key {name!r} has mismatched types: {type(va).__name__} vs {type(vb).__name__}"
            )
        else:
            if va != vb:
                raise ValueError(
                    f"non-tensor conditioning value {name!r} differs between the two sides: {va!r} vs {vb!r}"
                )
            out[key] = va
    return out


def cat_kwargs(a: dict, b: dict) -> dict:
    """Concatenate two network-kwargs dicts along dim 0 (recursively through nested dicts).

    Tensors are ``torch.cat``-ed; non-tensor values must be equal on both sides (ValueError naming the key).
    """
    return _zip_tensors(a, b, lambda x, y: torch.cat([x, y.to(device=x.device)], dim=0))


def _first_tensor(d: dict | None) -> torch.Tensor | None:
    if not d:
        return None
    for value in d.values():
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, dict):
            found = _first_tensor(value)
            if found is not None:
                return found
    return None


def _row_index(idx: Any, device: torch.device | None = None):
    """Normalise a row selector so that it never drops the batch dimension."""
    if isinstance(idx, bool):
        raise TypeError(f"invalid row index {idx!r}")
    if isinstance(idx, int):
        return [idx]
    if isinstance(idx, torch.Tensor):
        if idx.ndim == 0:
            return idx.reshape(1).to(device) if device is not None else idx.reshape(1)
        return idx.to(device) if device is not None else idx
    return idx


# ----------------------------------------------------------------------------------------------------------
# Cond
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Cond:
    """Network kwargs for the conditional (``kwargs``) and unconditional (``null``) branch.

    Every tensor is batch-first ``(B, ...)``; values may nest one dict level (``added_cond_kwargs``).
    ``null=None`` means classifier-free guidance is impossible (``null_reason`` says why).
    ``batch_size`` is only needed when there is no tensor at all (:meth:`none`).
    """

    kwargs: dict
    null: dict | None = None
    batch_size: int | None = field(default=None, repr=False)
    null_reason: str | None = field(default=None, repr=False)

    @classmethod
    def none(cls, batch_size: int) -> Cond:
        """Conditioning of an unconditional model: no kwargs on either branch."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
            raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
        return cls(kwargs={}, null={}, batch_size=batch_size)

    # -- shape ---------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        t = _first_tensor(self.kwargs)
        if t is None:
            t = _first_tensor(self.null)
        if t is not None:
            return int(t.shape[0])
        if self.batch_size is not None:
            return self.batch_size
        raise ValueError("Cond has no tensor and no batch_size: its length is unknown")

    @property
    def has_null(self) -> bool:
        return self.null is not None

    def _replace(self, kwargs: dict, null: dict | None, batch_size: int | None) -> Cond:
        return Cond(kwargs=kwargs, null=null, batch_size=batch_size, null_reason=self.null_reason)

    # -- moves / selection ---------------------------------------------------------------------------------

    def to(self, device=None, dtype: torch.dtype | None = None) -> Cond:
        """Move every tensor to ``device``; cast floating tensors (only) to ``dtype``."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        null = None if self.null is None else _map_tensors(self.null, move)
        return self._replace(_map_tensors(self.kwargs, move), null, self.batch_size)

    def index(self, idx) -> Cond:
        """Select rows of ``kwargs`` and ``null`` (int, slice, list, integer or boolean tensor)."""
        n = len(self)
        sel = _row_index(idx)
        try:
            probe = torch.arange(n, device=sel.device if isinstance(sel, torch.Tensor) else None)[sel]
        except (IndexError, TypeError) as err:
            raise ValueError(f"invalid row index {idx!r} for a batch of {n}: {err}") from err
        new_bs = int(probe.shape[0])

        def select(t: torch.Tensor) -> torch.Tensor:
            return t[_row_index(idx, t.device if isinstance(idx, torch.Tensor) else None)]

        null = None if self.null is None else _map_tensors(self.null, select)
        return self._replace(_map_tensors(self.kwargs, select), null, new_bs)

    def __getitem__(self, idx) -> Cond:
        return self.index(idx)

    def repeat(self, n: int) -> Cond:
        """Repeat each row ``n`` times consecutively (``repeat_interleave``): rows a, b -> a, a, b, b."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"repeat count must be a positive int, got {n!r}")
        if n == 1:
            return self

        def rep(t: torch.Tensor) -> torch.Tensor:
            return t.repeat_interleave(n, dim=0)

        null = None if self.null is None else _map_tensors(self.null, rep)
        return self._replace(_map_tensors(self.kwargs, rep), null, len(self) * n)

    # -- guidance ------------------------------------------------------------------------------------------

    def _require_null(self, what: str) -> dict:
        if self.null is None:
            reason = self.null_reason or "this conditioning was built without an unconditional (null) input"
            raise ValueError(f"no unconditional branch: cannot {what}; {reason}")
        return self.null

    def uncond(self) -> Cond:
        """The unconditional branch as its own Cond (kwargs = null)."""
        null = self._require_null("build the unconditional Cond")
        return Cond(kwargs=null, null=null, batch_size=len(self))

    def with_cfg_batch(self) -> dict:
        """Kwargs for one batched forward of ``[cond; uncond]`` (``cat(kwargs, null)`` along dim 0)."""
        null = self._require_null("run classifier-free guidance")
        return cat_kwargs(self.kwargs, null)

    def drop(self, p: float, generator: torch.Generator | None = None) -> Cond:
        """Replace each row by its null row with probability ``p`` (label / caption dropout).

        ``null`` is unchanged, so the result can still be guided. ``p=0`` returns ``self``.
        """
        p = float(p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"drop probability must be in [0, 1], got {p!r}")
        if p == 0.0:
            return self
        null = self._require_null("drop conditioning (no null rows to drop to)")
        n = len(self)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        mask = rnd.rand(n, generator=generator, device=gen_device) < p

        def pick(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            if c.shape != u.shape:
                raise ValueError(f"cond and null tensors differ in shape: {tuple(c.shape)} vs {tuple(u.shape)}")
            m = mask.to(c.device).view(n, *([1] * (c.ndim - 1)))
            return torch.where(m, u.to(device=c.device, dtype=c.dtype), c)

        return self._replace(_zip_tensors(self.kwargs, null, pick), null, self.batch_size)

    def drop_mask(self, mask: torch.Tensor) -> Cond:
        """Replace the rows where boolean ``mask`` (B,) is True by null rows."""
        null = self._require_null("drop conditioning (no null rows to drop to)")
        n = len(self)
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (n,):
            raise ValueError(f"drop mask must have shape ({n},), got {tuple(mask.shape)}")

        def pick(c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            m = mask.to(c.device).view(n, *([1] * (c.ndim - 1)))
            return torch.where(m, u.to(device=c.device, dtype=c.dtype), c)

        return self._replace(_zip_tensors(self.kwargs, null, pick), null, self.batch_size)


# ----------------------------------------------------------------------------------------------------------
# class labels
# ----------------------------------------------------------------------------------------------------------


class ClassConditioner:
    """Integer class labels -> ``Cond(kwargs={"class_labels": labels}, null={"class_labels": null_class})``.

    ``null_class`` defaults to ``num_classes`` (the extra "null" embedding row, like DiT's label 1000 on
    ImageNet). ``with_null=False`` builds conditioning without an unconditional branch (CFG impossible).
    """

    def __init__(
        self,
        num_classes: int,
        null_class: int | None = None,
        with_null: bool = True,
        no_null_reason: str | None = None,
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        if with_null:
            null_class = num_classes if null_class is None else null_class
            if isinstance(null_class, bool) or not isinstance(null_class, int) or null_class < 0:
                raise ValueError(f"null_class must be a non-negative int, got {null_class!r}")
            if null_class < num_classes:
                raise ValueError(f"null_class {null_class} collides with a real class (num_classes={num_classes})")
            self.null_class: int | None = null_class
        else:
            if null_class is not None:
                raise ValueError(f"null_class={null_class!r} given together with with_null=False")
            self.null_class = None
        self.no_null_reason = no_null_reason or "this class conditioner has no null class"

    @property
    def supports_cfg(self) -> bool:
        return self.null_class is not None

    @classmethod
    def for_unet2d(cls, unet, num_classes: int | None = None) -> ClassConditioner:
        """From a class-conditional ``UNet2DModel`` (``num_class_embeds`` rows).

        stepdistill's convention (as DiT's): a CFG-capable UNet has one extra "null" row, the last one, so
        ``num_classes=None`` means ``num_class_embeds - 1`` real classes and null class ``num_class_embeds -
        1``. Pass ``num_classes=num_class_embeds`` for a UNet whose rows are all real classes (no null row:
        CFG impossible, and the error says so).
        """
        config = getattr(unet, "config", unet)
        rows = getattr(config, "num_class_embeds", None)
        if rows is None or getattr(config, "class_embed_type", None) is not None:
            raise ValueError(
                f"{type(unet).__name__} is not label-conditional (num_class_embeds={rows!r}, "
                f"class_embed_type={getattr(config, 'class_embed_type', None)!r}); use Cond.none(batch_size)"
            )
        if num_classes is None:
            num_classes = rows - 1 if rows > 1 else rows
        if num_classes == rows:
            return cls(
                rows,
                with_null=False,
                no_null_reason=(
                    f"the UNet's {rows} class embeddings are all real classes (no extra null row to use as "
                    "the unconditional label)"
                ),
            )
        if not 0 < num_classes < rows:
            raise ValueError(f"num_classes={num_classes} does not fit the UNet's num_class_embeds={rows}")
        return cls(num_classes, null_class=num_classes)

    @classmethod
    def for_dit(cls, transformer) -> ClassConditioner:
        """From a ``DiTTransformer2DModel``: ``num_embeds_ada_norm`` classes, null label = that number when
        the label table has the extra CFG row (diffusers always adds it: class dropout 0.1)."""
        config = getattr(transformer, "config", transformer)
        num_classes = getattr(config, "num_embeds_ada_norm", None)
        if num_classes is None:
            raise ValueError(f"{type(transformer).__name__} has no num_embeds_ada_norm: not class-conditional")
        rows = None
        if isinstance(transformer, torch.nn.Module):
            for module in transformer.modules():
                table = getattr(module, "embedding_table", None)
                if isinstance(table, torch.nn.Embedding) and hasattr(module, "num_classes"):
                    rows = table.num_embeddings
                    break
        if rows is not None and rows <= num_classes:
            return cls(
                num_classes,
                with_null=False,
                no_null_reason=(f"the DiT label table has {rows} rows for {num_classes} classes (no null row)"),
            )
        return cls(num_classes, null_class=num_classes)

    def __call__(self, labels) -> Cond:
        labels = torch.as_tensor(labels)
        if labels.ndim == 0:
            labels = labels.reshape(1)
        if labels.ndim != 1:
            raise ValueError(f"class labels must be 1-D (B,), got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
            raise ValueError(f"class labels must be integers, got dtype {labels.dtype}")
        labels = labels.long()
        if labels.numel():
            bad = labels[(labels < 0) | (labels >= self.num_classes)]
            if bad.numel():
                raise ValueError(f"class label {int(bad[0])} outside [0, {self.num_classes})")
        if self.null_class is None:
            return Cond(kwargs={"class_labels": labels}, null=None, null_reason=self.no_null_reason)
        return Cond(kwargs={"class_labels": labels}, null={"class_labels": torch.full_like(labels, self.null_class)})

    def null(self, batch_size: int, device=None) -> Cond:
        """Unconditional conditioning only (all labels = null class), e.g. for unconditional sampling."""
        if self.null_class is None:
            raise ValueError(f"no unconditional branch: {self.no_null_reason}")
        labels = torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)
        return Cond(kwargs={"class_labels": labels}, null={"class_labels": labels.clone()})


# ----------------------------------------------------------------------------------------------------------
# text
# ----------------------------------------------------------------------------------------------------------

TEXT_KINDS = ("sd", "sdxl", "sd3")
_PIPELINE_KINDS = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_SD3_DEFAULT_T5_LENGTH = 256


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class TextConditioner:
    """Prompts -> :class:`Cond` for SD1.5 (``"sd"``), SDXL (``"sdxl"``) and SD3 (``"sd3"``) denoisers.

    Args:
        kind: ``"sd"`` (1 CLIPTextModel), ``"sdxl"`` (CLIPTextModel + CLIPTextModelWithProjection) or
            ``"sd3"`` (2 CLIPTextModelWithProjection + optional T5EncoderModel; pass ``None`` as third
            encoder/tokenizer or leave it out when absent).
        tokenizers, text_encoders: loaded components, in pipeline order.
        resolution: SDXL only (required): ``int`` or ``(height, width)`` in pixels, for ``time_ids``
            ``(h, w, 0, 0, h, w)`` (original size = target size, no crop: the pipeline default).
        max_sequence_length: SD3 T5 sequence length (diffusers' default 256).
        joint_attention_dim: SD3 without T5 only: width of the zero T5 embeddings (the transformer's
            ``config.joint_attention_dim``, 4096 for SD3).
        cache_size: number of prompts whose embeddings are kept (``None``: unlimited, ``0``: no cache).

    Embeddings equal the stock pipelines' ``encode_prompt`` (no clip_skip, default negative prompt): SD null
    = embeddings of ``""``; SDXL null = zeros (``force_zeros_for_empty_prompt``), ``time_ids`` unchanged;
    SD3 null = embeddings of ``""``. Encoders are frozen (eval, ``requires_grad=False``) and run under
    ``no_grad``, once per distinct prompt.
    """

    def __init__(
        self,
        kind: str,
        tokenizers: Sequence,
        text_encoders: Sequence,
        resolution: int | tuple[int, int] | None = None,
        *,
        max_sequence_length: int = _SD3_DEFAULT_T5_LENGTH,
        joint_attention_dim: int | None = None,
        cache_size: int | None = None,
    ):
        if kind not in TEXT_KINDS:
            raise ValueError(f"unknown text conditioner kind {kind!r}; expected one of {TEXT_KINDS}")
        tokenizers = list(tokenizers)
        text_encoders = list(text_encoders)
        if len(tokenizers) != len(text_encoders):
            raise ValueError(f"got {len(tokenizers)} tokenizers but {len(text_encoders)} text encoders")
        expected = {"sd": (1,), "sdxl": (2,), "sd3": (2, 3)}[kind]
        if len(text_encoders) not in expected:
            raise ValueError(
                f"kind {kind!r} needs {' or '.join(map(str, expected))} text encoders, got {len(text_encoders)}"
            )
        if kind == "sd3" and len(text_encoders) == 2:
            tokenizers.append(None)
            text_encoders.append(None)
        for i, (tok, enc) in enumerate(zip(tokenizers, text_encoders)):
            optional = kind == "sd3" and i == 2
            if (tok is None) != (enc is None) or (enc is None and not optional):
                raise ValueError(
                    f"text encoder {i + 1} of kind {kind!r}: tokenizer and encoder must both be given"
                    + (" or both be None" if optional else "")
                )
        self.kind = kind
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        for enc in text_encoders:
            if enc is not None:
                enc.eval()
                enc.requires_grad_(False)

        self.resolution: tuple[int, int] | None = None
        if kind == "sdxl":
            if resolution is None:
                raise ValueError("kind 'sdxl' needs resolution=(height, width) (or an int) for the time_ids")
            self.resolution = self._parse_resolution(resolution)
        elif resolution is not None:
            self.resolution = self._parse_resolution(resolution)

        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
        self.max_sequence_length = max_sequence_length
        self.joint_attention_dim = joint_attention_dim
        if kind == "sd3" and text_encoders[2] is None:
            if joint_attention_dim is None:
                raise ValueError(
                    "kind 'sd3' without a T5 text encoder needs joint_attention_dim (the transformer's "
                    "config.joint_attention_dim, 4096 for SD3) for the zero T5 embeddings"
                )
            clip_width = sum(int(e.config.hidden_size) for e in text_encoders[:2])
            if joint_attention_dim < clip_width:
                raise ValueError(
                    f"joint_attention_dim={joint_attention_dim} is narrower than the concatenated "
                    f"CLIP width {clip_width}"
                )
        if cache_size is not None and (
            isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0
        ):
            raise ValueError(f"cache_size must be None or a non-negative int, got {cache_size!r}")
        self.cache_size = cache_size
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._null: dict[str, torch.Tensor] | None = None

    # -- construction from a pipeline folder ---------------------------------------------------------------

    @staticmethod
    def _parse_resolution(resolution) -> tuple[int, int]:
        if isinstance(resolution, int) and not isinstance(resolution, bool):
            h = w = resolution
        elif isinstance(resolution, (tuple, list)) and len(resolution) == 2:
            h, w = resolution
        else:
            raise ValueError(f"resolution must be an int or (height, width), got {resolution!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
            raise ValueError(f"resolution must be positive ints, got {resolution!r}")
        return int(h), int(w)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        kind: str | None = None,
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        local_files_only: bool | None = None,
        *,
        resolution: int | tuple[int, int] | None = None,
        max_sequence_length: int = _SD3_DEFAULT_T5_LENGTH,
        joint_attention_dim: int | None = None,
        load_t5: bool = True,
        cache_size: int | None = None,
    ) -> TextConditioner:
        """Load the tokenizers / text encoders of a diffusers pipeline folder or hub repo.

        ``kind`` is inferred from ``model_index.json`` when not given. SDXL ``resolution`` defaults to the
        pipeline's default size (``unet.config.sample_size * vae_scale_factor``); SD3's
        ``joint_attention_dim`` is read from ``transformer/config.json``. ``load_t5=False`` skips SD3's T5
        (zeros instead, as diffusers does with ``text_encoder_3=None``).
        """
        source = os.fspath(path_or_hub_id)
        is_local = os.path.isdir(source)
        if not is_local:
            if os.path.exists(source):
                raise FileNotFoundError(f"{source!r} is a file, not a diffusers pipeline folder")
            if not _HUB_ID.match(source):
                raise FileNotFoundError(f"pipeline folder {source!r} does not exist (and is not a hub id 'org/name')")
        hub_kwargs: dict[str, Any] = {}
        if revision is not None:
            hub_kwargs["revision"] = revision
        if local_files_only is not None:
            hub_kwargs["local_files_only"] = local_files_only

        def read_json(filename: str, required: bool) -> dict | None:
            if is_local:
                full = os.path.join(source, filename)
                if not os.path.isfile(full):
                    if required:
                        raise FileNotFoundError(f"{full!r} not found: is {source!r} a diffusers pipeline folder?")
                    return None
            else:
                from huggingface_hub import hf_hub_download

                try:
                    full = hf_hub_download(source, filename, **hub_kwargs)
                except Exception as err:
                    if required:
                        raise FileNotFoundError(
                            f"could not fetch {filename!r} from hub repo {source!r}: {err}"
                        ) from err
                    return None
            with open(full, encoding="utf-8") as f:
                return json.load(f)

        index = read_json("model_index.json", required=True)
        if kind is None:
            class_name = index.get("_class_name")
            kind = _PIPELINE_KINDS.get(class_name)
            if kind is None:
                raise ValueError(
                    f"cannot infer the text conditioner kind of {source!r} from pipeline class "
                    f"{class_name!r}; pass kind= one of {TEXT_KINDS}"
                )
        elif kind not in TEXT_KINDS:
            raise ValueError(f"unknown text conditioner kind {kind!r}; expected one of {TEXT_KINDS}")

        from transformers import (
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5TokenizerFast,
        )

        def present(sub: str) -> bool:
            entry = index.get(sub)
            has_entry = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None
            if is_local:
                return has_entry and os.path.isdir(os.path.join(source, sub))
            return has_entry

        model_kwargs = dict(hub_kwargs)
        if torch_dtype is not None:
            model_kwargs[_dtype_kwarg()] = torch_dtype

        def load(sub: str, model_cls, tok_cls):
            if not present(sub):
                raise FileNotFoundError(f"{source!r} has no {sub!r} component (needed for kind {kind!r})")
            tok_sub = sub.replace("text_encoder", "tokenizer")
            if not present(tok_sub):
                raise FileNotFoundError(f"{source!r} has no {tok_sub!r} component (needed for kind {kind!r})")
            tokenizer = tok_cls.from_pretrained(source, subfolder=tok_sub, **hub_kwargs)
            encoder = model_cls.from_pretrained(source, subfolder=sub, **model_kwargs)
            return tokenizer, encoder

        if kind == "sd":
            specs = [("text_encoder", CLIPTextModel)]
        elif kind == "sdxl":
            specs = [("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)]
        else:
            specs = [
                ("text_encoder", CLIPTextModelWithProjection),
                ("text_encoder_2", CLIPTextModelWithProjection),
            ]
        tokenizers, encoders = [], []
        for sub, model_cls in specs:
            tok, enc = load(sub, model_cls, CLIPTokenizer)
            tokenizers.append(tok)
            encoders.append(enc)
        if kind == "sd3":
            if load_t5 and present("text_encoder_3"):
                tok, enc = load("text_encoder_3", T5EncoderModel, T5TokenizerFast)  # SD3 pipelines' tokenizer_3
            else:
                tok, enc = None, None
            tokenizers.append(tok)
            encoders.append(enc)
            if enc is None and joint_attention_dim is None:
                tcfg = read_json("transformer/config.json", required=False) or {}
                joint_attention_dim = tcfg.get("joint_attention_dim")
                if joint_attention_dim is None:
                    raise ValueError(
                        f"{source!r}: SD3 without T5 needs joint_attention_dim (no transformer config "
                        "found to read it from); pass joint_attention_dim="
                    )
        if kind == "sdxl" and resolution is None:
            ucfg = read_json("unet/config.json", required=False) or {}
            vcfg = read_json("vae/config.json", required=False) or {}
            sample = ucfg.get("sample_size")
            blocks = vcfg.get("block_out_channels")
            if isinstance(sample, int) and blocks:
                resolution = sample * 2 ** (len(blocks) - 1)
            else:
                raise ValueError(f"{source!r}: cannot infer the SDXL resolution (unet/vae configs); pass resolution=")
        return cls(
            kind,
            tokenizers,
            encoders,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
            joint_attention_dim=joint_attention_dim,
            cache_size=cache_size,
        )

    # -- encoding ------------------------------------------------------------------------------------------

    @staticmethod
    def _clip_length(tokenizer, encoder) -> int:
        length = int(tokenizer.model_max_length)
        limit = int(getattr(encoder.config, "max_position_embeddings", length))
        if length > 1_000_000:  # tokenizer without a configured max length
            length = limit
        return length

    def _run_clip(self, i: int, prompts: list[str], max_length: int):
        tokenizer, encoder = self.tokenizers[i], self.text_encoders[i]
        inputs = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        device = _module_device(encoder)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = inputs.attention_mask.to(device)
        return encoder(inputs.input_ids.to(device), attention_mask=mask, output_hidden_states=self.kind != "sd")

    def _encode_rows(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Run the encoders on distinct prompts; returns batch tensors (one row per prompt)."""
        with torch.no_grad():
            if self.kind == "sd":
                enc = self.text_encoders[0]
                out = self._run_clip(0, prompts, self._clip_length(self.tokenizers[0], enc))
                return {"ehs": out[0].to(dtype=_module_dtype(enc))}

            length = self._clip_length(self.tokenizers[0], self.text_encoders[0])
            if self.kind == "sdxl":
                hidden, pooled = [], None
                for i in range(2):
                    out = self._run_clip(i, prompts, length)
                    if pooled is None and out[0].ndim == 2:
                        pooled = out[0]
                    hidden.append(out.hidden_states[-2])
                if pooled is None:
                    raise ValueError(
                        "SDXL needs a pooled text embedding: the second text encoder must be a "
                        f"CLIPTextModelWithProjection, got {type(self.text_encoders[1]).__name__}"
                    )
                ehs = torch.cat(hidden, dim=-1).to(dtype=_module_dtype(self.text_encoders[1]))
                return {"ehs": ehs, "pooled": pooled}

            # sd3
            hidden, pooled = [], []
            for i in range(2):
                out = self._run_clip(i, prompts, length)
                pooled.append(out[0])
                hidden.append(out.hidden_states[-2].to(dtype=_module_dtype(self.text_encoders[0])))
            clip = torch.cat(hidden, dim=-1)
            t5_tok, t5 = self.tokenizers[2], self.text_encoders[2]
            if t5 is None:
                t5_emb = torch.zeros(
                    len(prompts),
                    self.max_sequence_length,
                    int(self.joint_attention_dim),
                    dtype=_module_dtype(self.text_encoders[0]),
                    device=clip.device,
                )
            else:
                ids = t5_tok(
                    prompts,
                    padding="max_length",
                    max_length=self.max_sequence_length,
                    truncation=True,
                    add_special_tokens=True,
                    return_tensors="pt",
                ).input_ids
                t5_emb = t5(ids.to(_module_device(t5)))[0].to(dtype=_module_dtype(t5))
            t5_emb = t5_emb.to(clip.device)
            if clip.shape[-1] > t5_emb.shape[-1]:
                raise ValueError(f"concatenated CLIP width {clip.shape[-1]} exceeds the T5 width {t5_emb.shape[-1]}")
            clip = torch.nn.functional.pad(clip, (0, t5_emb.shape[-1] - clip.shape[-1]))
            return {"ehs": torch.cat([clip, t5_emb], dim=-2), "pooled": torch.cat(pooled, dim=-1)}

    def _rows(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Embedding rows for ``prompts`` (in order), running the encoders only on uncached prompts."""
        use_cache = self.cache_size != 0
        missing = list(dict.fromkeys(p for p in prompts if not (use_cache and p in self._cache)))
        fresh: dict[str, dict[str, torch.Tensor]] = {}
        if missing:
            batch = self._encode_rows(missing)
            for j, prompt in enumerate(missing):
                fresh[prompt] = {k: v[j : j + 1].clone() for k, v in batch.items()}
        rows = []
        for prompt in prompts:
            if prompt in fresh:
                rows.append(fresh[prompt])
            else:
                rows.append(self._cache[prompt])
                self._cache.move_to_end(prompt)
        if use_cache:
            for prompt, row in fresh.items():
                self._cache[prompt] = row
            if self.cache_size is not None:
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return {k: torch.cat([r[k] for r in rows], dim=0) for k in rows[0]}

    def _null_row(self) -> dict[str, torch.Tensor]:
        if self._null is None:
            self._null = self._encode_rows([""])
        return self._null

    def _time_ids(self, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
        h, w = self.resolution
        ids = torch.tensor([h, w, 0, 0, h, w], dtype=dtype, device=device)
        return ids.unsqueeze(0).repeat(batch, 1)

    def encode(self, prompts: str | Sequence[str], device=None) -> Cond:
        """Encode prompts into a :class:`Cond` (batch = number of prompts, duplicates allowed)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("empty prompt list: need at least one prompt")
        for p in prompts:
            if not isinstance(p, str):
                raise TypeError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        n = len(prompts)
        rows = self._rows(prompts)
        ehs = rows["ehs"]
        if self.kind == "sd":
            null_ehs = self._null_row()["ehs"].repeat(n, 1, 1)
            kwargs = {"encoder_hidden_states": ehs}
            null = {"encoder_hidden_states": null_ehs}
        elif self.kind == "sdxl":
            pooled = rows["pooled"]
            time_ids = self._time_ids(n, ehs.dtype, ehs.device)
            kwargs = {
                "encoder_hidden_states": ehs,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
            }
            null = {
                "encoder_hidden_states": torch.zeros_like(ehs),
                "added_cond_kwargs": {"text_embeds": torch.zeros_like(pooled), "time_ids": time_ids.clone()},
            }
        else:
            nrow = self._null_row()
            kwargs = {"encoder_hidden_states": ehs, "pooled_projections": rows["pooled"]}
            null = {
                "encoder_hidden_states": nrow["ehs"].repeat(n, 1, 1),
                "pooled_projections": nrow["pooled"].repeat(n, 1),
            }
        cond = Cond(kwargs=kwargs, null=null)
        return cond.to(device) if device is not None else cond

    __call__ = encode

    def clear_cache(self) -> None:
        """Forget cached prompt embeddings (the null embedding is kept)."""
        self._cache.clear()

    def to(self, device=None, dtype: torch.dtype | None = None) -> TextConditioner:
        """Move the text encoders; cached embeddings are dropped."""
        for enc in self.text_encoders:
            if enc is not None:
                enc.to(device=device, dtype=dtype)
        self._cache.clear()
        self._null = None
        return self

    def offload(self, device="cpu") -> TextConditioner:
        """Move the text encoders AND the cached embeddings to ``device`` (``to()`` drops the cache): once a
        dataset's prompts are encoded, the encoders leave the accelerator and cached prompts cost no encoder
        pass; conditions come back on ``device`` (move them with ``Cond.to``)."""
        for enc in self.text_encoders:
            if enc is not None:
                enc.to(device)
        for prompt, row in list(self._cache.items()):
            self._cache[prompt] = {k: v.to(device) for k, v in row.items()}
        if self._null is not None:
            self._null = {k: v.to(device) for k, v in self._null.items()}
        return self


def _dtype_kwarg() -> str:
    """transformers >= 4.56 takes ``dtype=``; older versions ``torch_dtype=``."""
    import transformers

    try:
        major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    except ValueError:
        return "dtype"
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
