"""Evaluate an x2 upscaler against bicubic and Lanczos on scikit-image's sample colour images.

For each image: crop to even size, downscale 2x with bicubic (PIL, the same degradation
the demo upscaler is trained with), upscale back 2x with each method and compare with the
original on the luminance channel: PSNR and SSIM of ITU-R BT.601 Y (the convention of the
super-resolution literature, e.g. Real-ESRGAN arXiv 2107.10833 and basicsr's metrics),
with a 2-pixel border cropped.

scikit-image's sample images are never used for training (tools/train_demo_upscaler.py
trains on matplotlib's and scikit-learn's); images that need a download are skipped.

    python tools/eval_upscaler.py                           # the bundled demo upscaler
    python tools/eval_upscaler.py --weights RealESRGAN_x2plus.pth --json eval.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.progress import JobControl  # noqa: E402
from pipelines.upscale import DEMO_UPSCALER, SRWeights, Upscaler, load_upscaler  # noqa: E402

log = logging.getLogger("eval_upscaler")

# scikit-image's RGB sample images that ship with the package (``cat`` is ``chelsea``;
# ``logo`` is RGBA artwork). Held out: never used for training.
EVAL_IMAGES = ("astronaut", "chelsea", "coffee", "colorwheel", "hubble_deep_field",
               "immunohistochemistry", "retina", "rocket")
SCALE = 2
CROP_BORDER = 2
METHODS = ("bicubic", "lanczos", "model")


def mod_crop(image: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """Crop (H, W, C) so both sides are multiples of ``scale``."""
    height, width = image.shape[:2]
    return image[: height - height % scale, : width - width % scale]


def bicubic_downscale(image: np.ndarray, scale: int = SCALE) -> np.ndarray:
    """The degradation: PIL bicubic (antialiased) downscale of a uint8 RGB image by ``scale``."""
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width // scale, height // scale), Image.Resampling.BICUBIC))


def resize_up(image: np.ndarray, method: str, scale: int = SCALE) -> np.ndarray:
    """PIL bicubic or Lanczos upscale by ``scale``."""
    resample = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}[method]
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((width * scale, height * scale), resample))


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma (16-235) of uint8 RGB, as float64 in [0, 255] (MATLAB's rgb2ycbcr)."""
    rgb = image.astype(np.float64) / 255.0
    return 16.0 + rgb @ np.array([65.481, 128.553, 24.966])


def luma_psnr_ssim(reference: np.ndarray, test: np.ndarray, crop_border: int = CROP_BORDER) -> tuple[float, float]:
    """(PSNR in dB, SSIM) on the Y channel with ``crop_border`` pixels cut from each side."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a, b = rgb_to_y(reference), rgb_to_y(test)
    if crop_border:
        a = a[crop_border:-crop_border, crop_border:-crop_border]
        b = b[crop_border:-crop_border, crop_border:-crop_border]
    psnr = peak_signal_noise_ratio(a, b, data_range=255.0)
    # Wang et al. 2004's SSIM: 11x11 Gaussian window, sigma 1.5, population covariance.
    ssim = structural_similarity(a, b, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    return float(psnr), float(ssim)


def load_eval_images(names=EVAL_IMAGES) -> dict[str, np.ndarray]:
    """The named scikit-image sample images that load offline, as uint8 RGB."""
    import skimage.data

    images = {}
    for name in names:
        try:
            image = getattr(skimage.data, name)()
        except (ModuleNotFoundError, OSError, ValueError) as exc:  # needs pooch / a download
            log.warning("skipping %s: %s", name, str(exc).splitlines()[0])
            continue
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{name} is not an 8-bit RGB image: {image.shape} {image.dtype}")
        images[name] = image
    return images


def model_upscale(upscaler: Upscaler, low: np.ndarray, tile: int = 0) -> np.ndarray:
    """The upscaler's 2x of uint8 RGB ``low``, as uint8 RGB."""
    outputs, _, _ = upscaler.upscale_rgb([low.astype(np.float32) / 255.0], tile_size=tile, tile_pad=10,
                                         control=JobControl())
    return (np.clip(outputs[0], 0, 1) * 255.0).round().astype(np.uint8)


def evaluate(upscaler: Upscaler, images: dict[str, np.ndarray], tile: int = 0) -> dict:
    """Per-image and mean PSNR/SSIM of bicubic, Lanczos and the model."""
    rows = {}
    for name, image in tqdm(images.items(), desc="evaluating", unit="image"):
        high = mod_crop(image)
        low = bicubic_downscale(high)
        results = {
            "bicubic": resize_up(low, "bicubic"),
            "lanczos": resize_up(low, "lanczos"),
            "model": model_upscale(upscaler, low, tile),
        }
        rows[name] = {m: dict(zip(("psnr", "ssim"), luma_psnr_ssim(high, out))) for m, out in results.items()}
        rows[name]["size"] = f"{high.shape[1]}x{high.shape[0]}"
    mean = {m: {k: float(np.mean([r[m][k] for r in rows.values()])) for k in ("psnr", "ssim")} for m in METHODS}
    return {"images": rows, "mean": mean, "gain_over_bicubic_db": mean["model"]["psnr"] - mean["bicubic"]["psnr"],
            "upscaler": upscaler.describe()}


def markdown_table(report: dict) -> str:
    """The report as a Markdown table (PSNR dB / SSIM on Y)."""
    lines = ["| image | size | bicubic PSNR / SSIM | Lanczos PSNR / SSIM | model PSNR / SSIM | gain vs bicubic |",
             "|---|---|---|---|---|---|"]
    rows = list(report["images"].items()) + [("**mean**", dict(report["mean"], size=""))]
    for name, row in rows:
        cells = [f"{row[m]['psnr']:.2f} / {row[m]['ssim']:.4f}" for m in METHODS]
        gain = row["model"]["psnr"] - row["bicubic"]["psnr"]
        lines.append(f"| {name} | {row['size']} | " + " | ".join(cells) + f" | {gain:+.2f} dB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default=str(DEMO_UPSCALER),
                        help="x2 weights (.pth or .safetensors); default: the bundled demo")
    parser.add_argument("--images", nargs="*", default=list(EVAL_IMAGES), help="scikit-image sample image names")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tile", type=int, default=0, help="tile size (0 = automatic)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--json", help="also write the report as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = Path(args.weights)
    origin = "bundled demo" if path.resolve() == DEMO_UPSCALER.resolve() else "--sr-weights"
    upscaler = load_upscaler(SRWeights(path, origin), args.device)
    report = evaluate(upscaler, load_eval_images(args.images), args.tile)
    sys.stdout.write(f"{report['upscaler']}\n\n{markdown_table(report)}\n\n"
                     f"mean PSNR gain over bicubic: {report['gain_over_bicubic_db']:+.3f} dB\n")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
