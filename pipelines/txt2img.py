"""Text to image: the diffusers StableDiffusionPipeline call, with per-step progress and cancel.

The manager hands this a loaded pipeline and a fresh scheduler; nothing here loads or
saves anything, and the images it returns still have to pass the output guard.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

from .progress import JobControl
from .requests import Txt2ImgRequest

log = logging.getLogger(__name__)


def dropped_token_warning(tokenizer, text: str, field: str = "prompt") -> str | None:
    """A warning when ``text`` is longer than the text encoder reads (77 tokens with BOS/EOS)."""
    ids = tokenizer(text, truncation=False, add_special_tokens=True).input_ids
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return None
    dropped = len(ids) - limit
    tail = tokenizer.decode(ids[limit - 1 : -1]).strip()
    return (
        f"{field} is {len(ids) - 2} tokens but the text encoder reads {limit - 2}: "
        f"the last {dropped} were dropped ('{tail[:80]}')"
    )


def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """VAE-decode ``latents`` to PIL images; an all-NaN half-precision decode is retried in fp32.

    Raises:
        FloatingPointError: the latents themselves are not finite, so no image can be made.
    """
    if not torch.isfinite(latents).all():
        raise FloatingPointError(
            "the denoising produced NaN/Inf latents (often fp16 overflow): try --dtype fp32 or bf16"
        )
    vae = pipe.vae
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor
    with torch.no_grad():
        decoded = vae.decode(scaled, return_dict=False)[0]
        if not torch.isfinite(decoded).all() and vae.dtype != torch.float32:
            # SD 1.x VAEs overflow in fp16 on some images; fp32 decoding fixes it.
            log.warning("VAE decode in %s gave NaN; retrying in fp32", vae.dtype)
            decoded = vae_decode_fp32(vae, scaled)
    if not torch.isfinite(decoded).all():
        raise FloatingPointError("the VAE decode produced NaN pixels even in fp32")
    arr = ((decoded.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def vae_decode_fp32(vae, scaled: torch.Tensor) -> torch.Tensor:
    """Decode once in fp32 and put the VAE back in its own dtype."""
    dtype = vae.dtype
    vae.to(torch.float32)
    try:
        return vae.decode(scaled.float(), return_dict=False)[0]
    finally:
        vae.to(dtype)


def run_txt2img(pipe, req: Txt2ImgRequest, *, seeds: list[int], width: int, height: int,
                scheduler_factory, control: JobControl) -> list[Image.Image]:
    """Generate ``batch_count`` batches of ``batch_size`` images; image ``i`` uses ``seeds[i]``.

    Args:
        pipe: a loaded StableDiffusionPipeline (its safety checker is off; the guard runs it).
        seeds: one seed per image.
        scheduler_factory: returns a fresh scheduler for ``req.sampler`` (no state is shared
            between jobs, so multistep samplers start clean every time).
        control: progress, cancel and preview hooks.
    """
    total = req.batch_count * req.steps
    images: list[Image.Image] = []
    for batch in range(req.batch_count):
        batch_seeds = seeds[batch * req.batch_size : (batch + 1) * req.batch_size]
        # CPU generators: the same seed gives the same noise on every device.
        generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
        pipe.scheduler = scheduler_factory()
        done_before = batch * req.steps

        def on_step_end(p, step, timestep, kwargs, done_before=done_before):
            control.report(done_before + step + 1, total)
            if control.preview is not None:
                control.preview(step + 1, req.steps, kwargs["latents"])
            control.check_cancelled()
            return {}

        control.check_cancelled()
        latents = pipe(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance_scale,
            width=width,
            height=height,
            num_images_per_prompt=req.batch_size,
            generator=generators,
            output_type="latent",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        ).images
        images += decode_latents(pipe, latents)
    return images
