"""Faults: out of memory, NaN latents, an all-NaN half-precision VAE decode, and Cancel.

Faults are injected with forward hooks on the real tiny model's modules; the code under test
(pipeline, manager, run_job, the served app) is the code users run.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.manager import PipelineManager
from pipelines.requests import Txt2ImgRequest

from .conftest import free_port

torch.set_num_threads(1)

TXT2IMG = dict(prompt="a red circle on a blue background", negative_prompt="", sampler="DDIM", steps=2,
               guidance_scale=7.5, width=64, height=64, seed=11, batch_size=1, batch_count=1)


def once(fault):
    """A forward hook that applies ``fault(output)`` on its first call only."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        if len(calls) == 1:
            return fault(output)
        return None

    hook.calls = calls
    return hook


def nan_like(output):
    if isinstance(output, tuple):
        return (torch.full_like(output[0], float("nan")),) + tuple(output[1:])
    if hasattr(output, "sample"):
        output.sample = torch.full_like(output.sample, float("nan"))
        return output
    return torch.full_like(output, float("nan"))


def output_pngs(manager) -> list[Path]:
    return sorted(Path(manager.config.output_dir).rglob("*.png"))


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """(client, manager) for the tiny model served on loopback without auth."""
    from gradio_client import Client

    from pipelines.config import AppConfig
    from ui.app import serving

    manager = PipelineManager(AppConfig(model=str(tiny_model_dir), output_dir=tmp_path_factory.mktemp("faults"),
                                        safety_checker=False, device="cpu", port=free_port()))
    with serving(manager) as (url, _):
        yield Client(url, verbose=False), manager


def test_out_of_memory_says_what_to_change_frees_the_device_and_the_next_job_runs(served):
    from gradio_client.exceptions import AppError

    from ui.common import OOM_MESSAGE

    client, manager = served

    def oom(output):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = once(oom)
    handle = manager.pipe.unet.register_forward_hook(hook)
    before = output_pngs(manager)
    try:
        with pytest.raises(AppError) as info:
            client.predict(**TXT2IMG, api_name="/txt2img")
        assert str(info.value) == OOM_MESSAGE
        assert "smaller size" in OOM_MESSAGE and "--memory low" in OOM_MESSAGE
        assert not manager.device_lock.locked()
        assert output_pngs(manager) == before  # nothing delivered
        gallery, seed, *_ = client.predict(**TXT2IMG, api_name="/txt2img")
        assert seed == 11 and Path(gallery[0]["image"]).is_file()
        assert len(hook.calls) >= 2  # the second job really ran through the UNet
    finally:
        handle.remove()


def test_nan_latents_are_an_error_not_a_black_image(served):
    from gradio_client.exceptions import AppError

    client, manager = served
    hook = once(nan_like)
    handle = manager.pipe.unet.register_forward_hook(hook)
    before = output_pngs(manager)
    try:
        with pytest.raises(AppError, match="NaN/Inf latents .*try --dtype fp32 or bf16"):
            client.predict(**TXT2IMG, api_name="/txt2img")
        assert output_pngs(manager) == before
        assert not manager.device_lock.locked()
        gallery, *_ = client.predict(**TXT2IMG, api_name="/txt2img")
        with Image.open(gallery[0]["image"]) as im:
            assert np.asarray(im.convert("RGB")).max() > 0
    finally:
        handle.remove()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_nan_half_precision_decode_is_retried_in_fp32(tiny_manager, dtype, caplog):
    from pipelines.txt2img import decode_latents

    pipe = tiny_manager.pipe
    latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    reference = np.asarray(decode_latents(pipe, latents)[0])  # fp32 VAE, no fault
    pipe.vae.to(dtype)
    hook = once(nan_like)
    handle = pipe.vae.decoder.register_forward_hook(hook)
    try:
        with caplog.at_level(logging.WARNING, logger="pipelines.txt2img"):
            image = np.asarray(decode_latents(pipe, latents)[0])
        assert len(hook.calls) == 2  # the half-precision decode, then the fp32 retry
        assert f"VAE decode in {dtype} gave NaN; retrying in fp32" in caplog.text
        # The retry decoded the half-precision-rounded latents in fp32: close to the fp32 reference.
        assert np.abs(image.astype(int) - reference.astype(int)).mean() < 4 and image.max() > 0
        assert pipe.vae.dtype == dtype  # put back after the retry
    finally:
        handle.remove()
        pipe.vae.to(torch.float32)


def test_nan_even_in_fp32_and_fp32_vae_nan_are_errors(tiny_manager):
    from pipelines.txt2img import decode_latents

    pipe = tiny_manager.pipe
    latents = torch.randn(1, pipe.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    always = pipe.vae.decoder.register_forward_hook(lambda m, a, o: nan_like(o))
    try:
        with pytest.raises(FloatingPointError, match="the VAE decode produced NaN pixels even in fp32"):
            decode_latents(pipe, latents)  # fp32 VAE: no retry, an error
        pipe.vae.to(torch.bfloat16)
        with pytest.raises(FloatingPointError, match="even in fp32"):
            decode_latents(pipe, latents)  # bf16, then fp32, both NaN
        assert pipe.vae.dtype == torch.bfloat16
    finally:
        always.remove()
        pipe.vae.to(torch.float32)


def test_cancel_stops_within_one_step_and_frees_the_device(tiny_config):
    import gradio as gr

    import ui
    from ui.common import run_job

    manager = PipelineManager(tiny_config)
    ctx = ui.build_app(manager).sdstudio_context
    request = gr.Request(session_hash="session-1")
    first_step = threading.Event()
    cancel_sent = threading.Event()
    calls = []

    def hold_first_step(module, args, output):
        calls.append(1)
        if len(calls) == 1:
            first_step.set()
            cancel_sent.wait(timeout=60)

    handle = manager.pipe.unet.register_forward_hook(hold_first_step)
    outcome = {}

    def job():
        req = Txt2ImgRequest(**{**TXT2IMG, "steps": 20})
        try:
            outcome["result"] = run_job(ctx, request, None, lambda control: manager.txt2img(req, control))
        except Exception as exc:  # the test checks which exception
            outcome["error"] = exc

    worker = threading.Thread(target=job)
    before = output_pngs(manager)
    try:
        worker.start()
        assert first_step.wait(timeout=60)
        assert manager.device_lock.locked()
        assert ctx.jobs.cancel("session-1") is True
        cancel_sent.set()
        worker.join(timeout=60)
        assert not worker.is_alive()
    finally:
        cancel_sent.set()
        handle.remove()
    error = outcome.get("error")
    assert isinstance(error, gr.Error) and "Cancelled" in str(error)
    assert len(calls) == 1  # the step that was running finished; no further step ran
    assert not manager.device_lock.locked()
    assert ctx.jobs.cancel("session-1") is False  # the job left the registry
    assert output_pngs(manager) == before
    result = run_job(ctx, request, None, lambda control: manager.txt2img(Txt2ImgRequest(**TXT2IMG), control))
    assert len(result.images) == 1
