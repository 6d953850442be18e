"""Tiny, randomly initialised diffusers / transformers components for fast CPU tests.

Everything is built from a config inside this module (no download). Builders seed torch themselves so
that two calls with the same arguments give the same weights. Import from tests as
``from tiny_models import ...`` (pytest puts the tests folder on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import string

import torch

# ----------------------------------------------------------------------------------------------------------
# tokenizers
# ----------------------------------------------------------------------------------------------------------

TOKENIZER_MAX_LENGTH = 16
_LETTERS = string.ascii_lowercase
_CLIP_MERGES = (
    "t h",
    "th e</w>",
    "a n",
    "an d</w>",
    "o f</w>",
    "c a",
    "ca t</w>",
    "d o",
    "do g</w>",
    "r e",
    "e d</w>",
)
_CLIP_SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _clip_vocab() -> dict[str, int]:
    tokens = ["!"] + list(_LETTERS) + [c + "</w>" for c in _LETTERS]
    tokens += [m.replace(" ", "") for m in _CLIP_MERGES]
    tokens += list(_CLIP_SPECIAL)
    return {tok: i for i, tok in enumerate(tokens)}


CLIP_VOCAB_SIZE = len(_clip_vocab())
CLIP_BOS_ID = _clip_vocab()["<|startoftext|>"]
CLIP_EOS_ID = _clip_vocab()["<|endoftext|>"]


def tiny_clip_tokenizer(tmp_dir, pad_token: str = "<|endoftext|>", model_max_length: int = TOKENIZER_MAX_LENGTH):
    """A real ``CLIPTokenizer`` over lowercase letters (+ a few merged words), max length 16.

    ``vocab.json`` / ``merges.txt`` are written to ``tmp_dir``. SD1.5 pads with ``<|endoftext|>``, the second
    SDXL / SD3 tokenizer with ``"!"`` (pass ``pad_token="!"``).
    """
    from transformers import CLIPTokenizer

    os.makedirs(tmp_dir, exist_ok=True)
    vocab_file = os.path.join(str(tmp_dir), "vocab.json")
    merges_file = os.path.join(str(tmp_dir), "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(_clip_vocab(), f)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(_CLIP_MERGES) + "\n")
    return CLIPTokenizer(vocab=vocab_file, merges=merges_file, pad_token=pad_token, model_max_length=model_max_length)


def _t5_vocab() -> list[tuple[str, float]]:
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + c, -2.0) for c in _LETTERS]
    pieces += [(c, -3.0) for c in _LETTERS]
    pieces += [("\u2581the", -1.0), ("\u2581cat", -1.0), ("\u2581dog", -1.0), ("\u2581a", -1.5)]
    # de-duplicate ("\u2581a" appears twice); keep the first score
    seen, out = set(), []
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            out.append((piece, score))
    return out


T5_VOCAB_SIZE = len(_t5_vocab())


def tiny_t5_tokenizer(model_max_length: int = 256):
    """A real (tokenizers-backed) ``T5Tokenizer`` with a tiny unigram vocabulary; pad 0, eos 1, unk 2."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_t5_vocab(), extra_ids=0, model_max_length=model_max_length)


# ----------------------------------------------------------------------------------------------------------
# text encoders
# ----------------------------------------------------------------------------------------------------------


def tiny_clip_text_encoder(
    with_projection: bool = False, hidden_size: int = 32, projection_dim: int = 32, seed: int = 0
):
    """``CLIPTextModel`` (or ``...WithProjection``): 2 layers, 4 heads, the tiny CLIP vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max(TOKENIZER_MAX_LENGTH, 32),
        hidden_act="gelu",
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_t5_encoder(d_model: int = 96, seed: int = 0):
    """``T5EncoderModel`` with 1 layer, 4 heads, vocabulary of ``tiny_t5_tokenizer``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=T5_VOCAB_SIZE,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


# ----------------------------------------------------------------------------------------------------------
# denoisers and VAE
# ----------------------------------------------------------------------------------------------------------


def tiny_unet2d(
    class_conditional: bool = True,
    sample_size: int = 8,
    num_class_embeds: int = 11,
    in_channels: int = 3,
    seed: int = 0,
):
    """Pixel-space ``UNet2DModel`` (8, 16) channels; with ``num_class_embeds`` class embedding rows."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
        num_class_embeds=num_class_embeds if class_conditional else None,
    )


def tiny_sd_unet(
    cross_attention_dim: int = 32, time_cond_proj_dim: int | None = None, sample_size: int = 8, seed: int = 0
):
    """SD1.5-style ``UNet2DConditionModel`` on 4-channel latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=cross_attention_dim,
        time_cond_proj_dim=time_cond_proj_dim,
    )


def tiny_sdxl_unet(
    cross_attention_dim: int = 64,
    text_embeds_dim: int = 32,
    addition_time_embed_dim: int = 8,
    sample_size: int = 8,
    seed: int = 0,
):
    """SDXL-style UNet: ``addition_embed_type="text_time"``; expects ``added_cond_kwargs`` with
    ``text_embeds`` (B, text_embeds_dim) and ``time_ids`` (B, 6)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=text_embeds_dim + 6 * addition_time_embed_dim,
        transformer_layers_per_block=(1, 1),
    )


def tiny_vae(
    latent_channels: int = 4,
    shift_factor: float | None = None,
    scaling_factor: float = 0.18215,
    seed: int = 0,
):
    """``AutoencoderKL`` with 2 blocks (8, 16): spatial factor 2, ``latent_channels`` latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
    )


def tiny_dit(num_classes: int = 4, sample_size: int = 8, in_channels: int = 4, seed: int = 0):
    """``DiTTransformer2DModel`` with learned sigma (out_channels = 2 * in_channels) and ``num_classes``
    classes (+ diffusers' extra null row, index ``num_classes``)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=in_channels,
        out_channels=2 * in_channels,
        num_layers=1,
        norm_num_groups=4,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    )


def tiny_sd3_transformer(
    joint_attention_dim: int = 96, pooled_projection_dim: int = 64, sample_size: int = 8, seed: int = 0
):
    """``SD3Transformer2DModel``: 1 joint block, inner dim 32, context width ``joint_attention_dim`` (the T5
    width; the two 32-wide CLIP encoders give 64, zero-padded to it) and pooled width 32 + 32."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=32,
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=16,
    )


# ----------------------------------------------------------------------------------------------------------
# whole pipelines
# ----------------------------------------------------------------------------------------------------------

_SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def tiny_sd_components(tmp_dir) -> dict:
    """Keys of ``StableDiffusionPipeline`` (minus the safety checker / feature extractor)."""
    from diffusers import DDPMScheduler

    return {
        "unet": tiny_sd_unet(cross_attention_dim=32),
        "vae": tiny_vae(),
        "text_encoder": tiny_clip_text_encoder(with_projection=False, hidden_size=32),
        "tokenizer": tiny_clip_tokenizer(os.path.join(str(tmp_dir), "tokenizer_src")),
        "scheduler": DDPMScheduler(**_SD_BETAS, steps_offset=1, clip_sample=False),
    }


def tiny_sdxl_components(tmp_dir) -> dict:
    """Keys of ``StableDiffusionXLPipeline``: CLIPTextModel (32) + ...WithProjection (32, proj 32)."""
    from diffusers import EulerDiscreteScheduler

    src = os.path.join(str(tmp_dir), "tokenizer_src")
    return {
        "unet": tiny_sdxl_unet(cross_attention_dim=64, text_embeds_dim=32),
        "vae": tiny_vae(),
        "text_encoder": tiny_clip_text_encoder(with_projection=False, hidden_size=32, seed=1),
        "text_encoder_2": tiny_clip_text_encoder(with_projection=True, hidden_size=32, projection_dim=32, seed=2),
        "tokenizer": tiny_clip_tokenizer(src),
        "tokenizer_2": tiny_clip_tokenizer(src, pad_token="!"),
        "scheduler": EulerDiscreteScheduler(**_SD_BETAS, timestep_spacing="leading", steps_offset=1),
    }


def tiny_sd3_components(tmp_dir, with_t5: bool = False) -> dict:
    """Keys of ``StableDiffusion3Pipeline``; ``text_encoder_3`` / ``tokenizer_3`` are None unless ``with_t5``
    (a 96-wide T5 encoder, the transformer's ``joint_attention_dim``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    src = os.path.join(str(tmp_dir), "tokenizer_src")
    return {
        "transformer": tiny_sd3_transformer(joint_attention_dim=96, pooled_projection_dim=64),
        "vae": tiny_vae(shift_factor=0.0609, scaling_factor=1.5305),
        "text_encoder": tiny_clip_text_encoder(with_projection=True, hidden_size=32, projection_dim=32, seed=1),
        "text_encoder_2": tiny_clip_text_encoder(with_projection=True, hidden_size=32, projection_dim=32, seed=2),
        "text_encoder_3": tiny_t5_encoder(d_model=96, seed=3) if with_t5 else None,
        "tokenizer": tiny_clip_tokenizer(src),
        "tokenizer_2": tiny_clip_tokenizer(src, pad_token="!"),
        "tokenizer_3": tiny_t5_tokenizer() if with_t5 else None,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def build_tiny_pipeline(components: dict, pipeline_cls):
    """Instantiate a stock diffusers pipeline from ``tiny_*_components`` (SD: no safety checker)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    kwargs = dict(components)
    if issubclass(pipeline_cls, StableDiffusionPipeline):
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif issubclass(pipeline_cls, StableDiffusionXLPipeline):
        kwargs.setdefault("add_watermarker", False)
    pipe = pipeline_cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_pipeline(components: dict, pipeline_cls, out_dir) -> str:
    """``save_pretrained`` the stock pipeline built from ``components`` into ``out_dir``; returns the path."""
    pipe = build_tiny_pipeline(components, pipeline_cls)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    return str(out_dir)
