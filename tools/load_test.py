"""Load test: N concurrent gradio_client clients against a studio on loopback.

Starts the studio in this process on 127.0.0.1 (the tiny test model by default, or the demo
model, or any --model the app accepts) with the given --max-queue and --rate-limit, or targets
a running server with --url. Every client is its own session and calls /txt2img once, all
released together. The run is bounded: at most --clients (<= 256) jobs, and --timeout seconds
in all; a job still running then counts as an error.

Prints completed, refused (queue full / rate limit), errors, and p50/p95 latency of the
completed jobs, then checks that the server still answers. Exit status 0 only when there were
no errors, every accepted job returned an image, and the server answered afterwards.

    python tools/load_test.py --clients 24 --max-queue 8
    python tools/load_test.py --model demo --clients 8 --steps 4 --size 256
    python tools/load_test.py --url http://127.0.0.1:7860/ --auth alice:secret --clients 16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("load_test")

MAX_CLIENTS = 256


@dataclass
class Outcome:
    kind: str  # completed | queue_full | rate_limited | error
    latency: float
    detail: str = ""


@dataclass
class Summary:
    clients: int
    completed: int = 0
    refused_queue_full: int = 0
    refused_rate_limit: int = 0
    errors: int = 0
    p50_s: float | None = None
    p95_s: float | None = None
    wall_s: float = 0.0
    server_answers_afterwards: bool = False
    error_details: list[str] = field(default_factory=list)

    @property
    def refused(self) -> int:
        return self.refused_queue_full + self.refused_rate_limit

    @property
    def ok(self) -> bool:
        return self.errors == 0 and self.server_answers_afterwards and \
            self.completed + self.refused == self.clients

    def report(self) -> str:
        def fmt(x):
            return "n/a" if x is None else f"{x:.2f} s"

        lines = [
            f"clients:    {self.clients}",
            f"completed:  {self.completed} (each returned an image)",
            f"refused:    {self.refused} (queue full: {self.refused_queue_full}, rate limit: {self.refused_rate_limit})",
            f"errors:     {self.errors}",
            f"latency:    p50 {fmt(self.p50_s)}, p95 {fmt(self.p95_s)} (completed jobs)",
            f"wall time:  {self.wall_s:.1f} s",
            f"server answers afterwards: {'yes' if self.server_answers_afterwards else 'NO'}",
        ]
        lines += [f"  error: {d}" for d in self.error_details[:10]]
        return "\n".join(lines)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile ``q`` (0-100) of ``values``; ``None`` when empty."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def classify(exc: BaseException) -> str:
    from gradio_client.utils import QueueError

    text = str(exc).lower()
    if isinstance(exc, QueueError) or "queue is full" in text:
        return "queue_full"
    if "rate limit" in text:
        return "rate_limited"
    return "error"


def has_image(result) -> bool:
    from PIL import Image

    try:
        gallery = result[0]
        path = gallery[0]["image"] if isinstance(gallery[0], dict) else gallery[0][0]
        if isinstance(path, dict):
            path = path.get("path")
        with Image.open(path) as im:
            im.load()
            return im.width > 0
    except Exception:  # any unreadable result is "no image"
        return False


def job_arguments(args, seed: int) -> dict:
    return dict(prompt=args.prompt, negative_prompt="", sampler=args.sampler, steps=args.steps,
                guidance_scale=7.5, width=args.size, height=args.size, seed=seed, batch_size=1, batch_count=1)


def run_clients(url: str, args, auth: tuple[str, str] | None) -> Summary:
    """Start ``args.clients`` sessions together; each calls /txt2img once."""
    from gradio_client import Client

    n = args.clients
    deadline = time.monotonic() + args.timeout
    outcomes: list[Outcome | None] = [None] * n
    ready = threading.Barrier(n)

    def one(i: int) -> None:
        try:
            client = Client(url, auth=auth, verbose=False)
        except Exception as exc:  # a refused connection is an error of the run
            outcomes[i] = Outcome("error", 0.0, f"connect: {type(exc).__name__}: {exc}")
            ready.abort()
            return
        try:
            ready.wait(timeout=max(1.0, deadline - time.monotonic()))
        except threading.BrokenBarrierError:
            pass
        start = time.monotonic()
        try:
            job = client.submit(**job_arguments(args, seed=args.seed + i), api_name="/txt2img")
            result = job.result(timeout=max(0.1, deadline - time.monotonic()))
            kind = "completed" if has_image(result) else "error"
            outcomes[i] = Outcome(kind, time.monotonic() - start, "" if kind == "completed" else "no image returned")
        except Exception as exc:  # sorted into refused or error below
            outcomes[i] = Outcome(classify(exc), time.monotonic() - start, f"{type(exc).__name__}: {exc}"[:300])

    started = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.1, deadline - time.monotonic()))
    summary = Summary(clients=n, wall_s=time.monotonic() - started)
    latencies = []
    for o in outcomes:
        if o is None:
            o = Outcome("error", args.timeout, f"no answer within --timeout {args.timeout} s")
        if o.kind == "completed":
            summary.completed += 1
            latencies.append(o.latency)
        elif o.kind == "queue_full":
            summary.refused_queue_full += 1
        elif o.kind == "rate_limited":
            summary.refused_rate_limit += 1
        else:
            summary.errors += 1
            summary.error_details.append(o.detail)
    summary.p50_s, summary.p95_s = percentile(latencies, 50), percentile(latencies, 95)
    try:
        after = Client(url, auth=auth, verbose=False).predict(**job_arguments(args, seed=args.seed + n),
                                                              api_name="/txt2img")
        summary.server_answers_afterwards = has_image(after)
    except Exception as exc:
        if classify(exc) == "rate_limited":  # the server answered, with a refusal
            summary.server_answers_afterwards = True
        else:
            summary.error_details.append(f"after the load: {type(exc).__name__}: {exc}"[:300])
    return summary


def start_server(args, workdir: Path, stack: contextlib.ExitStack) -> str:
    """Serve the studio in this process on a free loopback port until ``stack`` closes; returns its URL."""
    from pipelines.config import AppConfig
    from pipelines.manager import PipelineManager

    model = args.model
    if model == "tiny":
        from pipelines.tiny import save_tiny_pipeline

        model = str(save_tiny_pipeline(workdir / "tiny-model"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = AppConfig(model=model, device=args.device, output_dir=workdir / "outputs", safety_checker=False,
                       port=port, max_queue=args.max_queue, rate_limit=args.rate_limit, offline=True)
    from ui.app import serving

    url, _ = stack.enter_context(serving(PipelineManager(config)))
    return url


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=24, help=f"concurrent clients, 1-{MAX_CLIENTS} (default 24)")
    p.add_argument("--max-queue", type=int, default=8, help="the server's --max-queue (default 8)")
    p.add_argument("--rate-limit", default=None, help="the server's --rate-limit, e.g. 10/min (default: none)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run (default 300)")
    p.add_argument("--model", default="tiny", help="tiny (default: the tiny test model), demo, or a model path")
    p.add_argument("--device", default="cpu", help="device for the in-process server (default cpu)")
    p.add_argument("--url", default=None, help="test this running server instead of starting one")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="login for --url")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--sampler", default="DDIM")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the in-process server (default 1)")
    p.add_argument("--json", action="store_true", help="also print the summary as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        raise SystemExit(f"--clients must be 1-{MAX_CLIENTS}, got {args.clients}")
    if not 1 <= args.timeout <= 3600:
        raise SystemExit(f"--timeout must be 1-3600 s, got {args.timeout}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url
        else:
            import torch

            torch.set_num_threads(args.threads)
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sdstudio-load-"))
            url = start_server(args, Path(tmp), stack)
        summary = run_clients(url, args, auth)
    print(f"load test: {args.clients} clients, --max-queue {args.max_queue}, "
          f"--rate-limit {args.rate_limit or 'off'}, {args.steps} steps at {args.size} px, {url}")
    print(summary.report())
    if args.json:
        print(json.dumps({**asdict(summary), "refused": summary.refused, "ok": summary.ok}))
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
