"""The studio served in-process on a free port, called through gradio_client like a user's script."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.manager import PipelineManager
from pipelines.metadata import JSON_CHUNK, PARAMETERS_CHUNK

from .conftest import free_port

TXT2IMG = dict(prompt="a red circle on a blue background", negative_prompt="", sampler="DDIM", steps=2,
               guidance_scale=7.5, width=64, height=64, seed=9, batch_size=1, batch_count=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """(client, manager, app) for a studio running the tiny model on 127.0.0.1."""
    from gradio_client import Client

    from pipelines.config import AppConfig
    from ui.app import serving

    config = AppConfig(model=str(tiny_model_dir), output_dir=tmp_path_factory.mktemp("served"),
                       safety_checker=False, device="cpu", port=free_port())
    manager = PipelineManager(config)
    with serving(manager) as (url, app):
        yield Client(url, verbose=False), manager, app


def test_txt2img_endpoint_returns_a_guarded_png(served):
    client, manager, _ = served
    gallery, seed, parameters, notice = client.predict(**TXT2IMG, api_name="/txt2img")
    assert seed == 9 and len(gallery) == 1
    path = gallery[0]["image"]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (64, 64)
        # The file the client downloads keeps both metadata chunks.
        assert "Seed: 9" in im.info[PARAMETERS_CHUNK] and '"seed": 9' in im.info[JSON_CHUNK]
        served_pixels = np.asarray(im.convert("RGB"))
    direct = manager.txt2img(__import__("pipelines.requests", fromlist=["x"]).Txt2ImgRequest(
        **{k: v for k, v in TXT2IMG.items()}))
    assert np.array_equal(served_pixels, np.asarray(direct.images[0]))
    assert parameters.startswith(TXT2IMG["prompt"])


@pytest.mark.parametrize("field,value", [("width", 500), ("steps", 0), ("batch_size", 0), ("sampler", "Nope"),
                                         ("guidance_scale", 45.0)])
def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(served, field, value):
    # NaN cannot cross the API (JSON has no NaN); the request's check covers it (tests/test_txt2img.py).
    from gradio_client.exceptions import AppError

    client, _, _ = served
    with pytest.raises(AppError, match=field):
        client.predict(**{**TXT2IMG, field: value}, api_name="/txt2img")
    gallery, *_ = client.predict(**TXT2IMG, api_name="/txt2img")
    assert len(gallery) == 1


def test_fractional_number_is_refused_not_rounded(served):
    from gradio_client.exceptions import AppError

    client, _, _ = served
    with pytest.raises(AppError, match="steps must be a whole number, got 2.5"):
        client.predict(**{**TXT2IMG, "steps": 2.5}, api_name="/txt2img")


def test_api_lists_the_three_endpoints_with_request_field_names(served):
    client, _, _ = served
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(info) >= {"/txt2img", "/upscale", "/canvas"}
    names = [p["parameter_name"] for p in info["/txt2img"]["parameters"]]
    assert names == list(TXT2IMG)


def test_only_the_prompt_is_required(served):
    """A script passes just the prompt: the negative prompt defaults to empty, like the page's."""
    client, manager, _ = served
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for endpoint in ("/txt2img", "/canvas"):
        required = [p["parameter_name"] for p in info[endpoint]["parameters"] if not p["parameter_has_default"]]
        assert required == ["prompt"], endpoint
    gallery, seed, parameters, _ = client.predict(prompt=TXT2IMG["prompt"], steps=2, seed=5, api_name="/txt2img")
    assert seed == 5 and len(gallery) == 1
    with Image.open(gallery[0]["image"]) as im:
        assert '"negative_prompt": ""' in im.info[JSON_CHUNK]
        assert im.size == (manager.native_size, manager.native_size)
