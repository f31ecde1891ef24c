"""The Large canvas tab: inputs named like CanvasRequest's fields, wired to manager.canvas.

A picture of the tile grid (every view of the MultiDiffusion canvas, overlaps shaded) updates
as the sizes change, before anything is generated, so users see what a tile and an overlap
mean and how many UNet calls a step costs.
"""

from __future__ import annotations

import numpy as np
import gradio as gr
from PIL import Image, ImageDraw

from pipelines.canvas import canvas_views, default_overlap, resolve_tiling
from pipelines.requests import BLEND_MODES, MAX_SEED, MAX_STEPS, SAMPLERS, CanvasRequest

from .common import UIContext, as_float, as_int, run_job
from .txt2img_tab import DEMO_EXAMPLES, GalleryOutputs, gallery_with_selection

SD_CANVAS_EXAMPLES = [
    "a photo of the dolomites, wide panorama, golden hour",
    "a city skyline at night seen across a river, long exposure",
    "an endless bookshelf in an old library, warm light",
]
GRID_MAX_SIDE = 768
# One colour per view outline, cycled; the fill gets darker where more views overlap.
GRID_COLOURS = ((220, 50, 47), (38, 139, 210), (133, 153, 0), (211, 54, 130), (181, 137, 0), (42, 161, 152))
GRID_FILL = 238
GRID_SHADE_PER_VIEW = 38
MAX_TILE_BATCH_UI = 16


def draw_tile_grid(width: int, height: int, tile_size: int, tile_overlap: int,
                   max_side: int = GRID_MAX_SIDE) -> Image.Image:
    """The views of a ``width`` x ``height`` canvas drawn at most ``max_side`` pixels wide or high.

    Each view is an outlined rectangle; the fill is light where one view covers the canvas and
    darker for every further view covering the same pixels (the overlaps that are blended).
    """
    views = canvas_views(height // 8, width // 8, tile_size // 8, tile_overlap // 8)
    scale = min(1.0, max_side / max(width, height))
    out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))

    def box(view):
        top, bottom, left, right = (round(v * 8 * scale) for v in view)
        return top, min(bottom, out_h), left, min(right, out_w)

    coverage = np.zeros((out_h, out_w), dtype=np.int32)
    for view in views:
        top, bottom, left, right = box(view)
        coverage[top:bottom, left:right] += 1
    shade = np.clip(GRID_FILL - GRID_SHADE_PER_VIEW * (coverage - 1), 60, 255).astype(np.uint8)
    image = Image.fromarray(np.stack([shade] * 3, axis=-1))
    draw = ImageDraw.Draw(image)
    for n, view in enumerate(views):
        top, bottom, left, right = box(view)
        draw.rectangle((left, top, right - 1, bottom - 1), outline=GRID_COLOURS[n % len(GRID_COLOURS)], width=2)
    return image


def grid_summary(width: int, height: int, tile_size: int, tile_overlap: int, views: int, tile_batch_size: int) -> str:
    """One line under the grid: how many views, and UNet calls per denoising step."""
    calls = -(-views // tile_batch_size)
    return (f"{width}x{height} px canvas: **{views} views** of {tile_size}x{tile_size} px overlapping by "
            f"{tile_overlap} px, {calls} UNet call{'s' if calls != 1 else ''} per step "
            f"({tile_batch_size} views per call).")


def build_canvas_tab_section(ctx: UIContext, tabs, t2i) -> GalleryOutputs:
    """The Large canvas tab; returns its gallery so the app can wire Send to Upscale."""
    manager = ctx.manager
    native = manager.native_size
    config = manager.config
    max_side = config.max_canvas_side

    def show_grid(width, height, tile_size, tile_overlap, tile_batch_size):
        """The tile-grid picture and its summary line, or the reason the sizes are not a valid canvas."""
        try:
            w, h = as_int("width", width), as_int("height", height)
            tile, overlap = as_int("tile_size", tile_size), as_int("tile_overlap", tile_overlap)
            batch = as_int("tile_batch_size", tile_batch_size)
            CanvasRequest(prompt="grid", width=w, height=h, tile_size=tile, tile_overlap=overlap).check(
                config.max_canvas_side, config.max_canvas_pixels)
            tiling = resolve_tiling(w, h, tile, overlap, native)
        except ValueError as exc:
            return gr.update(), f"**Not a valid canvas:** {exc}"
        summary = grid_summary(w, h, tile, overlap, len(tiling.views), max(1, batch))
        return draw_tile_grid(w, h, tile, overlap), summary

    with gr.Tab("Large canvas", id="canvas"):
        gr.Markdown(
            "Generate a canvas larger than the model's native size from overlapping tiles blended at every "
            "denoising step (MultiDiffusion), so it is one image without seams. "
            f"Canvas sides are multiples of 8 up to {max_side} px and at most {config.max_canvas_pixels:,} pixels; "
            f"tiles default to the model's native {native} px, overlap to a quarter of the tile."
        )
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Describe the whole canvas",
                                    elem_id="canvas-prompt")
                negative_prompt = gr.Textbox(value="", label="Negative prompt", lines=2, elem_id="canvas-negative")
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLERS), value=manager.default_sampler, label="Sampler")
                    steps = gr.Slider(1, MAX_STEPS, value=30, step=1, label="Steps")
                    guidance_scale = gr.Slider(0, 30, value=7.5, step=0.5, label="Guidance scale (CFG)")
                with gr.Row():
                    width = gr.Slider(64, max_side, value=min(max_side, 4 * native), step=8, label="Canvas width")
                    height = gr.Slider(64, max_side, value=min(max_side, native), step=8, label="Canvas height")
                with gr.Row():
                    tile_size = gr.Slider(64, 2 * native, value=native, step=8, label="Tile size",
                                          info=f"default {native} px: the model's native size")
                    tile_overlap = gr.Slider(0, 2 * native - 8, value=default_overlap(native), step=8,
                                             label="Tile overlap", info="default a quarter of the tile")
                with gr.Row():
                    blend = gr.Radio(list(BLEND_MODES), value="cosine", label="Blend",
                                     info="uniform: MultiDiffusion average; cosine/gaussian: feathered tile edges")
                    tile_batch_size = gr.Slider(1, MAX_TILE_BATCH_UI, value=4, step=1, label="Tile batch size",
                                                info="views per UNet call: faster on a GPU, more memory")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1, maximum=MAX_SEED)
                with gr.Row():
                    generate = gr.Button("Generate canvas", variant="primary", elem_id="canvas-generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="canvas-cancel")
                examples = DEMO_EXAMPLES if manager.info.source.is_demo else SD_CANVAS_EXAMPLES
                gr.Examples([[e] for e in examples], inputs=[prompt], label="Example prompts")
            with gr.Column(scale=4):
                first_grid, first_summary = show_grid(width.value, height.value, tile_size.value,
                                                      tile_overlap.value, tile_batch_size.value)
                grid = gr.Image(value=first_grid if isinstance(first_grid, Image.Image) else None, type="pil", label="Tile grid", interactive=False,
                                height=220, elem_id="canvas-grid")
                grid_info = gr.Markdown(first_summary, elem_id="canvas-grid-info")
                out = gallery_with_selection("Canvas")
                seed_used = gr.Number(label="Seed used", precision=0, interactive=False)
                notice = gr.Markdown(elem_id="canvas-notice")
                parameters = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                        buttons=["copy"], elem_id="canvas-parameters")

    grid_inputs = [width, height, tile_size, tile_overlap, tile_batch_size]
    for component in grid_inputs:
        component.change(show_grid, grid_inputs, [grid, grid_info], queue=False, api_visibility="private")

    def canvas(prompt, negative_prompt, sampler, steps, guidance_scale, width, height, seed, tile_size,
               tile_overlap, blend, tile_batch_size, request: gr.Request, progress=gr.Progress()):
        """Generate one large canvas from overlapping tiles blended at every step (MultiDiffusion).

        Args:
            prompt: what to draw across the canvas.
            negative_prompt: what to avoid.
            sampler: one of Euler a, Euler, DPM++ 2M, DPM++ 2M Karras, DDIM, PLMS, UniPC, LMS.
            steps: denoising steps (1-150).
            guidance_scale: classifier-free guidance scale (0-30).
            width: canvas width in pixels, a multiple of 8.
            height: canvas height in pixels, a multiple of 8.
            seed: -1 for random, else 0 to 2**32-1.
            tile_size: tile side in pixels, a multiple of 8 up to twice the model's native size (None: native).
            tile_overlap: pixels shared by neighbouring tiles, a multiple of 8 below tile_size (None: a quarter).
            blend: uniform, cosine or gaussian weights across tile overlaps.
            tile_batch_size: tiles per UNet call (1-64).
        """

        def job(control):
            req = CanvasRequest(
                prompt=prompt,
                negative_prompt=negative_prompt or "",
                sampler=sampler,
                steps=as_int("steps", steps),
                guidance_scale=as_float("guidance_scale", guidance_scale),
                width=as_int("width", width),
                height=as_int("height", height),
                seed=as_int("seed", seed),
                tile_size=None if tile_size in (None, "") else as_int("tile_size", tile_size),
                tile_overlap=None if tile_overlap in (None, "") else as_int("tile_overlap", tile_overlap),
                blend=blend,
                tile_batch_size=as_int("tile_batch_size", tile_batch_size),
            )
            return manager.canvas(req, control)

        result = run_job(ctx, request, progress, job)
        for w in result.warnings:
            gr.Warning(w)
        note = ("**The safety checker withheld this canvas** and replaced it by a placeholder."
                if any(result.nsfw) else "")
        gallery = [(str(p), f"seed {s}") for p, s in zip(result.files, result.seeds)]
        return gallery, result.seeds[0], "\n\n".join(result.infotexts), note

    generate.click(
        canvas,
        inputs=[prompt, negative_prompt, sampler, steps, guidance_scale, width, height, seed, tile_size,
                tile_overlap, blend, tile_batch_size],
        outputs=[out.gallery, seed_used, parameters, notice],
        api_name="canvas",
        concurrency_id="device",
    )

    def cancel_job(request: gr.Request):
        if ctx.jobs.cancel(getattr(request, "session_hash", None)):
            gr.Info("Cancelling: the job stops after the current step.")

    cancel.click(cancel_job, None, None, queue=False, api_visibility="private")
    return out
