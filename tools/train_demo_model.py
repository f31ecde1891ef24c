"""Train the bundled demo model: a small Stable-Diffusion-format latent diffusion model.

The data is drawn procedurally (tools/demo_world.py): one coloured shape on a plain
background, captioned "a red circle in the top left on a blue background". Training is
in two stages, as for Stable Diffusion itself (Rombach et al. 2022, arXiv 2112.10752):

1. an AutoencoderKL with f=8 and 4 latent channels (reconstruction + a small KL term);
2. a UNet2DConditionModel and a CLIP text encoder, trained together from scratch on the
   frozen autoencoder's latents with the epsilon objective and the SD 1.x noise schedule,
   with 10% empty captions so classifier-free guidance works, Min-SNR loss weighting
   (Hang et al. 2023, arXiv 2303.09556) and an EMA of the weights.

The result is a diffusers folder loaded by exactly the code path that loads Stable
Diffusion. Seeded and reproducible on the same machine and library versions.

    python tools/train_demo_model.py                 # full run, writes assets/demo-model
    python tools/train_demo_model.py --smoke --out /tmp/demo   # same code, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from pipelines.tokenizer_files import write_clip_tokenizer  # noqa: E402
from tools.demo_world import VOCABULARY, random_scene, render  # noqa: E402

log = logging.getLogger("train_demo_model")

# The SD 1.x noise schedule, so every sampler of the studio treats the demo model like SD.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def scheduler_config(prediction_type: str, zero_terminal_snr: bool) -> dict:
    """SD 1.x's schedule, optionally with zero terminal SNR (Lin et al. 2024, arXiv 2305.08891).

    With SD's own schedule the noisiest timestep still shows the picture at
    ``sqrt(alphas_cumprod[999]) = 0.068`` of its amplitude, so a model learns to read the
    layout off the starting noise instead of the prompt, and then places the object wherever
    the noise suggests. Rescaling the betas so the last timestep is pure noise removes that
    shortcut; it needs v-prediction (epsilon is undefined where there is no signal) and
    "trailing" timestep spacing so samplers start at the pure-noise step. Every one of the
    studio's samplers reads these fields from the checkpoint's scheduler config (SD 2.x
    checkpoints use v-prediction the same way).
    """
    if zero_terminal_snr and prediction_type != "v_prediction":
        raise ValueError("zero terminal SNR needs --prediction-type v_prediction (epsilon is undefined at SNR 0)")
    config = dict(SCHEDULER_CONFIG, prediction_type=prediction_type)
    if zero_terminal_snr:
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def build_vae(size: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=size,
    )


def build_text_encoder(vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
        projection_dim=128,
    )
    return CLIPTextModel(config)


def unet_channels(levels: int = 3, first_channels: int = 32) -> tuple[int, ...]:
    """The UNet's channels per level; the first level's width (32x32 latents) is the one knob."""
    if levels not in (3, 4):
        raise ValueError(f"unet levels must be 3 or 4, got {levels}")
    if first_channels < 16 or first_channels % 16:
        raise ValueError(f"unet first-level channels must be a multiple of 16 (the group norm's groups), "
                         f"got {first_channels}")
    return (first_channels, 64, 128, 128)[:levels]


def build_unet(size: int, levels: int = 3, downsample_padding: int = 1, first_channels: int = 32) -> UNet2DConditionModel:
    channels = unet_channels(levels, first_channels)
    # No attention at full latent resolution: 1024-token self-attention would cost more than
    # the rest of the UNet on a CPU; position and colour are carried by cross-attention at
    # 16x16 and 8x8 (and 4x4 with a fourth level, whose bottleneck sees the whole picture).
    return UNet2DConditionModel(
        sample_size=size // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        cross_attention_dim=128,
        attention_head_dim=4,
        norm_num_groups=16,
        downsample_padding=downsample_padding,
    )


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> float NCHW in [-1, 1], as the VAE expects."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def set_cosine_lr(opt: torch.optim.Optimizer, base: float, step: int, total: int) -> None:
    for group in opt.param_groups:
        group["lr"] = base * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))


def train_vae(vae: AutoencoderKL, args, rng: random.Random) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    crop = min(args.vae_crop, args.size)
    vae.train()
    last = {}
    bar = tqdm(range(args.vae_steps), desc="vae", disable=args.quiet)
    for step in bar:
        set_cosine_lr(opt, args.vae_lr, step, args.vae_steps)
        images = []
        for _ in range(args.vae_batch):
            img = render(random_scene(rng), args.size, rng)
            y, x = rng.randrange(args.size - crop + 1), rng.randrange(args.size - crop + 1)
            images.append(img[y : y + crop, x : x + crop])
        batch = to_tensor(images)
        posterior = vae.encode(batch).latent_dist
        # Decode the posterior mean: with flat-colour images, sampling noise at the start
        # of training drowns the latent and the autoencoder learns several times slower.
        # The small KL term still keeps the latent bounded, and latents are rescaled later.
        recon = vae.decode(posterior.mode()).sample
        l1 = (recon - batch).abs().mean()
        mse = F.mse_loss(recon, batch)
        kl = posterior.kl().mean() / (4 * (crop // 8) ** 2)
        loss = l1 + mse + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        last = {"vae_l1": float(l1.detach()), "vae_mse": float(mse.detach()), "vae_kl": float(kl.detach())}
        if step % 20 == 0:
            bar.set_postfix(l1=f"{l1.item():.4f}")
    vae.eval()
    return last


def train_decoder(vae: AutoencoderKL, args) -> dict:
    """Stage 1b: fine-tune the decoder alone, on full-size images and jittered latents.

    Stage 1 trains on crops for a short time; its decoder leaves a frame along the image
    border, washes out the inside of objects (a purple square comes back lilac in the middle,
    which the grader then reads as a thin outline) and bleeds low-contrast pairs such as
    orange on yellow. Like SD's own fine-tuned decoders, this stage keeps the encoder, and
    with it the latent space the UNet is trained in, exactly as it was, so it can run before
    or after stage 2 and be applied to a trained model. The latents get a little Gaussian
    noise (up to ``--decoder-noise`` of their standard deviation) so the decoder also draws
    clean shapes from the slightly-off latents a 20-step sampler ends on.
    """
    rng = random.Random(args.seed + 2)  # its own stream: stage 2's data does not depend on it
    gen = torch.Generator().manual_seed(args.seed + 2)
    device = torch.device(args.device)
    vae.to(device)
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    vae.decoder.train()
    last = {}
    bar = tqdm(range(args.decoder_steps), desc="decoder", disable=args.quiet)
    for step in bar:
        set_cosine_lr(opt, args.decoder_lr, step, args.decoder_steps)
        batch = to_tensor([render(random_scene(rng, position_prob=0.6), args.size, rng)
                           for _ in range(args.decoder_batch)]).to(device)
        with torch.no_grad():
            z = vae.encode(batch).latent_dist.mode()
            sigma = torch.rand((z.shape[0], 1, 1, 1), generator=gen) * args.decoder_noise * z.std().cpu()
            z = z + (sigma * torch.randn(z.shape, generator=gen)).to(device)
        recon = vae.decode(z).sample
        l1 = (recon - batch).abs().mean()
        mse = F.mse_loss(recon, batch)
        loss = l1 + mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        last = {"decoder_l1": float(l1.detach()), "decoder_mse": float(mse.detach())}
        if step % 20 == 0:
            bar.set_postfix(l1=f"{last['decoder_l1']:.4f}")
    for p in vae.parameters():
        p.requires_grad_(False)
    vae.eval().cpu()
    return last


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, args, rng: random.Random) -> tuple[torch.Tensor, list]:
    scenes, latents = [], []
    device = torch.device(args.device)
    vae.to(device)
    bar = tqdm(range(0, args.dataset, 32), desc="encode", disable=args.quiet)
    for start in bar:
        n = min(32, args.dataset - start)
        batch_scenes = [random_scene(rng, position_prob=0.6) for _ in range(n)]
        images = [render(s, args.size, rng) for s in batch_scenes]
        latents.append(vae.encode(to_tensor(images).to(device)).latent_dist.mean.cpu())
        scenes += batch_scenes
    vae.cpu()
    return torch.cat(latents), scenes


@torch.no_grad()
def heldout_reconstruction_error(vae: AutoencoderKL, args) -> float:
    """Mean absolute error, in 0-255 levels, of full-size reconstructions of unseen scenes."""
    rng = random.Random(args.seed + 1)
    images = [render(random_scene(rng), args.size, rng) for _ in range(8)]
    batch = to_tensor(images)
    recon = vae.decode(vae.encode(batch).latent_dist.mode()).sample.clamp(-1, 1)
    err = float(((recon - batch).abs() * 127.5).mean())
    log.info("VAE held-out reconstruction error: %.2f levels", err)
    return err


def caption(scene, rng: random.Random, drop_prob: float) -> str:
    if rng.random() < drop_prob:
        return ""  # unconditional, for classifier-free guidance
    if scene.position is not None and rng.random() < 0.25:
        # A positioned object is also a valid picture of the position-free prompt.
        return type(scene)(scene.color, scene.shape, scene.background, None).prompt
    return scene.prompt


def min_snr_weights(scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights (arXiv 2303.09556, eq. 8) for the scheduler's prediction type.

    For epsilon, ``min(SNR, gamma) / SNR``. For v-prediction the v loss already equals
    ``(SNR + 1)`` times the epsilon loss, so the weight is ``min(SNR + 1, gamma) / (SNR + 1)``:
    1 at high noise (where SNR may be exactly 0 under zero terminal SNR) and capped at low noise.
    """
    alphas_cumprod = scheduler.alphas_cumprod[timesteps.cpu()].to(timesteps.device)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    if scheduler.config.prediction_type == "v_prediction":
        return torch.clamp(snr + 1, max=gamma) / (snr + 1)
    return torch.clamp(snr, max=gamma) / snr


def low_frequency_noise(shape, generator: torch.Generator, strengths: tuple[float, ...]) -> torch.Tensor:
    """Gaussian noise plus coarse noise at 1x1, 2x2, 4x4, ... upsampled to the latent size.

    Plain white noise hides a flat-colour picture badly: at t=951, where a 20-step DDIM run
    starts, the image still shows through as ``sqrt(alphas_cumprod) = 0.09`` of its mean,
    which 32x32 latent pixels of noise average down only to a standard deviation of 0.03.
    A model trained that way reads the background colour (and coarse layout) off the noise
    and never learns them from the prompt: the first bundled model followed the prompt's
    background in 19% of images. Per-image offset noise (Guttenberg 2023, "Diffusion with
    offset noise") and coarser pyramid levels hide those low frequencies at high noise
    levels, so only the prompt can tell them. Sampling still starts from white noise.
    """
    b, c, h, w = shape
    noise = torch.randn(shape, generator=generator)
    for level, strength in enumerate(strengths):
        side = 2**level
        if strength <= 0 or side > min(h, w):
            continue
        coarse = torch.randn((b, c, side, side), generator=generator)
        mode = "nearest" if side == 1 else "bilinear"
        kwargs = {} if side == 1 else {"align_corners": False}
        noise = noise + strength * F.interpolate(coarse, size=(h, w), mode=mode, **kwargs)
    return noise


def sample_timesteps(n: int, num_train_timesteps: int, high_frac: float, generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, with a fraction ``high_frac`` drawn from the noisiest 30% instead.

    Composition (where the object goes, which colour fills the background) is decided in the
    first sampling steps, at high noise, and only there does the prompt carry information the
    noisy latent does not. With the epsilon objective those timesteps also weigh little in the
    loss (an error in the predicted image counts ``SNR`` times as much as one in epsilon), so
    the model sees more of them instead.
    """
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    high = torch.rand(n, generator=generator) < high_frac
    t_high = torch.randint(int(0.7 * num_train_timesteps), num_train_timesteps, (n,), generator=generator)
    return torch.where(high, t_high, t)


def train_diffusion(unet, text_encoder, tokenizer, latents, scenes, args, rng: random.Random) -> dict:
    scheduler = DDPMScheduler.from_config(args.scheduler_config)
    device = torch.device(args.device)
    unet.to(device)
    text_encoder.to(device)
    latents = latents.to(device)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in list(ema_unet.parameters()) + list(ema_text.parameters()):
        p.requires_grad_(False)
    unet.train()
    text_encoder.train()
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, min(200, args.unet_steps // 10))
    losses: list[torch.Tensor] = []
    bar = tqdm(range(args.unet_steps), desc="unet+text", disable=args.quiet)
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(scenes), (args.batch,), generator=gen)
        x0 = latents[idx.to(device)] * args.scaling_factor
        prompts = [caption(scenes[int(i)], rng, args.uncond_prob) for i in idx]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        # Noise and timesteps come from the CPU generator on every device, so a GPU run
        # draws the same batches as a CPU run of the same command.
        noise = low_frequency_noise(x0.shape, gen, args.low_freq_noise).to(device)
        t = sample_timesteps(args.batch, scheduler.config.num_train_timesteps, args.high_noise_frac, gen).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        cond = text_encoder(ids)[0]
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        per_sample = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(scheduler, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_m, m in ((ema_unet, unet), (ema_text, text_encoder)):
                torch._foreach_lerp_(list(ema_m.parameters()), list(m.parameters()), 1 - decay)
        losses.append(loss.detach())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(torch.stack(losses[-100:]).mean()):.4f}")
    unet.load_state_dict(ema_unet.state_dict())
    text_encoder.load_state_dict(ema_text.state_dict())
    unet.cpu()
    text_encoder.cpu()
    return {"diffusion_loss_last100": float(torch.stack(losses[-100:]).mean())}


def write_model_card(out: Path, args, stats: dict, counts: dict) -> None:
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    metrics = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in stats.items())
    schedule = "SD 1.x noise schedule" + (
        ", rescaled to zero terminal SNR" if args.zero_terminal_snr else "") + f", {args.prediction_type}"
    snr_flag = "--zero-terminal-snr" if args.zero_terminal_snr else "--no-zero-terminal-snr"
    card = f"""# SD Studio demo model

A small text-to-image latent diffusion model in the Stable Diffusion 1.x diffusers format
(UNet2DConditionModel, AutoencoderKL with f=8 and 4 latent channels, CLIP text encoder and
tokenizer, {schedule}), trained from scratch by this project on procedurally
drawn images. It draws one object (circle, square, triangle) in one of eight colours on a
plain background of another colour, optionally at a named position:

    a red circle in the top left on a blue background

It exists so the studio works offline and in CI. It is not Stable Diffusion and knows
nothing outside this world. No safety checker applies to it: its world has no people.

## Architecture

| component | parameters |
|---|---|
""" + "\n".join(f"| {k} | {v:,} |" for k, v in counts.items()) + f"""

Native size {args.size}x{args.size} px ({args.size // 8}x{args.size // 8} latents), a {args.unet_levels}-level UNet. Weights in safetensors,
{size_mb:.1f} MB in all.

## Training

    python tools/train_demo_model.py --seed {args.seed} --vae-steps {args.vae_steps} --unet-steps {args.unet_steps} --dataset {args.dataset} --batch {args.batch} --low-freq-noise {",".join(f"{v:g}" for v in args.low_freq_noise)} --high-noise-frac {args.high_noise_frac:g} --lr {args.lr:g} --prediction-type {args.prediction_type} {snr_flag} --unet-levels {args.unet_levels} --unet-first-channels {args.unet_first_channels} --downsample-padding {args.downsample_padding} --decoder-steps {args.decoder_steps}{f" --init-from {args.init_from}" if args.init_from else ""}{f" --vae-from {args.vae_from}" if args.vae_from else ""}

on {torch.get_num_threads()} CPU threads, torch {torch.__version__}; it took {stats.get('train_minutes', 0):.1f} minutes.

## Final metrics

| metric | value |
|---|---|
{metrics}

Prompt adherence is measured by `python tools/eval_demo_model.py` (see the project README).
"""
    (out / "README.md").write_text(card, encoding="utf-8")


def load_stage2(folder: Path, args) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """UNet and text encoder of an earlier run, to train further (``--init-from``)."""
    config_file = folder / "scheduler" / "scheduler_config.json"
    if not config_file.is_file():
        raise SystemExit(f"--init-from: {folder} is not a diffusers model folder (no scheduler/scheduler_config.json)")
    config = json.loads(config_file.read_text())
    for key in ("prediction_type", "rescale_betas_zero_snr"):
        want = args.scheduler_config.get(key, False)
        if config.get(key, False) != want:
            raise SystemExit(f"--init-from: {folder} was trained with {key}={config.get(key, False)!r}, "
                             f"this run asks for {want!r}; pass the matching --prediction-type / --zero-terminal-snr")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    have, want = tuple(unet.config.block_out_channels), unet_channels(args.unet_levels, args.unet_first_channels)
    if have != want:
        raise SystemExit(f"--init-from: {folder} has UNet channels {list(have)}, this run asks for {list(want)} "
                         f"(--unet-levels {args.unet_levels} --unet-first-channels {args.unet_first_channels})")
    if unet.config.downsample_padding != args.downsample_padding:
        # Same weights, other border handling in the downsamplers: continue with the padding
        # this run asks for (the UNet then learns to use the new left/right cue).
        log.info("--init-from: switching the UNet's downsample padding from %s to %s",
                 unet.config.downsample_padding, args.downsample_padding)
        state = unet.state_dict()
        unet = UNet2DConditionModel.from_config(dict(unet.config, downsample_padding=args.downsample_padding))
        unet.load_state_dict(state)
    return unet, CLIPTextModel.from_pretrained(folder / "text_encoder")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "assets" / "demo-model"), help="output diffusers folder")
    p.add_argument("--size", type=int, default=256, help="native image size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-crop", type=int, default=96, help="training crop for the VAE (it is fully convolutional)")
    p.add_argument("--vae-lr", type=float, default=3e-4)
    p.add_argument("--vae-kl", type=float, default=1e-5)
    p.add_argument("--decoder-steps", type=int, default=0,
                   help="stage 1b: fine-tune the VAE decoder alone on full-size images (0: skip)")
    p.add_argument("--decoder-batch", type=int, default=4)
    p.add_argument("--decoder-lr", type=float, default=2e-4)
    p.add_argument("--decoder-noise", type=float, default=0.1,
                   help="largest latent jitter, as a fraction of the latents' std, in stage 1b")
    p.add_argument("--dataset", type=int, default=6000, help="number of rendered training images")
    p.add_argument("--unet-steps", type=int, default=3500)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--high-noise-frac", type=float, default=0.3,
                   help="fraction of training timesteps drawn from the noisiest 30%% (the rest uniform)")
    p.add_argument("--low-freq-noise", default="0.3,0.35,0.3",
                   help="strengths of extra training noise at 1x1, 2x2, 4x4, ... (comma-separated; 0 turns it off)")
    # The shipped weights come from two runs (v-prediction, zero terminal SNR, then continued
    # with --downsample-padding 0): their commands are in assets/demo-model/README.md. The
    # defaults stay the plain SD recipe (epsilon, SD's schedule): docs/demo-model-experiments.md.
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    p.add_argument("--zero-terminal-snr", action=argparse.BooleanOptionalAction, default=False,
                   help="rescale the schedule so the last timestep is pure noise (needs v_prediction)")
    p.add_argument("--unet-levels", type=int, choices=(3, 4), default=3,
                   help="UNet resolution levels: 3 (32/16/8 latent px) or 4 (down to a 4x4 bottleneck; "
                   "measured worse on position and slower)")
    p.add_argument("--unet-first-channels", type=int, default=32,
                   help="channels of the UNet's first level (32x32 latents at 256 px), a multiple of 16")
    p.add_argument("--downsample-padding", type=int, choices=(0, 1), default=1,
                   help="1: SD's symmetric padding in the UNet's downsamplers; 0: pad only the right and "
                   "bottom edges (the original LDM code), which tells left from right and top from bottom")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine, 2 threads stall on each other)")
    p.add_argument("--device", default="cpu", help="torch device for stage 2 and the dataset encoding "
                   "(cpu, cuda); noise and batches are drawn on the CPU either way")
    p.add_argument("--resume-vae", action="store_true", help="reuse OUT/vae-stage1 from an interrupted run")
    p.add_argument("--vae-from", help="reuse the stage-1 autoencoder of an earlier run (a diffusers vae folder) "
                   "instead of training it; stage 2 is unchanged")
    p.add_argument("--init-from", help="continue training the UNet and text encoder of an earlier run's folder "
                   "(its VAE too, unless --vae-from); use another --seed so the batches differ")
    p.add_argument("--smoke", action="store_true", help="same code, a few steps: for CI")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        args.low_freq_noise = tuple(float(v) for v in str(args.low_freq_noise).split(",") if v.strip())
    except ValueError:
        p.error(f"--low-freq-noise must be comma-separated numbers, got {args.low_freq_noise!r}")
    try:
        unet_channels(args.unet_levels, args.unet_first_channels)
    except ValueError as err:
        p.error(f"--unet-first-channels: {err}")
    try:
        args.scheduler_config = scheduler_config(args.prediction_type, args.zero_terminal_snr)
    except ValueError as err:
        p.error(str(err))
    if args.smoke:
        args.size, args.vae_steps, args.vae_batch, args.vae_crop = 64, 3, 2, 64
        args.dataset, args.unet_steps, args.batch = 16, 3, 4
        args.decoder_steps, args.decoder_batch = min(args.decoder_steps, 2), 2
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(out / "tokenizer", VOCABULARY))
    vocab = tokenizer.get_vocab()
    vae = build_vae(args.size)
    text_encoder = build_text_encoder(len(vocab), tokenizer.bos_token_id, tokenizer.eos_token_id)
    unet = build_unet(args.size, args.unet_levels, args.downsample_padding, args.unet_first_channels)
    if args.init_from:
        unet, text_encoder = load_stage2(Path(args.init_from), args)
        args.vae_from = args.vae_from or str(Path(args.init_from) / "vae")
    counts = {"unet": param_count(unet), "vae": param_count(vae), "text_encoder": param_count(text_encoder)}
    log.info("parameters: %s", counts)

    stats: dict = {}
    stage1 = out / "vae-stage1"
    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from)
        stats["vae_reused_from"] = str(args.vae_from)
        log.info("reusing the VAE of %s", args.vae_from)
    elif args.resume_vae and (stage1 / "config.json").is_file():
        # Stage 1 done by an earlier run with the same seed: reuse it (the RNG is re-seeded
        # so stage 2 sees the same data as a run that trained the VAE itself would not,
        # which is recorded in training.json).
        vae = AutoencoderKL.from_pretrained(stage1)
        stats["vae_resumed_from"] = str(stage1)
        log.info("resumed the VAE from %s", stage1)
    else:
        stats.update(train_vae(vae, args, rng))
        vae.save_pretrained(stage1)
    if args.decoder_steps:
        stats.update(train_decoder(vae, args))
        stats["decoder_steps"] = args.decoder_steps
    for p in vae.parameters():
        p.requires_grad_(False)
    stats["vae_heldout_l1_uint8"] = heldout_reconstruction_error(vae, args)
    latents, scenes = encode_dataset(vae, args, rng)
    # As in SD: scale latents to unit variance so the noise schedule fits them.
    args.scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=args.scaling_factor)
    stats["vae_scaling_factor"] = args.scaling_factor
    stats.update(train_diffusion(unet, text_encoder, tokenizer, latents, scenes, args, rng))
    stats["train_minutes"] = (time.perf_counter() - start) / 60

    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=DDIMScheduler.from_config(args.scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    if stage1.exists():
        import shutil

        shutil.rmtree(stage1)
    (out / "training.json").write_text(json.dumps({"args": vars(args), "stats": stats}, indent=2, default=str))
    write_model_card(out, args, stats, counts)
    log.info("wrote %s in %.1f min: %s", out, stats["train_minutes"], stats)
    return out


if __name__ == "__main__":
    main()
