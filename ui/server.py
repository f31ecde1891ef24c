"""Serving concerns: logins from flags and files, the share-link warning, the full-queue
message and the Hugging Face Spaces (ZeroGPU) decorator."""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from pipelines.config import AppConfig

log = logging.getLogger(__name__)

QUEUE_FULL_MESSAGE = "The queue is full, try again in a minute ({waiting} jobs are waiting; the limit is {limit})."


def parse_auth(entry: str, where: str) -> tuple[str, str]:
    user, sep, password = entry.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"auth entry {where} must be user:password, got {entry!r}")
    return user, password


def auth_pairs(config: AppConfig) -> list[tuple[str, str]]:
    """Every (user, password) from --auth and --auth-file."""
    pairs = [parse_auth(a, "--auth") for a in config.auth]
    if config.auth_file:
        path = Path(config.auth_file)
        if not path.is_file():
            raise ValueError(f"auth_file '{path}' does not exist")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                pairs.append(parse_auth(line.strip(), f"in {path} line {n}"))
    return pairs


def bind_address(config: AppConfig, environ: Mapping[str, str] = os.environ) -> tuple[str, int]:
    """(server name, port): ``--listen``/``--host``/``--port`` first; with neither given, the
    ``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT`` that a Hugging Face Space sets (0.0.0.0:7860)."""
    defaults = AppConfig.__dataclass_fields__
    if config.listen or config.host != defaults["host"].default:
        name = config.server_name
    else:
        name = environ.get("GRADIO_SERVER_NAME") or config.host
    port = config.port
    if port == defaults["port"].default and environ.get("GRADIO_SERVER_PORT"):
        port = int(environ["GRADIO_SERVER_PORT"])
    return name, port


def share_warning(config: AppConfig, has_auth: bool) -> str | None:
    """The warning printed when ``--share`` makes a public link; ``None`` when there is nothing to say."""
    if not config.share:
        return None
    if has_auth:
        return ("--share makes a PUBLIC link: anyone who has it reaches the login page. "
                "Only the accounts from --auth/--auth-file can use the studio.")
    return ("WARNING: --share makes a PUBLIC link: anyone who has it can use this studio and your GPU. "
            "Add --auth USER:PASSWORD (or --auth-file FILE) to require a login.")


def friendly_queue_full(app) -> None:
    """Make a full queue answer with :data:`QUEUE_FULL_MESSAGE` instead of Gradio's bare "Queue is full."

    Call after ``app.queue(...)``. Gradio refuses the job with HTTP 503 and this text as the detail;
    the browser shows it and ``gradio_client`` raises ``QueueError``.
    """
    queue = app._queue
    push = queue.push

    @functools.wraps(push)
    async def push_with_message(*args, **kwargs):
        success, detail, state = await push(*args, **kwargs)
        if state == "queue_full":
            detail = QUEUE_FULL_MESSAGE.format(waiting=len(queue), limit=queue.max_size)
            log.info("refused a job: %s", detail)
        return success, detail, state

    queue.push = push_with_message


def mcp_available() -> bool:
    """Whether Gradio's MCP server can run (the ``mcp`` package of ``gradio[mcp]`` is installed)."""
    return importlib.util.find_spec("mcp") is not None


def check_mcp(config: AppConfig) -> None:
    """Refuse ``--mcp`` up front, with the install command, when the ``mcp`` package is missing."""
    if config.mcp and not mcp_available():
        raise ValueError("--mcp needs Gradio's MCP extra, which is not installed: pip install 'gradio[mcp]'")


def spaces_gpu() -> Callable | None:
    """``spaces.GPU`` when the Hugging Face ``spaces`` package is installed (a Space), else ``None``."""
    if importlib.util.find_spec("spaces") is None:
        return None
    import spaces

    return getattr(spaces, "GPU", None)


def gpu_task(fn: Callable) -> Callable:
    """``fn`` decorated with ``spaces.GPU`` on a Space (so it runs on ZeroGPU hardware); ``fn`` itself elsewhere."""
    decorator = spaces_gpu()
    return fn if decorator is None else decorator(fn)
