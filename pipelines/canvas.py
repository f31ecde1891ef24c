"""Large canvas: one coherent image of any size from overlapping tiles in latent space.

Stable Diffusion is trained at one size; asked for a 2048x512 panorama directly it repeats
and breaks. MultiDiffusion (Bar-Tal et al. 2023, arXiv 2302.08113) runs the UNet on
overlapping windows ("views") of the canvas latents at every denoising step and fuses them,
so neighbouring tiles agree at every step and the canvas has no seams.

We fuse the views' *noise predictions* with per-pixel weights into one canvas-sized
prediction and take one scheduler step on the whole canvas. Every scheduler step is linear
in the noise prediction, so this is the paper's per-pixel weighted average (its Eq. 5) for
first-order samplers, and it keeps one scheduler state for the canvas: multistep samplers
(DPM++ 2M, UniPC, PLMS, LMS) keep one history instead of a deep copy per view, and ancestral
samplers add noise of the right variance once instead of averaging per-view noise.

Memory: besides the UNet's working set for ``tile_batch_size`` views, a job holds a few
canvas-sized latent tensors (latents, the fused prediction, the weight sum, the sampler's
history); large canvases decode in VAE tiles (:func:`decode_canvas`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from PIL import Image

from .manager import PipelineManager, resolve_seeds
from .progress import JobControl
from .requests import BLEND_MODES, CanvasRequest
from .results import GenerationResult
from .txt2img import decode_latents, dropped_token_warning

log = logging.getLogger(__name__)

View = tuple[int, int, int, int]
"""A window of the canvas latents: ``(top, bottom, left, right)``, bottom and right exclusive."""

# A tile is one UNet input. Beyond twice the native size the tile itself repeats and breaks,
# which is what tiling exists to avoid (and SD's attention memory grows with its square).
MAX_TILE_FACTOR = 2
# UNet evaluations per step are bounded so one job cannot hold the device for hours
# (an overlap of tile - 8 on a 4096x1024 canvas would be 29,000 views).
MAX_VIEWS = 1024
# Canvases over this many pixels decode in the VAE's own overlapping tiles. The SD 1.x VAE
# decoder's peak memory grows linearly with the pixels (tools/bench_canvas.py --memory, fp16, H200):
# 0.6 GiB at 512x512, 2.4 GiB at 1024x1024, 4.8 GiB at 2048x1024, 9.5 GiB at 2048x2048, while
# tiled decoding stays at 0.6 GiB for all of them but takes 2-3x as long and can show faint tile
# edges. 1 megapixel decodes directly next to the 2 GiB of fp16 weights on an 8 GB card.
DIRECT_DECODE_MAX_PIXELS = 1024 * 1024
# Width of the Gaussian feather, as a fraction of the ramp: the weight at the tile's edge is
# exp(-0.5 / 0.3**2) ~= 0.004, small but never 0, so every latent pixel keeps a weight.
GAUSSIAN_SIGMA = 0.3


# ----------------------------------------------------------------------------- geometry (pure)


def axis_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows of ``tile`` along an axis of ``length``, every ``stride``; the last
    window is clamped to end at the border (MultiDiffusion's views, arXiv 2302.08113 Sec. 4.1)."""
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def canvas_views(height: int, width: int, tile: int, overlap: int) -> list[View]:
    """The views covering a ``height`` x ``width`` latent canvas, row by row.

    Args:
        height, width: canvas size in latent pixels.
        tile: window side in latent pixels; a canvas side shorter than the tile gets one
            window spanning that whole side.
        overlap: latent pixels shared by neighbouring windows, ``0 <= overlap < tile``; the
            last row and column are clamped to the border, so they may overlap more.

    Returns:
        ``(top, bottom, left, right)`` for each view; all views have the same size.
    """
    if min(height, width, tile) < 1:
        raise ValueError(f"height, width and tile must be positive, got {height}, {width}, {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be from 0 to below the tile ({tile}), got {overlap}")
    stride = tile - overlap
    view_height, view_width = min(tile, height), min(tile, width)
    return [
        (top, top + view_height, left, left + view_width)
        for top in axis_starts(height, tile, stride)
        for left in axis_starts(width, tile, stride)
    ]


def edge_ramp(ramp: int, blend: str) -> torch.Tensor:
    """Weights rising from a tile edge over ``ramp`` latent pixels, each in (0, 1].

    ``cosine`` is the raised cosine sin^2: two ramps facing each other over the same pixels sum
    to exactly 1. ``gaussian`` falls off as a Gaussian towards the edge. ``uniform`` is flat
    (plain MultiDiffusion averaging).
    """
    if blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)}, got {blend!r}")
    # Sample at pixel centres so the outermost pixel's weight is above 0.
    x = (torch.arange(ramp, dtype=torch.float64) + 0.5) / max(ramp, 1)
    if blend == "cosine":
        return torch.sin(0.5 * math.pi * x) ** 2
    if blend == "gaussian":
        return torch.exp(-0.5 * ((1.0 - x) / GAUSSIAN_SIGMA) ** 2)
    return torch.ones(ramp, dtype=torch.float64)


def axis_profile(start: int, end: int, length: int, ramp: int, blend: str) -> torch.Tensor:
    """One view's 1-D weights along an axis: ramps at its edges inside the canvas only.

    An edge on the canvas border is not feathered, since no other view covers the pixels there
    and their weight must not fall towards 0.
    """
    size = end - start
    weights = torch.ones(size, dtype=torch.float64)
    ramp = min(ramp, size)
    if blend == "uniform" or ramp == 0:
        return weights
    rising = edge_ramp(ramp, blend)
    if start > 0:
        weights[:ramp] *= rising
    if end < length:
        weights[size - ramp :] *= rising.flip(0)
    return weights


def view_weights(view: View, height: int, width: int, ramp: int, blend: str) -> torch.Tensor:
    """Per-pixel blend weights of ``view`` on a ``height`` x ``width`` canvas, shape ``(h, w)``, all > 0."""
    top, bottom, left, right = view
    rows = axis_profile(top, bottom, height, ramp, blend)
    cols = axis_profile(left, right, width, ramp, blend)
    return torch.outer(rows, cols).float()


# ----------------------------------------------------------------------------- request settings


@dataclass(frozen=True)
class CanvasTiling:
    """A canvas' resolved tile settings, in pixels, and its views in latent pixels."""

    tile_size: int
    tile_overlap: int
    views: tuple[View, ...]


def default_overlap(tile_size: int) -> int:
    """A quarter of the tile, rounded down to the VAE's factor of 8."""
    return tile_size // 4 // 8 * 8


def resolve_tiling(width: int, height: int, tile_size: int | None, tile_overlap: int | None,
                   native_size: int) -> CanvasTiling:
    """Fill in the defaults (tile = native size, overlap = a quarter) and check what depends on the model.

    Raises:
        ValueError: naming ``tile_size`` or ``tile_overlap`` and the bad value.
    """
    tile = native_size if tile_size is None else tile_size
    max_tile = MAX_TILE_FACTOR * native_size
    if not isinstance(tile, int) or isinstance(tile, bool) or tile % 8 or not 64 <= tile <= max_tile:
        raise ValueError(
            f"tile_size must be a multiple of 8 from 64 to {max_tile} pixels (twice the model's native "
            f"{native_size}), got {tile!r}"
        )
    overlap = default_overlap(tile) if tile_overlap is None else tile_overlap
    if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap % 8 or not 0 <= overlap < tile:
        raise ValueError(
            f"tile_overlap must be a multiple of 8 from 0 to below tile_size ({tile}), got {overlap!r}"
        )
    views = canvas_views(height // 8, width // 8, tile // 8, overlap // 8)
    if len(views) > MAX_VIEWS:
        raise ValueError(
            f"tile_overlap {overlap} with tile_size {tile} makes {len(views)} views on a {width}x{height} "
            f"canvas, over the limit of {MAX_VIEWS}: lower tile_overlap or raise tile_size"
        )
    return CanvasTiling(tile, overlap, tuple(views))


# ----------------------------------------------------------------------------- decoding


@contextmanager
def vae_tiling(vae) -> Iterator[None]:
    """Turn on the VAE's tiled decoding for one decode, then put back the previous state.

    The VAE is shared with Text to image, so it must not stay changed.
    """
    previous = vae.use_tiling
    vae.enable_tiling()
    try:
        yield
    finally:
        vae.use_tiling = previous


def decode_canvas(pipe, latents: torch.Tensor, max_direct_pixels: int = DIRECT_DECODE_MAX_PIXELS) -> list[Image.Image]:
    """VAE-decode canvas latents; over ``max_direct_pixels`` in the VAE's overlapping tiles, so peak
    memory stays near that of one VAE tile however large the canvas."""
    pixels = latents.shape[-2] * latents.shape[-1] * pipe.vae_scale_factor**2
    if pixels <= max_direct_pixels:
        return decode_latents(pipe, latents)
    log.info("decoding a %d-pixel canvas in VAE tiles", pixels)
    with vae_tiling(pipe.vae):
        return decode_latents(pipe, latents)


# ----------------------------------------------------------------------------- pipeline


class MultiDiffusionPipeline(StableDiffusionPipeline):
    """Stable Diffusion 1.x on a canvas of any size from overlapping views (arXiv 2302.08113).

    Build it from a loaded pipeline with ``MultiDiffusionPipeline.from_pipe(pipe)``: it shares
    the UNet, VAE, text encoder and tokenizer objects, no weights are copied.

    A canvas equal to one tile runs exactly the computation of ``StableDiffusionPipeline`` with
    the same generator, so it gives the same pixels as Text to image.
    """

    @classmethod
    def from_pipe(cls, pipeline, **kwargs) -> "MultiDiffusionPipeline":
        """``DiffusionPipeline.from_pipe`` that leaves the shared modules in their own dtypes.

        diffusers casts every module of the new pipeline to float32 when no dtype is given, and
        the modules are the loaded pipeline's own objects: Text to image would silently switch
        from fp16 to fp32 (twice the memory, slower) after the first canvas.
        """
        if "torch_dtype" in kwargs or "dtype" in kwargs:
            return super().from_pipe(pipeline, **kwargs)
        dtypes = {name: module.dtype for name, module in pipeline.components.items()
                  if isinstance(module, torch.nn.Module)}
        new = super().from_pipe(pipeline, dtype=pipeline.unet.dtype, **kwargs)
        for name, dtype in dtypes.items():
            module = getattr(new, name)
            if module.dtype != dtype:
                module.to(dtype)
        return new

    @property
    def native_size(self) -> int:
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def check_canvas_inputs(self, height: int, width: int, tile_size: int | None, tile_overlap: int | None,
                            blend: str, tile_batch_size: int) -> CanvasTiling:
        """Validate the canvas arguments; return the resolved tiling."""
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {', '.join(BLEND_MODES)}, got {blend!r}")
        if not isinstance(tile_batch_size, int) or tile_batch_size < 1:
            raise ValueError(f"tile_batch_size must be a whole number of at least 1, got {tile_batch_size!r}")
        return resolve_tiling(width, height, tile_size, tile_overlap, self.native_size)

    def predict_views(self, latent_input: torch.Tensor, views: list[View], t, embeds: torch.Tensor,
                      guidance_scale: float, do_cfg: bool, timestep_cond=None) -> list[torch.Tensor]:
        """One batched UNet call on ``views`` of ``latent_input``; returns each view's guided noise.

        The batch is ``[uncond views..., cond views...]``: with one view it is exactly the
        ``[uncond, cond]`` batch of ``StableDiffusionPipeline``.
        """
        crops = torch.cat([latent_input[:, :, top:bottom, left:right] for top, bottom, left, right in views])
        model_input = torch.cat([crops, crops]) if do_cfg else crops
        noise = self.unet(model_input, t, encoder_hidden_states=embeds, timestep_cond=timestep_cond,
                          return_dict=False)[0]
        if do_cfg:
            noise_uncond, noise_text = noise.chunk(2)
            noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
        return list(noise.chunk(len(views)))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        height: int = 512,
        width: int = 1024,
        tile_size: int | None = None,
        tile_overlap: int | None = None,
        blend: str = "cosine",
        tile_batch_size: int = 4,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (diffusers' signature)
    ) -> StableDiffusionPipelineOutput:
        """Generate one canvas of ``width`` x ``height`` pixels.

        Args:
            tile_size: view side in pixels (default: the model's native size).
            tile_overlap: pixels shared by neighbouring views (default: a quarter of the tile).
            blend: per-pixel view weights: ``uniform`` (MultiDiffusion's average), ``cosine`` or
                ``gaussian`` (feathered towards tile edges inside the canvas).
            tile_batch_size: views per UNet call (classifier-free guidance doubles the batch).
            generator: as for ``StableDiffusionPipeline``; it draws the initial latents and the
                ancestral samplers' step noise, in the same order.
            output_type: ``"pil"`` or ``"latent"``.
            callback_on_step_end: ``fn(pipe, step, timestep, {"latents": ...}) -> dict`` after each step.

        Returns:
            ``StableDiffusionPipelineOutput`` with ``images`` (PIL list or latents).
        """
        # 1. Check inputs
        self.check_inputs(prompt, height, width, None, negative_prompt, None, None, None, None,
                          callback_on_step_end_tensor_inputs)
        tiling = self.check_canvas_inputs(height, width, tile_size, tile_overlap, blend, tile_batch_size)
        if output_type not in ("pil", "latent"):
            raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
        self._guidance_scale = guidance_scale
        self._guidance_rescale = 0.0
        self._clip_skip = None
        self._cross_attention_kwargs = None
        self._interrupt = False

        # 2. Define call parameters: one canvas per call
        device = self._execution_device
        do_cfg = self.do_classifier_free_guidance

        # 3. Encode input prompt
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(prompt, device, 1, do_cfg, negative_prompt)

        # 4. Prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps

        # 5. Prepare latent variables: the canvas-sized noise, drawn exactly as the base pipeline draws it
        latents = self.prepare_latents(1, self.unet.config.in_channels, height, width, prompt_embeds.dtype,
                                       device, generator, latents)

        # 6. Prepare extra step kwargs, views and their blend weights
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)
        timestep_cond = None
        if self.unet.config.time_cond_proj_dim is not None:
            guidance_tensor = torch.tensor(guidance_scale - 1).repeat(1)
            timestep_cond = self.get_guidance_scale_embedding(
                guidance_tensor, embedding_dim=self.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)
        views = list(tiling.views)
        batches = [views[i : i + tile_batch_size] for i in range(0, len(views), tile_batch_size)]
        # Text embeddings per batch size, built once: [uncond x k, cond x k] to match predict_views.
        embeds_by_size = {}
        for size in {len(b) for b in batches}:
            parts = [negative_prompt_embeds.repeat(size, 1, 1)] if do_cfg else []
            embeds_by_size[size] = torch.cat(parts + [prompt_embeds.repeat(size, 1, 1)])
        latent_height, latent_width = latents.shape[-2:]
        ramp = tiling.tile_overlap // self.vae_scale_factor
        weights = [view_weights(v, latent_height, latent_width, ramp, blend).to(device) for v in views]
        weight_sum = torch.zeros((1, 1, latent_height, latent_width), device=device)
        for (top, bottom, left, right), w in zip(views, weights):
            weight_sum[:, :, top:bottom, left:right] += w
        # Accumulate in fp32 whatever the model's dtype: the weighted sum of up to MAX_VIEWS terms.
        fused = torch.zeros(latents.shape, device=device, dtype=torch.float32)
        log.debug("canvas %dx%d: %d views of %d px, overlap %d, %d per UNet call",
                  width, height, len(views), tiling.tile_size, tiling.tile_overlap, tile_batch_size)

        # 7. Denoising loop
        self._num_timesteps = len(timesteps)
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                # Scale the whole canvas once: Euler-type schedulers divide by sqrt(sigma^2 + 1) and
                # track their step index per call, so one call per step keeps one state for the canvas.
                latent_input = self.scheduler.scale_model_input(latents, t)
                fused.zero_()
                index = 0
                for batch in batches:
                    noises = self.predict_views(latent_input, batch, t, embeds_by_size[len(batch)],
                                                guidance_scale, do_cfg, timestep_cond)
                    for (top, bottom, left, right), noise in zip(batch, noises):
                        fused[:, :, top:bottom, left:right].addcmul_(noise.float(), weights[index])
                        index += 1
                # MultiDiffusion's fusion (Eq. 5): the per-pixel weighted average of the views.
                noise_pred = (fused / weight_sum).to(latents.dtype)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    step_locals = locals()
                    callback_kwargs = {k: step_locals[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        if output_type == "latent":
            return StableDiffusionPipelineOutput(images=latents, nsfw_content_detected=None)
        return StableDiffusionPipelineOutput(images=decode_canvas(self, latents), nsfw_content_detected=None)


# ----------------------------------------------------------------------------- the capability


def canvas_record(req: CanvasRequest, tiling: CanvasTiling, seed: int) -> dict:
    """The generation parameters the guard writes into the PNG and the audit log."""
    return dict(
        prompt=req.prompt, negative_prompt=req.negative_prompt, sampler=req.sampler, steps=req.steps,
        guidance_scale=req.guidance_scale, width=req.width, height=req.height, seed=seed,
        tile_size=tiling.tile_size, tile_overlap=tiling.tile_overlap, blend=req.blend,
        tile_batch_size=req.tile_batch_size,
        extra_parameters={"Tile size": tiling.tile_size, "Tile overlap": tiling.tile_overlap, "Blend": req.blend},
    )


def run_canvas(manager, req: CanvasRequest, control: JobControl) -> GenerationResult:
    """Generate one guarded canvas for ``req`` with the manager's loaded model.

    Raises:
        ValueError: a field of ``req`` is invalid (the message names it and its value).
        PromptRefused: the prompt matched the blocklist (nothing was computed).
        GenerationCancelled: the user cancelled (the job stops within one step).
    """
    req.check(manager.config.max_canvas_side, manager.config.max_canvas_pixels)
    manager.blocklist.check(prompt=req.prompt, negative_prompt=req.negative_prompt)
    base = manager.load()
    tiling = resolve_tiling(req.width, req.height, req.tile_size, req.tile_overlap, manager.native_size)
    seeds = resolve_seeds(req.seed, 1)
    warnings = [w for w in (dropped_token_warning(base.tokenizer, req.prompt),
                            dropped_token_warning(base.tokenizer, req.negative_prompt, "negative_prompt")) if w]

    def on_step_end(pipe, step, timestep, kwargs):
        control.report(step + 1, pipe.num_timesteps)
        if control.preview is not None:
            control.preview(step + 1, pipe.num_timesteps, kwargs["latents"])
        control.check_cancelled()
        return {}

    with manager.device_lock:
        pipe = manager.derived_pipeline(MultiDiffusionPipeline)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = manager.scheduler(req.sampler)
        log.info("canvas %dx%d: %d views of %d px, overlap %d, blend %s", req.width, req.height,
                 len(tiling.views), tiling.tile_size, tiling.tile_overlap, req.blend)
        control.check_cancelled()
        latents = pipe(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt or None,
            height=req.height,
            width=req.width,
            tile_size=tiling.tile_size,
            tile_overlap=tiling.tile_overlap,
            blend=req.blend,
            tile_batch_size=req.tile_batch_size,
            num_inference_steps=req.steps,
            guidance_scale=req.guidance_scale,
            # A CPU generator, as in Text to image: the same seed gives the same noise on every device.
            generator=[torch.Generator("cpu").manual_seed(seeds[0])],
            output_type="latent",
            callback_on_step_end=on_step_end,
        ).images
        images = decode_canvas(pipe, latents)
        guarded = manager.guard.deliver(images, [canvas_record(req, tiling, seeds[0])], tab="canvas",
                                        client=control.client)
    return PipelineManager._result(guarded, seeds, warnings)
