"""The model sizes the GPU check builds and the preflight plan counts: `REAL` (Qwen2.5-VL-7B-Instruct and
FLUX.1-Kontext-dev, from their published config.json files) and `TINY` (the tests' shapes), one `Preset` each, and
the helpers that build them on any device, the meta device included. launch/gpu_check.py and launch/plan.py both
import this module; it imports neither.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from policies.kontext import SCHEDULER as KONTEXT_SCHEDULER
from policies.kontext import TINY_SIZES as KONTEXT_TINY
from policies.kontext import tiny_tokenizers


@dataclass(frozen=True)
class Preset:
    """Every size of the check: `REAL` and `TINY` differ in these numbers only (one code path)."""

    text: dict  # Qwen2_5_VLConfig.text_config of the JRM backbone
    vision: dict  # its vision_config
    min_pixels: int  # the image processor's bounds (Qwen2.5-VL's preprocessor_config.json)
    max_pixels: int
    image_size: int  # side of the JRM's source and edited images
    batch: int  # JRM pairs per forward
    generative_batch: int  # pairs per generate() call
    critique_tokens: int  # tokens per generated critique (min = max new tokens)
    repeats: int  # timed runs of each JRM measurement (median), after one warm-up
    flux: dict  # FluxTransformer2DModel
    vae: dict  # AutoencoderKL
    clip: dict  # CLIPTextConfig
    t5: dict  # T5Config (encoder)
    max_sequence_length: int  # T5 tokens per instruction
    edit_size: int  # side of the policy's source image and edit
    steps: int  # denoising steps of the rollout
    dtype: torch.dtype


REAL = Preset(  # Qwen2.5-VL-7B-Instruct and FLUX.1-Kontext-dev, from their config.json files
    text=dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[16, 24, 24]),
    ),
    vision=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
    min_pixels=3136,
    max_pixels=12845056,
    image_size=512,
    batch=32,
    generative_batch=8,
    critique_tokens=256,
    repeats=3,
    flux=dict(
        in_channels=64,
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=(16, 56, 56),
    ),
    vae=dict(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
    clip=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
    ),
    t5=dict(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
    ),
    max_sequence_length=512,
    edit_size=512,
    steps=8,
    dtype=torch.bfloat16,
)

TINY = (
    Preset(  # the shapes of the tests' tiny models; vocabularies larger than the tiny tokenizers, as the real ones are
        text=dict(
            vocab_size=1024,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]),
        ),
        vision=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=32,
            fullatt_block_indexes=[1],
        ),
        min_pixels=256,
        max_pixels=4096,
        image_size=64,
        batch=4,
        generative_batch=4,
        critique_tokens=8,
        repeats=2,
        flux=KONTEXT_TINY["flux"],
        vae=KONTEXT_TINY["vae"],
        clip=dict(KONTEXT_TINY["clip"], vocab_size=1024),
        t5=dict(KONTEXT_TINY["t5"], vocab_size=128),
        max_sequence_length=32,
        edit_size=32,
        steps=3,
        dtype=torch.float32,
    )
)


@contextlib.contextmanager
def building_on(device: str | torch.device, dtype: torch.dtype):
    """New parameters are made on `device` in `dtype`: a 12B model never exists in float32 or on the CPU."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def kontext_components(preset: Preset, device: str | torch.device) -> dict:
    """FluxKontextPipeline's components at the preset's size with random weights, built on `device`, and the
    offline tiny tokenizers (their token ids are valid in the real vocabularies)."""
    tokenizer, tokenizer_2 = tiny_tokenizers()
    scheduler = FlowMatchEulerDiscreteScheduler(**KONTEXT_SCHEDULER)
    with building_on(device, preset.dtype):
        torch.manual_seed(0)
        clip = CLIPTextConfig(**preset.clip, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
        t5 = T5Config(**preset.t5, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1)
        return {
            "scheduler": scheduler,
            "vae": AutoencoderKL(**preset.vae),
            "text_encoder": CLIPTextModel(clip),
            "tokenizer": tokenizer,
            "text_encoder_2": T5EncoderModel(t5),
            "tokenizer_2": tokenizer_2,
            "transformer": FluxTransformer2DModel(**preset.flux, patch_size=1, guidance_embeds=True),
        }
