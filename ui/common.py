"""What the tabs share: job registry (Cancel), input coercion, error mapping, rate limit."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import gradio as gr

from pipelines.guard import PromptRefused
from pipelines.manager import PipelineManager
from pipelines.progress import JobControl
from pipelines.results import GenerationCancelled

OOM_MESSAGE = (
    "The device ran out of memory on this job. Try a smaller size, a smaller batch or tile size, "
    "or start the studio with --memory low. The device has been released; the next job will run."
)


class JobRegistry:
    """The running job of each browser session, so the Cancel button can reach it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobControl] = {}

    def start(self, key: str | None, control: JobControl) -> None:
        if key:
            with self._lock:
                self._jobs[key] = control

    def finish(self, key: str | None, control: JobControl) -> None:
        if key:
            with self._lock:
                if self._jobs.get(key) is control:
                    del self._jobs[key]

    def cancel(self, key: str | None) -> bool:
        with self._lock:
            control = self._jobs.get(key) if key else None
        if control is None:
            return False
        control.cancel()
        return True


class RateLimiter:
    """At most ``limit`` jobs per ``window`` seconds for each client (user name or IP)."""

    def __init__(self, limit: int, window: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.limit, self.window, self.clock = limit, window, clock
        self._lock = threading.Lock()
        self._hits: dict[str, deque] = {}

    @classmethod
    def parse(cls, spec: str | None) -> "RateLimiter | None":
        """``'10/min'`` -> a limiter; ``None`` -> no limit."""
        if not spec:
            return None
        try:
            count, unit = spec.strip().split("/")
            limit = int(count)
        except ValueError:
            raise ValueError(f"rate_limit must look like 10/min, got {spec!r}") from None
        windows = {"s": 1.0, "sec": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0, "hour": 3600.0}
        if unit not in windows or limit < 1:
            raise ValueError(f"rate_limit must look like 10/min (units: sec, min, hour), got {spec!r}")
        return cls(limit, windows[unit])

    def check(self, client: str) -> None:
        """Raise ``ValueError`` saying when to retry if ``client`` is over the limit."""
        now = self.clock()
        with self._lock:
            hits = self._hits.setdefault(client, deque())
            while hits and now - hits[0] >= self.window:
                hits.popleft()
            if len(hits) >= self.limit:
                retry = math.ceil(self.window - (now - hits[0]))
                raise ValueError(
                    f"rate limit reached: {self.limit} jobs per {int(self.window)} s; try again in {retry} s"
                )
            hits.append(now)


@dataclass
class UIContext:
    """Built once by ``build_app`` and handed to every tab builder."""

    manager: PipelineManager
    jobs: JobRegistry = field(default_factory=JobRegistry)
    rate_limiter: RateLimiter | None = None


def client_id(request: gr.Request | None) -> str | None:
    """The user name when logged in, else the client's IP address."""
    if request is None:
        return None
    if getattr(request, "username", None):
        return f"user:{request.username}"
    host = getattr(getattr(request, "client", None), "host", None)
    return f"ip:{host}" if host else None


def as_int(name: str, value) -> int:
    """Accept 512 or 512.0 from a slider or API client; refuse 512.5 instead of rounding it."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return as_int(name, float(value))
        except ValueError:
            pass
    raise ValueError(f"{name} must be a whole number, got {value!r}")


def as_float(name: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_job(ctx: UIContext, request: gr.Request | None, progress: gr.Progress | None, fn: Callable[[JobControl], object]):
    """Run ``fn(control)`` as one user job: rate limit, Cancel, progress and error messages.

    ``ValueError`` (bad field, blocklist, rate limit) becomes a ``gr.Error`` with its message;
    an out-of-memory error frees the device cache and says what to change.
    """
    client = client_id(request)
    key = getattr(request, "session_hash", None)
    control = JobControl(client=client)
    if progress is not None:
        control.progress = lambda done, total, desc: progress((done, total), desc=desc)
    try:
        if ctx.rate_limiter is not None:
            ctx.rate_limiter.check(client or "anonymous")
        ctx.jobs.start(key, control)
        return fn(control)
    except GenerationCancelled:
        raise gr.Error("Cancelled: the job stopped and nothing was delivered.", title="Cancelled") from None
    except (ValueError, PromptRefused) as exc:
        raise gr.Error(str(exc), title="Invalid input") from None
    except FloatingPointError as exc:
        raise gr.Error(str(exc), title="Numerical error") from None
    except Exception as exc:
        if is_out_of_memory(exc):
            free_device_memory()
            raise gr.Error(OOM_MESSAGE, title="Out of memory") from None
        raise
    finally:
        ctx.jobs.finish(key, control)


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def validated_by_request(*components):
    """Let the request's ``check()`` validate these inputs (numbers, sampler names) instead of Gradio.

    Gradio's own Slider/Number preprocessing raises "Value 0 is less than minimum value 1."
    without naming the field, lets NaN through, and rounds to the component's precision (so
    an API call with steps=2.5 would silently run 2 steps). Passing the raw value through
    means every bad value is refused by ``check()``/``as_int`` with the field's name.
    """
    for component in components:
        component.preprocess = lambda payload: payload  # instance attribute shadows the method
    return components


def decoded_by_request(*images):
    """Hand the uploaded file's path to the request's own safe decoder instead of Gradio opening it.

    With ``type="filepath"`` Gradio's Image preprocessing only calls ``PIL.Image.open`` on the
    upload and returns the same path, but that open turns a decompression bomb, a text file
    named ``.png`` or a truncated file into "Could not preprocess input component ...". The
    capability's decoder (``pipelines.upscale.load_input_image``) refuses the same files with a
    message that names the file and the limit. Gradio has already checked that the path is an
    upload in its cache before ``preprocess`` runs.
    """
    for image in images:
        if getattr(image, "type", None) != "filepath" or getattr(image, "image_mode", "") is not None:
            raise ValueError("decoded_by_request is for gr.Image(type='filepath', image_mode=None)")
        original = image.preprocess

        def preprocess(payload, original=original):
            if payload is None:
                return None
            path = payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", None)
            return str(path) if path else original(payload)  # base64 payloads: Gradio decodes them

        image.preprocess = preprocess
    return images
