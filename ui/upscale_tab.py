"""The Upscale 2x tab: an image in, Real-ESRGAN 2x out, compared before/after (manager.upscale).

Also the "Send to Upscale" button under other tabs' galleries: ``add_send_to_upscale(ctx, tabs,
gallery_outputs)`` renders one under a GalleryOutputs' gallery; ``send_to_upscale_button`` makes
one wherever the caller is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import gradio as gr

from pipelines.requests import UpscaleRequest
from pipelines.upscale import describe_weight_choice, enlarged_original, loaded_upscaler

from .common import UIContext, as_int, run_job

SEND_LABEL = "Send to Upscale"
TAB_ID = "upscale"
_TARGET_ATTR = "upscale_input"
T = TypeVar("T")


def _item_path(item) -> str | None:
    """The file path of one Gallery value item: ``(path, caption)``, a path, or a FileData-like dict."""
    if isinstance(item, (tuple, list)):
        item = item[0] if item else None
    if isinstance(item, dict):
        item = (item.get("image") or {}).get("path") or item.get("path")
    return str(item) if item else None


def image_to_send(selected: str | None, gallery_value) -> str | None:
    """The gallery image the user clicked if it is still shown, else the first image shown.

    ``selected`` can be stale (a new run replaced the gallery); names are compared because
    the gallery and its select event may report different cache folders for the same file.
    """
    shown = [p for p in (_item_path(i) for i in (gallery_value or [])) if p]
    if selected and (not shown or Path(selected).name in {Path(p).name for p in shown}):
        return selected
    return shown[0] if shown else None


def send_to_upscale_button(label: str, selected_state: gr.State, target_image: gr.Image, tabs: gr.Tabs,
                           gallery: gr.Gallery | None = None) -> gr.Button:
    """A button that puts the selected gallery image into the Upscale tab and switches to it.

    Args:
        label: the button text.
        selected_state: a gr.State with the file path of the image clicked in the gallery.
        target_image: the Upscale tab's input image (``upscale_target(ctx)``).
        tabs: the page's gr.Tabs.
        gallery: the gallery itself; when given, its first image is sent if none was clicked.
    """
    button = gr.Button(label, size="sm")

    def send(selected, gallery_value=None):
        path = image_to_send(selected, gallery_value)
        if path is None:
            raise gr.Error("There is no image to send yet: generate one first, then click it.", title="No image")
        return path, gr.Tabs(selected=TAB_ID)

    inputs = [selected_state] + ([gallery] if gallery is not None else [])
    button.click(send, inputs, [target_image, tabs], queue=False, api_visibility="private")
    return button


def render_under(anchor: gr.components.Component, build: Callable[[], T]) -> T:
    """Run ``build`` so the components it makes appear at the end of the layout block holding
    ``anchor`` (which belongs to another, already built tab).

    Gradio puts new components into the block context that is open; ``with block:`` opens
    an already rendered block again. Entering it also re-parents the block, so its parent
    is put back afterwards.
    """
    container = anchor.parent
    outer = container.parent
    with container:
        built = build()
    container.parent = outer
    return built


def add_send_to_upscale(ctx: UIContext, tabs: gr.Tabs, outputs, label: str = SEND_LABEL) -> gr.Button:
    """Put a Send to Upscale button under another tab's gallery (``outputs``: its GalleryOutputs).

    Call it inside the Blocks, after the Upscale tab is built, e.g. at the end of the Large
    canvas builder: ``add_send_to_upscale(ctx, tabs, out)``.
    """
    target = upscale_target(ctx)
    if target is None:
        raise RuntimeError("build the Upscale 2x tab before adding Send to Upscale buttons")
    return render_under(outputs.gallery,
                        lambda: send_to_upscale_button(label, outputs.selected, target, tabs, outputs.gallery))


def upscale_target(ctx: UIContext) -> gr.Image | None:
    """The Upscale tab's input image, for other tabs' Send to Upscale buttons (None before it is built)."""
    return getattr(ctx, _TARGET_ATTR, None)


def weights_note(ctx: UIContext) -> str:
    manager = ctx.manager
    loaded = loaded_upscaler(manager)
    weights = f"**{loaded.describe()}**" if loaded is not None else describe_weight_choice(manager.config)
    limit = manager.config.max_upscale_pixels
    return (
        "Real-ESRGAN 2x super-resolution (Wang et al. 2021, arXiv 2107.10833): exactly twice the width and "
        f"height, alpha included. Weights in use: {weights}. Inputs up to {limit:,} pixels "
        f"({limit / 1e6:g} megapixels, `--max-upscale-pixels`); large images are processed in tiles."
    )


def build_upscale_tab_section(ctx: UIContext, tabs: gr.Tabs, t2i) -> gr.Image:
    """The Upscale 2x tab, plus a Send to Upscale button under the Text to image gallery.

    Returns the tab's input image (also available as ``upscale_target(ctx)``).
    """
    manager = ctx.manager
    with gr.Tab("Upscale 2x", id=TAB_ID):
        gr.Markdown(weights_note(ctx), elem_id="upscale-note")
        with gr.Row():
            with gr.Column(scale=3):
                image = gr.Image(label="Image to upscale (PNG, JPEG or WebP)", type="filepath", image_mode=None,
                                 sources=["upload", "clipboard"], format="png", height=360, elem_id="upscale-input")
                with gr.Row():
                    tile_size = gr.Number(value=0, label="Tile size (0 = automatic)", minimum=0, maximum=4096,
                                          elem_id="upscale-tile-size")
                    tile_pad = gr.Slider(0, 256, value=10, step=1, label="Tile padding", elem_id="upscale-tile-pad")
                with gr.Row():
                    run = gr.Button("Upscale 2x", variant="primary", elem_id="upscale-run")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="upscale-cancel")
                if t2i is not None:
                    send_to_upscale_button("Use the image selected in Text to image", t2i.selected, image, tabs,
                                           t2i.gallery)
            with gr.Column(scale=4):
                compare = gr.ImageSlider(label="Before (pixels enlarged) | after", type="filepath", format="png",
                                         interactive=False, elem_id="upscale-compare")
                download = gr.File(label="Upscaled PNG (with its metadata)", interactive=False, elem_id="upscale-file")
                notice = gr.Markdown(elem_id="upscale-notice")
                parameters = gr.Textbox(label="Parameters", lines=3, interactive=False, buttons=["copy"],
                                        elem_id="upscale-parameters")

    def upscale(image, tile_size, tile_pad, request: gr.Request, progress=gr.Progress()):
        """Upscale an image 2x with Real-ESRGAN; the result has passed the safety checker and carries metadata.

        Args:
            image: the PNG, JPEG or WebP image to upscale.
            tile_size: 0 for automatic, else the tile side in pixels (32-4096).
            tile_pad: pixels of context read around each tile (0-256).
        """

        def job(control):
            req = UpscaleRequest(image=image, tile_size=as_int("tile_size", tile_size),
                                 tile_pad=as_int("tile_pad", tile_pad))
            result = manager.upscale(req, control)
            before = None if result.nsfw[0] else enlarged_original(image, max_pixels=manager.config.max_upscale_pixels)
            return result, before

        result, before = run_job(ctx, request, progress, job)
        for w in result.warnings:
            gr.Warning(w)
        path = str(result.files[0])
        meta = result.metadata[0]
        if result.nsfw[0]:
            note = "**The safety checker withheld this image**; a placeholder was delivered instead."
        else:
            tile = meta["tile_size_used"]
            note = (f"{meta['source_width']}x{meta['source_height']} → {meta['width']}x{meta['height']} with "
                    f"{meta['upscaler']} ({meta['upscaler_architecture']}; {meta['upscaler_weights']}), "
                    f"{'untiled' if tile == 0 else f'tiles of {tile} px'}.")
        return (before if before is not None else path, path), path, result.infotexts[0], note

    run.click(upscale, inputs=[image, tile_size, tile_pad], outputs=[compare, download, parameters, notice],
              api_name="upscale", concurrency_id="device")

    def cancel_job(request: gr.Request):
        if ctx.jobs.cancel(getattr(request, "session_hash", None)):
            gr.Info("Cancelling: the job stops after the current tile.")

    cancel.click(cancel_job, None, None, queue=False, api_visibility="private")

    setattr(ctx, _TARGET_ATTR, image)
    if t2i is not None:
        add_send_to_upscale(ctx, tabs, t2i)
    return image
