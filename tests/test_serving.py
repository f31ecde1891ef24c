"""Serving: logins, file routes, the shared device queue, junk uploads and the rate limit,
checked against the studio served in-process on loopback and called like a stranger would."""

from __future__ import annotations

import http.client
import json
import importlib.machinery
import sys
import threading
import time
import types
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import AppConfig, config_from_args
from pipelines.manager import PipelineManager
from ui.app import serving

from .conftest import ROOT, free_port

torch.set_num_threads(1)

TXT2IMG = dict(prompt="a red circle on a blue background", negative_prompt="", sampler="DDIM", steps=1,
               guidance_scale=7.5, width=64, height=64, seed=3, batch_size=1, batch_count=1)
ALICE = ("alice", "wonderland")
BOB = ("bob", "builder")
SECRET = "sdstudio-secret-7f3a9c"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """(url, manager, app, config, root): the tiny model behind two logins, a queue of 2 and a 100 kB upload limit."""
    root = tmp_path_factory.mktemp("serving")
    (root / "secret.txt").write_text(SECRET, encoding="utf-8")
    auth_file = root / "users.txt"
    auth_file.write_text("# the team\nbob:builder\n", encoding="utf-8")
    config = config_from_args([
        "--model", str(tiny_model_dir), "--device", "cpu", "--no-safety-checker",
        "--output-dir", str(root / "outputs"), "--port", str(free_port()),
        "--auth", "alice:wonderland", "--auth-file", str(auth_file),
        "--max-queue", "2", "--max-file-size", "100kb",
    ])
    manager = PipelineManager(config)
    with serving(manager) as (url, app):
        yield url, manager, app, config, root


@pytest.fixture(scope="module")
def alice(served):
    from gradio_client import Client

    return Client(served[0], auth=ALICE, verbose=False)


def page_config(html: str) -> dict:
    start = html.index("window.gradio_config = ") + len("window.gradio_config = ")
    return json.JSONDecoder().raw_decode(html[start:])[0]


def login_cookie(url: str, user: tuple[str, str]) -> str:
    import httpx

    r = httpx.post(url + "login", data={"username": user[0], "password": user[1]})
    assert r.status_code == 200, r.text
    return "; ".join(f"{k}={v}" for k, v in r.cookies.items())


def raw_get(url: str, path: str, cookie: str | None = None) -> tuple[int, bytes]:
    """GET ``path`` exactly as written: no client-side normalising of ``..`` or percent escapes."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        if cookie:
            conn.putheader("Cookie", cookie)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def small_png(path: Path, seed: int = 0, size: int = 24) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- access


def test_anonymous_page_and_api_are_refused(served):
    import httpx
    from gradio_client import Client

    url = served[0]
    page = httpx.get(url)
    # The page is the login form, not the studio: no component and no event in its config.
    config = page_config(page.text)
    assert config["auth_required"] is True and config["components"] == [] and config["dependencies"] == []
    assert "Generate" not in json.dumps(config)
    assert httpx.get(url + "config").status_code == 401
    assert httpx.get(url + "gradio_api/info").status_code == 401
    call = httpx.post(url + "gradio_api/call/txt2img", json={"data": list(TXT2IMG.values())})
    assert call.status_code == 401
    join = httpx.post(url + "gradio_api/queue/join", json=queue_join_body(served[2], list(TXT2IMG.values())))
    assert join.status_code == 401
    with pytest.raises(Exception):
        Client(url, verbose=False)
    with pytest.raises(Exception):
        Client(url, auth=("alice", "wrong-password"), verbose=False)


def test_authorised_users_from_flag_and_file_are_served(served, alice):
    import httpx
    from gradio_client import Client

    url, manager, *_ = served
    gallery, seed, parameters, _ = alice.predict(**TXT2IMG, api_name="/txt2img")
    assert seed == 3 and len(gallery) == 1
    with Image.open(gallery[0]["image"]) as im:
        assert im.size == (64, 64)
    bob = Client(url, auth=BOB, verbose=False)
    gallery, *_ = bob.predict(**{**TXT2IMG, "seed": 4}, api_name="/txt2img")
    assert len(gallery) == 1
    cookie = login_cookie(url, ALICE)
    assert httpx.get(url + "config", headers={"Cookie": cookie}).status_code == 200
    # The audit log names the logged-in user as the client.
    from pipelines.guard import hash_client

    audit = (Path(manager.config.output_dir) / "audit.jsonl").read_text(encoding="utf-8")
    assert hash_client("user:alice") in audit and hash_client("user:bob") in audit


def test_auth_flags_parse_and_bad_entries_are_refused(tmp_path):
    from ui.server import auth_pairs

    users = tmp_path / "users.txt"
    users.write_text("carol:pw:with:colons\n\n# comment\n", encoding="utf-8")
    config = config_from_args(["--auth", "a:1", "--auth", "b:2", "--auth-file", str(users)])
    assert auth_pairs(config) == [("a", "1"), ("b", "2"), ("carol", "pw:with:colons")]
    with pytest.raises(ValueError, match="auth entry --auth must be user:password, got 'nopassword'"):
        auth_pairs(AppConfig(auth=("nopassword",)))
    users.write_text("ok:1\n:empty\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"users.txt line 2 must be user:password"):
        auth_pairs(AppConfig(auth_file=users))
    with pytest.raises(ValueError, match="auth_file '.*missing.txt' does not exist"):
        auth_pairs(AppConfig(auth_file=tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- file routes


def test_file_routes_serve_nothing_outside_the_output_dir(served, alice):
    url, manager, _, config, root = served
    cookie = login_cookie(url, ALICE)
    out = Path(config.output_dir).resolve()
    repo_app = (ROOT / "app.py").resolve()
    app_text = repo_app.read_bytes()[:200]
    variants = [
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=../../../../../../etc/passwd",
        "/gradio_api/file=..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/gradio_api/file=%2Fetc%2Fpasswd",
        f"/gradio_api/file={repo_app}",
        f"/gradio_api/file={out}/../secret.txt",
        f"/gradio_api/file={urllib.parse.quote(str(out))}%2F..%2Fsecret.txt",
        "/gradio_api/file=%252E%252E%252F%252E%252E%252Fetc%252Fpasswd",
        f"/file={repo_app}",
    ]
    for path in variants:
        for who in (cookie, None):
            status, body = raw_get(url, path, who)
            assert b"root:" not in body and SECRET.encode() not in body and app_text not in body, (path, status)
            assert status != 200 or not body.strip(), (path, status, body[:200])
    # The route itself works: an image in the output dir is served to a logged-in user only.
    gallery, *_ = alice.predict(**TXT2IMG, api_name="/txt2img")
    saved = sorted(out.rglob("*.png"))
    assert saved
    status, body = raw_get(url, f"/gradio_api/file={saved[-1]}", cookie)
    assert status == 200 and body.startswith(b"\x89PNG")
    status, body = raw_get(url, f"/gradio_api/file={saved[-1]}", None)
    assert status in (401, 403) and not body.startswith(b"\x89PNG")


def test_launch_kwargs_limits_paths_mcp_and_ssr(tmp_path, monkeypatch):
    import ui.server
    from ui.app import launch_kwargs

    if not ui.server.mcp_available():
        with pytest.raises(ValueError, match=r"--mcp needs Gradio's MCP extra.*pip install 'gradio\[mcp\]'"):
            launch_kwargs(AppConfig(model="demo", output_dir=tmp_path / "out", mcp=True))
        monkeypatch.setattr(ui.server, "mcp_available", lambda: True)

    config = AppConfig(model="demo", output_dir=tmp_path / "out", mcp=True, auth=("a:b",), max_file_size="5mb",
                       listen=True, port=7000)
    kwargs = launch_kwargs(config)
    assert kwargs["allowed_paths"] == [str((tmp_path / "out").resolve())] and (tmp_path / "out").is_dir()
    assert kwargs["mcp_server"] is True and kwargs["ssr_mode"] is False
    assert kwargs["max_file_size"] == "5mb" and kwargs["auth"] == [("a", "b")]
    assert kwargs["server_name"] == "0.0.0.0" and kwargs["server_port"] == 7000
    default = launch_kwargs(AppConfig(model="demo", output_dir=tmp_path / "o2"))
    assert default["mcp_server"] is False and "auth" not in default and default["server_name"] == "127.0.0.1"
    assert default["max_file_size"] == "20mb" and default["share"] is False
    assert config_from_args(["--mcp"]).mcp is True


def test_share_warning_says_public_and_suggests_auth():
    from ui.server import share_warning

    open_link = share_warning(AppConfig(model="demo", share=True), has_auth=False)
    assert "PUBLIC" in open_link and "--auth USER:PASSWORD" in open_link
    closed = share_warning(AppConfig(model="demo", share=True), has_auth=True)
    assert "PUBLIC" in closed and "--auth USER:PASSWORD" not in closed
    assert share_warning(AppConfig(model="demo"), has_auth=False) is None


def test_gpu_task_without_spaces_is_the_function_itself(monkeypatch, tiny_config):
    import importlib.util

    import ui
    from ui.server import gpu_task

    assert importlib.util.find_spec("spaces") is None  # this environment has no Spaces package

    def handler(x):
        return x

    assert gpu_task(handler) is handler
    # With a `spaces` module present, every device handler of the page goes through spaces.GPU.
    decorated = []
    fake = types.ModuleType("spaces")
    fake.__spec__ = importlib.machinery.ModuleSpec("spaces", None)

    def gpu(fn):
        decorated.append(fn.__name__)
        return fn

    fake.GPU = gpu
    monkeypatch.setitem(sys.modules, "spaces", fake)
    app = ui.build_app(PipelineManager(tiny_config))
    assert sorted(decorated) == ["canvas", "txt2img", "txt2img", "upscale"]  # Generate, prompt Enter, Upscale, Canvas
    device = [f for f in app.fns.values() if f.concurrency_id == "device"]
    assert len(device) == 4


def test_dockerfile_runs_non_root_and_listens():
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines()]
    assert "RUN pip install -r requirements.txt" in lines
    user = next(line for line in lines if line.startswith("USER "))
    assert user.split()[1] not in ("root", "0")
    assert any(line.startswith("EXPOSE 7860") for line in lines)
    entrypoint = next(line for line in lines if line.startswith("ENTRYPOINT "))
    assert json.loads(entrypoint.split(" ", 1)[1]) == ["python", "app.py", "--listen", "--port", "7860"]
    health = text[text.index("HEALTHCHECK"):]
    assert "http://127.0.0.1:7860/ " in health.split("\n\n")[0]


def test_bind_address_flags_first_then_the_space_environment():
    from ui.server import bind_address

    space = {"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7861"}
    assert bind_address(AppConfig(model="demo"), {}) == ("127.0.0.1", 7860)
    assert bind_address(AppConfig(model="demo"), space) == ("0.0.0.0", 7861)
    assert bind_address(AppConfig(model="demo", listen=True), {}) == ("0.0.0.0", 7860)
    assert bind_address(AppConfig(model="demo", host="10.0.0.5", port=9000), space) == ("10.0.0.5", 9000)


def test_launch_logs_the_share_warning(tiny_config, caplog):
    """The warning goes to the log at launch; the share link itself is not created (share=False override)."""
    import dataclasses
    import logging

    config = dataclasses.replace(tiny_config, share=True, port=free_port())
    with caplog.at_level(logging.WARNING, logger="ui.app"), serving(PipelineManager(config), share=False) as (_, app):
        assert "--share makes a PUBLIC link" in caplog.text and "--auth USER:PASSWORD" in caplog.text
        assert app.share is False and app.share_url is None


# ----------------------------------------------------------------------------- queue


def queue_join_body(app, data: list) -> dict:
    fn_index = next(i for i, f in app.fns.items() if f.api_name == "txt2img")
    return {"data": data, "fn_index": fn_index, "session_hash": "rawclient", "event_data": None, "trigger_id": None}


def test_queue_overflow_is_refused_and_every_accepted_job_completes(served, alice):
    import httpx
    from gradio_client.utils import QueueError

    url, manager, app, config, _ = served
    unet = manager.pipe.unet
    gate, running = threading.Event(), threading.Event()

    def hold(module, args, output):
        running.set()
        gate.wait(timeout=60)  # the running job holds the device until the queue has been checked

    handle = unet.register_forward_hook(hold)
    try:
        # The first job reaches the device before the others are sent: sent together, the third
        # could arrive while the first is still queued and find the queue full.
        accepted = [alice.submit(**{**TXT2IMG, "seed": 100}, api_name="/txt2img")]
        assert running.wait(timeout=60), "the first job never reached the device"
        accepted += [alice.submit(**{**TXT2IMG, "seed": 100 + i}, api_name="/txt2img") for i in (1, 2)]
        deadline = time.monotonic() + 60
        while len(app._queue) < config.max_queue:  # 1 job on the device, 2 waiting
            assert time.monotonic() < deadline, "the jobs never queued"
            time.sleep(0.05)
        refused = [alice.submit(**{**TXT2IMG, "seed": 200 + i}, api_name="/txt2img") for i in range(2)]
        for job in refused:
            with pytest.raises(QueueError, match="(?i)queue is full.*try again"):
                job.result(timeout=60)
        r = httpx.post(url + "gradio_api/queue/join", json=queue_join_body(app, list(TXT2IMG.values())),
                       headers={"Cookie": login_cookie(url, ALICE)})
        assert r.status_code == 503 and "queue is full, try again" in r.json()["detail"]
    finally:
        gate.set()
        handle.remove()
    seeds = []
    for job in accepted:
        gallery, seed, *_ = job.result(timeout=120)
        assert Path(gallery[0]["image"]).is_file()
        seeds.append(seed)
    assert sorted(seeds) == [100, 101, 102]
    assert not manager.device_lock.locked()
    gallery, *_ = alice.predict(**TXT2IMG, api_name="/txt2img")
    assert len(gallery) == 1


def test_device_handlers_share_one_queue_of_concurrency_one(served, alice):
    _, _, app, config, _ = served
    alice.predict(**TXT2IMG, api_name="/txt2img")  # Gradio makes the event queue on the first job
    device = [f for f in app.fns.values() if f.concurrency_id == "device"]
    assert {f.api_name for f in device} >= {"txt2img", "upscale", "canvas"}
    assert all(f.concurrency_limit in ("default", 1) for f in device)
    queue = app._queue
    assert queue.default_concurrency_limit == 1 and queue.max_size == config.max_queue == 2
    assert queue.event_queue_per_concurrency_id["device"].concurrency_limit == 1


# ----------------------------------------------------------------------------- junk uploads


def junk_uploads(tmp_path: Path) -> list[tuple[str, Path, str]]:
    from .test_upscale import bomb_png

    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not an image\n" * 20, encoding="utf-8")
    good = small_png(tmp_path / "ok.png")
    data = good.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    rng = np.random.default_rng(1)
    big = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(big)  # ~197 kB > 100 kB
    assert big.stat().st_size > 100_000
    return [
        ("decompression bomb", bomb_png(tmp_path / "bomb.png", 60_000, 60_000), r"60000x60000 = 3,600,000,000 pixels"),
        ("text renamed .png", text, r"could not be decoded|not an image|cannot identify"),
        ("truncated", cut, r"truncated or corrupt"),
        ("oversized", big, r"(?i)maximum file size|too large"),
    ]


def test_junk_uploads_get_a_clear_message_and_the_next_request_succeeds(served, alice, tmp_path):
    from gradio_client import handle_file

    good = small_png(tmp_path / "good.png", seed=5)
    for name, path, message in junk_uploads(tmp_path):
        with pytest.raises(Exception, match=message):
            alice.predict(image=handle_file(str(path)), tile_size=0, tile_pad=10, api_name="/upscale")
        _, file, _, notice = alice.predict(image=handle_file(str(good)), tile_size=0, tile_pad=10,
                                           api_name="/upscale")
        with Image.open(file) as im:
            assert im.size == (48, 48), name


def test_oversized_upload_is_refused_by_the_server_itself(served, tmp_path):
    """gradio_client checks max_file_size before uploading; a raw client is refused by the server."""
    import httpx

    url = served[0]
    cookie = login_cookie(url, ALICE)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300_000))
    r = httpx.post(url + "gradio_api/upload", files={"files": ("big.png", big.read_bytes(), "image/png")},
                   headers={"Cookie": cookie})
    assert r.status_code == 413 and "exceeded maximum allowed size of 102400 bytes" in r.text
    small = httpx.post(url + "gradio_api/upload", files={"files": ("ok.png", small_png(tmp_path / "ok.png").read_bytes(),
                                                                 "image/png")}, headers={"Cookie": cookie})
    assert small.status_code == 200 and Path(small.json()[0]).is_file()
    anonymous = httpx.post(url + "gradio_api/upload", files={"files": ("ok.png", b"x", "image/png")})
    assert anonymous.status_code == 401


# ----------------------------------------------------------------------------- rate limit


def test_rate_limit_per_user_says_when_to_retry(served, alice):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from ui.common import RateLimiter

    url, _, app, *_ = served
    ctx = app.sdstudio_context
    ctx.rate_limiter = RateLimiter(2, 60)
    try:
        bob = Client(url, auth=BOB, verbose=False)
        for seed in (1, 2):
            assert len(bob.predict(**{**TXT2IMG, "seed": seed}, api_name="/txt2img")[0]) == 1
        with pytest.raises(AppError, match=r"rate limit reached: 2 jobs per 60 s; try again in (60|59|58|57) s"):
            bob.predict(**TXT2IMG, api_name="/txt2img")
        # Another user has a budget of their own.
        assert len(alice.predict(**TXT2IMG, api_name="/txt2img")[0]) == 1
    finally:
        ctx.rate_limiter = None


def test_rate_limit_flag_parses():
    from ui.common import RateLimiter

    limiter = RateLimiter.parse(config_from_args(["--rate-limit", "3/min"]).rate_limit)
    assert (limiter.limit, limiter.window) == (3, 60.0)
    with pytest.raises(ValueError, match="rate_limit must look like 10/min"):
        RateLimiter.parse("ten per minute")
    with pytest.raises(ValueError, match="rate_limit must look like 10/min"):
        RateLimiter.parse("0/min")


# ----------------------------------------------------------------------------- load test tool


def test_load_test_tool_counts_completed_refused_and_errors(served):
    from tools.load_test import build_parser, percentile, run_clients

    from ui.common import RateLimiter

    url, manager, app, *_ = served
    args = build_parser().parse_args(["--clients", "6", "--steps", "1", "--timeout", "120"])
    summary = run_clients(url, args, ALICE)
    assert summary.errors == 0 and summary.server_answers_afterwards and summary.ok, summary.report()
    # The 2 queue places are always filled (a third job is accepted only when the first has already
    # left the queue for the device, a race); each accepted job returned an image.
    assert summary.completed >= 2 and summary.completed + summary.refused_queue_full == 6
    assert summary.p50_s is not None and summary.p50_s <= summary.p95_s

    # One job a minute: the queue always admits at least 2 of the 6, so at least one admitted job
    # meets the limit whatever the timing (with 2 a minute that needed the race above to admit a third).
    app.sdstudio_context.rate_limiter = RateLimiter(1, 60)
    try:
        limited = run_clients(url, args, ALICE)
    finally:
        app.sdstudio_context.rate_limiter = None
    assert limited.errors == 0 and limited.completed <= 1 and limited.refused_rate_limit >= 1, limited.report()
    assert limited.completed + limited.refused == 6 and "rate limit: " in limited.report()
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and percentile([], 50) is None


def test_app_main_refuses_a_bad_login_entry_before_serving(tiny_model_dir, tmp_path, caplog):
    import app as studio

    argv = ["--model", str(tiny_model_dir), "--device", "cpu", "--no-safety-checker", "--output-dir",
            str(tmp_path / "out"), "--port", str(free_port()), "--auth", "no-colon"]
    assert studio.main(argv) == 2
    assert "auth entry --auth must be user:password, got 'no-colon'" in caplog.text


def test_load_test_bounds_and_classification():
    from gradio_client.utils import QueueError

    from tools.load_test import Summary, classify, main

    with pytest.raises(SystemExit, match="--clients must be 1-256, got 0"):
        main(["--clients", "0"])
    with pytest.raises(SystemExit, match="--clients must be 1-256, got 257"):
        main(["--clients", "257"])
    with pytest.raises(SystemExit, match="--timeout must be 1-3600 s"):
        main(["--timeout", "0"])
    assert classify(QueueError("Queue is full! Please try again.")) == "queue_full"
    assert classify(RuntimeError("rate limit reached: 2 jobs per 60 s; try again in 5 s")) == "rate_limited"
    assert classify(RuntimeError("boom")) == "error"
    bad = Summary(clients=2, completed=1, errors=1, server_answers_afterwards=True, error_details=["AppError: boom"])
    assert not bad.ok and "errors:     1" in bad.report() and "error: AppError: boom" in bad.report()
    assert not Summary(clients=1, completed=1, server_answers_afterwards=False).ok


def test_decoded_by_request_passes_the_upload_path_through(tmp_path):
    import gradio as gr

    from ui.common import decoded_by_request

    with pytest.raises(ValueError, match="decoded_by_request is for gr.Image"):
        decoded_by_request(gr.Image(type="pil"))
    with pytest.raises(ValueError, match="decoded_by_request is for gr.Image"):
        decoded_by_request(gr.Image(type="filepath", image_mode="RGB"))
    (image,) = decoded_by_request(gr.Image(type="filepath", image_mode=None))
    junk = tmp_path / "junk.png"
    junk.write_text("not an image", encoding="utf-8")
    assert image.preprocess(None) is None
    assert image.preprocess({"path": str(junk)}) == str(junk)  # not opened here: the request's decoder says why
    data = image.data_model(path=str(junk))
    assert image.preprocess(data) == str(junk)
