"""Tiny, seeded Stable Diffusion 1.x components for tests and benchmarks.

Same classes and layout as Stable Diffusion (UNet2DConditionModel, AutoencoderKL f=8 with
4 latent channels, CLIPTextModel, CLIPTokenizer), a few thousand parameters each, so a
whole pipeline saves, loads and runs 2 steps on a CPU in well under a second. Modelled on
diffusers' ``get_dummy_components()`` in its own pipeline tests.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_WORDS = ("a", "red", "blue", "green", "circle", "square", "on", "background", "photo", "of", "cat")
SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    clip_sample=False, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
)


def get_dummy_components(tokenizer_dir: str | Path, seed: int = 0, sample_size: int = 8) -> dict:
    """Build the components of a tiny StableDiffusionPipeline (native size ``sample_size * 8`` px).

    Args:
        tokenizer_dir: where the tokenizer's vocab.json and merges.txt are written.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .tokenizer_files import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tokenizer_dir, TINY_WORDS))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=sample_size * 8,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer.get_vocab()),
            max_position_embeddings=77,
        )
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": PNDMScheduler.from_config(SD_SCHEDULER),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def save_tiny_pipeline(folder: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny diffusers pipeline folder (safetensors) and return its path."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    components = get_dummy_components(folder / "_tokenizer_src", seed=seed, sample_size=sample_size)
    StableDiffusionPipeline(**components).save_pretrained(folder, safe_serialization=True)
    return folder
