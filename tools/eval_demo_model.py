"""Prompt adherence of the bundled demo model, in the spirit of GenEval (Ghosh et al. 2023).

For N prompts of the demo world with fixed seeds, generate through the studio's own
PipelineManager (the path users take) and grade each image by image analysis
(tools/demo_world.py: background colour from the border, object colour from the pixels
that differ from it, shape from how much of its bounding box it fills, position from its
centre). Prints accuracy per attribute and the median seconds per image.

    python tools/eval_demo_model.py                    # 64 prompts, 20 DDIM steps, guidance 7.5
    python tools/eval_demo_model.py --n 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipelines.config import AppConfig  # noqa: E402
from pipelines.manager import PipelineManager  # noqa: E402
from pipelines.requests import Txt2ImgRequest  # noqa: E402
from tools.demo_world import ATTRIBUTES, eval_prompts, grade  # noqa: E402
from tools.demo_world import accuracy as score  # noqa: E402

BARS = {"color": 0.95, "background": 0.95, "shape": 0.85, "position": 0.85}  # issue 4's bar


def evaluate(manager: PipelineManager, n: int = 64, steps: int = 20, guidance: float = 7.5,
             sampler: str = "DDIM", seed: int = 0, progress: bool = True) -> dict:
    """Generate and grade ``n`` prompts; returns accuracies, timings and per-prompt rows."""
    manager.load()
    rows, seconds = [], []
    for i, scene in enumerate(tqdm(eval_prompts(n, seed), desc="eval", disable=not progress)):
        req = Txt2ImgRequest(prompt=scene.prompt, sampler=sampler, steps=steps, guidance_scale=guidance, seed=1000 + i)
        start = time.perf_counter()
        image = manager.txt2img(req).images[0]
        seconds.append(time.perf_counter() - start)
        rows.append({**grade(scene, image), "seed": 1000 + i})
    accuracy = score(rows)
    return {
        "n": n,
        "steps": steps,
        "guidance_scale": guidance,
        "sampler": sampler,
        "size": manager.native_size,
        "accuracy": accuracy,
        "median_seconds_per_image": statistics.median(seconds),
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="DDIM")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--no-safety-checker", dest="safety_checker", action="store_false",
                   help="for a model folder other than the bundled one (e.g. a fresh training run), which "
                        "has no safety checker of its own; the bundled model needs none")
    p.add_argument("--card", action="store_true",
                   help="also write the table into the model folder's README.md (section 'Prompt adherence')")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        manager = PipelineManager(AppConfig(model=args.model, output_dir=Path(out), device="cpu", save=False,
                                           safety_checker=args.safety_checker))
        report = evaluate(manager, args.n, args.steps, args.guidance, args.sampler, args.seed)
    table = adherence_table(report, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.card:
        card = write_card_section(model_folder(args.model), table)
        print(f"wrote the table into {card}")
    return report


def adherence_table(report: dict, args) -> str:
    lines = [f"| attribute | accuracy ({report['n']} prompts, {report['steps']} {report['sampler']} steps, "
             f"guidance {report['guidance_scale']}) | bar |", "|---|---|---|"]
    for attr, acc in report["accuracy"].items():
        lines.append(f"| {attr} | {acc:.1%} | {BARS[attr]:.0%} |")
    lines.append("")
    lines.append(f"median seconds per image at {report['size']} px: {report['median_seconds_per_image']:.2f} "
                 f"({args.threads or 'default'} torch threads)")
    return "\n".join(lines)


def model_folder(model: str) -> Path:
    from pipelines.config import DEMO_MODEL_DIR

    return DEMO_MODEL_DIR if model == "demo" else Path(model)


def write_card_section(folder: Path, table: str) -> Path:
    """Replace (or add) the model card's '## Prompt adherence' section with ``table``."""
    card = folder / "README.md"
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    head = "## Prompt adherence"
    section = f"{head}\n\nMeasured by `python tools/eval_demo_model.py` (fixed prompts and seeds):\n\n{table}\n"
    if head in text:
        start = text.index(head)
        rest = text[start + len(head):]
        end = rest.find("\n## ")
        text = text[:start] + section + ("\n" + rest[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    card.write_text(text, encoding="utf-8")
    return card


if __name__ == "__main__":
    main()
