"""Benchmark Large canvas speed (and, on CUDA, memory) in one process.

Compared, at the same steps, sampler and guidance, each timed end to end to decoded pixels:

(a) a SIZE x 2*SIZE canvas at default settings (native tile, quarter overlap, cosine, 4 views
    per UNet call) against one SIZE x SIZE Text to image;
(b) our canvas at the views of diffusers' StableDiffusionPanoramaPipeline (window 64 latents,
    stride 8: tile 512 px, overlap 448 px, uniform blend), batched as by default (4 views per
    UNet call) and with all views in one call, against that pipeline built with ``from_pipe`` on
    the same components, at its default ``view_batch_size=1`` and with all views batched. On a
    CPU a batch of 4 views is the fastest (the UNet's attention slows down at larger batches);
    on a GPU one call for all views is.

Cases run round-robin after one warm-up each; the table gives medians over ``--repeats``.

Models: ``tiny512`` (default: the tiny SD architecture of pipelines/tiny.py at native 512 px,
which runs on a CPU), ``sd15-random`` (the real SD 1.5 architecture from assets/sd15-config with
random weights: the timing of Stable Diffusion without its weights, for a GPU), or anything
``--model`` accepts in the app (a folder, a .safetensors file, ``demo``).

    python tools/bench_canvas.py --steps 20 --repeats 3
    python tools/bench_canvas.py --model sd15-random --device cuda --dtype fp16 --memory
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.canvas import DIRECT_DECODE_MAX_PIXELS, MultiDiffusionPipeline, decode_canvas  # noqa: E402
from pipelines.config import SD15_CONFIG_DIR, AppConfig  # noqa: E402
from pipelines.manager import PipelineManager, apply_speed_options  # noqa: E402
from pipelines.progress import JobControl  # noqa: E402
from pipelines.requests import Txt2ImgRequest  # noqa: E402
from pipelines.samplers import make_scheduler  # noqa: E402
from pipelines.txt2img import run_txt2img  # noqa: E402

log = logging.getLogger("bench_canvas")

PROMPT = "a red circle on a blue background"
PANORAMA_TILE, PANORAMA_OVERLAP = 512, 448  # diffusers' get_views: window 64 latents, stride 8
BAR_DEFAULT_VS_T2I = 3.5
BAR_SAME_VIEWS_VS_PANORAMA = 1.0


def sd15_random_pipeline(device: str, dtype: torch.dtype):
    """Stable Diffusion 1.5's architecture with random weights (no download): realistic timings."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from pipelines.tiny import TINY_WORDS
    from pipelines.tokenizer_files import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tempfile.mkdtemp(), TINY_WORDS))
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(SD15_CONFIG_DIR / "vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(SD15_CONFIG_DIR / "text_encoder"))
    scheduler = PNDMScheduler.from_config(PNDMScheduler.load_config(SD15_CONFIG_DIR / "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False).to(device, dtype)
    apply_speed_options(pipe, AppConfig(device=device), device)
    return pipe


def load_pipeline(model: str, device: str, dtype: str):
    """The base pipeline to benchmark, through the app's own loader where there are weights."""
    if model == "sd15-random":
        table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        resolved = AppConfig(device=device).resolve_device()
        torch_dtype = table.get(dtype) or (torch.float16 if resolved == "cuda" else torch.float32)
        return sd15_random_pipeline(resolved, torch_dtype)
    if model == "tiny512":
        from pipelines.tiny import save_tiny_pipeline

        model = str(save_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny512", sample_size=64))
    config = AppConfig(model=model, device=device, dtype=dtype, safety_checker=False,
                       output_dir=Path(tempfile.mkdtemp(prefix="bench-canvas-")))
    return PipelineManager(config).pipe


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build_cases(pipe, args, steps: int) -> dict[str, Callable[[], object]]:
    """name -> a function that makes one image end to end (denoising and VAE decode) in ``steps`` steps."""
    from diffusers import StableDiffusionPanoramaPipeline

    size = args.size
    scheduler = lambda: make_scheduler(args.sampler, pipe.scheduler.config)  # noqa: E731
    canvas = MultiDiffusionPipeline.from_pipe(pipe)
    # from_pipe casts the shared modules to fp32 unless told the dtype (see MultiDiffusionPipeline.from_pipe).
    panorama = StableDiffusionPanoramaPipeline.from_pipe(pipe, dtype=pipe.unet.dtype)
    for p in (canvas, panorama):
        p.set_progress_bar_config(disable=True)
    common = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=args.guidance_scale)

    def generator():
        return [torch.Generator("cpu").manual_seed(0)]

    def txt2img():
        req = Txt2ImgRequest(prompt=PROMPT, sampler=args.sampler, steps=steps,
                             guidance_scale=args.guidance_scale, width=size, height=size, seed=0)
        return run_txt2img(pipe, req, seeds=[0], width=size, height=size, scheduler_factory=scheduler,
                           control=JobControl())

    def ours(**kwargs):
        def run():
            canvas.scheduler = scheduler()
            return canvas(height=size, width=2 * size, generator=generator(), **common, **kwargs).images

        return run

    def diffusers_panorama(view_batch_size: int):
        def run():
            panorama.scheduler = scheduler()
            return panorama(height=size, width=2 * size, view_batch_size=view_batch_size, generator=generator(),
                            **common).images

        return run

    views = len(panorama.get_views(size, 2 * size))
    return {
        "txt2img": txt2img,
        "canvas default": ours(),
        "canvas panorama views": ours(tile_size=PANORAMA_TILE, tile_overlap=PANORAMA_OVERLAP, blend="uniform"),
        "canvas panorama views (all batched)": ours(tile_size=PANORAMA_TILE, tile_overlap=PANORAMA_OVERLAP,
                                                    blend="uniform", tile_batch_size=views),
        "diffusers panorama (view_batch_size=1)": diffusers_panorama(1),
        "diffusers panorama (all views batched)": diffusers_panorama(views),
    }


def time_cases(cases: dict, warm_up: dict, repeats: int, device: torch.device,
               on_round: Callable[[dict], None] = lambda times: None) -> dict[str, list[float]]:
    """Seconds per run of each case, round-robin after one (short) warm-up run of each.

    ``on_round(times)`` is called after every round, so a long run that is stopped keeps its numbers.
    """
    times = {name: [] for name in cases}
    for fn in warm_up.values():
        fn()
    for _ in tqdm(range(repeats), desc="rounds"):
        for name, fn in cases.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
            log.info("%s: %.3f s", name, times[name][-1])
        on_round(times)
    return times


def vae_memory(pipe, sizes: list[tuple[int, int]]) -> list[dict]:
    """Peak CUDA memory of one VAE decode, direct and in VAE tiles, at each (width, height)."""
    vae, rows = pipe.vae, []
    factor = pipe.vae_scale_factor
    for width, height in sizes:
        latents = torch.randn((1, 4, height // factor, width // factor), device=vae.device, dtype=vae.dtype)
        row = dict(width=width, height=height)
        for mode in ("direct", "tiled"):
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with torch.no_grad():
                # 0 forces the VAE's tiles; the canvas' own size forces one direct decode.
                decode_canvas(pipe, latents * vae.config.scaling_factor,
                              max_direct_pixels=width * height if mode == "direct" else 0)
            torch.cuda.synchronize()
            row[f"{mode}_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            row[f"{mode}_s"] = time.perf_counter() - start
        rows.append(row)
    return rows


def canvas_memory(pipe, widths: list[int], height: int, steps: int) -> list[dict]:
    """Peak CUDA memory of a whole canvas job (denoising + decode) as the canvas widens."""
    canvas = MultiDiffusionPipeline.from_pipe(pipe)
    canvas.set_progress_bar_config(disable=True)
    rows = []
    for width in widths:
        canvas.scheduler = make_scheduler("Euler a", pipe.scheduler.config)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        latents = canvas(PROMPT, height=height, width=width, num_inference_steps=steps, output_type="latent").images
        denoise = (torch.cuda.max_memory_allocated() - base) / 2**30
        decode_canvas(canvas, latents)
        torch.cuda.synchronize()
        rows.append(dict(width=width, height=height, denoise_peak_gib=denoise,
                         job_peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30))
    return rows


def one_tile_exactness(pipe, samplers: list[str], steps: int, size: int) -> dict[str, int]:
    """Max pixel difference (0-255) between a one-tile canvas and Text to image, per sampler, on this device."""
    import numpy as np

    canvas = MultiDiffusionPipeline.from_pipe(pipe)
    canvas.set_progress_bar_config(disable=True)
    diffs = {}
    for sampler in samplers:
        scheduler = lambda: make_scheduler(sampler, pipe.scheduler.config)  # noqa: E731
        req = Txt2ImgRequest(prompt=PROMPT, sampler=sampler, steps=steps, width=size, height=size, seed=3)
        t2i = run_txt2img(pipe, req, seeds=[3], width=size, height=size, scheduler_factory=scheduler,
                          control=JobControl())[0]
        canvas.scheduler = scheduler()
        one = canvas(PROMPT, height=size, width=size, num_inference_steps=steps,
                     generator=[torch.Generator("cpu").manual_seed(3)]).images[0]
        diffs[sampler] = int(np.abs(np.asarray(t2i, dtype=np.int16) - np.asarray(one, dtype=np.int16)).max())
    return diffs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny512", help="tiny512 (default), sd15-random, or an app --model value")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    p.add_argument("--size", type=int, default=512, help="image side; the canvas is SIZE x 2*SIZE (default 512)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="Euler a")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="also measure peak CUDA memory (VAE decode, canvas jobs)")
    p.add_argument("--exactness", action="store_true",
                   help="also check that a one-tile canvas equals Text to image on this device")
    p.add_argument("--json", type=Path, default=ROOT / "bench-results" / "canvas-bench.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)

    pipe = load_pipeline(args.model, args.device, args.dtype)
    device = pipe.unet.device
    native = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    args.json.parent.mkdir(parents=True, exist_ok=True)

    def save_partial(times):
        args.json.write_text(json.dumps(dict(model=args.model, steps=args.steps, partial_seconds=times), indent=2))

    # One-step runs warm up every code path (allocations, kernels) without the cost of a full image.
    times = time_cases(build_cases(pipe, args, args.steps), build_cases(pipe, args, 1), args.repeats, device,
                       save_partial)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratios = {
        "canvas default / txt2img": median["canvas default"] / median["txt2img"],
        "diffusers panorama / txt2img": median["diffusers panorama (view_batch_size=1)"] / median["txt2img"],
        "canvas panorama views / diffusers panorama": (median["canvas panorama views"]
                                                       / median["diffusers panorama (view_batch_size=1)"]),
        "canvas panorama views (all batched) / diffusers panorama": (
            median["canvas panorama views (all batched)"] / median["diffusers panorama (view_batch_size=1)"]),
        "canvas panorama views (all batched) / diffusers panorama batched": (
            median["canvas panorama views (all batched)"] / median["diffusers panorama (all views batched)"]),
    }
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = dict(model=args.model, native_size=native, device=device_name, dtype=str(pipe.unet.dtype),
                  size=args.size, steps=args.steps, sampler=args.sampler, repeats=args.repeats,
                  seconds=times, median_seconds=median, ratios=ratios)
    lines = [f"Large canvas benchmark: {args.model} (native {native}) on {device_name}, {report['dtype']}, "
             f"{args.sampler}, {args.steps} steps, median of {args.repeats}", "",
             "| case | size | median s | x txt2img |", "|---|---|---|---|"]
    for name, seconds in median.items():
        shape = f"{args.size}x{args.size}" if name == "txt2img" else f"{2 * args.size}x{args.size}"
        lines.append(f"| {name} | {shape} | {seconds:.3f} | {seconds / median['txt2img']:.2f} |")
    lines += ["", "| ratio | value | bar |", "|---|---|---|"]
    bars = {"canvas default / txt2img": BAR_DEFAULT_VS_T2I,
            "canvas panorama views / diffusers panorama": BAR_SAME_VIEWS_VS_PANORAMA}
    for name, value in ratios.items():
        bar = bars.get(name)
        lines.append(f"| {name} | {value:.2f} | {f'<= {bar}: ' + ('PASS' if value <= bar else 'FAIL') if bar else ''} |")

    if args.exactness:
        report["one_tile_max_diff"] = one_tile_exactness(pipe, ["Euler a", "DPM++ 2M", "DDIM"], 10, native)
        lines += ["", f"one-tile canvas vs Text to image, max pixel difference (of 255): {report['one_tile_max_diff']}"]
    if args.memory and device.type == "cuda":
        sizes = [(512, 512), (1024, 512), (1024, 1024), (2048, 1024), (2048, 2048), (4096, 1024)]
        report["vae_memory"] = vae_memory(pipe, sizes)
        report["canvas_memory"] = canvas_memory(pipe, [1024, 2048, 4096], 512, 2)
        lines += ["", f"VAE decode peak memory ({report['dtype']}; tiled in the VAE's own tiles)", "",
                  "| size | direct GiB | direct s | tiled GiB | tiled s |", "|---|---|---|---|---|"]
        for r in report["vae_memory"]:
            lines.append(f"| {r['width']}x{r['height']} | {r['direct_gib']:.2f} | {r['direct_s']:.2f} | "
                         f"{r['tiled_gib']:.2f} | {r['tiled_s']:.2f} |")
        lines += ["", "Canvas job peak memory (Euler a, 2 steps, default tiles, decode as the app does it)", "",
                  "| size | denoising GiB | whole job GiB |", "|---|---|---|"]
        for r in report["canvas_memory"]:
            lines.append(f"| {r['width']}x{r['height']} | {r['denoise_peak_gib']:.2f} | {r['job_peak_gib']:.2f} |")
    elif args.memory:
        lines += ["", "--memory needs a CUDA device; skipped."]
    sys.stdout.write("\n".join(lines) + "\n")
    args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
