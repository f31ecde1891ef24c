"""Browser tests: Playwright for Python driving Debian's Chromium (no browser download).

Each tab is used like a person would: fill the inputs, click, wait for the result image, check
it is shown (loaded, non-zero size) and save a screenshot under test-output/. Without Chromium
these tests skip with the reason; with ``CI`` set that is a failure instead (.ci/run installs it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import AppConfig
from pipelines.manager import PipelineManager

from .conftest import TEST_OUTPUT, free_port

torch.set_num_threads(1)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
RESULT_TIMEOUT_MS = 180_000


def require_chromium() -> None:
    """Skip without Chromium or Playwright; under CI a missing browser is a failure."""
    reason = None
    if not CHROMIUM.exists():
        reason = f"Chromium is not installed at {CHROMIUM} (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "Playwright for Python is not installed (pip install -r requirements.txt)"
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run under CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir):
    """The URL of the tiny-model studio served on loopback."""
    require_chromium()
    from ui.app import serving

    config = AppConfig(model=str(tiny_model_dir), output_dir=tmp_path_factory.mktemp("browser"),
                       safety_checker=False, device="cpu", port=free_port())
    with serving(PipelineManager(config)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser(studio):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, studio):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(studio)
    page.locator("#txt2img-generate").wait_for(state="visible", timeout=60_000)
    yield page
    context.close()
    assert not errors, errors


def set_slider(page, scope: str, label: str, value: int) -> None:
    """Type ``value`` into the number box of the slider labelled ``label`` inside ``scope``."""
    box = page.locator(scope).get_by_label(f"number input for {label}", exact=True)
    box.fill(str(value))
    box.press("Enter")


def wait_for_result_image(page, selector: str):
    """The first result image under ``selector`` once it has loaded."""
    image = page.locator(f"{selector} img[src*='file=']").first
    image.wait_for(state="visible", timeout=RESULT_TIMEOUT_MS)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                           timeout=60_000)
    return image


def shot(page, name: str) -> Path:
    TEST_OUTPUT.mkdir(exist_ok=True)
    path = TEST_OUTPUT / f"browser-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    return path


def natural_size(image) -> tuple[int, int]:
    return tuple(image.evaluate("img => [img.naturalWidth, img.naturalHeight]"))


def test_text_to_image_tab(page):
    page.locator("#txt2img-prompt textarea").fill("a red circle on a blue background")
    panel = "div.tabitem:visible"
    set_slider(page, panel, "Steps", 2)
    page.locator("#txt2img-generate").click()
    image = wait_for_result_image(page, panel)
    assert natural_size(image) == (64, 64)
    params = page.locator("#txt2img-parameters textarea")
    params.wait_for(state="visible")
    page.wait_for_function("el => el.value.includes('Steps: 2')", arg=params.element_handle(), timeout=30_000)
    shot(page, "txt2img")


def test_upscale_tab(page, tmp_path):
    rng = np.random.default_rng(7)
    source = tmp_path / "small.png"
    Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(source)
    page.get_by_role("tab", name="Upscale 2x").click()
    page.locator("#upscale-input input[type=file]").set_input_files(str(source))
    page.locator("#upscale-input img").first.wait_for(state="visible", timeout=60_000)  # the upload is shown
    page.locator("#upscale-run").click()
    image = wait_for_result_image(page, "#upscale-compare")
    assert max(natural_size(image)) >= 28
    notice = page.locator("#upscale-notice")
    notice.get_by_text("28x20 → 56x40").wait_for(timeout=60_000)
    shot(page, "upscale")


def test_large_canvas_tab(page):
    page.get_by_role("tab", name="Large canvas").click()
    page.locator("#canvas-prompt textarea").fill("a red circle on a blue background")
    panel = "div.tabitem:visible"
    set_slider(page, panel, "Steps", 2)
    set_slider(page, panel, "Canvas width", 128)
    page.locator("#canvas-generate").click()
    image = wait_for_result_image(page, f"{panel} .grid-wrap")
    assert natural_size(image) == (128, 64)
    shot(page, "canvas")


def test_missing_chromium_skips_locally_and_fails_under_ci(monkeypatch, tmp_path):
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="Chromium is not installed"):
        require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="browser tests cannot run under CI: Chromium is not installed"):
        require_chromium()


def test_login_page_then_the_studio(browser, tiny_model_dir, tmp_path):
    """With --auth the browser gets the sign-in form, not the studio; the right password opens it."""
    from pipelines.config import config_from_args
    from ui.app import serving

    config = config_from_args(["--model", str(tiny_model_dir), "--device", "cpu", "--no-safety-checker",
                               "--output-dir", str(tmp_path / "out"), "--port", str(free_port()),
                               "--auth", "alice:wonderland"])
    with serving(PipelineManager(config)) as (url, _):
        context = browser.new_context()
        page = context.new_page()
        try:
            page.goto(url)
            page.get_by_label("username").fill("alice")
            page.get_by_label("password").fill("not-it")
            page.get_by_role("button", name="Login").click()
            page.get_by_text("Incorrect Credentials").wait_for(timeout=30_000)
            assert page.locator("#txt2img-generate").count() == 0
            page.get_by_label("username").fill("alice")  # the form is cleared after a failed attempt
            page.get_by_label("password").fill("wonderland")
            page.get_by_role("button", name="Login").click()
            page.locator("#txt2img-generate").wait_for(state="visible", timeout=60_000)
            shot(page, "login")
        finally:
            context.close()


def test_full_queue_message_in_the_page(browser, tiny_model_dir, tmp_path):
    """A job clicked while the queue is full is refused on the page with "try again", and the accepted jobs finish.

    The API answers with the studio's "The queue is full, try again ..." (HTTP 503); Gradio's page
    shows its own fixed text for any 503: "This application is currently busy. Please try again."
    """
    import threading

    from gradio_client import Client

    from pipelines.config import config_from_args
    from ui.app import serving

    config = config_from_args(["--model", str(tiny_model_dir), "--device", "cpu", "--no-safety-checker",
                               "--output-dir", str(tmp_path / "out"), "--port", str(free_port()),
                               "--max-queue", "1"])
    manager = PipelineManager(config)
    gate, running = threading.Event(), threading.Event()

    def hold(*_):  # the first job holds the device until the page has been refused
        running.set()
        gate.wait(timeout=300)

    with serving(manager) as (url, app):
        handle = manager.pipe.unet.register_forward_hook(hold)
        context = browser.new_context()
        try:
            page = context.new_page()  # the page is ready before the queue fills
            page.goto(url)
            page.locator("#txt2img-generate").wait_for(state="visible", timeout=60_000)
            client = Client(url, verbose=False)
            args = dict(prompt="a red circle on a blue background", negative_prompt="", sampler="DDIM", steps=1,
                        guidance_scale=7.5, width=64, height=64, seed=1, batch_size=1, batch_count=1)
            # One job on the device, then one waiting: submitted in that order, because a job that
            # arrives while the first is still queued would find the 1-place queue full.
            jobs = [client.submit(**args, api_name="/txt2img")]
            assert running.wait(timeout=60), "the first API job never reached the device"
            jobs.append(client.submit(**args, api_name="/txt2img"))
            deadline = time.monotonic() + 60
            while len(app._queue) < 1:  # one job on the device, one waiting
                assert time.monotonic() < deadline, "the second API job never queued"
                time.sleep(0.05)
            page.locator("#txt2img-prompt textarea").fill("a blue square")
            page.locator("#txt2img-generate").click()
            page.get_by_text("currently busy. Please try again", exact=False).first.wait_for(timeout=30_000)
            shot(page, "queue-full")
        finally:
            gate.set()
            handle.remove()
            context.close()
        for job in jobs:
            assert len(job.result(timeout=120)[0]) == 1
