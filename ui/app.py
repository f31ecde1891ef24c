"""Assemble the tabs into one Blocks app and serve it with the configured limits."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from pipelines.config import AppConfig
from pipelines.manager import PipelineManager

from .common import RateLimiter, UIContext, decoded_by_request
from .canvas_tab import build_canvas_tab_section
from .txt2img_tab import build_txt2img_tab
from .upscale_tab import add_send_to_upscale, build_upscale_tab_section

log = logging.getLogger(__name__)

CSS = """
#notices {border-left: 4px solid #e0a800; padding-left: 0.75em;}
"""


def build_app(manager: PipelineManager) -> gr.Blocks:
    """The studio page for ``manager``'s model (loads it if it is not loaded yet)."""
    config = manager.config
    ctx = UIContext(manager=manager, rate_limiter=RateLimiter.parse(config.rate_limit))
    info = manager.info
    with gr.Blocks(title="SD Studio") as app:
        gr.Markdown(
            f"# SD Studio\nModel **{info.source.name}** (hash `{info.hash}`) on **{info.device}**, {info.dtype}. "
            f"Safety checker: **{manager.guard.safety_status}**."
        )
        notices = manager.notices()
        if notices:
            gr.Markdown("\n\n".join(notices), elem_id="notices")
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="txt2img"):
                t2i = build_txt2img_tab(ctx)
            build_upscale_tab_section(ctx, tabs, t2i)
            canvas = build_canvas_tab_section(ctx, tabs, t2i)
        # Built after the Upscale tab exists: a Send to Upscale button under the canvas gallery.
        add_send_to_upscale(ctx, tabs, canvas)
    _decode_uploads_in_the_request(ctx)
    use_gpu_decorator(app)
    app.sdstudio_context = ctx  # for tests and tools that need the registry
    return app


def _decode_uploads_in_the_request(ctx: UIContext) -> None:
    """Junk uploads (bombs, text named .png, truncated files) reach the upscaler's own decoder,
    which says what is wrong, instead of failing in Gradio's preprocessing."""
    from .upscale_tab import upscale_target

    image = upscale_target(ctx)
    if image is not None:
        decoded_by_request(image)


def use_gpu_decorator(app: gr.Blocks) -> None:
    """On a Hugging Face Space with ZeroGPU, run every device handler under ``spaces.GPU``."""
    from .server import gpu_task

    for block_fn in app.fns.values():
        if block_fn.concurrency_id == "device":
            block_fn.fn = gpu_task(block_fn.fn)




def launch_kwargs(config: AppConfig) -> dict:
    """Arguments for ``Blocks.launch`` from the config: bind address, auth, limits, paths."""
    from .server import auth_pairs, bind_address, check_mcp

    check_mcp(config)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    server_name, server_port = bind_address(config)
    kwargs = dict(
        server_name=server_name,
        server_port=server_port,
        share=config.share,
        max_file_size=config.max_file_size,
        # Gradio before 6.32 lets a forged Host header skip auth under SSR; never use SSR.
        ssr_mode=False,
        allowed_paths=[str(config.output_dir.resolve())],
        mcp_server=config.mcp,
        css=CSS,
        show_error=True,
    )
    pairs = auth_pairs(config)
    if pairs:
        kwargs["auth"] = pairs
        kwargs["auth_message"] = "SD Studio: sign in with the account the owner gave you."
    return kwargs


def launch(app: gr.Blocks, config: AppConfig, **overrides):
    """Queue every device job through one worker and serve the app."""
    from .server import friendly_queue_full, share_warning

    app.queue(max_size=config.max_queue, default_concurrency_limit=1)
    friendly_queue_full(app)
    kwargs = launch_kwargs(config)
    kwargs.update(overrides)
    warning = share_warning(config, has_auth=bool(kwargs.get("auth")))
    if warning:
        log.warning("%s", warning)
    return app.launch(**kwargs)


@contextmanager
def serving(manager: PipelineManager, **overrides) -> Iterator[tuple[str, gr.Blocks]]:
    """``(url, app)``: the studio for ``manager`` served in this process; closed on exit.

    For tests and tools/load_test.py. ``_frontend=False`` skips Gradio's start-up self-check of
    its own URL, which gives up at the first 3 s timeout ("When localhost is not accessible, a
    shareable link must be created") on a busy machine; nothing else depends on it.
    """
    app = build_app(manager)
    launch(app, manager.config, **{"prevent_thread_lock": True, "quiet": True, "_frontend": False, **overrides})
    try:
        yield app.local_url, app
    finally:
        app.close()
