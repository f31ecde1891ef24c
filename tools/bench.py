"""SD Studio benchmark suite (issue 8): each figure a median over repeats, its baseline in the same process.

Sections (each measured variant and its baseline run interleaved, A, B, A, B, ...):

- ``txt2img``   PipelineManager.txt2img (request -> guarded PNG) vs a bare diffusers
                ``StableDiffusionPipeline.__call__`` (same weights, sampler, steps, size, seed);
                the ratio, and the ratio with the guard's own time taken out.
- ``guard``     the output guard per image at 512 and 1024 px: watermark + metadata + PNG + audit,
                safety checker off, and on with a small random safety checker.
- ``canvas``    Large canvas (MultiDiffusion, 2:1) vs one native image and vs diffusers'
                panorama pipeline at the same views (tools/bench_canvas.py's cases).
- ``upscale``   Upscale 2x tiled vs untiled: time (interleaved) and peak memory (RSS high-water
                mark of a fresh subprocess on CPU; max_memory_allocated on CUDA).
- ``serve``     cold start of ``app.py`` to the first served /txt2img, and resident memory after all
                three tabs were used once vs one plain StableDiffusionPipeline loaded alone.
- ``speed``     each speed option of the manager (bf16, channels_last, attention slicing, VAE
                tiling, ...) as a ratio to the default configuration; CUDA-only ones are listed.
- ``preview``   a 20-step generation with the live preview every step vs without.

Models: ``tiny512`` (pipelines/tiny.py at sample_size 64: the SD layout, native 512 px, CPU-fast),
``demo`` (assets/demo-model, when present), ``sd15-random`` (the SD 1.5 architecture with random
weights from assets/sd15-config: 2 steps at 256 px on a CPU; not in ``--quick``).

    python tools/bench.py --quick                       # < 10 min on 2 CPU cores
    python tools/bench.py --models tiny512,demo,sd15-random --json bench-results/full.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.config import DEMO_MODEL_DIR, AppConfig  # noqa: E402
from pipelines.manager import PipelineManager  # noqa: E402
from pipelines.progress import JobControl  # noqa: E402
from pipelines.requests import Txt2ImgRequest  # noqa: E402
from pipelines.samplers import make_scheduler  # noqa: E402

log = logging.getLogger("bench")

PROMPT = "a red circle on a blue background"
SAMPLER = "Euler a"
BAR_T2I_RATIO = 1.05
BAR_GUARD_MS_512 = 100.0
BAR_PREVIEW_OVERHEAD = 0.05
CUDA_ONLY_OPTIONS = {"fp16": "fp16 kernels are for GPUs (CPU fp16 matmuls are emulated)",
                     "compile": "--compile is applied on CUDA only (skipped with a warning elsewhere)",
                     "cpu_offload": "model CPU offload moves modules to a GPU while they run"}


# ----------------------------------------------------------------------------- helpers


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, device="cpu") -> dict[str, list[float]]:
    """Seconds per call of each case: one warm-up each, then ``repeats`` rounds A, B, A, B, ...
    (tools/bench_canvas.py's round-robin timer)."""
    from tools.bench_canvas import time_cases

    return time_cases(cases, cases, repeats, torch.device(device))


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def tiny512_dir(root: Path) -> Path:
    from pipelines.tiny import save_tiny_pipeline

    folder = root / "tiny512"
    if not (folder / "model_index.json").is_file():
        save_tiny_pipeline(folder, sample_size=64)
    return folder


def sd15_random_dir(root: Path) -> Path:
    """The SD 1.5 architecture with random weights, saved as a diffusers folder (no download)."""
    folder = root / "sd15-random"
    if not (folder / "model_index.json").is_file():
        from tools.bench_canvas import sd15_random_pipeline

        pipe = sd15_random_pipeline("cpu", torch.float32)
        pipe.save_pretrained(folder, safe_serialization=True)
        del pipe
        gc.collect()
    return folder


def resolve_model(name: str, root: Path) -> tuple[str, int]:
    """(app --model value, image size to bench; 0 = the model's native size) for a bench model name."""
    if name == "tiny512":
        return str(tiny512_dir(root)), 512
    if name == "sd15-random":
        return str(sd15_random_dir(root)), 256
    if name == "demo":
        return "demo", 0
    return name, 0


def bench_config(model: str, out: Path, **options) -> AppConfig:
    return AppConfig(model=model, device=options.pop("device", "cpu"), safety_checker=False, output_dir=out,
                     offline=True, **options)


class GuardTimer:
    """Wraps an OutputGuard's ``deliver`` to time each call (the real method runs; only a clock is added)."""

    def __init__(self, guard):
        self.guard, self.seconds = guard, []
        deliver = guard.deliver

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return deliver(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        guard.deliver = timed


# ----------------------------------------------------------------------------- (a) txt2img end to end


def bench_txt2img(model: str, *, steps: int, size: int, repeats: int, out: Path, device: str = "cpu") -> dict:
    """Manager (request -> guarded PNG) vs bare StableDiffusionPipeline.__call__; same seed and sampler."""
    from diffusers import StableDiffusionPipeline

    manager = PipelineManager(bench_config(model, out / "t2i", device=device))
    pipe = manager.load()
    size = size or manager.native_size
    timer = GuardTimer(manager.guard)
    # The baseline: the same weights loaded by diffusers itself, as a user of diffusers would.
    location = manager.info.source.location
    bare = StableDiffusionPipeline.from_pretrained(location, dtype=pipe.unet.dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    bare.set_progress_bar_config(disable=True)
    req = Txt2ImgRequest(prompt=PROMPT, sampler=SAMPLER, steps=steps, width=size, height=size, seed=1)

    def ours():
        return manager.txt2img(req)

    def baseline():
        bare.scheduler = make_scheduler(SAMPLER, bare.scheduler.config)
        return bare(PROMPT, num_inference_steps=steps, width=size, height=size, guidance_scale=req.guidance_scale,
                    generator=[torch.Generator("cpu").manual_seed(1)]).images

    times = interleaved({"ours": ours, "diffusers": baseline}, repeats, device)
    times["ours:guard"] = timer.seconds[1:]  # the first call was the warm-up
    m_ours, m_base, m_guard = med(times["ours"]), med(times["diffusers"]), med(times["ours:guard"])
    no_guard = [t - g for t, g in zip(times["ours"], times["ours:guard"])]
    row = dict(model=model, size=size, steps=steps, sampler=SAMPLER, repeats=repeats, seconds=times,
               median_ours_s=m_ours, median_diffusers_s=m_base, median_guard_s=m_guard,
               median_ours_without_guard_s=med(no_guard), ratio=m_ours / m_base,
               ratio_without_guard=med(no_guard) / m_base)
    row["bar_without_guard"] = f"<= {BAR_T2I_RATIO}"
    row["pass"] = bool(row["ratio_without_guard"] <= BAR_T2I_RATIO)
    del manager, bare, pipe
    gc.collect()
    return row


# ----------------------------------------------------------------------------- (b) guard cost


def small_safety_filter(device: str = "cpu"):
    """A randomly initialised StableDiffusionSafetyChecker with a small CLIP vision tower (224 px input)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from pipelines.guard import SafetyFilter

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           image_size=224, patch_size=16),
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    return SafetyFilter(checker, CLIPImageProcessor(crop_size=224, size=224), device=device)


def encode_png(image, record: dict) -> bytes:
    """The guard's PNG step alone (pipelines.guard.encode_png): the same metadata chunks, to memory."""
    from pipelines.guard import encode_png as guard_png
    from pipelines.metadata import format_parameters

    meta = dict(record, model="bench", model_hash="0" * 10)
    return guard_png(image, format_parameters(meta), meta)


def bench_guard(sizes: list[int], repeats: int, out: Path) -> list[dict]:
    """Seconds per image through OutputGuard.deliver (watermark, metadata, PNG, file, audit line)."""
    from pipelines.guard import OutputGuard, Watermarker

    rng = np.random.default_rng(0)
    guards = {"safety off": OutputGuard(out / "guard-off", "bench", "bench", "0" * 10, Watermarker(),
                                        safety=None, safety_status="off"),
              "safety on (small random checker)": OutputGuard(out / "guard-on", "bench", "bench", "0" * 10,
                                                              Watermarker(), safety=small_safety_filter())}
    rows = []
    for size in sizes:
        # A smooth random image (like a generated one, so PNG compression is realistic).
        small = rng.integers(0, 255, (size // 16, size // 16, 3), dtype=np.uint8)
        from PIL import Image

        image = Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC)
        record = dict(prompt=PROMPT, negative_prompt="", sampler=SAMPLER, steps=20, guidance_scale=7.5,
                      width=size, height=size, seed=1)
        marker = Watermarker()
        cases = {name: (lambda g=g: g.deliver([image], [record], tab="bench")) for name, g in guards.items()}
        cases["of which: watermark"] = lambda: marker.apply(image)
        cases["of which: PNG encode with metadata"] = lambda: encode_png(image, record)
        times = interleaved(cases, repeats)
        for name in cases:
            ms = med(times[name]) * 1000
            row = dict(size=size, case=name, median_ms=ms, repeats=repeats, seconds=times[name])
            if size == 512 and name == "safety off":
                row["bar"] = f"< {BAR_GUARD_MS_512} ms"
                row["pass"] = bool(ms < BAR_GUARD_MS_512)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- (c) canvas


def bench_canvas(model: str, *, steps: int, repeats: int, size: int = 0, panorama: bool = True) -> dict:
    """tools/bench_canvas.py's cases (txt2img, canvas default, and with ``panorama`` diffusers'
    panorama pipeline and our canvas at its views) on ``model``."""
    from tools import bench_canvas as bc

    pipe = bc.load_pipeline(model, "cpu", "auto")
    native = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    args = argparse.Namespace(size=size or native, steps=steps, sampler=SAMPLER, guidance_scale=7.5)
    cases = bc.build_cases(pipe, args, steps)
    keep = ["txt2img", "canvas default"]
    if panorama:
        keep += ["canvas panorama views", "diffusers panorama (view_batch_size=1)"]
    times = interleaved({k: cases[k] for k in keep}, repeats)
    median = {k: med(v) for k, v in times.items()}
    ratios = {"canvas default / one native image": median["canvas default"] / median["txt2img"]}
    if panorama:
        ratios["canvas panorama views / diffusers panorama"] = (median["canvas panorama views"]
                                                                / median["diffusers panorama (view_batch_size=1)"])
    return dict(model=model, size=args.size, canvas=f"{2 * args.size}x{args.size}", steps=steps, repeats=repeats,
                seconds=times, median_s=median, ratios=ratios)


# ----------------------------------------------------------------------------- (d) upscale


UPSCALE_CHILD = r"""
import json, sys, threading, time, torch, psutil
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[5]))
from pathlib import Path
import numpy as np
from pipelines.config import AppConfig
from pipelines.manager import PipelineManager
from pipelines.upscale import get_upscaler
from pipelines.progress import JobControl
manager = PipelineManager(AppConfig(model=sys.argv[2], device="cpu", safety_checker=False, output_dir=Path(sys.argv[6]), offline=True))
up = get_upscaler(manager)
side, tile = int(sys.argv[3]), int(sys.argv[4])
pixels = np.random.default_rng(0).random((side, side, 3), dtype=np.float32)
proc = psutil.Process()
up.upscale_rgb([pixels[:64, :64].copy()], tile_size=0, tile_pad=10, control=JobControl())  # warm the kernels
base = proc.memory_info().rss
peak = [base]
done = threading.Event()
def watch():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss)
        time.sleep(0.002)
t = threading.Thread(target=watch, daemon=True); t.start()
start = time.perf_counter()
_, used, _ = up.upscale_rgb([pixels], tile_size=tile, tile_pad=10, control=JobControl())
seconds = time.perf_counter() - start
done.set(); t.join()
peak[0] = max(peak[0], proc.memory_info().rss)
print(json.dumps(dict(seconds=seconds, peak_rss_delta_mib=(peak[0] - base) / 2**20, tile_used=used)))
"""


def upscale_memory_subprocess(model: str, side: int, tile: int, out: Path, threads: int) -> dict:
    """Peak RSS above the pre-upscale RSS in a fresh process (psutil sampled every 2 ms)."""
    result = subprocess.run([sys.executable, "-c", UPSCALE_CHILD, str(ROOT), model, str(side), str(tile),
                             str(threads), str(out / "upscale-mem")],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_upscale(model: str, sides: list[int], *, tile: int, repeats: int, out: Path, threads: int) -> list[dict]:
    """Tiled (``tile`` px) vs untiled Upscale 2x: interleaved time here, peak memory in subprocesses."""
    from pipelines.upscale import get_upscaler

    manager = PipelineManager(bench_config(model, out / "upscale"))
    upscaler = get_upscaler(manager)
    rows = []
    for side in sides:
        pixels = np.random.default_rng(0).random((side, side, 3), dtype=np.float32)
        cases = {"untiled": lambda: upscaler.upscale_rgb([pixels], tile_size=side + 64, tile_pad=10,
                                                         control=JobControl()),
                 f"tiled {tile}": lambda: upscaler.upscale_rgb([pixels], tile_size=tile, tile_pad=10,
                                                              control=JobControl())}
        times = interleaved(cases, repeats)
        memory = {"untiled": upscale_memory_subprocess(model, side, side + 64, out, threads),
                  f"tiled {tile}": upscale_memory_subprocess(model, side, tile, out, threads)}
        for name in cases:
            rows.append(dict(input=f"{side}x{side}", output=f"{2 * side}x{2 * side}", case=name,
                             median_s=med(times[name]), seconds=times[name],
                             peak_rss_delta_mib=memory[name]["peak_rss_delta_mib"],
                             memory="peak RSS above the pre-upscale RSS, fresh process (CPU)"))
        base = next(r for r in rows if r["input"] == f"{side}x{side}" and r["case"] == "untiled")
        for r in rows:
            if r["input"] == base["input"]:
                r["time_vs_untiled"] = r["median_s"] / base["median_s"]
                r["memory_vs_untiled"] = (r["peak_rss_delta_mib"] / base["peak_rss_delta_mib"]
                                          if base["peak_rss_delta_mib"] > 0 else float("nan"))
    return rows


# ----------------------------------------------------------------------------- (e) cold start + memory


PLAIN_CHILD = r"""
import json, sys, time, torch, psutil
torch.set_num_threads(int(sys.argv[2]))
start = time.perf_counter()
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, requires_safety_checker=False)
pipe.set_progress_bar_config(disable=True)
pipe("a red circle", num_inference_steps=1, height=int(sys.argv[3]), width=int(sys.argv[3]))
print(json.dumps(dict(rss_mib=psutil.Process().memory_info().rss / 2**20, seconds=time.perf_counter() - start)))
"""


def process_rss_mib(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return (proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))) / 2**20


def bench_serve(model_dir: str, *, out: Path, threads: int, size: int, timeout: float = 240.0) -> dict:
    """Start app.py, time until a /txt2img call returns; RSS after all three tabs vs a plain pipeline alone."""
    from gradio_client import Client, handle_file
    from PIL import Image

    from tests.conftest import free_port

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, str(ROOT / "app.py"), "--model", model_dir, "--device", "cpu", "--no-safety-checker",
           "--offline", "--output-dir", str(out / "serve"), "--port", str(port), "--log-level", "WARNING"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        client = None
        while client is None:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            if time.perf_counter() - start > timeout:
                raise TimeoutError(f"app.py did not serve within {timeout} s")
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not listening yet: any connection error means "try again"
                time.sleep(0.25)
        connected = time.perf_counter() - start
        client.predict(prompt=PROMPT, negative_prompt="", sampler=SAMPLER, steps=1, guidance_scale=7.5,
                       width=size, height=size, seed=1, batch_size=1, batch_count=1, api_name="/txt2img")
        first = time.perf_counter() - start
        rss_after_txt2img = process_rss_mib(proc.pid)
        image = out / "serve-input.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(image)
        client.predict(image=handle_file(str(image)), tile_size=0, tile_pad=10, api_name="/upscale")
        client.predict(prompt=PROMPT, negative_prompt="", sampler=SAMPLER, steps=1, guidance_scale=7.5,
                       width=2 * size, height=size, seed=1, tile_size=size, tile_overlap=size // 4, blend="cosine",
                       tile_batch_size=4, api_name="/canvas")
        rss_all = process_rss_mib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    plain = json.loads(subprocess.run([sys.executable, "-c", PLAIN_CHILD, model_dir, str(threads), str(size)],
                                      capture_output=True, text=True, check=True, env=env).stdout.strip()
                       .splitlines()[-1])
    return dict(model=model_dir, cold_start_to_listening_s=connected, cold_start_to_first_txt2img_s=first,
                rss_after_txt2img_mib=rss_after_txt2img, rss_all_three_tabs_mib=rss_all,
                plain_pipeline_rss_mib=plain["rss_mib"], plain_pipeline_load_and_1_step_s=plain["seconds"],
                rss_ratio=rss_all / plain["rss_mib"])


# ----------------------------------------------------------------------------- speed options


SPEED_OPTIONS = {
    "default": {},
    "bf16": {"dtype": "bf16"},
    "channels_last": {"channels_last": True},
    "attention slicing": {"attention_slicing": True},
    "VAE tiling": {"vae_tiling": True},
    "memory low": {"memory": "low"},
}


SPEED_NOTES = {
    "VAE tiling": "tiles only above the VAE's tile size (its sample_size), so no effect at or below it",
    "memory low": "on CPU: attention slicing + VAE tiling (offload is CUDA only)",
}


def bench_speed(model: str, *, steps: int, size: int, repeats: int, out: Path, device: str = "cpu") -> dict:
    """Each speed option's manager vs the default manager, interleaved, same request."""
    managers = {name: PipelineManager(bench_config(model, out / "speed", device=device, **opts))
                for name, opts in SPEED_OPTIONS.items()}
    size = size or managers["default"].native_size
    req = Txt2ImgRequest(prompt=PROMPT, sampler=SAMPLER, steps=steps, width=size, height=size, seed=1)
    cases = {name: (lambda m=m: m.txt2img(req)) for name, m in managers.items()}
    times = interleaved(cases, repeats, device)
    base = med(times["default"])
    reference = np.asarray(managers["default"].txt2img(req).images[0], dtype=np.int16)
    rows = []
    for name, m in managers.items():
        image = np.asarray(m.txt2img(req).images[0], dtype=np.int16)
        rows.append(dict(option=name, median_s=med(times[name]), ratio_vs_default=med(times[name]) / base,
                         max_pixel_diff_vs_default=int(np.abs(image - reference).max()),
                         unet_dtype=str(m.pipe.unet.dtype).replace("torch.", ""), note=SPEED_NOTES.get(name, "")))
    not_here = {k: v for k, v in CUDA_ONLY_OPTIONS.items()} if device != "cuda" else {}
    return dict(model=model, size=size, steps=steps, repeats=repeats, device=device, rows=rows, seconds=times,
                cuda_only_not_measured=not_here)


# ----------------------------------------------------------------------------- live preview


def bench_preview(model: str, *, steps: int, size: int, repeats: int, out: Path, every: int = 1) -> dict:
    """A ``steps``-step generation with the live preview every ``every`` steps vs without (same manager)."""
    from pipelines.preview import factors_for_model, preview_callback

    manager = PipelineManager(bench_config(model, out / "preview"))
    size = size or manager.native_size
    factors = factors_for_model(manager.info.source.is_demo)
    req = Txt2ImgRequest(prompt=PROMPT, sampler=SAMPLER, steps=steps, width=size, height=size, seed=1)
    shown = []
    cases = {"without preview": lambda: manager.txt2img(req),
             "with preview": lambda: manager.txt2img(
                 req, JobControl(preview=preview_callback(factors, every, lambda s, t, im: shown.append(im.size))))}
    times = interleaved(cases, repeats)
    overhead = med(times["with preview"]) / med(times["without preview"]) - 1
    # The same cost measured alone, on latents of this size: less noisy than a difference of two runs.
    latents = torch.randn(1, 4, size // 8, size // 8)
    sink = preview_callback(factors, 1, lambda s, t, im: None)
    calls = [0.0] * 50
    for i in range(len(calls)):
        start = time.perf_counter()
        sink(1, steps, latents)
        calls[i] = time.perf_counter() - start
    n_previews = len([s for s in range(1, steps + 1) if s % every == 0 or s == steps])
    isolated = n_previews * med(calls) / med(times["without preview"])
    return dict(model=model, size=size, steps=steps, every=every, repeats=repeats, factors=factors["name"],
                preview_size=list(shown[-1]) if shown else None, seconds=times,
                median_without_s=med(times["without preview"]), median_with_s=med(times["with preview"]),
                overhead=overhead, preview_call_ms=med(calls) * 1000, previews_per_image=n_previews,
                overhead_from_call_cost=isolated, bar=f"< {BAR_PREVIEW_OVERHEAD:.0%}",
                pass_=bool(isolated < BAR_PREVIEW_OVERHEAD and overhead < BAR_PREVIEW_OVERHEAD))


# ----------------------------------------------------------------------------- report


def machine(note: str = "") -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:10]
    except OSError:
        lscpu = []
    return dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, lscpu=lscpu,
                load_average_1min=os.getloadavg()[0], note=note)


def markdown(report: dict) -> str:
    r = report
    lines = [f"SD Studio benchmark ({'--quick' if r['quick'] else 'full'}), {r['date']}; "
             f"{r['machine']['cpu_count']} CPU cores, {r['machine']['torch_threads']} torch thread(s), "
             f"load average {r['machine'].get('load_average_1min', float('nan')):.2f} at the start"
             + (f"; **{r['machine']['note']}**" if r['machine'].get('note') else "")
             + ". Each variant is interleaved with its baseline: read the ratios first.", ""]
    if r.get("txt2img"):
        lines += ["### Text to image end to end vs bare diffusers", "",
                  "| model | size | steps | ours s | diffusers s | guard s | ratio | ratio without guard (bar <= 1.05) |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in r["txt2img"]:
            lines.append(f"| {x['model_name']} | {x['size']} | {x['steps']} | {x['median_ours_s']:.3f} | "
                         f"{x['median_diffusers_s']:.3f} | {x['median_guard_s']:.3f} | {x['ratio']:.3f} | "
                         f"{x['ratio_without_guard']:.3f} {'PASS' if x['pass'] else 'FAIL'} |")
        lines.append("")
    if r.get("guard"):
        lines += ["### Output guard per image (watermark, metadata, PNG, audit)", "",
                  "| size | case | median ms | bar |", "|---|---|---|---|"]
        for x in r["guard"]:
            bar = f"{x['bar']}: {'PASS' if x['pass'] else 'FAIL'}" if "bar" in x else ""
            lines.append(f"| {x['size']} | {x['case']} | {x['median_ms']:.1f} | {bar} |")
        for x in r.get("txt2img") or []:
            lines.append(f"| {x['size']} | safety off, inside Text to image ({x['model_name']}'s generated image) | "
                         f"{x['median_guard_s'] * 1000:.1f} | |")
        lines += ["", "The test image is smooth random colour (bicubic 32 -> N px); PNG compression time depends "
                      "on the content.", ""]
    for c in r.get("canvas", []):
        lines += [f"### Large canvas {c['canvas']} vs one {c['size']} px image ({c['model_name']}, {c['steps']} steps)",
                  "", "| case | median s | x one image |", "|---|---|---|"]
        one = c["median_s"]["txt2img"]
        for k, v in c["median_s"].items():
            lines.append(f"| {k} | {v:.2f} | {v / one:.2f} |")
        for k, v in c["ratios"].items():
            lines.append(f"| ratio: {k} | | {v:.2f} |")
        lines.append("")
    if r.get("upscale"):
        lines += ["### Upscale 2x, tiled vs untiled (demo upscaler)", "",
                  "| input -> output | case | median s | x untiled | peak RSS delta MiB | x untiled |",
                  "|---|---|---|---|---|---|"]
        for x in r["upscale"]:
            lines.append(f"| {x['input']} -> {x['output']} | {x['case']} | {x['median_s']:.2f} | "
                         f"{x['time_vs_untiled']:.2f} | {x['peak_rss_delta_mib']:.0f} | {x['memory_vs_untiled']:.2f} |")
        lines.append("")
    if r.get("serve"):
        s = r["serve"]
        lines += ["### Cold start and load-once memory (app.py subprocess, gradio_client)", "",
                  "| figure | value |", "|---|---|",
                  f"| start to listening | {s['cold_start_to_listening_s']:.1f} s |",
                  f"| start to first /txt2img served | {s['cold_start_to_first_txt2img_s']:.1f} s |",
                  f"| RSS after /txt2img | {s['rss_after_txt2img_mib']:.0f} MiB |",
                  f"| RSS after all three tabs | {s['rss_all_three_tabs_mib']:.0f} MiB |",
                  f"| plain StableDiffusionPipeline alone (1 step) | {s['plain_pipeline_rss_mib']:.0f} MiB |",
                  f"| ratio all tabs / plain pipeline | {s['rss_ratio']:.2f} |", ""]
    if r.get("speed"):
        s = r["speed"]
        lines += [f"### Speed options on {s['device']} ({s['model_name']}, {s['size']} px, {s['steps']} steps)", "",
                  "| option | unet dtype | median s | x default | max pixel diff vs default | note |",
                  "|---|---|---|---|---|---|"]
        for x in s["rows"]:
            lines.append(f"| {x['option']} | {x['unet_dtype']} | {x['median_s']:.2f} | {x['ratio_vs_default']:.2f} | "
                         f"{x['max_pixel_diff_vs_default']} | {x['note']} |")
        for k, why in s["cuda_only_not_measured"].items():
            lines.append(f"| {k} | CUDA only, not measured here | | | | {why} |")
        lines.append("")
    if r.get("preview"):
        p = r["preview"]
        lines += [f"### Live preview ({p['model_name']}, {p['steps']} steps, {p['size']} px, preview every "
                  f"{p['every']} step, {p['factors']})", "",
                  "| without s | with s | overhead, interleaved runs | one preview ms | overhead from its cost | bar < 5% |",
                  "|---|---|---|---|---|---|",
                  f"| {p['median_without_s']:.2f} | {p['median_with_s']:.2f} | {p['overhead']:+.1%} | "
                  f"{p['preview_call_ms']:.2f} | {p['overhead_from_call_cost']:.2%} | {'PASS' if p['pass_'] else 'FAIL'} |",
                  ""]
    if r.get("errors"):
        lines += ["### Not measured", ""] + [f"- {k}: {v}" for k, v in r["errors"].items()] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats; well under 10 minutes on a CPU")
    p.add_argument("--models", default=None,
                   help="comma-separated: tiny512, demo, sd15-random, or any app --model value "
                        "(default: tiny512 + demo when bundled, + sd15-random without --quick)")
    p.add_argument("--sections", default="txt2img,guard,canvas,upscale,serve,speed,preview")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=ROOT / "bench-results" / "bench.json")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument("--note", default="", help="a remark on the machine for the report (e.g. another job ran)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    quick = args.quick
    repeats = args.repeats or (3 if quick else 5)
    models = args.models.split(",") if args.models else (
        ["tiny512"] + (["demo"] if (DEMO_MODEL_DIR / "model_index.json").is_file() else [])
        + ([] if quick else ["sd15-random"]))
    sections = set(args.sections.split(","))
    work = Path(tempfile.mkdtemp(prefix="sdstudio-bench-"))
    report: dict = dict(quick=quick, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        machine=machine(args.note), models=models, repeats=repeats, errors={})
    t2i_steps = 8 if quick else 20

    def attempt(key: str, fn):
        try:
            return fn()
        except Exception as exc:  # a section that cannot run here is reported, the rest still run
            log.exception("section %s failed", key)
            report["errors"][key] = f"{type(exc).__name__}: {exc}"
            return None

    def named(name):
        return resolve_model(name, work)

    def progress(msg):
        sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")

    if "txt2img" in sections:
        report["txt2img"] = []
        for name in models:
            progress(f"txt2img {name}")
            model, size = named(name)
            steps, reps = (2, max(2, repeats - 1)) if name == "sd15-random" else (t2i_steps, repeats)
            row = attempt(f"txt2img {name}", lambda: bench_txt2img(model, steps=steps, size=size, repeats=reps,
                                                                   out=work, device=args.device))
            if row:
                row["model_name"] = name
                report["txt2img"].append(row)
    if "guard" in sections:
        progress("guard")
        report["guard"] = attempt("guard", lambda: bench_guard([512, 1024], repeats + 2, work)) or []
    if "canvas" in sections:
        report["canvas"] = []
        for name in [m for m in models if m != "sd15-random"][: 1 if quick else None]:
            progress(f"canvas {name}")
            model, _ = named(name)
            row = attempt(f"canvas {name}", lambda: bench_canvas(model if name != "tiny512" else "tiny512",
                                                                 steps=10,
                                                                 repeats=2 if quick else repeats,
                                                                 panorama=True))
            if row:
                row["model_name"] = name
                report["canvas"].append(row)
    if "upscale" in sections:
        progress("upscale")
        model, _ = named(models[0])
        report["upscale"] = attempt("upscale", lambda: bench_upscale(
            model, [512] if quick else [512, 2048], tile=256, repeats=2 if quick else 3, out=work,
            threads=args.threads)) or []
    if "serve" in sections:
        progress("serve")
        model, size = named(models[0])
        report["serve"] = attempt("serve", lambda: bench_serve(model, out=work, threads=args.threads,
                                                               size=256 if quick else (size or 512)))
    if "speed" in sections:
        progress("speed")
        model, _ = named(models[0])
        report["speed"] = attempt("speed", lambda: bench_speed(model, steps=4 if quick else 10, size=256 if quick else 0,
                                                               repeats=2 if quick else repeats, out=work,
                                                               device=args.device))
        if report["speed"]:
            report["speed"]["model_name"] = models[0]
    if "preview" in sections:
        progress("preview")
        name = "demo" if "demo" in models else models[0]
        model, _ = named(name)
        report["preview"] = attempt("preview", lambda: bench_preview(model, steps=20, size=256 if quick else 0,
                                                                     repeats=2 if quick else repeats, out=work))
        if report["preview"]:
            report["preview"]["model_name"] = name
    table = markdown(report)
    sys.stdout.write(table + "\n")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2, default=str))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    shutil.rmtree(work, ignore_errors=True)  # the saved test models (sd15-random is 4 GB)
    return report


if __name__ == "__main__":
    main()
