"""Train several demo-model recipes side by side on one GPU and grade each one.

A recipe is a name and the arguments of ``tools/train_demo_model.py``. Every recipe trains
in its own process (``--device cuda``; noise and batches still come from the CPU generator,
so the recipe is the one a CPU run of the same command follows), then the 64-prompt
adherence grading of ``tools/eval_demo_model.py`` runs on its result: the same prompts,
seeds, 20 DDIM steps and guidance 7.5, graded by the same image analysis. It is for choosing
a recipe in minutes instead of hours; the shipped weights are still measured on the CPU.

Measured on one H200 (2026-11-28): this small UNet is launch-bound there, about 11 steps/s
alone at batch 96 (8x the steps/s of 2 CPU threads at batch 24, at 4x the batch), and seven recipes sharing the GPU did not
finish 7000 steps each in 7.5 minutes. Size a sweep as (recipes x steps) / ~12 steps/s.

    python tools/sweep_demo_model.py --recipes recipes.json --out /tmp/sweep --budget-s 500
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def grade_folder(folder: Path, n: int = 64, device: str = "cuda", batch: int = 16) -> dict:
    """The adherence grading of eval_demo_model, batched on ``device`` (no watermark step)."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from tools.demo_world import accuracy, eval_prompts, grade

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    scenes = eval_prompts(n)
    rows = []
    for start in range(0, n, batch):
        chunk = scenes[start:start + batch]
        gens = [torch.Generator().manual_seed(1000 + start + i) for i in range(len(chunk))]
        # The studio draws the starting latents on the CPU from the request's seed.
        side = pipe.unet.config.sample_size
        latents = torch.cat([torch.randn((1, 4, side, side), generator=g) for g in gens]).to(device)
        images = pipe([s.prompt for s in chunk], num_inference_steps=20, guidance_scale=7.5, latents=latents).images
        rows += [grade(scene, image) for scene, image in zip(chunk, images)]
    acc = {a: round(100 * v, 1) for a, v in accuracy(rows).items()}
    return {"accuracy": acc, "median_fill": round(statistics.median(r["read"]["fill"] for r in rows), 3),
            "worst": min(acc["shape"], acc["position"])}


def last_progress(log: str) -> str:
    """The last progress-bar line of a training log (tqdm rewrites its line with carriage returns)."""
    lines = [line.strip() for line in log.replace("\r", "\n").splitlines() if "%|" in line]
    return lines[-1] if lines else "no progress bar yet"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", required=True, help='JSON file: {"name": "train args", ...}')
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=500, help="stop waiting for training after this long")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per training process")
    p.add_argument("--grade", help="only grade this model folder and print the result")
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=64, help="prompts to grade")
    args = p.parse_args(argv)
    if args.grade:
        print(json.dumps(grade_folder(Path(args.grade), args.n, args.device)))
        return
    recipes = json.loads(Path(args.recipes).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    start = time.time()
    for name, extra in recipes.items():
        cmd = [sys.executable, str(ROOT / "tools" / "train_demo_model.py"), "--device", args.device,
               "--threads", str(args.threads), "--out", str(out / name)] + extra.split()
        log = open(out / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ)), log)
        print(f"started {name}: {' '.join(cmd[2:])}", flush=True)
    results = {}
    pending = dict(procs)
    while pending and time.time() - start < args.budget_s:
        for name, (proc, log) in list(pending.items()):
            if proc.poll() is None:
                continue
            del pending[name]
            log.close()
            minutes = (time.time() - start) / 60
            if proc.returncode != 0:
                results[name] = {"error": f"exit {proc.returncode}", "args": recipes[name]}
                print(name, "FAILED; log tail:", (out / f"{name}.log").read_text()[-1500:], flush=True)
                continue
            results[name] = {"args": recipes[name], "minutes": round(minutes, 1), **grade_folder(out / name, args.n, args.device)}
            print(name, json.dumps(results[name]), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=2))
        time.sleep(2)
    for name, (proc, log) in pending.items():
        proc.kill()
        log.close()
        reached = last_progress((out / f"{name}.log").read_text(errors="replace"))
        results[name] = {"error": f"not finished within the budget; last progress: {reached}", "args": recipes[name]}
        print(name, "not finished within the budget; last progress:", reached, flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
