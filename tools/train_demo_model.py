"""Train the bundled demo model: a small Stable-Diffusion-format latent diffusion model.

The data is drawn procedurally (tools/demo_world.py): one coloured shape on a plain
background, captioned "a red circle in the top left on a blue background". Training is
in two stages, as for Stable Diffusion itself (Rombach et al. 2022, arXiv 2112.10752):

1. an AutoencoderKL with f=8 and 4 latent channels (reconstruction + a small KL term);
2. a UNet2DConditionModel and a CLIP text encoder, trained together from scratch on the
   frozen autoencoder's latents with the epsilon objective and the SD 1.x noise schedule,
   with 10% empty captions so classifier-free guidance works, Min-SNR loss weighting
   (Hang et al. 2023, arXiv 2303.09556) and an EMA of the weights.

Optional stages refine the result: 3. the VAE decoder on the latents the sampler itself ends on
(``--sampler-decoder-steps``); 4. the UNet on in-between outlines (blobs between a disc and a
square) paired with the prompt's true shape in the same box (``--outline-steps``).

The result is a diffusers folder loaded by exactly the code path that loads Stable
Diffusion. Seeded and reproducible on the same machine and library versions.

    python tools/train_demo_model.py --recipe shipped   # the bundled weights' run, writes assets/demo-model
    python tools/train_demo_model.py --smoke --out /tmp/demo   # same code, seconds
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import shlex
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

from pipelines.config import cpu_has_fast_bf16  # noqa: E402
from pipelines.loading import own_weights  # noqa: E402
from pipelines.tokenizer_files import write_clip_tokenizer  # noqa: E402
from tools.demo_world import SHAPES, VOCABULARY, Scene, object_box, random_scene, render, render_box, snap_to_grid  # noqa: E402

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


def unet_block_types(levels: int = 3, first_level_attention: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Down and up block types. By default no attention at full latent resolution: 1024-token
    self-attention there about doubles the UNet's cost on a CPU, and position and colour are
    carried by cross-attention at 16x16 and 8x8 (and 4x4 with a fourth level). With
    ``first_level_attention`` the up path's full-resolution level, where the outlines are drawn,
    gets self- and cross-attention too, as Stable Diffusion's highest level has."""
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
    up = ("CrossAttnUpBlock2D",) * (levels - 1) + ("CrossAttnUpBlock2D" if first_level_attention else "UpBlock2D",)
    return down, up


TEXT_TIME_HEADS = 4


def text_time_config(enabled: bool) -> dict:
    """UNet config keys for ``--text-time-embedding``: diffusers' ``addition_embed_type="text"``
    pools the prompt's hidden states (attention pooling) into a vector added to the timestep
    embedding, so every ResNet block, the full-resolution ones without cross-attention included,
    is conditioned on the prompt. The standard Stable Diffusion pipeline drives it unchanged
    (the UNet computes it from ``encoder_hidden_states``)."""
    return {"addition_embed_type": "text", "addition_embed_type_num_heads": TEXT_TIME_HEADS} if enabled else {}


def unet_layers(levels: int = 3, first_level_layers: int = 1) -> int | tuple[int, ...]:
    """``layers_per_block`` for the UNet: one ResNet per level going down (two coming up), or
    ``first_level_layers`` at the full-resolution level alone (``--first-level-layers``), where
    the 10-16 latent pixels of an object's side are drawn; the default stays the plain ``1`` so
    the configs of earlier weights are unchanged."""
    if not 1 <= first_level_layers <= 4:
        raise ValueError(f"the first level takes 1 to 4 ResNet layers, got {first_level_layers}")
    return 1 if first_level_layers == 1 else (first_level_layers,) + (1,) * (levels - 1)


def build_unet(size: int, levels: int = 3, downsample_padding: int = 1, first_channels: int = 32,
               first_level_attention: bool = False, text_time_embedding: bool = False,
               first_level_layers: int = 1) -> UNet2DConditionModel:
    channels = unet_channels(levels, first_channels)
    down, up = unet_block_types(levels, first_level_attention)
    return UNet2DConditionModel(
        **text_time_config(text_time_embedding),
        sample_size=size // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=unet_layers(levels, first_level_layers),
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=128,
        attention_head_dim=4,
        norm_num_groups=16,
        downsample_padding=downsample_padding,
    )


def autocast(args):
    """bf16 autocast for a training stage's forward passes when ``--bf16`` (weights, optimiser
    state and losses stay float32). On a CPU with AVX512-BF16 this roughly halves the cost of
    the VAE and UNet convolutions; the saved weights are float32 either way."""
    return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16,
                          enabled=bool(args.bf16))


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 HWC images -> float NCHW in [-1, 1], as the VAE expects."""
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def token_ids(tokenizer: CLIPTokenizer, texts: list[str], device) -> torch.Tensor:
    """Captions as the text encoder's input ids, padded to its full length as Stable Diffusion does."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


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
            # The draws of render() and then the crop's corner, in that order, with only the
            # crop drawn: the same pixels as cropping the full image.
            scene = random_scene(rng)
            box = object_box(scene, rng, args.size, args.object_grid)
            y, x = rng.randrange(args.size - crop + 1), rng.randrange(args.size - crop + 1)
            images.append(render_box(scene, args.size, *box, window=(y, x, crop, crop)))
        batch = to_tensor(images)
        with autocast(args):
            posterior = vae.encode(batch).latent_dist
        # Decode the posterior mean: with flat-colour images, sampling noise at the start
        # of training drowns the latent and the autoencoder learns several times slower.
        # The small KL term still keeps the latent bounded, and latents are rescaled later.
        with autocast(args):
            recon = vae.decode(posterior.mode()).sample.float()
        l1 = (recon - batch).abs().mean()
        mse = F.mse_loss(recon, batch)
        kl = posterior.kl().float().mean() / (4 * (crop // 8) ** 2)
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


def train_decoder(vae: AutoencoderKL, args, pairs: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Stage 1b (and 3): fine-tune the decoder alone, on full-size images and jittered latents.

    Stage 1 trains on crops for a short time; its decoder leaves a frame along the image
    border, washes out the inside of objects (a purple square comes back lilac in the middle,
    which the grader then reads as a thin outline) and bleeds low-contrast pairs such as
    orange on yellow. Like SD's own fine-tuned decoders, this stage keeps the encoder, and
    with it the latent space the UNet is trained in, exactly as it was, so it can run before
    or after stage 2 and be applied to a trained model. The latents get a little Gaussian
    noise (up to ``--decoder-noise`` of their standard deviation) so the decoder also draws
    clean shapes from the slightly-off latents a 20-step sampler ends on.

    With ``pairs`` (stage 3: latents the trained UNet's sampler ended on, and the real images
    they started from; ``sampler_latent_pairs``) all but one image of each batch comes from
    them, and the stage runs ``--sampler-decoder-steps`` at ``--sampler-decoder-lr``.
    """
    steps, lr = (args.decoder_steps, args.decoder_lr) if pairs is None else (args.sampler_decoder_steps,
                                                                             args.sampler_decoder_lr)
    offset = 2 if pairs is None else 4  # each stage its own stream: stage 2's data does not depend on it
    rng = random.Random(args.seed + offset)
    gen = torch.Generator().manual_seed(args.seed + offset)
    device = torch.device(args.device)
    vae.to(device)
    for p in vae.parameters():
        p.requires_grad_(False)
    params = list(vae.post_quant_conv.parameters()) + list(vae.decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vae.decoder.train()
    last = {}
    n_render = args.decoder_batch if pairs is None else 1
    bar = tqdm(range(steps), desc="decoder" if pairs is None else "decoder on sampler latents", disable=args.quiet)
    for step in bar:
        set_cosine_lr(opt, lr, step, steps)
        batch = to_tensor([render(random_scene(rng, position_prob=0.6), args.size, rng, grid=args.object_grid)
                           for _ in range(n_render)]).to(device)
        with torch.no_grad(), autocast(args):
            z = vae.encode(batch).latent_dist.mode().float()
        with torch.no_grad():
            sigma = torch.rand((z.shape[0], 1, 1, 1), generator=gen) * args.decoder_noise * z.std().cpu()
            z = z + (sigma * torch.randn(z.shape, generator=gen)).to(device)
        if pairs is not None:
            idx = torch.randint(0, len(pairs[0]), (args.decoder_batch - n_render,), generator=gen)
            z = torch.cat([pairs[0][idx].to(device), z])
            batch = torch.cat([to_tensor(list(pairs[1][idx].numpy())).to(device), batch])
        with autocast(args):
            recon = vae.decode(z).sample.float()
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
        images = [render(s, args.size, rng, grid=args.object_grid) for s in batch_scenes]
        with autocast(args):
            latents.append(vae.encode(to_tensor(images).to(device)).latent_dist.mean.float().cpu())
        scenes += batch_scenes
    vae.cpu()
    return torch.cat(latents), scenes


@torch.no_grad()
def sampler_latent_pairs(vae: AutoencoderKL, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                         tokenizer: CLIPTokenizer, args) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents the trained UNet's sampler ends on, each paired with the real image it started from.

    Each rendered scene is encoded, noised to a timestep of the studio's 20-step schedule no
    higher than ``--sampler-decoder-max-t`` (where the noisy latent still fixes the object's
    outline), and sampled from there to the end with deterministic DDIM and guidance 7.5, as
    the studio does. The end latents carry the sampler's own errors (wobbly edges, rounded
    corners); the decoder learns to draw the real image from them (stage 3). Returns
    (unscaled latents, uint8 images NHWC).
    """
    rng = random.Random(args.seed + 3)
    gen = torch.Generator().manual_seed(args.seed + 3)
    device = torch.device(args.device)
    for module in (vae, unet, text_encoder):
        module.to(device).eval()
    scheduler = DDIMScheduler.from_config(args.scheduler_config)
    scheduler.set_timesteps(20)
    starts = [i for i, t in enumerate(scheduler.timesteps) if int(t) <= args.sampler_decoder_max_t]
    if not starts:
        raise ValueError(f"--sampler-decoder-max-t {args.sampler_decoder_max_t} is below every step of the "
                         f"schedule ({[int(t) for t in scheduler.timesteps]})")

    def embed(prompts):
        with autocast(args):
            return text_encoder(token_ids(tokenizer, prompts, device))[0]

    latents, images = [], []
    scale = vae.config.scaling_factor
    bar = tqdm(range(0, args.sampler_decoder_pairs, 32), desc="sampler latents", disable=args.quiet)
    for begin in bar:
        n = min(32, args.sampler_decoder_pairs - begin)
        scenes = [random_scene(rng, position_prob=0.6) for _ in range(n)]
        rendered = [render(scene, args.size, rng, grid=args.object_grid) for scene in scenes]
        with autocast(args):
            z0 = vae.encode(to_tensor(rendered).to(device)).latent_dist.mode().float() * scale
        timesteps = scheduler.timesteps[rng.choice(starts):]
        noise = torch.randn(z0.shape, generator=gen).to(device)
        z = scheduler.add_noise(z0, noise, timesteps[:1].repeat(n).to(device))
        text = torch.cat([embed([""] * n), embed([s.prompt for s in scenes])])
        for t in timesteps:
            tt = t.repeat(2 * n).to(device)
            with autocast(args):
                pred_u, pred_c = unet(torch.cat([z, z]), tt, encoder_hidden_states=text).sample.float().chunk(2)
            z = scheduler.step(pred_u + args.guided_loss_scale * (pred_c - pred_u), t, z).prev_sample
        latents.append((z / scale).cpu())
        images.append(torch.from_numpy(np.stack(rendered)))
    for module in (vae, unet, text_encoder):
        module.cpu()
    return torch.cat(latents), torch.cat(images)


def dataset_cache_key(vae: AutoencoderKL, args, rng: random.Random) -> str:
    """What the encoded dataset depends on: the encoder's weights, the image size and count,
    and the state of the data RNG when encoding starts (which the seed and earlier stages set)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(repr((args.size, args.dataset, args.object_grid, rng.getstate())).encode())
    return digest.hexdigest()[:16]


def load_or_encode_dataset(vae: AutoencoderKL, args, rng: random.Random) -> tuple[torch.Tensor, list]:
    """``encode_dataset``, reusing ``--dataset-cache`` when an earlier run encoded the same data.

    Encoding 6000 images takes about 13 minutes of one CPU thread, and every continuation of
    the shipped weights encodes the same images again. The cache file stores the latents, the
    scenes and the data RNG's state after encoding, so a run that reads it draws exactly the
    batches and captions of a run that encoded them itself.
    """
    if not args.dataset_cache:
        return encode_dataset(vae, args, rng)
    from tools.demo_world import Scene

    path = Path(args.dataset_cache) / f"latents-{dataset_cache_key(vae, args, rng)}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        rng.setstate(saved["rng_state"])
        log.info("encoded dataset read from %s", path)
        return saved["latents"], [Scene(*s) for s in saved["scenes"]]
    latents, scenes = encode_dataset(vae, args, rng)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"latents": latents, "scenes": [(s.color, s.shape, s.background, s.position) for s in scenes],
                "rng_state": rng.getstate()}, tmp)
    tmp.replace(path)
    log.info("encoded dataset written to %s", path)
    return latents, scenes


@torch.no_grad()
def heldout_reconstruction_error(vae: AutoencoderKL, args) -> float:
    """Mean absolute error, in 0-255 levels, of full-size reconstructions of unseen scenes."""
    rng = random.Random(args.seed + 1)
    images = [render(random_scene(rng), args.size, rng, grid=args.object_grid) for _ in range(8)]
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


class LatentImageEncoder(torch.nn.Module):
    """The image tower of the text encoder's contrastive pretraining: a small CNN on the
    (scaled) VAE latents the UNet is trained on, down to 4x4, flattened so it keeps where
    things are (pooling would throw position away), projected to the text width."""

    def __init__(self, latent_channels: int, latent_size: int, width: int = 64, out_dim: int = 128):
        super().__init__()
        layers, channels, side = [torch.nn.Conv2d(latent_channels, width, 3, padding=1), torch.nn.SiLU()], width, latent_size
        while side > 4:
            nxt = min(channels * 2, 128)
            layers += [torch.nn.Conv2d(channels, nxt, 3, stride=2, padding=1), torch.nn.SiLU()]
            channels, side = nxt, (side + 1) // 2
        self.features = torch.nn.Sequential(*layers)
        self.proj = torch.nn.Linear(channels * side * side, out_dim)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(latents).flatten(1))


def caption_matches(image_scenes: list, caption_scenes: list) -> torch.Tensor:
    """[i, j] is True where caption ``j`` truly describes image ``i``: same colours and shape, and
    either the same named position or none named (a position-free caption fits any placement)."""
    return torch.tensor([[(c.color, c.shape, c.background) == (s.color, s.shape, s.background)
                          and (c.position is None or c.position == s.position) for c in caption_scenes]
                         for s in image_scenes])


def text_pretrain_step(opt, loss: torch.Tensor, params: list, losses: list, bar, step: int) -> None:
    """One clipped optimizer step of a text-pretraining objective, its loss kept for the stats and the bar."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    losses.append(float(loss.detach()))
    if step % 20 == 0:
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")


def pretrain_text_encoder(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, latents: torch.Tensor,
                          scenes: list, args, rng: random.Random) -> dict:
    """Contrastive (CLIP-style) pretraining of the text encoder on the demo world's captions.

    Stable Diffusion conditions on a text encoder that CLIP (Radford et al. 2021, arXiv
    2103.00020) trained to tell captions apart by the images they describe; trained only
    through the diffusion loss, a small text encoder hardly separates words whose pictures
    differ in a few pixels: after the shipped run, "square" and "circle" left the end token
    within 6% of each other (docs/demo-model-experiments.md, session 7), and the UNet drew
    a blend of both. Here the encoder's pooled (end-token) output and a small CNN over the
    same VAE latents the UNet sees are trained with the symmetric InfoNCE loss; a caption
    counts as positive for every image it truly describes (``caption_matches``), since this
    world repeats captions within a batch. Held-out retrieval accuracy per attribute is
    returned, read off the best-scoring caption among every caption of the world.
    """
    from tools.demo_world import Scene

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed + 5)
    n_held = max(1, len(scenes) // 20)
    train_idx = len(scenes) - n_held
    x = latents * args.scaling_factor
    image_tower = LatentImageEncoder(latents.shape[1], latents.shape[-1], out_dim=text_encoder.config.hidden_size).to(device)
    text_proj = torch.nn.Linear(text_encoder.config.hidden_size, text_encoder.config.hidden_size).to(device)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07), device=device))
    text_encoder.to(device).train()
    params = list(text_encoder.parameters()) + list(image_tower.parameters()) + list(text_proj.parameters()) + [log_scale]
    opt = torch.optim.AdamW(params, lr=args.text_pretrain_lr, weight_decay=1e-4)

    def embed_text(prompts):
        # Padded to the batch's longest caption, not to 77: under the causal mask the end
        # token's output does not depend on the padding after it, and this is 5x cheaper.
        ids = tokenizer(prompts, padding="longest", truncation=True, return_tensors="pt").input_ids.to(device)
        return F.normalize(text_proj(text_encoder(ids).pooler_output).float(), dim=-1)

    losses = []
    bar = tqdm(range(args.text_pretrain_steps), desc="text encoder (contrastive)", disable=args.quiet)
    for step in bar:
        set_cosine_lr(opt, args.text_pretrain_lr, step, args.text_pretrain_steps)
        idx = torch.randint(0, train_idx, (args.text_pretrain_batch,), generator=gen)
        image_scenes = [scenes[int(i)] for i in idx]
        caption_scenes = [s if s.position is None or rng.random() >= 0.25 else Scene(s.color, s.shape, s.background, None)
                          for s in image_scenes]
        positive = caption_matches(image_scenes, caption_scenes).float().to(device)
        with autocast(args):
            img = F.normalize(image_tower(x[idx.to(device)]).float(), dim=-1)
            txt = embed_text([c.prompt for c in caption_scenes])
        logits = log_scale.clamp(max=math.log(100)).exp() * img @ txt.T
        loss = 0.5 * (-(positive / positive.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                      - (positive.T / positive.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean())
        text_pretrain_step(opt, loss, params, losses, bar, step)

    # Held-out retrieval: each unseen image against every caption of the world.
    text_encoder.eval()
    every = world_captions()
    with torch.no_grad(), autocast(args):
        txt = torch.cat([embed_text([s.prompt for s in every[i:i + 512]]) for i in range(0, len(every), 512)])
        img = F.normalize(image_tower(x[train_idx:].to(device)).float(), dim=-1)
    held = scenes[train_idx:]
    # Among the captions that name a position when the image's does, and none otherwise (a
    # position-free caption also fits a placed image, so it would tie with the right one).
    named = torch.tensor([s.position is not None for s in every])
    scores = (img @ txt.float().T).cpu()
    scores = torch.where(named[None, :] == torch.tensor([s.position is not None for s in held])[:, None],
                         scores, torch.tensor(float("-inf")))
    best = [every[int(j)] for j in scores.argmax(1)]
    stats = {f"text_pretrain_heldout_{attr}": float(np.mean([getattr(b, attr) == getattr(s, attr) for b, s in zip(best, held)]))
             for attr in ("color", "shape", "background")}
    placed = [(b, s) for b, s in zip(best, held) if s.position is not None]
    stats["text_pretrain_heldout_position"] = float(np.mean([b.position == s.position for b, s in placed])) if placed else float("nan")
    stats["text_pretrain_loss_last50"] = float(np.mean(losses[-50:])) if losses else float("nan")
    log.info("text encoder pretraining, held-out retrieval: %s", stats)
    text_encoder.cpu()
    return stats


def world_captions() -> list:
    """Every caption of the demo world: each object colour, background colour, shape, and named
    position or none (8 x 7 x 3 x 6 = 1008 scenes)."""
    from tools.demo_world import COLORS, POSITIONS, SHAPES, Scene

    return [Scene(c, sh, b, pos) for c in COLORS for b in COLORS if b != c for sh in SHAPES
            for pos in [None, *POSITIONS]]


def pretrain_text_attributes(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, args) -> dict:
    """Supervised pretraining of the text encoder on the world's captions (``--text-pretrain-objective
    attributes``): linear heads on the pooled (end-token) output learn to read the object colour,
    the shape, the background colour and the named position (or none) back from each caption.

    It serves the same end as the contrastive objective (pooled outputs that keep every
    attribute apart, so the frozen encoder gives the UNet "square" and "circle" as different
    conditions) without an image tower: the world's captions are a closed grammar whose
    attributes are known, so no image is needed to say what a caption means. On 2 CPU cores the
    contrastive step (batch 256) costs about 0.9 s, most of it the image tower on 32x32 latents;
    this one costs the text encoder alone. Its accuracy is read over all 1008 captions (the
    whole world: there is no unseen caption to hold out)."""
    from tools.demo_world import COLORS, POSITIONS, SHAPES

    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed + 5)
    every = world_captions()
    vocab = {"color": sorted(COLORS), "shape": list(SHAPES), "background": sorted(COLORS),
             "position": ["none", *sorted(POSITIONS)]}
    labels = {attr: torch.tensor([names.index(getattr(s, attr) or "none") for s in every])
              for attr, names in vocab.items()}
    width = text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict({attr: torch.nn.Linear(width, len(names)) for attr, names in vocab.items()}).to(device)
    text_encoder.to(device).train()
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.text_pretrain_lr, weight_decay=1e-4)

    def pooled(prompts):
        # Padded to the batch's longest caption: under the causal mask the end token does not see the padding.
        ids = tokenizer(prompts, padding="longest", truncation=True, return_tensors="pt").input_ids.to(device)
        return text_encoder(ids).pooler_output.float()

    losses = []
    bar = tqdm(range(args.text_pretrain_steps), desc="text encoder (attributes)", disable=args.quiet)
    for step in bar:
        set_cosine_lr(opt, args.text_pretrain_lr, step, args.text_pretrain_steps)
        idx = torch.randint(0, len(every), (args.text_pretrain_batch,), generator=gen)
        with autocast(args):
            h = pooled([every[int(i)].prompt for i in idx])
        loss = sum(F.cross_entropy(heads[attr](h), labels[attr][idx].to(device)) for attr in vocab) / len(vocab)
        text_pretrain_step(opt, loss, params, losses, bar, step)

    text_encoder.eval()
    with torch.no_grad(), autocast(args):
        h = torch.cat([pooled([s.prompt for s in every[i:i + 512]]) for i in range(0, len(every), 512)])
        stats = {f"text_pretrain_world_{attr}": float((heads[attr](h).argmax(1).cpu() == labels[attr]).float().mean())
                 for attr in vocab}
    stats["text_pretrain_loss_last50"] = float(np.mean(losses[-50:])) if losses else float("nan")
    log.info("text encoder pretraining (attributes), accuracy over the world's captions: %s", stats)
    text_encoder.cpu()
    return stats


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


def edge_weights(x0: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-position loss weights that favour the clean latent's edges, ``(B, 1, H, W)``.

    In this world what tells a square from a circle is the outline: their latents differ only
    in a few cells at the corners (about 3% of a 32x32 latent for an object a third of the
    image wide), while colour and position change every cell, so under a plain mean squared
    error the shape word gets a small share of the gradient and the model settles on rounded
    squares (docs/demo-model-experiments.md, session 12). The weight is ``1 + strength * e``
    where ``e`` is the latent's spatial gradient magnitude (summed over channels, dilated by
    one cell, scaled to 1 at each sample's strongest edge), then normalised to a mean of 1
    per sample, so the loss keeps its scale and a uniform latent is weighted evenly.
    """
    dx = (x0[..., :, 1:] - x0[..., :, :-1]).abs().sum(1, keepdim=True)
    dy = (x0[..., 1:, :] - x0[..., :-1, :]).abs().sum(1, keepdim=True)
    grad = F.pad(dx, (0, 1, 0, 0)) + F.pad(dx, (1, 0, 0, 0)) + F.pad(dy, (0, 0, 0, 1)) + F.pad(dy, (0, 0, 1, 0))
    grad = F.max_pool2d(grad, kernel_size=3, stride=1, padding=1)
    edges = grad / grad.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    weight = 1.0 + strength * edges
    return weight / weight.mean(dim=(2, 3), keepdim=True)


def guided_consistency_loss(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, target: torch.Tensor,
                            weights: torch.Tensor, scale: float) -> torch.Tensor:
    """Loss of the classifier-free-guided prediction against the plain training target.

    Where little noise is left, the noisy latent already fixes the picture, so the ideal
    conditional and unconditional predictions coincide and guidance ``u + scale * (c - u)``
    changes nothing. A small model does not learn that by itself: its two branches make
    different errors, and guidance multiplies their difference by ``scale - 1``. Measured on
    the session-6 weights at t=200, the guided x0 estimate was 22x further from the truth
    than either branch, which is what wobbles squares' edges and rounds their corners at
    guidance 7.5 (docs/demo-model-experiments.md, session 7). This term trains the guided
    combination the studio samples with, at those timesteps only, towards the same target.
    Per-sample weights as the main loss's (Min-SNR). Returns the mean over the given samples.
    """
    guided = pred_uncond + scale * (pred_cond - pred_uncond)
    per_sample = F.mse_loss(guided, target, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weights).mean()


def clean_and_noise(scheduler: DDPMScheduler, noisy: torch.Tensor, pred: torch.Tensor,
                    t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latent and the noise a UNet output implies at timesteps ``t`` (either prediction type)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(noisy.device)[t].view(-1, 1, 1, 1)
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    if scheduler.config.prediction_type == "v_prediction":
        return alpha * noisy - sigma * pred, sigma * noisy + alpha * pred
    return (noisy - sigma * pred) / alpha, pred


def self_generated_input(scheduler: DDPMScheduler, x0: torch.Tensor, noisy_before: torch.Tensor,
                         guided_pred: torch.Tensor, t_before: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One deterministic DDIM step of the model itself, from ``t_before`` down to ``t``, and the
    training target that takes that state back to the true clean latent ``x0``.

    A small model's clean-image estimates at high noise are blurred, and a sampler builds each
    next noisy latent from them, so from the second step on the model sees inputs whose picture
    is softer than any it was trained on, and keeps the softness: squares end with rounded
    corners even when sampling starts from a real square noised to t=600 (exposure bias,
    Ning et al. 2023, arXiv 2301.11706, who perturb the input noise instead). Training on the
    state the model's own step reaches, with the target that leads from it to the real image,
    teaches it to correct its own error. Returns (noisy latent at t, target for t).
    """
    x0_hat, noise_hat = clean_and_noise(scheduler, noisy_before, guided_pred, t_before)
    alphas_cumprod = scheduler.alphas_cumprod.to(x0.device)[t].view(-1, 1, 1, 1)
    alpha, sigma = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    noisy = alpha * x0_hat + sigma * noise_hat
    implied_noise = (noisy - alpha * x0) / sigma  # the noise that makes this state the real x0's
    if scheduler.config.prediction_type == "v_prediction":
        return noisy, alpha * implied_noise - sigma * x0
    return noisy, implied_noise


def sample_timesteps(n: int, num_train_timesteps: int, high_frac: float, generator: torch.Generator,
                     logit_normal: tuple[float, float] | None = None) -> torch.Tensor:
    """Uniform timesteps, with a fraction ``high_frac`` drawn from the noisiest 30% instead.

    With ``logit_normal=(m, s)`` the base draw is ``sigmoid(N(m, s))`` of the timestep range
    instead of uniform (Esser et al. 2024, arXiv 2403.03206, sec. 3.1): it weights middle
    noise, where the outline of the object is decided, over the ends.

    Composition (where the object goes, which colour fills the background) is decided in the
    first sampling steps, at high noise, and only there does the prompt carry information the
    noisy latent does not. With the epsilon objective those timesteps also weigh little in the
    loss (an error in the predicted image counts ``SNR`` times as much as one in epsilon), so
    the model sees more of them instead.
    """
    if logit_normal is None:
        t = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    else:
        u = torch.sigmoid(logit_normal[0] + logit_normal[1] * torch.randn(n, generator=generator))
        t = (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    high = torch.rand(n, generator=generator) < high_frac
    t_high = torch.randint(int(0.7 * num_train_timesteps), num_train_timesteps, (n,), generator=generator)
    return torch.where(high, t_high, t)


def train_diffusion(unet, text_encoder, tokenizer, latents, scenes, args, rng: random.Random,
                    snapshot=None) -> dict:
    """Stage 2: the UNet (and, unless ``--freeze-text-encoder``, the text encoder) on the encoded
    dataset. ``snapshot(step, unet, text_encoder)``, when given, is called with the EMA weights
    every ``--checkpoint-every`` steps, so a long run can be evaluated on the way."""
    scheduler = DDPMScheduler.from_config(args.scheduler_config)
    device = torch.device(args.device)
    unet.to(device)
    text_encoder.to(device)
    latents = latents.to(device)
    train_text = not args.freeze_text_encoder
    text_encoder.requires_grad_(train_text)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for p in list(ema_unet.parameters()) + list(ema_text.parameters()):
        p.requires_grad_(False)
    ema_pairs = ((ema_unet, unet), (ema_text, text_encoder)) if train_text else ((ema_unet, unet),)
    unet.train()
    text_encoder.train(train_text)
    guided_from = int(args.guided_loss_from * args.unet_steps)
    gen = torch.Generator().manual_seed(args.seed)
    warmup = max(1, min(200, args.unet_steps // 10))
    losses: list[torch.Tensor] = []
    guided_losses: list[torch.Tensor] = []
    guided_steps = 0
    empty_ids = token_ids(tokenizer, [""], device)
    bar = tqdm(range(args.unet_steps), desc="unet+text", disable=args.quiet)
    for step in bar:
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(scenes), (args.batch,), generator=gen)
        x0 = latents[idx.to(device)] * args.scaling_factor
        prompts = [caption(scenes[int(i)], rng, args.uncond_prob) for i in idx]
        ids = token_ids(tokenizer, prompts, device)
        # Noise and timesteps come from the CPU generator on every device, so a GPU run
        # draws the same batches as a CPU run of the same command.
        noise = low_frequency_noise(x0.shape, gen, args.low_freq_noise).to(device)
        t = sample_timesteps(args.batch, scheduler.config.num_train_timesteps, args.high_noise_frac, gen,
                             args.logit_normal_timesteps).to(device)
        noisy = scheduler.add_noise(x0, noise, t)
        target = scheduler.get_velocity(x0, noise, t) if scheduler.config.prediction_type == "v_prediction" else noise
        weights = min_snr_weights(scheduler, t)
        if args.self_input_frac > 0:
            # Part of the batch starts one sampler step earlier and takes that step with the
            # model itself (guided, as the studio samples), so it trains on its own states.
            own = (torch.rand(args.batch, generator=gen) < args.self_input_frac).to(device)
            own &= t + args.self_input_gap < scheduler.config.num_train_timesteps
            if bool(own.any()):
                noisy, target = noisy.clone(), target.clone()
                t_before = t[own] + args.self_input_gap
                before = scheduler.add_noise(x0[own], noise[own], t_before)
                with torch.no_grad(), autocast(args):
                    own_ids = ids[own.cpu()]
                    emb = text_encoder(torch.cat([own_ids, empty_ids.expand(len(own_ids), -1)]))[0]
                    both = unet(torch.cat([before, before]), torch.cat([t_before, t_before]),
                                encoder_hidden_states=emb).sample
                    pred_c, pred_u = both.chunk(2)
                    guided_pred = (pred_u + args.guided_loss_scale * (pred_c - pred_u)).float()
                noisy[own], target[own] = self_generated_input(scheduler, x0[own], before, guided_pred,
                                                               t_before, t[own])
        # Samples at low noise with a real caption also go through the unconditional branch,
        # in the same UNet call, for the guided-consistency term (--guided-loss).
        guided = torch.zeros(args.batch, dtype=torch.bool)
        if args.guided_loss > 0 and step >= guided_from:
            guided_steps += 1
            guided = (t.cpu() < args.guided_loss_max_t) & torch.tensor([bool(p) for p in prompts])
        n_guided = int(guided.sum())
        if n_guided:
            ids = torch.cat([ids, empty_ids.expand(n_guided, -1)])
        with autocast(args), torch.set_grad_enabled(train_text):
            cond = text_encoder(ids)[0]
        if n_guided:
            sel = guided.to(device)
            noisy, t_in = torch.cat([noisy, noisy[sel]]), torch.cat([t, t[sel]])
        else:
            t_in = t
        with autocast(args):
            pred = unet(noisy, t_in, encoder_hidden_states=cond).sample.float()
        pred, pred_uncond = pred[: args.batch], pred[args.batch:]
        sq_err = F.mse_loss(pred, target, reduction="none")
        if args.edge_weight > 0:
            sq_err = sq_err * edge_weights(x0, args.edge_weight)
        per_sample = sq_err.mean(dim=(1, 2, 3))
        loss = (per_sample * weights).mean()
        if n_guided:
            g_loss = guided_consistency_loss(pred[sel], pred_uncond, target[sel], weights[sel], args.guided_loss_scale)
            # Scaled by the guided share of the batch, so --guided-loss is its weight per sample.
            loss = loss + args.guided_loss * g_loss * (n_guided / args.batch)
            guided_losses.append(g_loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_m, m in ema_pairs:
                torch._foreach_lerp_(list(ema_m.parameters()), list(m.parameters()), 1 - decay)
        losses.append(loss.detach())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{float(torch.stack(losses[-100:]).mean()):.4f}")
        if snapshot is not None and args.checkpoint_every and (step + 1) % args.checkpoint_every == 0 \
                and step + 1 < args.unet_steps:
            snapshot(step + 1, ema_unet, ema_text)
    unet.load_state_dict(ema_unet.state_dict())
    text_encoder.load_state_dict(ema_text.state_dict())
    unet.cpu()
    text_encoder.cpu()
    stats = {"diffusion_loss_last100": float(torch.stack(losses[-100:]).mean())}
    if guided_losses:
        stats["guided_loss_last100"] = float(torch.stack(guided_losses[-100:]).mean())
    if args.guided_loss > 0:
        stats["guided_loss_steps"] = guided_steps
    return stats


def train_lowres_first(unet, text_encoder, tokenizer, vae: AutoencoderKL, args, rng: random.Random) -> dict:
    """Stage 2a: the same UNet first trained on images drawn at ``--lowres-size`` (``--lowres-steps``
    of ``--lowres-batch``), then stage 2 goes on at the native size from its EMA weights.

    Stable Diffusion itself was trained at 256 px before 512 px. In this world a scene is defined
    in fractions of the image, so a 128 px image is the same scene at half the scale, and its
    16x16 latents cost the UNet about a third as much per image as 32x32 ones (the UNet is fully
    convolutional; its attention sees fewer tokens). Where the object goes, what each word means
    and what outline each shape has are learnt there cheaply; the native-size stage then learns
    the detail. The latents keep the native-size scaling factor (same encoder, same statistics).
    No guided-consistency term and no checkpoints in this stage."""
    return train_extra_stage("lowres", unet, text_encoder, tokenizer, vae, args, rng,
                             size=args.lowres_size, dataset=args.lowres_dataset, batch=args.lowres_batch,
                             unet_steps=args.lowres_steps, guided_loss=0.0, self_input_frac=0.0)


def train_extra_stage(name: str, unet, text_encoder, tokenizer, vae: AutoencoderKL, args, rng: random.Random,
                      **changes) -> dict:
    """Stage 2's training with some options changed, on its own newly drawn and encoded scenes
    (the data RNG goes on), without checkpoints; its stats are prefixed with ``name``."""
    stage = copy.copy(args)
    vars(stage).update(changes, checkpoint_every=0)
    latents, scenes = load_or_encode_dataset(vae, stage, rng)
    stats = train_diffusion(unet, text_encoder, tokenizer, latents, scenes, stage, rng)
    return {f"{name}_{k}": v for k, v in stats.items()}


def train_second_cycle(unet, text_encoder, tokenizer, vae: AutoencoderKL, args, rng: random.Random,
                       cycle: int = 0) -> dict:
    """Stage 2b: a second, shorter cosine cycle on scenes stage 2 never saw.

    ``--second-cycle-steps`` more steps from stage 2's EMA weights, with a new optimizer whose
    learning rate warms up to ``--second-cycle-lr`` and decays to zero again, on
    ``--second-cycle-dataset`` freshly drawn and encoded scenes (the data RNG goes on from where
    stage 2 left it) and its own noise stream. Every other option (timesteps, guided term and
    the share of steps it starts after, EMA) is stage 2's. Run as a separate continuation of
    run G (docs/demo-model-experiments.md, H0), 600 such steps moved shape more than stage 2's
    last 1800 did; inside runs I and J they added 6.3 / 3.1 and 3.1 / 0 points on two prompt sets.

    With ``--second-cycles K`` the cycle is repeated K times, each from the previous one's EMA
    weights on its own fresh scenes and noise stream (``cycle`` counts from 0; the first cycle's
    stats keep the ``second_cycle_`` prefix, later ones are ``second_cycle_2_`` and so on)."""
    name = "second_cycle" if cycle == 0 else f"second_cycle_{cycle + 1}"
    return train_extra_stage(name, unet, text_encoder, tokenizer, vae, args, rng,
                             unet_steps=args.second_cycle_steps, lr=args.second_cycle_lr,
                             dataset=args.second_cycle_dataset, seed=args.seed + 7 + cycle)


def outline_pair_images(rng: random.Random, count: int, size: int,
                        exponents: dict[str, tuple[float, float]]) -> tuple[list, list, list[Scene]]:
    """``count`` scenes whose shape is one of ``exponents``' shapes, each drawn twice in the same
    box and colours: as a superellipse with an exponent drawn log-uniformly from that shape's
    range (the ambiguous input) and as the scene's true shape (the target)."""
    shapes = sorted(exponents)
    blurred, true, scenes = [], [], []
    for _ in range(count):
        drawn = random_scene(rng, position_prob=0.6)
        scene = Scene(drawn.color, rng.choice(shapes), drawn.background, drawn.position)
        box = object_box(scene, rng)
        lo, hi = exponents[scene.shape]
        exponent = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        blurred.append(render_box(scene, size, *box, exponent=exponent))
        true.append(render_box(scene, size, *box))
        scenes.append(scene)
    return blurred, true, scenes


@torch.no_grad()
def outline_pair_latents(vae: AutoencoderKL, args) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stage 4's pairs (``outline_pair_images``, ``--outline-pairs`` of them) encoded and scaled,
    with their prompts. Own RNG (seed + 13), so the pairs do not depend on earlier stages."""
    rng = random.Random(args.seed + 13)
    device = torch.device(args.device)
    vae.to(device)
    inputs, targets, prompts = [], [], []
    for begin in tqdm(range(0, args.outline_pairs, 32), desc="outline pairs", disable=args.quiet):
        blurred, true, scenes = outline_pair_images(rng, min(32, args.outline_pairs - begin), args.size,
                                                    args.outline_exponents)
        prompts += [scene.prompt for scene in scenes]
        with autocast(args):
            for images, out in ((blurred, inputs), (true, targets)):
                out.append(vae.encode(to_tensor(images).to(device)).latent_dist.mean.float().cpu() * args.scaling_factor)
    vae.cpu()
    return torch.cat(inputs), torch.cat(targets), prompts


def train_outline_pairs(unet, text_encoder, tokenizer, vae: AutoencoderKL, latents: torch.Tensor, scenes: list,
                        args) -> dict:
    """Stage 4: teach the UNet to settle an ambiguous outline by the shape word.

    A small model's samples go wrong in one way above all: at middle noise the object is a
    blob between a disc and a square, and the model keeps the blob (squares come out with
    rounded corners and are read as circles). Here the input is such a blob, a superellipse in
    the object's box (``outline_pair_latents``), noised to a timestep in ``--outline-t``, and
    the target is the prompt's true shape in that box: the clean latent is trained, for the
    conditional prediction and for the guided one the studio samples with (both branches with
    gradients, so guidance cannot push the outline away again). Each step also takes as many
    plain pairs from stage 2's data (its v or epsilon loss, plus the guided-consistency term at
    t < 500 scaled by its share), so nothing else is forgotten. ``--outline-steps`` steps of
    ``--outline-batch`` pairs of each kind (the outline pairs' loss weighted by
    ``--outline-weight``), cosine learning rate from ``--outline-lr``, an EMA
    of decay ``--outline-ema``; the text encoder stays as it is. As a 400-step continuation of
    run P it moved squares from 4 to 11 of 21 (docs/demo-model-experiments.md, session 26)."""
    start = time.perf_counter()
    scheduler = DDPMScheduler.from_config(args.scheduler_config)
    inputs, targets, prompts = outline_pair_latents(vae, args)
    device = torch.device(args.device)
    unet.to(device)
    text_encoder.to(device).requires_grad_(False)
    data = latents * args.scaling_factor
    data_prompts = [s.prompt for s in scenes]
    unet.train().requires_grad_(True)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.outline_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 13)
    tmin, tmax = args.outline_t
    batch, scale, n_train = args.outline_batch, args.guided_loss_scale, scheduler.config.num_train_timesteps

    def embed(texts):
        with torch.no_grad(), autocast(args):
            return text_encoder(token_ids(tokenizer, texts, device))[0].float()

    empty = embed([""])
    pair_losses, plain_losses = [], []
    bar = tqdm(range(args.outline_steps), desc="outline pairs", disable=args.quiet)
    for step in bar:
        set_cosine_lr(opt, args.outline_lr, step, args.outline_steps)
        i = torch.randint(0, len(inputs), (batch,), generator=gen)
        t = torch.randint(tmin, tmax + 1, (batch,), generator=gen)
        noisy = scheduler.add_noise(inputs[i], torch.randn(inputs[i].shape, generator=gen), t).to(device)
        goal = targets[i].to(device)
        j = torch.randint(0, len(data), (batch,), generator=gen)
        x0 = data[j]
        noise = torch.randn(x0.shape, generator=gen)
        td = torch.randint(0, n_train, (batch,), generator=gen)
        noisy_d = scheduler.add_noise(x0, noise, td).to(device)
        target_d = (scheduler.get_velocity(x0, noise, td) if scheduler.config.prediction_type == "v_prediction"
                    else noise).to(device)
        low = td < 500
        n_low = int(low.sum())
        cond = torch.cat([embed([prompts[k] for k in i.tolist()]), embed([data_prompts[k] for k in j.tolist()]),
                          empty.expand(batch + n_low, -1, -1)])
        with autocast(args):
            pred = unet(torch.cat([noisy, noisy_d, noisy, noisy_d[low.to(device)]]),
                        torch.cat([t, td, t, td[low]]).to(device), encoder_hidden_states=cond).sample.float()
        pred_c, pred_dc, pred_u, pred_du = pred.split([batch, batch, batch, n_low])
        t_dev = t.to(device)
        pair_loss = F.mse_loss(clean_and_noise(scheduler, noisy, pred_c, t_dev)[0], goal) + F.mse_loss(
            clean_and_noise(scheduler, noisy, pred_u + scale * (pred_c - pred_u), t_dev)[0], goal)
        plain_loss = F.mse_loss(pred_dc, target_d)
        if n_low:
            sel = low.to(device)
            plain_loss = plain_loss + guided_consistency_loss(
                pred_dc[sel], pred_du, target_d[sel], torch.ones(n_low, device=device), scale) * (n_low / batch)
        loss = args.outline_weight * pair_loss + plain_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - args.outline_ema)
        pair_losses.append(pair_loss.detach())
        plain_losses.append(plain_loss.detach())
        if step % 20 == 0:
            bar.set_postfix(pairs=f"{float(pair_losses[-1]):.4f}", plain=f"{float(plain_losses[-1]):.4f}")
    unet.load_state_dict(ema.state_dict())
    unet.cpu().eval()
    text_encoder.cpu()
    return {"outline_pair_loss_last50": float(torch.stack(pair_losses[-50:]).mean()),
            "outline_plain_loss_last50": float(torch.stack(plain_losses[-50:]).mean()),
            "outline_minutes": (time.perf_counter() - start) / 60}


def write_model_card(out: Path, args, stats: dict, counts: dict) -> None:
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    metrics = "\n".join(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in stats.items())
    schedule = "SD 1.x noise schedule" + (
        ", rescaled to zero terminal SNR" if args.zero_terminal_snr else "") + f", {args.prediction_type}"
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

    {args.command}

on {torch.get_num_threads()} CPU threads, torch {torch.__version__}; it took {stats.get('train_minutes', 0):.1f} minutes.

## Final metrics

| metric | value |
|---|---|
{metrics}

Prompt adherence is measured by `python tools/eval_demo_model.py` (see the project README).
"""
    (out / "README.md").write_text(card, encoding="utf-8")


def unet_with_config(unet: UNet2DConditionModel, new_prefix: str = "", **changes) -> UNet2DConditionModel:
    """A UNet built from ``unet``'s config with ``changes`` and carrying all of its weights; the
    only weights it may lack are new ones under ``new_prefix``, left as initialised (an empty
    prefix: none may be new). diffusers drops the keys listed in ``_use_default_values`` from a
    config it builds from, so that list goes, or a changed default would silently not apply."""
    config = {key: value for key, value in unet.config.items() if key != "_use_default_values"}
    grown = UNet2DConditionModel.from_config(dict(config, **changes))
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not new_prefix or not key.startswith(new_prefix) for key in missing):
        raise ValueError(f"cannot change this UNet's {sorted(changes)}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return grown


def grow_first_level_attention(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The same UNet with attention added at its full-resolution up level, computing exactly the
    same function: every weight is copied, and each new transformer's output projection starts
    at zero, so its residual branch adds nothing until training moves it."""
    up = tuple(unet.config.up_block_types)
    grown = unet_with_config(unet, f"up_blocks.{len(up) - 1}.attentions.",
                             up_block_types=up[:-1] + ("CrossAttnUpBlock2D",))
    for attention in grown.up_blocks[-1].attentions:
        torch.nn.init.zeros_(attention.proj_out.weight)
        torch.nn.init.zeros_(attention.proj_out.bias)
    return grown


def grow_text_time_embedding(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """The same UNet with a text-time embedding (``--text-time-embedding``) added, computing
    exactly the same function: every weight is copied and the new embedding's final layer norm
    starts at zero gain and bias, so it adds nothing to the timestep embedding until trained."""
    grown = unet_with_config(unet, "add_embedding.", **text_time_config(True))
    torch.nn.init.zeros_(grown.add_embedding.norm2.weight)
    torch.nn.init.zeros_(grown.add_embedding.norm2.bias)
    return grown


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
    unet = own_weights(UNet2DConditionModel.from_pretrained(folder / "unet"))
    have, want = tuple(unet.config.block_out_channels), unet_channels(args.unet_levels, args.unet_first_channels)
    if have != want:
        raise SystemExit(f"--init-from: {folder} has UNet channels {list(have)}, this run asks for {list(want)} "
                         f"(--unet-levels {args.unet_levels} --unet-first-channels {args.unet_first_channels})")
    have_layers, want_layers = unet.config.layers_per_block, unet_layers(args.unet_levels, args.first_level_layers)
    if (have_layers if isinstance(have_layers, int) else tuple(have_layers)) != want_layers:
        raise SystemExit(f"--init-from: {folder} has UNet layers per block {have_layers}, this run asks for "
                         f"{want_layers} (--first-level-layers {args.first_level_layers})")
    want_down, want_up = unet_block_types(args.unet_levels, args.first_level_attention)
    if tuple(unet.config.down_block_types) != want_down or tuple(unet.config.up_block_types) != want_up:
        if tuple(unet.config.down_block_types) != want_down or not args.first_level_attention:
            raise SystemExit(f"--init-from: {folder} has UNet blocks {list(unet.config.up_block_types)}, this run asks "
                             f"for {list(want_up)}; only adding --first-level-attention to a run without it is supported")
        unet = grow_first_level_attention(unet)
        log.info("--init-from: added attention to the UNet's full-resolution up level (starts as the identity)")
    has_text_time = unet.config.addition_embed_type == "text"
    if has_text_time != bool(args.text_time_embedding):
        if has_text_time:
            raise SystemExit(f"--init-from: {folder} has a text-time embedding and this run does not ask for one; "
                             "pass --text-time-embedding (only adding it to a run without it is supported)")
        unet = grow_text_time_embedding(unet)
        log.info("--init-from: added a text-time embedding to the UNet (starts as the identity)")
    if unet.config.downsample_padding != args.downsample_padding:
        # Same weights, other border handling in the downsamplers: continue with the padding
        # this run asks for (the UNet then learns to use the new left/right cue).
        log.info("--init-from: switching the UNet's downsample padding from %s to %s",
                 unet.config.downsample_padding, args.downsample_padding)
        unet = unet_with_config(unet, downsample_padding=args.downsample_padding)
    return unet, own_weights(CLIPTextModel.from_pretrained(folder / "text_encoder"))


def parse_outline_options(p: argparse.ArgumentParser, t_range: str, exponents: str):
    """``--outline-t MIN,MAX`` and ``--outline-exponents SHAPE:LO:HI,...`` as a tuple and a dict,
    or an argparse error naming the option and the value."""
    try:
        tmin, tmax = (int(v) for v in str(t_range).split(","))
    except ValueError:
        p.error(f"--outline-t must be MIN,MAX (two whole timesteps), got {t_range!r}")
    if not 0 <= tmin <= tmax < 1000:
        p.error(f"--outline-t must satisfy 0 <= MIN <= MAX <= 999, got {t_range!r}")
    ranges = {}
    for part in str(exponents).split(","):
        try:
            shape, lo, hi = part.split(":")
            lo, hi = float(lo), float(hi)
        except ValueError:
            p.error(f"--outline-exponents must be SHAPE:LO:HI entries separated by commas, got {part!r}")
        if shape not in SHAPES or shape in ranges:
            p.error(f"--outline-exponents: {shape!r} is not one of {', '.join(SHAPES)} (each at most once)")
        if not (0 < lo <= hi and math.isfinite(hi)):
            p.error(f"--outline-exponents: {shape} needs 0 < LO <= HI, got {lo:g}:{hi:g}")
        ranges[shape] = (lo, hi)
    return (tmin, tmax), ranges


# Named recipes: the options of a documented run, read before the command's own so that any
# option given beside ``--recipe`` still wins. ``shipped`` is the base run of the bundled weights,
# the first command in assets/demo-model/README.md (the weights are it plus 800 more stage-4
# steps, the card's second command; tests/test_demo_model.py holds the recipe to the record).
RECIPES = {
    "shipped": (
        "--seed 0 --bf16 --vae-steps 1200 --decoder-steps 800 --dataset 6000 --batch 24 --unet-steps 1800 "
        "--second-cycle-steps 500 --second-cycles 1 --second-cycle-lr 2e-4 --second-cycle-dataset 4000 "
        "--lr 5e-4 --ema 0.999 --prediction-type v_prediction --zero-terminal-snr --downsample-padding 0 "
        "--unet-first-channels 64 --low-freq-noise 0,0,0 --high-noise-frac 0 --guided-loss 1 "
        "--guided-loss-max-t 500 --guided-loss-from 0.5 --sampler-decoder-steps 400 "
        "--sampler-decoder-pairs 800 --threads 2 --checkpoint-every 600 --text-pretrain-steps 1200 "
        "--freeze-text-encoder --lowres-steps 1200 --lowres-batch 48 --lowres-size 128 "
        "--lowres-dataset 12000 --text-time-embedding --first-level-layers 2 --outline-steps 800"
    ),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="start from a documented run's options (shipped: the bundled weights' base run, "
                   "about 130 minutes on a 2-core CPU with AVX512-BF16); options given beside it override it")
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
    p.add_argument("--sampler-decoder-steps", type=int, default=0,
                   help="stage 3: fine-tune the VAE decoder on latents the trained UNet's sampler ends on, "
                   "paired with the real images they started from (0: skip)")
    p.add_argument("--sampler-decoder-pairs", type=int, default=1600, help="sampler latents made for stage 3")
    p.add_argument("--sampler-decoder-lr", type=float, default=1e-4)
    p.add_argument("--sampler-decoder-max-t", type=int, default=600,
                   help="stage 3's sampling starts at a timestep of the 20-step schedule at or below this")
    p.add_argument("--outline-steps", type=int, default=0,
                   help="stage 4 (after stage 3): steps on in-between-outline pairs, see train_outline_pairs")
    p.add_argument("--outline-pairs", type=int, default=1536, help="in-between-outline pairs drawn and encoded for stage 4")
    p.add_argument("--outline-batch", type=int, default=12, help="pairs per stage-4 step (and as many plain pairs)")
    p.add_argument("--outline-lr", type=float, default=2e-4, help="peak learning rate of stage 4")
    p.add_argument("--outline-ema", type=float, default=0.98, help="EMA decay of stage 4")
    p.add_argument("--outline-weight", type=float, default=1.0,
                   help="weight of the outline pairs' loss against the plain pairs' in stage 4")
    p.add_argument("--outline-t", default="150,500", metavar="MIN,MAX",
                   help="training timesteps the outline inputs are noised to")
    p.add_argument("--outline-exponents", default="square:2.4:8,circle:1.6:2.2", metavar="SHAPE:LO:HI,...",
                   help="the shapes stage 4 teaches and the superellipse exponents drawn for each")
    p.add_argument("--dataset", type=int, default=6000, help="number of rendered training images")
    p.add_argument("--object-grid", type=int, default=0, metavar="PX",
                   help="draw every training object's bounding box on whole PX-pixel cells (8: the latent "
                        "cells, so a square's edges fall between latent pixels); 0 places it anywhere")
    p.add_argument("--unet-steps", type=int, default=3500)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--guided-loss", type=float, default=0.0,
                   help="weight of the guided-consistency term: at timesteps below --guided-loss-max-t the "
                   "classifier-free-guided prediction is also trained towards the target (0: off)")
    p.add_argument("--guided-loss-from", type=float, default=0.0,
                   help="the guided-consistency term starts at this fraction of the UNet steps (it costs an extra "
                   "UNet pass for its samples; it polishes what the plain loss has learned)")
    p.add_argument("--guided-loss-scale", type=float, default=7.5,
                   help="guidance scale of that term (the studio's and the evaluation's default)")
    p.add_argument("--guided-loss-max-t", type=int, default=500,
                   help="the term applies to training timesteps below this (of 1000)")
    p.add_argument("--edge-weight", type=float, default=0.0,
                   help="weight the denoising loss towards the clean latent's edges by 1 + this "
                        "times the normalised edge strength (0: plain MSE); aimed at the outline "
                        "that tells squares from circles")
    p.add_argument("--self-input-frac", type=float, default=0.0,
                   help="share of each batch trained on the state one guided DDIM step of the model itself "
                   "reaches, instead of a freshly noised latent (0: off)")
    p.add_argument("--self-input-gap", type=int, default=50,
                   help="that step's length in training timesteps (50: the studio's 20-step sampling)")
    p.add_argument("--high-noise-frac", type=float, default=0.3,
                   help="fraction of training timesteps drawn from the noisiest 30%% (the rest uniform)")
    p.add_argument("--logit-normal-timesteps", metavar="MEAN,STD",
                   help="draw training timesteps as sigmoid(N(MEAN, STD)) of the range instead of uniformly "
                        "(e.g. 0,1: more middle noise, where outlines are decided)")
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
    p.add_argument("--first-level-layers", type=int, default=1,
                   help="ResNet layers at the UNet's first level going down (one more coming up), 1 to 4; "
                   "the other levels keep one. 2 costs about 1.2x per training step")
    p.add_argument("--first-level-attention", action="store_true",
                   help="self- and cross-attention at the up path's full-resolution level (about 2x the "
                   "UNet's cost); with --init-from a model without it, the attention is added as the identity")
    p.add_argument("--text-time-embedding", action="store_true",
                   help="add the pooled prompt to the timestep embedding (diffusers' addition_embed_type='text'), "
                   "so the full-resolution ResNet blocks that draw the outline see the prompt too; with "
                   "--init-from a model without it, it is added as the identity")
    p.add_argument("--downsample-padding", type=int, choices=(0, 1), default=1,
                   help="1: SD's symmetric padding in the UNet's downsamplers; 0: pad only the right and "
                   "bottom edges (the original LDM code), which tells left from right and top from bottom")
    p.add_argument("--lowres-steps", type=int, default=0,
                   help="stage 2a: train the UNet this many steps on --lowres-size images first (0: off)")
    p.add_argument("--lowres-size", type=int, default=128, help="image size of stage 2a, a multiple of 64")
    p.add_argument("--lowres-batch", type=int, default=48)
    p.add_argument("--lowres-dataset", type=int, default=12000, help="number of rendered images for stage 2a")
    p.add_argument("--second-cycle-steps", type=int, default=0,
                   help="stage 2b: steps of a second cosine cycle on fresh scenes after stage 2 (0: none)")
    p.add_argument("--second-cycle-lr", type=float, default=2e-4, help="peak learning rate of stage 2b")
    p.add_argument("--second-cycle-dataset", type=int, default=6000,
                   help="number of fresh rendered images for stage 2b")
    p.add_argument("--second-cycles", type=int, default=1,
                   help="how many stage-2b cycles to run one after another, each on its own fresh scenes")
    p.add_argument("--text-pretrain-steps", type=int, default=0,
                   help="contrastive (CLIP-style) pretraining of the text encoder against the training latents "
                   "before stage 2 (0: off, the text encoder starts random)")
    p.add_argument("--text-pretrain-batch", type=int, default=256)
    p.add_argument("--text-pretrain-objective", choices=("contrastive", "attributes"), default="contrastive",
                   help="contrastive: captions against a CNN over the training latents (CLIP-style); attributes: "
                   "heads read each caption's colours, shape and position back (no image tower, far cheaper; but in run T4 it "
                   "left shape words close in the token states the UNet reads, and shape fell to 31%%: "
                   "docs/demo-model-experiments.md, session 33)")
    p.add_argument("--text-pretrain-lr", type=float, default=1e-3)
    p.add_argument("--freeze-text-encoder", action="store_true",
                   help="keep the text encoder fixed in stage 2, as Stable Diffusion keeps CLIP's")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for every stage's forward passes (float32 weights and losses)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="also save the EMA weights every N UNet steps to OUT/checkpoints/step-N (0: off)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine, 2 threads stall on each other)")
    p.add_argument("--device", default="cpu", help="torch device for stage 2 and the dataset encoding "
                   "(cpu, cuda); noise and batches are drawn on the CPU either way")
    p.add_argument("--resume-vae", action="store_true", help="reuse OUT/vae-stage1 from an interrupted run")
    p.add_argument("--vae-from", help="reuse the stage-1 autoencoder of an earlier run (a diffusers vae folder) "
                   "instead of training it; stage 2 is unchanged")
    p.add_argument("--init-from", help="continue training the UNet and text encoder of an earlier run's folder "
                   "(its VAE too, unless --vae-from); use another --seed so the batches differ")
    p.add_argument("--dataset-cache", help="folder to keep encoded training sets in, reused by later runs "
                   "with the same encoder, seed and dataset size")
    p.add_argument("--smoke", action="store_true", help="same code, a few steps: for CI")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = p.parse_known_args(argv)[0].recipe  # argparse's own reading: --recipe=X, abbreviations, checks
    if recipe:
        # The recipe's options first, so that those given beside it win (argparse keeps an
        # option's last value); kept written out for the card, which then needs no RECIPES table.
        argv = shlex.split(RECIPES[recipe]) + argv
    args = p.parse_args(argv)
    args.argv = argv
    if args.bf16 and torch.device(args.device).type == "cpu" and not args.smoke and not cpu_has_fast_bf16():
        p.error(f"--bf16: this CPU has no bfloat16 path in oneDNN (it needs AVX-512; torch reads this one as "
                f"{torch.backends.cpu.get_cpu_capability()}), so bf16 autocast is emulated and a step runs "
                "several times slower than in float32; add --no-bf16 to train in float32 (its weights "
                "differ from a bf16 run's), or run on a CPU with AVX-512 BF16 or AMX, or a GPU")
    try:
        args.low_freq_noise = tuple(float(v) for v in str(args.low_freq_noise).split(",") if v.strip())
    except ValueError:
        p.error(f"--low-freq-noise must be comma-separated numbers, got {args.low_freq_noise!r}")
    if args.logit_normal_timesteps is not None:
        try:
            mean, std = (float(v) for v in args.logit_normal_timesteps.split(","))
        except ValueError:
            p.error(f"--logit-normal-timesteps must be MEAN,STD (two numbers), got {args.logit_normal_timesteps!r}")
        if not std > 0:
            p.error(f"--logit-normal-timesteps: STD must be positive, got {std:g}")
        args.logit_normal_timesteps = (mean, std)
    if args.guided_loss < 0:
        p.error(f"--guided-loss must be 0 or more, got {args.guided_loss}")
    if not 0 <= args.self_input_frac <= 1:
        p.error(f"--self-input-frac must be between 0 and 1, got {args.self_input_frac}")
    if not (math.isfinite(args.edge_weight) and args.edge_weight >= 0):
        p.error(f"--edge-weight must be a number >= 0, got {args.edge_weight}")
    if not 1 <= args.self_input_gap < 1000:
        p.error(f"--self-input-gap must be between 1 and 999 training timesteps, got {args.self_input_gap}")
    if not 49 <= args.sampler_decoder_max_t <= 1000:
        p.error(f"--sampler-decoder-max-t must be between 49 (the 20-step schedule's last step) and 1000, "
                f"got {args.sampler_decoder_max_t}")
    if not 0 <= args.guided_loss_from < 1:
        p.error(f"--guided-loss-from must be a fraction of the UNet steps in [0, 1), got {args.guided_loss_from}")
    if args.lowres_steps and (args.lowres_size < 64 or args.lowres_size % 64 or args.lowres_size >= args.size):
        p.error(f"--lowres-size must be a multiple of 64 below --size {args.size}, got {args.lowres_size}")
    for name in ("text_pretrain_steps", "checkpoint_every", "lowres_steps", "second_cycle_steps"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if args.second_cycles < 1:
        p.error(f"--second-cycles must be at least 1 (use --second-cycle-steps 0 for none), got {args.second_cycles}")
    if args.second_cycle_steps and args.second_cycle_dataset < 1:
        p.error(f"--second-cycle-dataset must be at least 1 image, got {args.second_cycle_dataset}")
    if args.second_cycle_steps and not (math.isfinite(args.second_cycle_lr) and args.second_cycle_lr > 0):
        p.error(f"--second-cycle-lr must be a positive number, got {args.second_cycle_lr}")
    args.outline_t, args.outline_exponents = parse_outline_options(p, args.outline_t, args.outline_exponents)
    for name in ("outline_pairs", "outline_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.outline_steps < 0:
        p.error(f"--outline-steps must be 0 or more, got {args.outline_steps}")
    if not (math.isfinite(args.outline_lr) and args.outline_lr > 0):
        p.error(f"--outline-lr must be a positive number, got {args.outline_lr}")
    if not (math.isfinite(args.outline_weight) and args.outline_weight > 0):
        p.error(f"--outline-weight must be a positive number, got {args.outline_weight}")
    if not 0 <= args.outline_ema < 1:
        p.error(f"--outline-ema must be in [0, 1), got {args.outline_ema}")
    # The contrastive loss compares the captions of a batch with each other; the attribute heads read one.
    least = 2 if args.text_pretrain_objective == "contrastive" else 1
    if args.text_pretrain_batch < least:
        p.error(f"--text-pretrain-batch must be at least {least} for --text-pretrain-objective "
                f"{args.text_pretrain_objective}, got {args.text_pretrain_batch}")
    if not 1 <= args.guided_loss_max_t <= 1000:
        p.error(f"--guided-loss-max-t must be between 1 and 1000 (training timesteps), got {args.guided_loss_max_t}")
    try:
        unet_channels(args.unet_levels, args.unet_first_channels)
    except ValueError as err:
        p.error(f"--unet-first-channels: {err}")
    try:
        unet_layers(args.unet_levels, args.first_level_layers)
    except ValueError as err:
        p.error(f"--first-level-layers: {err}")
    try:
        args.scheduler_config = scheduler_config(args.prediction_type, args.zero_terminal_snr)
    except ValueError as err:
        p.error(str(err))
    if args.unet_steps < 0 or (args.unet_steps == 0 and not args.init_from):
        p.error(f"--unet-steps must be positive (0 only with --init-from, to run stage 3 or 4 alone), "
                f"got {args.unet_steps}")
    if args.smoke:
        args.size, args.vae_steps, args.vae_batch, args.vae_crop = 64, 3, 2, 64
        args.dataset, args.unet_steps, args.batch = 16, min(args.unet_steps, 3), 4
        args.decoder_steps, args.decoder_batch = min(args.decoder_steps, 2), 2
        args.sampler_decoder_steps, args.sampler_decoder_pairs = min(args.sampler_decoder_steps, 2), 4
        args.text_pretrain_steps, args.text_pretrain_batch = min(args.text_pretrain_steps, 2), 8
        args.lowres_steps, args.lowres_size, args.lowres_batch, args.lowres_dataset = min(args.lowres_steps, 2), 32, 4, 8
        args.second_cycle_steps, args.second_cycle_dataset = min(args.second_cycle_steps, 2), 8
        args.outline_steps, args.outline_pairs, args.outline_batch = min(args.outline_steps, 2), 4, 2
    if args.object_grid < 0:
        p.error(f"--object-grid: the cell size must be 0 (off) or a positive number of pixels, got {args.object_grid}")
    if args.object_grid:
        for size in [args.size] + ([args.lowres_size] if args.lowres_steps else []):
            try:
                snap_to_grid(0.4, 0.5, 0.5, size, args.object_grid)
            except ValueError as err:
                p.error(f"--object-grid: {err}")
    return args


def save_pipeline(folder: Path, vae, text_encoder, tokenizer, unet, args) -> None:
    """Write the components as a diffusers Stable Diffusion folder (safetensors, no safety checker)."""
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
    pipe.save_pretrained(folder, safe_serialization=True)


def main(argv=None) -> Path:
    args = parse_args(argv)
    # The command exactly as given, for the model card (every option, not a summary of them).
    # A --recipe is written out as its options, so the card's command does not depend on RECIPES.
    args.command = "python tools/train_demo_model.py " + shlex.join(args.argv)
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
    unet = build_unet(args.size, args.unet_levels, args.downsample_padding, args.unet_first_channels,
                      args.first_level_attention, args.text_time_embedding, args.first_level_layers)
    parent_record = None
    if args.init_from:
        unet, text_encoder = load_stage2(Path(args.init_from), args)
        parent = Path(args.init_from) / "training.json"
        if parent.is_file():
            parent_record = json.loads(parent.read_text())
        args.vae_from = args.vae_from or str(Path(args.init_from) / "vae")
    counts = {"unet": param_count(unet), "vae": param_count(vae), "text_encoder": param_count(text_encoder)}
    log.info("parameters: %s", counts)

    stats: dict = {}
    stage1 = out / "vae-stage1"
    if args.vae_from:
        vae = own_weights(AutoencoderKL.from_pretrained(args.vae_from))
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
    # A UNet that has already learnt a latent scale (--init-from: a continuation, or stage 3
    # alone) keeps the one saved with the VAE it goes on from (--vae-from, by default the
    # parent's); a new one gets SD's, the scale that gives its latents unit variance.
    args.scaling_factor = float(vae.config.scaling_factor)
    latents = scenes = None
    if args.unet_steps:
        latents, scenes = load_or_encode_dataset(vae, args, rng)
        if not args.init_from:
            args.scaling_factor = float(1.0 / latents.std())
            vae.register_to_config(scaling_factor=args.scaling_factor)
        if args.text_pretrain_steps:
            if args.text_pretrain_objective == "attributes":
                stats.update(pretrain_text_attributes(text_encoder, tokenizer, args))
            else:
                stats.update(pretrain_text_encoder(text_encoder, tokenizer, latents, scenes, args, rng))

        def snapshot(step, unet_now, text_now):
            save_pipeline(out / "checkpoints" / f"step-{step}", vae, text_now, tokenizer, unet_now, args)
            log.info("step %d: EMA weights saved to %s", step, out / "checkpoints" / f"step-{step}")

        if args.lowres_steps:
            stats.update(train_lowres_first(unet, text_encoder, tokenizer, vae, args, rng))
        stats.update(train_diffusion(unet, text_encoder, tokenizer, latents, scenes, args, rng, snapshot))
        if args.second_cycle_steps:
            for cycle in range(args.second_cycles):
                if args.checkpoint_every:
                    # Where each cycle starts (stage 2's end first), kept so each cycle's own
                    # effect can be measured; named by the UNet steps done so far.
                    snapshot(args.unet_steps + cycle * args.second_cycle_steps, unet, text_encoder)
                stats.update(train_second_cycle(unet, text_encoder, tokenizer, vae, args, rng, cycle))
    stats["vae_scaling_factor"] = args.scaling_factor
    if args.sampler_decoder_steps:
        pairs = sampler_latent_pairs(vae, unet, text_encoder, tokenizer, args)
        stats.update({f"sampler_{k}": v for k, v in train_decoder(vae, args, pairs).items()})
        stats["sampler_decoder_steps"] = args.sampler_decoder_steps
        stats["vae_heldout_l1_uint8_after_sampler_decoder"] = heldout_reconstruction_error(vae, args)
    if args.outline_steps:
        if latents is None:  # --unet-steps 0: stage 4 alone on a continuation; draw its plain data
            latents, scenes = load_or_encode_dataset(vae, args, rng)
        stats.update(train_outline_pairs(unet, text_encoder, tokenizer, vae, latents, scenes, args))
        stats["outline_steps"] = args.outline_steps
    stats["train_minutes"] = (time.perf_counter() - start) / 60

    save_pipeline(out, vae, text_encoder, tokenizer, unet, args)
    if stage1.exists():
        import shutil

        shutil.rmtree(stage1)
    record = {"args": vars(args), "stats": stats}
    if parent_record is not None:
        # A continuation keeps the record of the weights it started from, so a model folder's
        # training.json holds its whole lineage (read at the start: `out` may be that folder).
        record["init_from_training"] = parent_record
    (out / "training.json").write_text(json.dumps(record, indent=2, default=str))
    write_model_card(out, args, stats, counts)
    log.info("wrote %s in %.1f min: %s", out, stats["train_minutes"], stats)
    return out


if __name__ == "__main__":
    main()
