"""Live preview: the current latents as a picture, through a cheap linear latent -> RGB map.

A Stable Diffusion 1.x latent has 4 channels at 1/8 of the image size. Each latent pixel
decodes (mostly) to the colour of its 8x8 patch, and that colour is close to an affine
function of the 4 channels, so ``rgb = latents^T @ matrix + bias`` (a 4x3 matrix and a
3-vector) gives a recognisable thumbnail for a few thousand multiply-adds instead of a
VAE decode. The same trick is A1111's "Approx cheap" preview and ComfyUI's
``latent_rgb_factors``; the factors were first fitted by Keturn ("Decoding latents to RGB
without upscaling", discuss.huggingface.co, 2022) by least squares between SD 1.x latents
and the colours of their decoded images.

Factors are a small dict (JSON on disk): ``matrix`` (4 rows of 3), ``bias`` (3), both
acting on latents in the model's space (the VAE mean multiplied by ``scaling_factor``,
which is what the denoising loop holds) and giving RGB in [-1, 1].
``tools/fit_latent_preview.py`` fits them for the bundled demo model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import ASSETS

log = logging.getLogger(__name__)

DEMO_PREVIEW_FACTORS = ASSETS / "demo-model-preview.json"

# SD 1.x latent -> RGB, published-style: the least-squares factors popularised by Keturn
# (2022) and used, with these values to 3 decimals, by A1111's "Approx cheap" previews.
# Rows are latent channels 0-3, columns R, G, B; no bias (SD 1.x latents are near zero-mean).
SD1_FACTORS: dict = {
    "name": "SD 1.x (published-style factors)",
    "matrix": [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ],
    "bias": [0.0, 0.0, 0.0],
}


def load_factors(path: str | Path) -> dict:
    """Read factors written by tools/fit_latent_preview.py and check their shapes.

    Raises:
        ValueError: the file does not hold a 4x3 ``matrix`` and a 3-element ``bias``.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    matrix, bias = np.asarray(data.get("matrix"), dtype=np.float32), np.asarray(data.get("bias"), dtype=np.float32)
    if matrix.shape != (4, 3) or bias.shape != (3,):
        raise ValueError(f"preview factors '{path}' must have a 4x3 matrix and 3 biases, "
                         f"got {matrix.shape} and {bias.shape}")
    return data


def factors_for_model(is_demo: bool, demo_path: Path = DEMO_PREVIEW_FACTORS) -> dict:
    """The demo model's fitted factors when it is the loaded model (and they exist), else SD 1.x's."""
    if is_demo:
        if demo_path.is_file():
            return load_factors(demo_path)
        log.warning("no fitted preview factors at %s; using the SD 1.x factors", demo_path)
    return SD1_FACTORS


def latents_to_preview(latents: torch.Tensor, factors: dict, upscale: int = 8) -> Image.Image:
    """Project (B, 4, h, w) or (4, h, w) latents to one RGB image, ``upscale`` times larger (nearest).

    A batch is laid out side by side. Args:
        factors: ``matrix`` (4x3) and ``bias`` (3), mapping model-space latents to RGB in [-1, 1].
        upscale: 8 gives the generated image's own size for SD 1.x's f=8 VAE.
    """
    if latents.ndim == 3:
        latents = latents[None]
    if latents.ndim != 4 or latents.shape[1] != 4:
        raise ValueError(f"latents must be (B, 4, h, w), got {tuple(latents.shape)}")
    matrix = torch.as_tensor(factors["matrix"], dtype=torch.float32)
    bias = torch.as_tensor(factors["bias"], dtype=torch.float32)
    with torch.no_grad():
        lat = latents.detach().to("cpu", torch.float32)
        rgb = torch.einsum("bchw,cr->bhwr", lat, matrix) + bias  # (B, h, w, 3) in about [-1, 1]
        rgb = ((rgb + 1) * 127.5).clamp_(0, 255).to(torch.uint8)
    batch, h, w, _ = rgb.shape
    tiled = rgb.permute(1, 0, 2, 3).reshape(h, batch * w, 3).numpy()
    image = Image.fromarray(np.ascontiguousarray(tiled))
    if upscale != 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.Resampling.NEAREST)
    return image


def preview_callback(factors: dict, every: int, sink: Callable[[int, int, Image.Image], None]):
    """A ``JobControl.preview`` hook: on every ``every``-th step (and the last), ``sink(step, total, image)``.

    Raises:
        ValueError: ``every`` is below 1.
    """
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"preview_every must be an integer of at least 1, got {every!r}")

    def on_step(step: int, total: int, latents: torch.Tensor) -> None:
        if step % every == 0 or step == total:
            sink(step, total, latents_to_preview(latents, factors))

    return on_step
