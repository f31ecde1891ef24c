"""Per-step progress and cooperative cancel, shared by every capability's denoising loop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .results import GenerationCancelled

ProgressFn = Callable[[int, int, str], None]


@dataclass
class JobControl:
    """Handed to a capability by the caller: reports progress, and lets Cancel stop the job.

    ``cancel_event`` is checked after every denoising step, so a cancelled job stops within
    one step and frees the device lock for the next job.
    """

    progress: ProgressFn | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    preview: Callable | None = None
    client: str | None = None

    def cancel(self) -> None:
        self.cancel_event.set()

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise GenerationCancelled("cancelled by the user")

    def report(self, done: int, total: int, desc: str = "denoising") -> None:
        if self.progress is not None:
            self.progress(done, total, desc)
