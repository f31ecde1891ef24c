"""Fit the live preview's linear latent -> RGB map (pipelines/preview.py) for a model's VAE.

Least squares, as Keturn did for SD 1.x: render demo-world images (tools/demo_world.py),
encode them with the model's VAE (mean, times ``scaling_factor``: the denoising loop's
space), average each image over the 8x8 patch under every latent pixel, and solve
``[latents, 1] @ [matrix; bias] = rgb`` over all latent pixels. Writes JSON with the 4x3
matrix, the bias and the fit error in 0-255 levels (train and held-out).

    python tools/fit_latent_preview.py                          # assets/demo-model -> assets/demo-model-preview.json
    python tools/fit_latent_preview.py --vae /tmp/train/demo-model/vae-stage1 --images 256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.preview import DEMO_PREVIEW_FACTORS, SD1_FACTORS  # noqa: E402
from tools.demo_world import random_scene, render  # noqa: E402

log = logging.getLogger("fit_latent_preview")


def load_vae(path: Path):
    """A diffusers AutoencoderKL from a model folder (its vae/) or a VAE folder."""
    from diffusers import AutoencoderKL

    folder = path / "vae" if (path / "vae").is_dir() else path
    return AutoencoderKL.from_pretrained(folder).eval(), folder


def collect(vae, count: int, size: int, seed: int, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) model-space latent pixels and (N, 3) the mean RGB in [-1, 1] of the patch under each."""
    rng = random.Random(seed)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    xs, ys = [], []
    for start in tqdm(range(0, count, batch), desc="encode"):
        images = np.stack([render(random_scene(rng), size, rng) for _ in range(min(batch, count - start))])
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        patches = torch.nn.functional.avg_pool2d(pixels, factor)
        xs.append(latents.permute(0, 2, 3, 1).reshape(-1, 4).numpy())
        ys.append(patches.permute(0, 2, 3, 1).reshape(-1, 3).numpy())
    return np.concatenate(xs), np.concatenate(ys)


def fit(latents: np.ndarray, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (4x3 matrix, 3 bias) with ``latents @ matrix + bias ~ rgb``."""
    design = np.concatenate([latents, np.ones((len(latents), 1), latents.dtype)], axis=1)
    solution, *_ = np.linalg.lstsq(design.astype(np.float64), rgb.astype(np.float64), rcond=None)
    return solution[:4], solution[4]


def rmse_levels(latents, rgb, matrix, bias) -> float:
    """Root-mean-square error of the projection in 0-255 levels (clamped like the preview)."""
    pred = np.clip(latents @ matrix + bias, -1, 1)
    return float(np.sqrt(np.mean((pred - rgb) ** 2)) * 127.5)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", type=Path, default=ROOT / "assets" / "demo-model",
                   help="model folder (with vae/) or VAE folder (default assets/demo-model)")
    p.add_argument("--out", type=Path, default=DEMO_PREVIEW_FACTORS)
    p.add_argument("--images", type=int, default=192, help="rendered images to fit on (default 192)")
    p.add_argument("--heldout", type=int, default=48, help="further images to report the error on")
    p.add_argument("--size", type=int, default=64, help="image side (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    vae, folder = load_vae(args.vae)
    weights = next(folder.glob("*.safetensors"), None)
    x, y = collect(vae, args.images, args.size, args.seed)
    hx, hy = collect(vae, args.heldout, args.size, args.seed + 1)
    matrix, bias = fit(x, y)
    sd1 = np.asarray(SD1_FACTORS["matrix"]), np.asarray(SD1_FACTORS["bias"])
    report = {
        "name": "demo model (fitted by tools/fit_latent_preview.py)",
        "matrix": [[round(float(v), 6) for v in row] for row in matrix],
        "bias": [round(float(v), 6) for v in bias],
        "space": "model latents (VAE mean x scaling_factor) -> RGB in [-1, 1]",
        "vae": str(folder.relative_to(ROOT)) if folder.is_relative_to(ROOT) else str(folder),
        "vae_weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights else None,
        "images": args.images, "heldout_images": args.heldout, "size": args.size, "seed": args.seed,
        "latent_pixels": int(len(x)),
        "rmse_levels_train": rmse_levels(x, y, matrix, bias),
        "rmse_levels_heldout": rmse_levels(hx, hy, matrix, bias),
        "rmse_levels_heldout_sd1_factors": rmse_levels(hx, hy, *sd1),
        "rmse_levels_heldout_mean_colour": rmse_levels(hx, hy, np.zeros((4, 3)), y.mean(0)),
        "command": "python tools/fit_latent_preview.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: held-out RMSE {report['rmse_levels_heldout']:.1f} levels "
          f"(SD 1.x factors {report['rmse_levels_heldout_sd1_factors']:.1f}, "
          f"mean colour {report['rmse_levels_heldout_mean_colour']:.1f})")
    return report


if __name__ == "__main__":
    main()
