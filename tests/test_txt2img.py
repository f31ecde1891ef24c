"""Text to image through PipelineManager on the tiny model: determinism, samplers, load once, validation."""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pytest
import torch

from pipelines.manager import PipelineManager
from pipelines.progress import JobControl
from pipelines.requests import SAMPLERS, Txt2ImgRequest
from pipelines.results import GenerationCancelled

PROMPT = "a red circle on a blue background"


def arr(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def test_same_request_same_pixels(tiny_manager):
    req = Txt2ImgRequest(prompt=PROMPT, steps=3, seed=1234, sampler="Euler a")
    a, b = tiny_manager.txt2img(req), tiny_manager.txt2img(req)
    assert a.seeds == b.seeds == [1234]
    assert np.array_equal(arr(a.images[0]), arr(b.images[0]))
    other = tiny_manager.txt2img(dataclasses.replace(req, seed=1235))
    assert not np.array_equal(arr(a.images[0]), arr(other.images[0]))


def test_random_seed_is_reported_and_reproduces(tiny_manager):
    first = tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=-1))
    seed = first.seeds[0]
    assert 0 <= seed < 2**32
    again = tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=seed))
    assert np.array_equal(arr(first.images[0]), arr(again.images[0]))


def test_batch_seeds_increment_and_each_image_reproduces_alone(tiny_manager):
    batch = tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=50, batch_size=2, batch_count=2))
    assert batch.seeds == [50, 51, 52, 53]
    assert len(batch.images) == len(batch.files) == len(batch.nsfw) == len(batch.metadata) == 4
    alone = tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=53))
    diff = np.abs(arr(batch.images[3]) - arr(alone.images[0])).max()
    assert diff <= 1  # batched convolutions may differ in the last float bit


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_runs_two_steps(tiny_manager, sampler):
    result = tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=3, sampler=sampler))
    image = arr(result.images[0])
    assert image.shape == (64, 64, 3) and image.std() > 1.0
    assert result.metadata[0]["sampler"] == sampler


def test_switching_sampler_keeps_the_loaded_weights(tiny_manager):
    tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=1, sampler="Euler"))
    unet, vae, text = tiny_manager.pipe.unet, tiny_manager.pipe.vae, tiny_manager.pipe.text_encoder
    tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=1, sampler="DPM++ 2M Karras"))
    assert tiny_manager.pipe.unet is unet and tiny_manager.pipe.vae is vae and tiny_manager.pipe.text_encoder is text
    assert type(tiny_manager.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"


def test_checkpoint_is_read_from_disk_once(tiny_config, monkeypatch):
    """Spy on safetensors reads: 5 requests and a sampler change open the UNet weights once."""
    import safetensors.torch

    opened = []
    real = safetensors.torch.load_file

    def spy(path, *args, **kwargs):
        opened.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "load_file", spy)
    manager = PipelineManager(tiny_config)
    for i, sampler in enumerate(["Euler a", "Euler a", "DDIM", "DDIM", "UniPC"]):
        manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=i, sampler=sampler))
    unet_reads = [p for p in opened if "unet" in p]
    assert len(unet_reads) == 1, opened
    assert manager.load_count == 1


def test_concurrent_first_requests_load_once(tiny_config):
    manager = PipelineManager(tiny_config)
    threads = [threading.Thread(target=manager.load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert manager.load_count == 1


@pytest.mark.parametrize(
    "field,value",
    [("width", 500), ("height", 1000 + 4), ("steps", 0), ("guidance_scale", math.nan), ("batch_size", 0),
     ("sampler", "Heun++"), ("seed", -2), ("batch_count", 17), ("width", 512.5)],
)
def test_invalid_field_is_named(tiny_manager, field, value):
    req = dataclasses.replace(Txt2ImgRequest(prompt=PROMPT, steps=2), **{field: value})
    with pytest.raises(ValueError, match=field) as info:
        tiny_manager.txt2img(req)
    assert str(value) in str(info.value) or repr(value) in str(info.value)
    # The manager keeps serving.
    assert tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=1)).images


def test_empty_prompt_is_refused(tiny_manager):
    with pytest.raises(ValueError, match="prompt must not be empty"):
        tiny_manager.txt2img(Txt2ImgRequest(prompt="   ", steps=2))


def test_long_prompt_warns_how_many_tokens_were_dropped(tiny_manager):
    prompt = " ".join(["red circle"] * 50)  # 100 word tokens
    result = tiny_manager.txt2img(Txt2ImgRequest(prompt=prompt, steps=1, seed=1))
    assert any("100 tokens" in w and "last 25 were dropped" in w for w in result.warnings), result.warnings


def test_cancel_stops_within_one_step_and_frees_the_device(tiny_manager):
    steps_seen = []
    control = JobControl()

    def progress(done, total, desc):
        steps_seen.append(done)
        if done == 2:
            control.cancel()

    control.progress = progress
    with pytest.raises(GenerationCancelled):
        tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=20, seed=1), control)
    assert steps_seen == [1, 2]
    assert not tiny_manager.device_lock.locked()
    assert tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=1)).images


def test_sdpa_attention_is_used(tiny_manager):
    from diffusers.models.attention_processor import AttnProcessor2_0

    processors = tiny_manager.pipe.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_samplers_without_zero_terminal_snr_support_are_refused_for_such_a_model():
    """LMS and PLMS cannot follow a zero-terminal-SNR schedule: refused with the usable list."""
    from diffusers import DDIMScheduler

    from pipelines.samplers import make_scheduler
    from tools.train_demo_model import scheduler_config

    zsnr = scheduler_config("v_prediction", zero_terminal_snr=True)
    for name in ("LMS", "PLMS"):
        with pytest.raises(ValueError, match=f"sampler '{name}' does not support this model's zero-terminal-SNR"
                                             r".*use one of Euler a, Euler, DPM\+\+ 2M, DPM\+\+ 2M Karras, DDIM, UniPC"):
            make_scheduler(name, zsnr)
    for name in ("Euler a", "DDIM", "UniPC"):  # the others follow the rescaled schedule themselves
        assert float(make_scheduler(name, zsnr).alphas_cumprod[-1]) < 1e-6, name
    # A checkpoint without zero SNR keeps every sampler, LMS included, on its own schedule.
    plain = scheduler_config("epsilon", zero_terminal_snr=False)
    assert torch.equal(make_scheduler("LMS", plain).alphas_cumprod, DDIMScheduler.from_config(plain).alphas_cumprod)
