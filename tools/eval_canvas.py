"""Measure seams of Large canvases: pixel jumps across tile borders relative to interior ones.

For each canvas, the jump at a column boundary is the mean absolute RGB difference between
the two neighbouring pixel columns (rows likewise). The seam ratio is the mean jump at the
tile borders (every view edge inside the canvas) over the mean jump at interior boundaries,
pooled over prompts and seeds. 1.0 means the borders cannot be told from the rest.

Interior boundaries are compared like with like: tile borders always fall on the latent grid
(every 8 pixels), and a VAE decoder leaves slightly larger jumps there than between (on the
demo model 2.05 against 1.42 on average), so the interior set is the latent-grid boundaries at
least ``--margin`` pixels from any tile border. The outer ``--edge`` pixels of the canvas are
left out of both sets: the demo model draws a thin frame at image edges, which would raise the
interior mean and flatter the ratio. The ratio against every interior boundary is printed too.

Two settings on the same prompts and seeds:
- MultiDiffusion at the default overlap (a quarter of the tile) and the default cosine blend;
- naive stitching: overlap 0, so each tile is denoised alone and the tiles are put side by side.

    python tools/eval_canvas.py                       # bundled demo model, 4x2 native tiles
    python tools/eval_canvas.py --model /tmp/smoke-demo --steps 10 --json bench-results/seams.json

The images are written to ``--out`` for a look.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.canvas import MultiDiffusionPipeline, resolve_tiling  # noqa: E402
from pipelines.config import AppConfig  # noqa: E402
from pipelines.manager import PipelineManager  # noqa: E402

log = logging.getLogger("eval_canvas")

DEMO_PROMPTS = (
    "a red circle on a blue background",
    "a yellow triangle in the top left on a purple background",
    "a white square in the bottom right on a black background",
)
SEAM_BAR = 1.3


def boundary_jumps(image: np.ndarray, axis: int) -> np.ndarray:
    """Mean |difference| across each boundary between neighbouring columns (axis 1) or rows (axis 0).

    Element ``k`` is the boundary in front of column/row ``k + 1``.
    """
    diff = np.abs(np.diff(image.astype(np.float64), axis=axis))
    other = 0 if axis == 1 else 1
    return diff.mean(axis=(other, 2))


def border_positions(views, scale: int, length: int, axis: int) -> set[int]:
    """Pixel positions of the view edges inside the canvas along ``axis`` (1: columns, 0: rows)."""
    starts, ends = (2, 3) if axis == 1 else (0, 1)
    edges = {v[starts] * scale for v in views} | {v[ends] * scale for v in views}
    return {e for e in edges if 0 < e < length}


def seam_measure(images: list[np.ndarray], views, scale: int, margin: int, edge: int) -> dict:
    """Pooled mean jump at tile borders and at interior latent-grid boundaries, and their ratio."""
    border, interior, interior_all = [], [], []
    for image in images:
        for axis in (1, 0):
            length = image.shape[axis]
            borders = border_positions(views, scale, length, axis)
            for k, jump in enumerate(boundary_jumps(image, axis)):
                position = k + 1
                if position < edge or position > length - edge:
                    continue
                distance = min((abs(position - b) for b in borders), default=length)
                if distance == 0:
                    border.append(jump)
                elif distance >= margin:
                    interior_all.append(jump)
                    if position % scale == 0:
                        interior.append(jump)
    b = float(np.mean(border)) if border else float("nan")
    i, i_all = float(np.mean(interior)), float(np.mean(interior_all))
    return {"border_jump": b, "interior_jump": i, "ratio": b / i, "ratio_all_interior": b / i_all,
            "border_median": float(np.median(border)) if border else float("nan"),
            "interior_median": float(np.median(interior)), "borders": len(border), "interior": len(interior)}


def generate(manager: PipelineManager, prompt: str, seed: int, args, tile_overlap: int, blend: str):
    """One canvas through the studio's MultiDiffusion pipeline, before the output guard
    (the watermark would add its own small pattern to both settings)."""
    with manager.device_lock:
        pipe = manager.derived_pipeline(MultiDiffusionPipeline)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = manager.scheduler(args.sampler)
        return pipe(prompt=prompt, height=args.height, width=args.width, tile_overlap=tile_overlap, blend=blend,
                    num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                    generator=[torch.Generator("cpu").manual_seed(seed)]).images[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="model to evaluate (default: the bundled demo model)")
    p.add_argument("--width", type=int, default=None, help="canvas width (default 4x the native size)")
    p.add_argument("--height", type=int, default=None, help="canvas height (default 2x the native size)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sampler", default="Euler a")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--prompts", nargs="+", default=None, help="default: three demo-world prompts")
    p.add_argument("--blend", default="cosine", help="blend of the MultiDiffusion setting (default cosine)")
    p.add_argument("--margin", type=int, default=4, help="interior boundaries are at least this far from a border")
    p.add_argument("--edge", type=int, default=16, help="pixels at the canvas edges left out of the measure")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results" / "eval-canvas", help="where images go")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    manager = PipelineManager(AppConfig(model=args.model, device=args.device, safety_checker=False,
                                        output_dir=Path(tempfile.mkdtemp(prefix="eval-canvas-"))))
    native = manager.native_size
    args.width = args.width or 4 * native
    args.height = args.height or 2 * native
    prompts = args.prompts or list(DEMO_PROMPTS)
    default = resolve_tiling(args.width, args.height, None, None, native)
    settings = {
        f"multidiffusion (overlap {default.tile_overlap}, {args.blend})": (default.tile_overlap, args.blend),
        "naive stitching (overlap 0)": (0, "uniform"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows = {}
    for name, (overlap, blend) in settings.items():
        tiling = resolve_tiling(args.width, args.height, None, overlap, native)
        images = []
        jobs = [(prompt, seed) for prompt in prompts for seed in args.seeds]
        for n, (prompt, seed) in enumerate(tqdm(jobs, desc=name)):
            image = generate(manager, prompt, seed, args, overlap, blend)
            image.save(args.out / f"{'naive' if overlap == 0 else 'md'}-{n}-seed{seed}.png")
            images.append(np.asarray(image.convert("RGB")))
        rows[name] = dict(seam_measure(images, tiling.views, 8, args.margin, args.edge), views=len(tiling.views),
                          tile_size=tiling.tile_size, tile_overlap=overlap, blend=blend)

    report = dict(model=manager.info.source.location, model_name=manager.info.source.name, native_size=native,
                  width=args.width, height=args.height, steps=args.steps, sampler=args.sampler,
                  guidance_scale=args.guidance_scale, prompts=prompts, seeds=args.seeds, margin=args.margin, edge=args.edge,
                  minutes=(time.perf_counter() - started) / 60, settings=rows)
    lines = [
        f"Seams on {manager.info.source.name} ({args.width}x{args.height}, native {native}, {args.sampler}, "
        f"{args.steps} steps, {len(prompts)} prompts x {len(args.seeds)} seeds)",
        "",
        "| setting | views | border jump (median) | interior jump (median) | ratio | ratio vs all interior |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['views']} | {row['border_jump']:.3f} ({row['border_median']:.3f}) | "
                     f"{row['interior_jump']:.3f} ({row['interior_median']:.3f}) | {row['ratio']:.3f} | "
                     f"{row['ratio_all_interior']:.3f} |")
    md_ratio = next(iter(rows.values()))["ratio"]
    lines += ["", f"default-overlap seam ratio {md_ratio:.3f} (bar <= {SEAM_BAR}): {'PASS' if md_ratio <= SEAM_BAR else 'FAIL'}"]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
