"""Export a diffusers SD 1.x pipeline as one ``.safetensors`` file in the original layout.

The original (CompVis/LDM) key layout is what most shared checkpoints use and what
``from_single_file`` reads; diffusers only converts that layout to its own. This module
is the reverse mapping, used by the tests to build a single-file checkpoint and offered to
users as "export as single file":

    python -m pipelines.export MODEL_FOLDER OUT.safetensors
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

RESNET_RENAMES = (  # diffusers -> LDM, inside a UNet ResBlock
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
)


def _rename_resnet(rest: str) -> str:
    for new, old in RESNET_RENAMES:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_original(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet2DConditionModel state dict to LDM's ``model.diffusion_model`` keys.

    LDM numbers blocks flatly: each down level has ``layers_per_block`` input blocks plus one
    downsampler; each up level has ``layers_per_block + 1`` output blocks, the last of which
    also holds the upsampler.
    """
    per_down = layers_per_block + 1
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("time_embedding.linear_1."):
            new = "time_embed.0." + parts[-1]
        elif key.startswith("time_embedding.linear_2."):
            new = "time_embed.2." + parts[-1]
        elif key.startswith("conv_in."):
            new = "input_blocks.0.0." + parts[-1]
        elif key.startswith("conv_norm_out."):
            new = "out.0." + parts[-1]
        elif key.startswith("conv_out."):
            new = "out.2." + parts[-1]
        elif parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "downsamplers":  # down_blocks.L.downsamplers.0.conv.*
                new = f"input_blocks.{per_down * (level + 1)}.0.op." + ".".join(parts[5:])
            else:
                j = int(parts[3])
                index = per_down * level + j + 1
                rest = ".".join(parts[4:])
                new = (f"input_blocks.{index}.0." + _rename_resnet(rest)) if kind == "resnets" else (
                    f"input_blocks.{index}.1." + rest)
        elif parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            if kind == "upsamplers":  # up_blocks.L.upsamplers.0.conv.*
                has_attn = any(k.startswith(f"up_blocks.{level}.attentions.") for k in state)
                index = per_down * level + layers_per_block
                new = f"output_blocks.{index}.{2 if has_attn else 1}.conv." + ".".join(parts[5:])
            else:
                j = int(parts[3])
                index = per_down * level + j
                rest = ".".join(parts[4:])
                new = (f"output_blocks.{index}.0." + _rename_resnet(rest)) if kind == "resnets" else (
                    f"output_blocks.{index}.1." + rest)
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            new = f"middle_block.{0 if j == 0 else 2}." + _rename_resnet(rest) if kind == "resnets" else (
                "middle_block.1." + rest)
        else:
            raise KeyError(f"UNet key {key!r} has no original-layout name")
        out[UNET_PREFIX + new] = value
    return out


VAE_ATTENTION_RENAMES = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers AutoencoderKL state dict to LDM's ``first_stage_model`` keys.

    LDM numbers decoder levels from the lowest resolution up, the reverse of diffusers, and
    stores the mid-block attention projections as 1x1 convolutions.
    """
    num_up = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        new = key
        if parts[1] == "down_blocks":  # encoder.down_blocks.i.resnets.j.* / downsamplers.0.conv.*
            i = parts[2]
            if parts[3] == "resnets":
                new = f"encoder.down.{i}.block.{parts[4]}." + ".".join(parts[5:])
            else:
                new = f"encoder.down.{i}.downsample.conv." + ".".join(parts[6:])
        elif parts[1] == "up_blocks":
            i = num_up - 1 - int(parts[2])
            if parts[3] == "resnets":
                new = f"decoder.up.{i}.block.{parts[4]}." + ".".join(parts[5:])
            else:
                new = f"decoder.up.{i}.upsample.conv." + ".".join(parts[6:])
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
            else:  # attentions.0.<name>
                rest = ".".join(parts[4:])
                for a, b in VAE_ATTENTION_RENAMES:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                        break
                new = f"{parts[0]}.mid.attn_1." + rest
                if value.ndim == 2:
                    value = value[:, :, None, None]
        elif parts[0] in ("encoder", "decoder") and parts[1] in ("conv_norm_out",):
            new = f"{parts[0]}.norm_out." + ".".join(parts[2:])
        new = new.replace("conv_shortcut", "nin_shortcut")
        out[VAE_PREFIX + new] = value
    return out


def pipeline_to_original(pipe) -> dict[str, torch.Tensor]:
    """The whole pipeline's weights (UNet, VAE, text encoder) in the original layout."""
    state = unet_to_original(pipe.unet.state_dict(), pipe.unet.config.layers_per_block)
    state.update(vae_to_original(pipe.vae.state_dict()))
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5 drops the "text_model." level that the original layout keeps.
        name = key if key.startswith("text_model.") else "text_model." + key
        state[TEXT_PREFIX + name] = value
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def export_single_file(pipe, path: str | Path) -> Path:
    """Write ``pipe`` as one ``.safetensors`` checkpoint in the original key layout."""
    from safetensors.torch import save_file

    path = Path(path)
    save_file(pipeline_to_original(pipe), str(path), metadata={"format": "pt", "exported_by": "sdstudio"})
    return path


def main(argv: list[str] | None = None) -> int:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(prog="python -m pipelines.export", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="diffusers pipeline folder")
    parser.add_argument("out", help="output .safetensors file")
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    sys.stdout.write(f"wrote {export_single_file(pipe, args.out)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
