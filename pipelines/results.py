"""What every capability returns: guarded images plus what is needed to reproduce them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


@dataclass
class GenerationResult:
    """Images that have passed the output guard, one entry per image in every list.

    Attributes:
        images: the delivered pixels (placeholder where the safety checker blocked one).
        seeds: the seed each image was made with (``None`` for upscales).
        nsfw: whether the safety checker replaced the image.
        metadata: every parameter, the model, library versions and the watermark status.
        files: the guarded PNG files (kept under the output dir, or a delivery folder with --no-save).
        warnings: things the user should know (dropped prompt tokens, skipped watermark).
    """

    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    nsfw: list[bool] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)


class GenerationCancelled(Exception):
    """The user pressed Cancel; raised between denoising steps."""
