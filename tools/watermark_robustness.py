"""What the invisible watermark survives: measured, not quoted.

Marks a few natural photographs (scikit-learn's sample images, cropped to 512x512) with the
guard's Watermarker, applies each transformation a user or a platform might apply, and
reports how often the exact payload is still decoded and the mean fraction of payload bits
recovered.

    python tools/watermark_robustness.py [--markdown]
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.config import DEFAULT_WATERMARK  # noqa: E402
from pipelines.guard import Watermarker  # noqa: E402


def _reencode(fmt: str, **kwargs) -> Callable[[Image.Image], Image.Image]:
    def apply(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    return apply


def _resize(factor: float) -> Callable[[Image.Image], Image.Image]:
    def apply(image: Image.Image) -> Image.Image:
        w, h = image.size
        return image.resize((int(w * factor), int(h * factor)), Image.Resampling.LANCZOS)

    return apply


def _crop(fraction: float) -> Callable[[Image.Image], Image.Image]:
    def apply(image: Image.Image) -> Image.Image:
        w, h = image.size
        dx, dy = int(w * fraction / 2), int(h * fraction / 2)
        return image.crop((dx, dy, w - dx, h - dy))

    return apply


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "PNG (lossless)": _reencode("PNG"),
    "JPEG quality 90": _reencode("JPEG", quality=90),
    "JPEG quality 75": _reencode("JPEG", quality=75),
    "resize to 50%": _resize(0.5),
    "resize 50% then back to 100%": lambda im: _resize(0.5)(im).resize(im.size, Image.Resampling.LANCZOS),
    "crop 10% off the borders": _crop(0.10),
}


def test_images() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    images = []
    for arr in load_sample_images().images:
        h, w = arr.shape[:2]
        side = min(h, w, 512)
        y, x = (h - side) // 2, (w - side) // 2
        images.append(Image.fromarray(arr[y : y + side, x : x + side]).resize((512, 512)))
    return images


def demo_world_images(n: int = 4) -> list[Image.Image]:
    """Flat-colour scenes like the bundled demo model draws, at 512x512."""
    import random

    from tools.demo_world import random_scene, render

    rng = random.Random(0)
    return [Image.fromarray(render(random_scene(rng), 512, rng)) for _ in range(n)]


def bit_accuracy(decoded: bytes | None, payload: bytes) -> float:
    if not decoded:
        return 0.0
    a = np.unpackbits(np.frombuffer(decoded[: len(payload)].ljust(len(payload), b"\0"), np.uint8))
    b = np.unpackbits(np.frombuffer(payload, np.uint8))
    return float((a == b).mean())


def measure(images: list[Image.Image], payload: str = DEFAULT_WATERMARK) -> dict[str, dict[str, float]]:
    marker = Watermarker(payload)
    images = [marker.apply(im)[0] for im in images]
    table = {}
    for name, transform in TRANSFORMS.items():
        found, bits = [], []
        for image in images:
            out = transform(image)
            decoded = marker.read(out)
            found.append(decoded == marker.payload)
            bits.append(bit_accuracy(decoded, marker.payload))
        table[name] = {"found": float(np.mean(found)), "bits": float(np.mean(bits)), "n": len(images)}
    return table


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    photos, flat = measure(test_images()), measure(demo_world_images())
    print("| after | photos: payload found | photos: bits | demo-world scenes: payload found | demo-world: bits |")
    print("|---|---|---|---|---|")
    for name in TRANSFORMS:
        a, b = photos[name], flat[name]
        print(f"| {name} | {a['found']:.0%} of {a['n']} | {a['bits']:.0%} | {b['found']:.0%} of {b['n']} | {b['bits']:.0%} |")


if __name__ == "__main__":
    main()
