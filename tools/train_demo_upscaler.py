"""Train the bundled demo upscaler: a small x2 SRVGGNetCompact (realesrgan's compact network).

Real-ESRGAN_x2plus (Wang et al. 2021, arXiv 2107.10833) is 17M parameters trained for days;
this is a ~79k-parameter network from the same package, trained in minutes on a CPU so the
studio can upscale offline with weights it made itself. The degradation is the classic
one, bicubic 2x downscaling (PIL, antialiased): the network learns to undo it, with an L1
loss (as EDSR, Lim et al. 2017, arXiv 1707.02921) and an EMA of the weights (basicsr's
``params_ema``).

Training data: only the sample images that ship with matplotlib (``mpl-data/sample_data``)
and scikit-learn (``load_sample_images``), at three scales, as random crops with the eight
flips/rotations. scikit-image's sample images are reserved for tools/eval_upscaler.py and
never read here. The right 20% of every training image is held out for the validation
number printed during training.

Seeded; reproducible on the same machine, thread count and library versions.

    python tools/train_demo_upscaler.py                      # full run, writes assets/demo-upscaler
    python tools/train_demo_upscaler.py --smoke --out /tmp/u # same code, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.upscale import DEMO_UPSCALER, SRArchitecture, save_sr_weights  # noqa: E402
from tools.eval_upscaler import bicubic_downscale, luma_psnr_ssim, mod_crop, resize_up  # noqa: E402

log = logging.getLogger("train_demo_upscaler")

DEMO_ARCH = SRArchitecture("SRVGGNetCompact", dict(num_in_ch=3, num_out_ch=3, num_feat=32, num_conv=8, upscale=2,
                                                   act_type="prelu"))
MATPLOTLIB_IMAGES = ("grace_hopper.jpg", "logo2.png", "Minduka_Present_Blue_Pack.png")
HR_SCALES = (1.0, 0.75, 0.5)
HOLDOUT_FRACTION = 0.2


def training_images() -> dict[str, np.ndarray]:
    """matplotlib's and scikit-learn's sample images as uint8 RGB (transparency over white)."""
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    images = {}
    for name in MATPLOTLIB_IMAGES:
        with Image.open(matplotlib.cbook.get_sample_data(name, asfileobj=False)) as im:
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            images[f"matplotlib/{name}"] = np.asarray(Image.alpha_composite(white, im).convert("RGB"))
    samples = load_sample_images()
    for filename, image in zip(samples.filenames, samples.images):
        images[f"sklearn/{Path(filename).name}"] = np.asarray(image, dtype=np.uint8)
    return images


def make_pairs(images: dict[str, np.ndarray], scales=HR_SCALES) -> tuple[list, list]:
    """(train pairs, held-out pairs) of (high, low) uint8 arrays; low = bicubic_downscale(high).

    Each image is also used Lanczos-reduced to 75% and 50% (finer detail per pixel, like
    the photographs users upscale). The right ``HOLDOUT_FRACTION`` of each image is held out.
    """
    train, held_out = [], []
    for image in images.values():
        height, width = image.shape[:2]
        split = int(width * (1 - HOLDOUT_FRACTION))
        for part, bucket in ((image[:, :split], train), (image[:, split:], held_out)):
            for scale in scales:
                h, w = part.shape[:2]
                size = (max(2, round(w * scale)), max(2, round(h * scale)))
                resized = part if scale == 1.0 else np.asarray(
                    Image.fromarray(part).resize(size, Image.Resampling.LANCZOS))
                high = mod_crop(np.ascontiguousarray(resized))
                if min(high.shape[:2]) >= 16:
                    bucket.append((high, bicubic_downscale(high)))
    return train, held_out


def sample_batch(pairs: list, rng: np.random.Generator, batch: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random aligned crops (low ``patch`` px, high 2x) with a random flip/rotation each."""
    weights = np.array([max(0, low.shape[0] - patch + 1) * max(0, low.shape[1] - patch + 1) for _, low in pairs], float)
    choice = rng.choice(len(pairs), size=batch, p=weights / weights.sum())
    lows, highs = [], []
    for index in choice:
        high, low = pairs[index]
        y = int(rng.integers(0, low.shape[0] - patch + 1))
        x = int(rng.integers(0, low.shape[1] - patch + 1))
        lo = low[y:y + patch, x:x + patch]
        hi = high[2 * y:2 * (y + patch), 2 * x:2 * (x + patch)]
        k, flip = int(rng.integers(0, 4)), bool(rng.integers(0, 2))
        lo, hi = np.rot90(lo, k), np.rot90(hi, k)
        if flip:
            lo, hi = lo[:, ::-1], hi[:, ::-1]
        lows.append(np.ascontiguousarray(lo))
        highs.append(np.ascontiguousarray(hi))

    def to_tensor(arrays):
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0

    return to_tensor(lows), to_tensor(highs)


def least_squares_filters(pairs: list, rng: np.random.Generator,
                          samples: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """The best linear 3x3 x2 upsampler for the degradation, by least squares.

    For each of the four output phases (i, j): weights over the 3x3 low-resolution
    neighbourhood (zero-padded, like the network's convolutions) and a bias predicting
    ``high[2y+i, 2x+j] - low[y, x]`` (the network adds the nearest-neighbour upsampling
    itself). Shared across colour channels. Returns (weights (4, 3, 3), bias (4,)).
    """
    rows, targets = [], []
    per_pair = max(1, samples // len(pairs))
    for high, low in pairs:
        lo = low.astype(np.float64) / 255.0
        hi = high.astype(np.float64) / 255.0
        padded = np.pad(lo, ((1, 1), (1, 1), (0, 0)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(0, 1))  # (h, w, c, 3, 3)
        height, width = lo.shape[:2]
        ys = rng.integers(0, height, per_pair)
        xs = rng.integers(0, width, per_pair)
        cs = rng.integers(0, 3, per_pair)
        rows.append(windows[ys, xs, cs].reshape(per_pair, 9))
        phases = [hi[2 * ys + i, 2 * xs + j, cs] - lo[ys, xs, cs] for i in (0, 1) for j in (0, 1)]
        targets.append(np.stack(phases, axis=1))
    a = np.concatenate(rows)
    a = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(a, np.concatenate(targets), rcond=None)
    return solution[:9].T.reshape(4, 3, 3), solution[9]


@torch.no_grad()
def linear_init(network: torch.nn.Module, weights: np.ndarray, bias: np.ndarray) -> None:
    """Start SRVGGNetCompact as the least-squares linear upsampler (it then learns the rest).

    Feature channels 0-2 carry the input unchanged through every layer (identity kernels,
    PReLU slope 1); the last convolution applies the least-squares filters to them and
    starts with zero weight on all other channels. Training from nearest-neighbour
    upsampling instead spends most of a short CPU budget relearning interpolation.
    """
    convs = [m for m in network.body if isinstance(m, torch.nn.Conv2d)]
    prelus = [m for m in network.body if isinstance(m, torch.nn.PReLU)]
    for conv in convs[:-1]:
        conv.weight[:3].zero_()
        conv.bias[:3].zero_()
        for c in range(3):
            conv.weight[c, c, 1, 1] = 1.0
    for prelu in prelus:
        prelu.weight[:3] = 1.0
    last = convs[-1]
    last.weight.zero_()
    last.bias.zero_()
    for c in range(3):
        for phase in range(4):  # PixelShuffle: channel c * 4 + i * 2 + j -> colour c at (2y + i, 2x + j)
            last.weight[c * 4 + phase, c] = torch.from_numpy(weights[phase]).float()
            last.bias[c * 4 + phase] = float(bias[phase])


@torch.no_grad()
def validate(network: torch.nn.Module, pairs: list) -> dict:
    """Mean luma PSNR of the network and of bicubic on the held-out pairs."""
    network.eval()
    model_psnr, bicubic_psnr = [], []
    for high, low in pairs:
        x = torch.from_numpy(np.array(low)).permute(2, 0, 1)[None].float() / 255.0
        out = network(x).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        out = (out * 255.0).round().astype(np.uint8)
        model_psnr.append(luma_psnr_ssim(high, out)[0])
        bicubic_psnr.append(luma_psnr_ssim(high, resize_up(low, "bicubic"))[0])
    network.train()
    return {"model_psnr": float(np.mean(model_psnr)), "bicubic_psnr": float(np.mean(bicubic_psnr)),
            "gain_db": float(np.mean(model_psnr) - np.mean(bicubic_psnr))}


def train(out: Path, *, steps: int, batch: int, patch: int, lr: float, seed: int, threads: int,
          ema_decay: float, validate_every: int) -> dict:
    """Train and write ``out/demo-upscaler-x2.safetensors``; returns the training summary."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    train_pairs, held_out = make_pairs(training_images())
    log.info("%d training pairs, %d held-out pairs", len(train_pairs), len(held_out))

    network = DEMO_ARCH.build()
    linear_init(network, *least_squares_filters(train_pairs, rng))
    log.info("linear start: %s", validate(network, held_out))
    ema = copy.deepcopy(network).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr, betas=(0.9, 0.99))
    # Cosine decay to 1% of the rate (SGDR without restarts, Loshchilov & Hutter 2016, arXiv 1608.03983).
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))

    start = time.time()
    history = []
    progress = tqdm(range(1, steps + 1), desc="training", unit="step", mininterval=10)
    for step in progress:
        low, high = sample_batch(train_pairs, rng, batch, patch)
        loss = F.l1_loss(network(low), high)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))  # warm-up of the EMA, as in diffusers' EMAModel
        with torch.no_grad():
            for e, p in zip(ema.parameters(), network.parameters()):
                e.lerp_(p, 1 - decay)
        progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % validate_every == 0 or step == steps:
            metrics = validate(ema, held_out)
            history.append({"step": step, "loss": float(loss.item()), **metrics})
            log.info("step %d: held-out luma PSNR %.2f dB (bicubic %.2f dB, gain %+.2f dB)",
                     step, metrics["model_psnr"], metrics["bicubic_psnr"], metrics["gain_db"])
    seconds = time.time() - start

    summary = {
        "architecture": json.loads(DEMO_ARCH.to_json()),
        "parameters": sum(p.numel() for p in ema.parameters()),
        "steps": steps, "batch": batch, "patch_low": patch, "lr": lr, "seed": seed, "threads": threads,
        "ema_decay": ema_decay, "train_seconds": round(seconds, 1),
        "data": sorted(training_images()), "hr_scales": list(HR_SCALES),
        "degradation": "PIL bicubic 2x downscale (antialiased)",
        "held_out": history[-1] if history else None,
        "torch": torch.__version__,
    }
    path = save_sr_weights(out / DEMO_UPSCALER.name, ema, DEMO_ARCH, metadata={
        "name": "SD Studio demo upscaler x2", "scale": 2, "trained_by": "tools/train_demo_upscaler.py",
        "steps": steps, "seed": seed, "data": "matplotlib + scikit-learn sample images",
        "degradation": summary["degradation"]})
    (out / "training.json").write_text(json.dumps({"summary": summary, "history": history}, indent=2) + "\n")
    log.info("wrote %s (%.1f kB) in %.0f s", path, path.stat().st_size / 1e3, seconds)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the bundled demo x2 upscaler (SRVGGNetCompact).")
    parser.add_argument("--out", default=str(DEMO_UPSCALER.parent), help="output folder (default assets/demo-upscaler)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--patch", type=int, default=48, help="low-resolution crop size in pixels")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--validate-every", type=int, default=250)
    parser.add_argument("--smoke", action="store_true", help="a few tiny steps (CI): same code, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.smoke:
        args.steps, args.batch, args.patch, args.validate_every = 3, 2, 16, 3
    train(Path(args.out), steps=args.steps, batch=args.batch, patch=args.patch, lr=args.lr, seed=args.seed,
          threads=args.threads, ema_decay=args.ema_decay, validate_every=args.validate_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
