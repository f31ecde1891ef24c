"""GPU check: the full-size SD 1.5 UNet (random weights) in fp16 at 512x512 with classifier-free guidance.

Builds the SD 1.5 architecture from assets/sd15-config (no download), times denoising steps
(one step = one UNet call on a batch of 2: the unconditional and the conditional half, as
classifier-free guidance does) eagerly and under ``torch.compile``, and prints steps per
second and the fraction of the GPU's dense fp16 tensor peak that this reaches.

FLOPs: the SD 1.5 UNet does about 400 G multiply-adds (0.8 TFLOP) per 64x64 latent, so a CFG
step on the batch of 2 is about 1.6 TFLOP (``--tflop-per-step`` to use another figure).

    bash tools/gpu_check.sh                # on the GPU machine, < 8 minutes
    python tools/gpu_check.py --dry-run    # CPU, tiny steps and size: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SD15_CONFIG_DIR = ROOT / "assets" / "sd15-config"

# Dense fp16/bf16 tensor-core peaks in TFLOP/s (no 2:4 sparsity), from the vendors' data sheets.
PEAK_TFLOPS = [
    ("H200", 989.0),
    ("H100", 989.0),  # SXM; the PCIe card is ~756 and matched first below
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("4090", 165.0),
    ("A10G", 70.0),  # A10G's dense fp16 tensor figure (AWS)
    ("A10", 125.0),
    ("T4", 65.0),
]


def peak_tflops(name: str) -> float | None:
    """The dense fp16 tensor peak for a device name, or None when unknown."""
    upper = name.upper()
    if "H100" in upper and "PCIE" in upper:
        return 756.0
    for key, value in PEAK_TFLOPS:
        if key.upper() in upper:
            return value
    return None


def build_unet(device: str, dtype: torch.dtype, tiny: bool):
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(SD15_CONFIG_DIR / "unet")
    if tiny:  # the same code path on a CPU in seconds
        config = {**config, "block_out_channels": (32, 64, 64, 64), "layers_per_block": 1,
                  "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 32}
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(device, dtype).eval()
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def time_steps(unet, latents, timestep, context, steps: int, warmup: int, device: str) -> list[float]:
    """Seconds per CFG step (one UNet call on the batch of 2), after ``warmup`` untimed calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            unet(latents, timestep, encoder_hidden_states=context, return_dict=False)
        if device == "cuda":
            torch.cuda.synchronize()
            times = []
            for _ in range(steps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                unet(latents, timestep, encoder_hidden_states=context, return_dict=False)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            return times
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            unet(latents, timestep, encoder_hidden_states=context, return_dict=False)
            times.append(time.perf_counter() - start)
        return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode (default 30)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--tflop-per-step", type=float, default=1.6, help="work of one CFG step (default 1.6 TFLOP)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-mode", default="max-autotune-no-cudagraphs")
    p.add_argument("--dry-run", action="store_true", help="CPU, a tiny UNet, 64 px, 2 steps: checks the script")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    if args.dry_run:
        device, dtype, tiny = "cpu", torch.float32, True
        args.size, args.steps, args.warmup = 64, 2, 1
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            print("no CUDA GPU visible to torch; use --dry-run to check the script on a CPU")
            return 2
        device, dtype, tiny = "cuda", torch.float16, False
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)"
    peak = peak_tflops(name) if device == "cuda" else None
    print(f"device: {name}; torch {torch.__version__}; "
          f"{'dense fp16 peak ' + format(peak, 'g') + ' TFLOP/s' if peak else 'unknown peak'}")
    print(f"SD 1.5 UNet{' (tiny dry-run config)' if tiny else ''}, {str(dtype).replace('torch.', '')}, "
          f"{args.size}x{args.size}, CFG batch 2, {args.steps} timed steps after {args.warmup} warm-up")

    unet = build_unet(device, dtype, tiny)
    latent = args.size // 8
    generator = torch.Generator("cpu").manual_seed(0)
    latents = torch.randn((2, 4, latent, latent), generator=generator).to(device, dtype)
    context = torch.randn((2, 77, unet.config.cross_attention_dim), generator=generator).to(device, dtype)
    timestep = torch.tensor(500, device=device)
    results = {}

    def report(mode: str, times: list[float]) -> None:
        median = statistics.median(times)
        sps = 1 / median
        line = f"{mode:>8}: {sps:7.2f} steps/s (median {median * 1000:.1f} ms/step"
        achieved = args.tflop_per_step * sps
        row = dict(steps_per_s=sps, median_ms=median * 1000, tflops=achieved)
        if peak:
            row["fraction_of_peak"] = achieved / peak
            line += f"; {achieved:.0f} TFLOP/s = {achieved / peak:.1%} of peak)"
        else:
            line += f"; {achieved:.1f} TFLOP/s at {args.tflop_per_step} TFLOP/step; unknown peak)"
        print(line, flush=True)
        results[mode] = row

    report("eager", time_steps(unet, latents, timestep, context, args.steps, args.warmup, device))
    if not args.no_compile:
        try:
            compiled = torch.compile(unet, mode=args.compile_mode, fullgraph=True) if not args.dry_run \
                else torch.compile(unet, backend="eager", fullgraph=True)  # no C compiler needed on a CPU check
            start = time.perf_counter()
            time_steps(compiled, latents, timestep, context, 1, 0, device)
            print(f"compile: first call took {time.perf_counter() - start:.1f} s", flush=True)
            report("compiled", time_steps(compiled, latents, timestep, context, args.steps, args.warmup, device))
            results["compiled"]["speedup_vs_eager"] = results["eager"]["median_ms"] / results["compiled"]["median_ms"]
            print(f"compiled / eager speed-up: {results['compiled']['speedup_vs_eager']:.2f}x")
        except Exception as exc:  # reported, not fatal: the eager figure still stands
            results["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            print(f"torch.compile failed: {results['compile_error']}")
            traceback.print_exc(limit=3)
    if device == "cuda":
        results["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak CUDA memory: {results['max_memory_allocated_gib']:.2f} GiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=name, peak_tflops=peak, size=args.size, steps=args.steps,
                                             tflop_per_step=args.tflop_per_step, results=results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
