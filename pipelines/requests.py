"""The requests each capability accepts, validated the way diffusers validates inputs.

``check()`` raises ``ValueError`` naming the field and the bad value; it never rounds or
clamps a user's number. The field names are the Gradio API's parameter names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SAMPLERS = ("Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "PLMS", "UniPC", "LMS")
BLEND_MODES = ("uniform", "cosine", "gaussian")
MAX_SEED = 2**32 - 1
MAX_STEPS = 150
MAX_SIDE = 2048
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 16
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 4000


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value: Any, low: int, high: int) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def check_side(name: str, value: Any, low: int, high: int) -> None:
    """A pixel size: a whole multiple of 8 (the VAE's factor) within [low, high]."""
    if not _is_int(value):
        raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")
    if value % 8 or not low <= value <= high:
        raise ValueError(f"{name} must be a multiple of 8 between {low} and {high}, got {value}")


def check_float(name: str, value: Any, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def check_text(name: str, value: Any, required: bool = False) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"{name} must not be empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} must be at most {MAX_PROMPT_CHARS} characters, got {len(value)}")


def check_common(req) -> None:
    """Fields shared by Text to image and Large canvas."""
    check_text("prompt", req.prompt, required=True)
    check_text("negative_prompt", req.negative_prompt)
    if req.sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {req.sampler!r}")
    check_int("steps", req.steps, 1, MAX_STEPS)
    check_float("guidance_scale", req.guidance_scale, 0.0, MAX_GUIDANCE)
    if not _is_int(req.seed) or not (req.seed == -1 or 0 <= req.seed <= MAX_SEED):
        raise ValueError(f"seed must be -1 (random) or a whole number 0-{MAX_SEED}, got {req.seed!r}")


@dataclass(frozen=True)
class Txt2ImgRequest:
    """One Text to image job: ``batch_count`` runs of ``batch_size`` images each.

    ``width``/``height`` of ``None`` mean the model's native size. Image ``i`` gets seed
    ``seed + i``, so any single image can be reproduced alone.
    """

    prompt: str
    negative_prompt: str = ""
    sampler: str = "Euler a"
    steps: int = 30
    guidance_scale: float = 7.5
    width: int | None = None
    height: int | None = None
    seed: int = -1
    batch_size: int = 1
    batch_count: int = 1

    def check(self, max_side: int = MAX_SIDE) -> None:
        check_common(self)
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None:
                check_side(name, value, 64, max_side)
        check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_int("batch_count", self.batch_count, 1, MAX_BATCH_COUNT)


@dataclass(frozen=True)
class CanvasRequest:
    """One Large canvas job (MultiDiffusion). Sizes are pixels; tile and overlap ``None`` = defaults."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "Euler a"
    steps: int = 30
    guidance_scale: float = 7.5
    width: int = 1024
    height: int = 512
    seed: int = -1
    tile_size: int | None = None
    tile_overlap: int | None = None
    blend: str = "cosine"
    tile_batch_size: int = 4

    def check(self, max_side: int = 4096, max_pixels: int = 4096 * 1024) -> None:
        check_common(self)
        check_side("width", self.width, 64, max_side)
        check_side("height", self.height, 64, max_side)
        if self.width * self.height > max_pixels:
            raise ValueError(
                f"canvas of {self.width}x{self.height} = {self.width * self.height} pixels is over the limit of {max_pixels}"
            )
        if self.tile_size is not None:
            check_side("tile_size", self.tile_size, 64, 2048)
        if self.tile_overlap is not None:
            tile = self.tile_size if self.tile_size is not None else 2048
            if not _is_int(self.tile_overlap) or self.tile_overlap % 8 or not 0 <= self.tile_overlap < tile:
                raise ValueError(
                    f"tile_overlap must be a multiple of 8 from 0 to below tile_size ({tile}), got {self.tile_overlap!r}"
                )
        if self.blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)}, got {self.blend!r}")
        check_int("tile_batch_size", self.tile_batch_size, 1, 64)


@dataclass(frozen=True)
class UpscaleRequest:
    """One Upscale 2x job. ``image`` is a PIL image or a path; ``tile_size`` 0 = automatic."""

    image: Any
    tile_size: int = 0
    tile_pad: int = 10

    def check(self) -> None:
        if self.image is None:
            raise ValueError("image is required: upload a PNG, JPEG or WebP file")
        if not _is_int(self.tile_size) or not (self.tile_size == 0 or 32 <= self.tile_size <= 4096):
            raise ValueError(f"tile_size must be 0 (automatic) or 32-4096 pixels, got {self.tile_size!r}")
        check_int("tile_pad", self.tile_pad, 0, 256)
