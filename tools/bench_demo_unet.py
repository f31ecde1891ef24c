"""Cost of a wider first UNet level for the demo model, as a ratio to the shipped width.

The demo model's misses are soft square corners, drawn at the UNet's first level (32x32
latents at 256 px, 32 channels). Before training a wider one (``train_demo_model.py
--unet-first-channels``), this measures what the width costs per image: a 20-step
classifier-free-guided denoising loop (batch 2 through the UNet per step) with fresh weights
of each width, interleaved in one process, median of the repeats. The VAE decode, which does
not change, is timed once and added, so the ratio is per whole image.

    python tools/bench_demo_unet.py --widths 32,48,64 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.train_demo_model import build_unet  # noqa: E402


def denoise_seconds(unet, steps: int, size: int) -> float:
    latents = torch.randn(2, 4, size // 8, size // 8)
    cond = torch.randn(2, 77, unet.config.cross_attention_dim)
    start = time.perf_counter()
    with torch.inference_mode():
        for t in range(steps):
            unet(latents, 999 - 50 * t, encoder_hidden_states=cond)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", default="32,48,64", help="first-level channels to compare; the first is the baseline")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default=str(ROOT / "assets" / "demo-model"), help="for the VAE decode time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    widths = [int(w) for w in args.widths.split(",")]
    unets = {w: build_unet(args.size, 3, 0, w).eval() for w in widths}
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(args.model) / "vae").eval()
    with torch.inference_mode():
        vae.decode(torch.randn(1, 4, args.size // 8, args.size // 8))  # warm-up
        start = time.perf_counter()
        vae.decode(torch.randn(1, 4, args.size // 8, args.size // 8))
        decode = time.perf_counter() - start
    times: dict[int, list[float]] = {w: [] for w in widths}
    for w in widths:
        denoise_seconds(unets[w], 2, args.size)  # warm-up
    for _ in range(args.repeats):
        for w in widths:  # interleaved, so machine noise falls on every width alike
            times[w].append(denoise_seconds(unets[w], args.steps, args.size))
    base = statistics.median(times[widths[0]]) + decode
    report = {"threads": args.threads, "size": args.size, "steps": args.steps, "vae_decode_s": round(decode, 3),
              "widths": {}}
    for w in widths:
        per_image = statistics.median(times[w]) + decode
        report["widths"][w] = {"unet_params": sum(x.numel() for x in unets[w].parameters()),
                               "seconds_per_image": round(per_image, 3), "ratio": round(per_image / base, 3)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
