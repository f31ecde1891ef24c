"""Large canvas end to end on the tiny SD model: exactness, determinism, samplers, cancel, guard, API."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.canvas import MultiDiffusionPipeline, decode_canvas, vae_tiling
from pipelines.config import AppConfig
from pipelines.manager import PipelineManager
from pipelines.progress import JobControl
from pipelines.requests import SAMPLERS, CanvasRequest, Txt2ImgRequest
from pipelines.results import GenerationCancelled

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def manager(tiny_model_dir, tmp_path_factory) -> PipelineManager:
    """One tiny-model manager for the module (native size 64 px: a 128x64 canvas is 3 views)."""
    out = tmp_path_factory.mktemp("canvas-out")
    return PipelineManager(AppConfig(model=str(tiny_model_dir), output_dir=out, safety_checker=False, device="cpu"))


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB")).astype(np.int16)


def canvas(manager, **kwargs):
    fields = dict(prompt=PROMPT, steps=2, seed=7, width=128, height=64)
    fields.update(kwargs)
    return manager.canvas(CanvasRequest(**fields))


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DDIM", "PLMS"])
def test_one_tile_canvas_matches_text_to_image(manager, sampler):
    common = dict(prompt=PROMPT, negative_prompt="green", sampler=sampler, steps=3, seed=11, width=64, height=64)
    t2i = manager.txt2img(Txt2ImgRequest(**common))
    one = manager.canvas(CanvasRequest(**common))
    assert one.images[0].size == (64, 64)
    assert np.abs(pixels(t2i) - pixels(one)).max() <= 1  # the bar: at most 1/255


def test_same_request_gives_identical_pixels(manager):
    a = canvas(manager, sampler="Euler a", width=192)
    b = canvas(manager, sampler="Euler a", width=192)
    assert np.array_equal(pixels(a), pixels(b))
    c = canvas(manager, sampler="Euler a", width=192, seed=8)
    assert not np.array_equal(pixels(a), pixels(c))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_two_steps_on_a_two_tile_canvas(manager, sampler):
    seen = []
    control = JobControl(progress=lambda done, total, desc: seen.append((done, total)))
    result = manager.canvas(CanvasRequest(prompt=PROMPT, sampler=sampler, steps=2, seed=3, width=112, height=64,
                                          tile_overlap=16), control)
    assert result.images[0].size == (112, 64)
    assert result.metadata[0]["sampler"] == sampler
    assert seen[0] == (1, seen[0][1]) and seen[-1][0] == seen[-1][1] >= 2
    assert pixels(result).std() > 0


def test_batching_views_does_not_change_the_image(manager):
    one_by_one = canvas(manager, width=128, height=128, tile_batch_size=1)  # 3x3 views
    all_at_once = canvas(manager, width=128, height=128, tile_batch_size=9)
    assert np.abs(pixels(one_by_one) - pixels(all_at_once)).max() <= 1


def test_blend_modes_weight_the_overlaps_differently(manager):
    images = {b: pixels(canvas(manager, width=192, blend=b, seed=5)) for b in ("uniform", "cosine", "gaussian")}
    assert not np.array_equal(images["uniform"], images["cosine"])
    assert not np.array_equal(images["cosine"], images["gaussian"])


def test_cancel_after_the_first_step_stops_and_frees_the_device(manager):
    seen = []
    control = JobControl()

    def progress(done, total, desc):
        seen.append(done)
        if done == 1:
            control.cancel()

    control.progress = progress
    with pytest.raises(GenerationCancelled):
        manager.canvas(CanvasRequest(prompt=PROMPT, steps=5, seed=1, width=128, height=64), control)
    assert seen == [1]
    assert manager.device_lock.acquire(blocking=False)
    manager.device_lock.release()


def test_every_output_passed_the_guard(manager):
    result = canvas(manager, width=256, height=256, tile_size=128, tile_overlap=24, blend="gaussian")
    path = result.files[0]
    assert path.is_file()
    with Image.open(path) as im:
        params = im.info["parameters"]
    assert "Tile size: 128, Tile overlap: 24, Blend: gaussian" in params
    assert "Size: 256x256" in params and "Seed: 7" in params
    assert result.metadata[0]["watermark"] == "applied"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    audit = [json.loads(line) for line in (manager.config.output_dir / "audit.jsonl").read_text().splitlines()]
    entry = next(e for e in audit if e["sha256"] == sha)
    assert entry["tab"] == "canvas"
    assert entry["parameters"]["tile_overlap"] == 24 and entry["parameters"]["blend"] == "gaussian"


def test_pipeline_shares_the_loaded_components(manager):
    canvas(manager)
    pipe = manager.derived_pipeline(MultiDiffusionPipeline)
    base = manager.pipe
    assert pipe.unet is base.unet and pipe.vae is base.vae and pipe.text_encoder is base.text_encoder
    assert pipe.tokenizer is base.tokenizer
    assert manager.load_count == 1


def test_canvas_pipeline_keeps_the_shared_modules_in_their_dtype(tiny_model_dir, tmp_path):
    # diffusers' from_pipe would cast the shared UNet/VAE/text encoder to fp32 (Text to image too).
    bf16 = PipelineManager(AppConfig(model=str(tiny_model_dir), output_dir=tmp_path, safety_checker=False,
                                     device="cpu", dtype="bf16"))
    pipe = bf16.derived_pipeline(MultiDiffusionPipeline)
    for module in (bf16.pipe.unet, bf16.pipe.vae, bf16.pipe.text_encoder):
        assert module.dtype == torch.bfloat16
    assert pipe.unet is bf16.pipe.unet


def test_large_canvas_decodes_in_vae_tiles_and_restores_the_shared_vae(manager):
    pipe = manager.derived_pipeline(MultiDiffusionPipeline)
    latents = torch.randn((1, 4, 12, 20), generator=torch.Generator().manual_seed(0))
    direct = np.asarray(decode_canvas(pipe, latents)[0])
    for before in (False, True):
        pipe.vae.use_tiling = before
        tiled = np.asarray(decode_canvas(pipe, latents, max_direct_pixels=64 * 64)[0])
        assert pipe.vae.use_tiling is before
    pipe.vae.use_tiling = False
    with vae_tiling(pipe.vae):
        reference = np.asarray(decode_canvas(pipe, latents)[0])
    assert np.array_equal(tiled, reference)
    assert not np.array_equal(tiled, direct)  # the tiny VAE's tiles (64 px) show: it really tiled
    assert tiled.shape == (96, 160, 3)


@pytest.mark.parametrize("fields,message", [
    (dict(tile_size=136), "tile_size must be a multiple of 8 from 64 to 128 pixels (twice the model's native 64), got 136"),
    (dict(tile_overlap=64), "tile_overlap must be a multiple of 8 from 0 to below tile_size (64), got 64"),
    (dict(tile_size=96, tile_overlap=96), "tile_overlap must be a multiple of 8 from 0 to below tile_size (96), got 96"),
    (dict(width=4096, height=2048), "canvas of 4096x2048 = 8388608 pixels is over the limit of 4194304"),
    (dict(width=100), "width must be a multiple of 8 between 64 and 4096, got 100"),
    (dict(blend="soft"), "blend must be one of uniform, cosine, gaussian, got 'soft'"),
    (dict(tile_batch_size=0), "tile_batch_size must be between 1 and 64, got 0"),
    (dict(width=4096, height=1024, tile_size=128, tile_overlap=120), "tile_overlap 120 with tile_size 128 makes"),
])
def test_invalid_fields_are_named_with_their_value(manager, fields, message):
    with pytest.raises(ValueError) as info:
        canvas(manager, **fields)
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(blend="hard"), "blend must be one of uniform, cosine, gaussian, got 'hard'"),
    (dict(tile_batch_size=0), "tile_batch_size must be a whole number of at least 1, got 0"),
    (dict(output_type="np"), "output_type must be 'pil' or 'latent', got 'np'"),
    (dict(tile_size=64, tile_overlap=8 * 9), "tile_overlap must be a multiple of 8 from 0 to below tile_size (64), got 72"),
])
def test_pipeline_called_directly_names_bad_arguments(manager, kwargs, message):
    pipe = manager.derived_pipeline(MultiDiffusionPipeline)
    with pytest.raises(ValueError) as info:
        pipe(PROMPT, height=64, width=128, num_inference_steps=1, **kwargs)
    assert message in str(info.value)


def test_gradio_api_canvas(manager, tmp_path):
    """The /canvas endpoint through gradio_client, with the request fields as parameter names."""
    from gradio_client import Client

    from ui.app import build_app, launch

    from .conftest import free_port

    app = build_app(manager)
    port = free_port()
    launch(app, manager.config, server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path))
        params = [p["parameter_name"] for p in client.view_api(return_format="dict", print_info=False)
                  ["named_endpoints"]["/canvas"]["parameters"]]
        assert params == ["prompt", "negative_prompt", "sampler", "steps", "guidance_scale", "width", "height",
                          "seed", "tile_size", "tile_overlap", "blend", "tile_batch_size"]
        gallery, seed, parameters, _ = client.predict(
            prompt=PROMPT, negative_prompt="", sampler="DDIM", steps=2, guidance_scale=7.5, width=128, height=64,
            seed=5, tile_size=64, tile_overlap=16, blend="cosine", tile_batch_size=4, api_name="/canvas")
        assert seed == 5 and "Tile overlap: 16" in parameters
        with Image.open(gallery[0]["image"]) as im:
            assert im.size == (128, 64)
    finally:
        app.close()
