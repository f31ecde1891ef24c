"""What ``train_demo_model.py --bf16`` buys on this machine, as a ratio to float32.

The shipped recipe (``--recipe shipped``) was timed on 2 cores of an EPYC with AVX512-BF16,
where bf16 autocast made a UNet step 0.83x and a VAE step 0.70x of float32's. On a CPU
without native bfloat16 oneDNN emulates it and the same autocast is several times slower
than float32 (the training script then refuses ``--bf16``). This times one training step of
each of the recipe's two costly models (the VAE at stage 1's crop and batch, and the recipe's
UNet at 256 px, batch 24), forward + backward + AdamW, in float32 and under bf16 autocast,
interleaved in one process, median of the repeats; and says whether the CPU has native bf16.

    python tools/bench_train_precision.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tools.train_demo_model import build_unet, build_vae, cpu_has_fast_bf16  # noqa: E402


def step_seconds(model, opt, batch, loss_fn, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
        out = loss_fn(model, batch)
    out.float().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def vae_loss(vae, images):
    posterior = vae.encode(images).latent_dist
    return F.l1_loss(vae.decode(posterior.sample()).sample.float(), images) + 1e-5 * posterior.kl().mean()


def unet_loss(unet, batch):
    latents, t, cond = batch
    return F.mse_loss(unet(latents, t, encoder_hidden_states=cond).sample.float(), latents)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="the UNet's image size (latents are size/8)")
    p.add_argument("--batch", type=int, default=24, help="UNet batch (the recipe's --batch)")
    p.add_argument("--vae-crop", type=int, default=96)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.size % 64 or args.size < 64:
        p.error(f"--size must be a multiple of 64, got {args.size}")
    for name in ("batch", "vae_batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # The recipe's UNet: 64 channels at the first level (two layers there), text-time embedding.
    unet = build_unet(args.size, 3, 0, 64, False, True, 2).train()
    vae = build_vae(args.size).train()
    side = args.size // 8
    images = torch.rand(args.vae_batch, 3, args.vae_crop, args.vae_crop) * 2 - 1
    unet_batch = (torch.randn(args.batch, 4, side, side), torch.randint(0, 1000, (args.batch,)),
                  torch.randn(args.batch, 77, unet.config.cross_attention_dim))
    cases = {  # name: (model, optimiser, batch, loss)
        "vae": (vae, torch.optim.AdamW(vae.parameters(), lr=1e-5), images, vae_loss),
        "unet": (unet, torch.optim.AdamW(unet.parameters(), lr=1e-5), unet_batch, unet_loss),
    }
    times = {(name, bf16): [] for name in cases for bf16 in (False, True)}
    for case in cases.values():  # warm-up, both precisions
        for bf16 in (False, True):
            step_seconds(*case, bf16)
    for _ in range(args.repeats):
        for name, case in cases.items():
            for bf16 in (False, True):  # interleaved, so machine noise falls on both alike
                times[(name, bf16)].append(step_seconds(*case, bf16))
    report = {"threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "native_bf16": cpu_has_fast_bf16(), "steps": {}}
    for name in cases:
        fp32, bf16 = statistics.median(times[(name, False)]), statistics.median(times[(name, True)])
        report["steps"][name] = {"fp32_s": round(fp32, 4), "bf16_s": round(bf16, 4),
                                 "bf16_over_fp32": round(bf16 / fp32, 3)}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
