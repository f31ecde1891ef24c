"""The Text to image tab: inputs named like Txt2ImgRequest's fields, wired to manager.txt2img."""

from __future__ import annotations

import contextvars
import queue
import threading
from dataclasses import dataclass

import gradio as gr

from pipelines.preview import factors_for_model, preview_callback
from pipelines.requests import MAX_BATCH_COUNT, MAX_BATCH_SIZE, MAX_SEED, MAX_STEPS, SAMPLERS, Txt2ImgRequest

from .common import UIContext, as_float, as_int, run_job, validated_by_request

DEMO_EXAMPLES = [
    "a red circle on a blue background",
    "a yellow triangle in the top left on a purple background",
    "a white square in the bottom right on a black background",
]
SD_EXAMPLES = [
    "a lighthouse on a cliff at sunset, oil painting, dramatic sky",
    "a cozy reading nook with plants, soft morning light, photograph",
    "a red fox in fresh snow, wildlife photography, 85mm",
]


@dataclass
class GalleryOutputs:
    """Components other tabs wire to (Send to Upscale)."""

    gallery: gr.Gallery
    selected: gr.State


def gallery_with_selection(label: str) -> GalleryOutputs:
    gallery = gr.Gallery(label=label, columns=2, height=520, format="png", type="filepath",
                         buttons=["download", "fullscreen"], interactive=False)
    selected = gr.State(None)

    def remember(evt: gr.SelectData):
        value = evt.value
        if isinstance(value, dict):
            value = (value.get("image") or {}).get("path") or value.get("path")
        return value

    gallery.select(remember, None, selected, queue=False, api_visibility="private")
    return GalleryOutputs(gallery, selected)


def build_txt2img_tab(ctx: UIContext) -> GalleryOutputs:
    manager = ctx.manager
    native = manager.native_size
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="Describe the image", elem_id="txt2img-prompt")
            negative_prompt = gr.Textbox(value="", label="Negative prompt", lines=2, elem_id="txt2img-negative")
            with gr.Row():
                sampler = gr.Dropdown(list(SAMPLERS), value=manager.default_sampler, label="Sampler")
                steps = gr.Slider(1, MAX_STEPS, value=30, step=1, label="Steps")
                guidance_scale = gr.Slider(0, 30, value=7.5, step=0.5, label="Guidance scale (CFG)")
            with gr.Row():
                width = gr.Slider(64, 2048, value=native, step=8, label="Width")
                height = gr.Slider(64, 2048, value=native, step=8, label="Height")
            with gr.Row():
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", minimum=-1, maximum=MAX_SEED)
                batch_size = gr.Slider(1, MAX_BATCH_SIZE, value=1, step=1, label="Batch size")
                batch_count = gr.Slider(1, MAX_BATCH_COUNT, value=1, step=1, label="Batch count")
            validated_by_request(sampler, steps, guidance_scale, width, height, seed, batch_size, batch_count)
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="txt2img-generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id="txt2img-cancel")
            examples = DEMO_EXAMPLES if manager.info.source.is_demo else SD_EXAMPLES
            gr.Examples([[e] for e in examples], inputs=[prompt], label="Example prompts")
        with gr.Column(scale=4):
            out = gallery_with_selection("Images")
            with gr.Row():
                seed_used = gr.Number(label="Seed used", precision=0, interactive=False)
                reuse = gr.Button("Reuse seed", size="sm")
            notice = gr.Markdown(visible=True, elem_id="txt2img-notice")
            parameters = gr.Textbox(label="Generation parameters", lines=4, interactive=False,
                                    buttons=["copy"], elem_id="txt2img-parameters")

    def txt2img(prompt, negative_prompt, sampler, steps, guidance_scale, width, height, seed,
                batch_size, batch_count, request: gr.Request, progress=gr.Progress()):
        """Generate images from a text prompt with the loaded Stable Diffusion model.

        Args:
            prompt: what to draw.
            negative_prompt: what to avoid.
            sampler: one of Euler a, Euler, DPM++ 2M, DPM++ 2M Karras, DDIM, PLMS, UniPC, LMS.
            steps: denoising steps (1-150).
            guidance_scale: classifier-free guidance scale (0-30).
            width: image width in pixels, a multiple of 8.
            height: image height in pixels, a multiple of 8.
            seed: -1 for random, else 0 to 2**32-1.
            batch_size: images per batch (1-8).
            batch_count: number of batches (1-16).
        """

        previews: queue.Queue = queue.Queue()
        every = manager.config.preview_every

        def job(control):
            if every > 0:
                # Every N steps the current latents as a picture (pipelines/preview.py), shown in the gallery.
                control.preview = preview_callback(factors_for_model(manager.info.source.is_demo), every,
                                                   lambda step, total, image: previews.put((step, total, image)))
            req = Txt2ImgRequest(
                prompt=prompt,
                negative_prompt=negative_prompt or "",
                sampler=sampler,
                steps=as_int("steps", steps),
                guidance_scale=as_float("guidance_scale", guidance_scale),
                width=as_int("width", width),
                height=as_int("height", height),
                seed=as_int("seed", seed),
                batch_size=as_int("batch_size", batch_size),
                batch_count=as_int("batch_count", batch_count),
            )
            return manager.txt2img(req, control)

        outcome: dict = {}

        def work():
            try:
                outcome["result"] = run_job(ctx, request, progress, job)
            except BaseException as exc:  # handed to the handler below, which raises it as before
                outcome["error"] = exc
            finally:
                previews.put(None)

        # The job runs in a thread (with this event's context, so gr.Progress still reaches the page)
        # while this generator yields each preview; the last yield is the guarded result as before,
        # so API clients (gradio_client's predict returns the final value) see no change.
        threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True).start()
        while (item := previews.get()) is not None:
            step, total, image = item
            yield [(image, f"preview: step {step}/{total}")], gr.skip(), gr.skip(), gr.skip()
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        for w in result.warnings:
            gr.Warning(w)
        blocked = sum(result.nsfw)
        note = (f"**{blocked} of {len(result.nsfw)} images were withheld by the safety checker** and replaced "
                "by a placeholder." if blocked else "")
        gallery = [(str(p), f"seed {s}") for p, s in zip(result.files, result.seeds)]
        yield gallery, result.seeds[0], "\n\n".join(result.infotexts), note

    event = generate.click(
        txt2img,
        inputs=[prompt, negative_prompt, sampler, steps, guidance_scale, width, height, seed, batch_size, batch_count],
        outputs=[out.gallery, seed_used, parameters, notice],
        api_name="txt2img",
        concurrency_id="device",
    )
    prompt.submit(txt2img,
                  inputs=[prompt, negative_prompt, sampler, steps, guidance_scale, width, height, seed, batch_size,
                          batch_count],
                  outputs=[out.gallery, seed_used, parameters, notice], api_visibility="private", concurrency_id="device")

    def cancel_job(request: gr.Request):
        if ctx.jobs.cancel(getattr(request, "session_hash", None)):
            gr.Info("Cancelling: the job stops after the current step.")

    cancel.click(cancel_job, None, None, queue=False, api_visibility="private")
    reuse.click(lambda s: s if s is not None else -1, seed_used, seed, queue=False, api_visibility="private")
    del event
    return out
