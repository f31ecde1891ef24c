"""How far classifier-free guidance moves a demo model's clean-image estimate from the truth.

For rendered scenes of the demo world (tools/demo_world.py), encode the image, noise it to
timestep t, and read the model's estimate of the clean latent from one UNet call: with the
prompt, with the empty prompt, and guided (``u + scale * (c - u)``). Where little noise is
left the noisy latent already fixes the picture, so all three should be equally close to the
truth; if the guided one is much further, the model's two branches disagree and guidance
amplifies the disagreement (the wobbly, rounded squares of docs/demo-model-experiments.md,
session 7). Prints the mean squared error of each estimate per timestep, in scaled latent
units, and the guided error as a multiple of the conditional one.

    python tools/guidance_error_demo.py                     # the bundled model
    python tools/guidance_error_demo.py --model /tmp/run --n 24 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.demo_world import COLORS, SHAPES, Scene, render  # noqa: E402

TIMESTEPS = (10, 50, 100, 200, 300, 500, 700, 900)


def clean_estimate(scheduler, noisy: torch.Tensor, pred: torch.Tensor, t: int) -> torch.Tensor:
    """x0 from the UNet's output at timestep t, for either prediction type."""
    alpha = scheduler.alphas_cumprod[t].sqrt()
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return alpha * noisy - sigma * pred
    return (noisy - sigma * pred) / alpha


@torch.no_grad()
def guidance_error(folder: str | Path, n: int = 24, scale: float = 7.5, timesteps=TIMESTEPS,
                   seed: int = 0) -> list[dict]:
    """Per timestep: MSE of the conditional, unconditional and guided clean-latent estimates."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from tools.train_demo_model import token_ids

    folder = Path(folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    size = unet.config.sample_size * 8

    rng = random.Random(seed)
    scenes = []
    for i in range(n):
        color, background = rng.sample(sorted(COLORS), 2)
        scenes.append(Scene(color, SHAPES[i % len(SHAPES)], background, None))
    images = np.stack([render(s, size, rng) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    z0 = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor

    def embed(prompts):
        return text_encoder(token_ids(tokenizer, prompts, "cpu"))[0]

    cond, uncond = embed([s.prompt for s in scenes]), embed([""] * n)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for t in timesteps:
        tt = torch.full((n,), t, dtype=torch.long)
        noisy = scheduler.add_noise(z0, noise, tt)
        pred_c = unet(noisy, tt, encoder_hidden_states=cond).sample
        pred_u = unet(noisy, tt, encoder_hidden_states=uncond).sample
        x0_c = clean_estimate(scheduler, noisy, pred_c, t)
        x0_u = clean_estimate(scheduler, noisy, pred_u, t)
        x0_g = x0_u + scale * (x0_c - x0_u)
        mse = {k: float(((v - z0) ** 2).mean()) for k, v in (("cond", x0_c), ("uncond", x0_u), ("guided", x0_g))}
        rows.append({"t": t, **mse, "guided_over_cond": mse["guided"] / mse["cond"]})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "assets" / "demo-model"), help="a demo-model diffusers folder")
    p.add_argument("--n", type=int, default=24, help="rendered scenes (shapes in turn)")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = guidance_error(args.model, args.n, args.scale, seed=args.seed)
    print(f"| t | conditional | unconditional | guided ({args.scale:g}) | guided / conditional |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['t']} | {r['cond']:.4f} | {r['uncond']:.4f} | {r['guided']:.4f} | {r['guided_over_cond']:.1f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
