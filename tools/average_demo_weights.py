"""Average the UNet and text encoder of demo-model runs that continued from the same weights.

A uniform weight average ("model soup", Wortsman et al. 2022, arXiv 2203.05482) of runs that
share their starting point and differ only in recipe stays in one basin and can beat each run.
The shipped demo model is the average of two 3200-step continuations of the same weights, one
with the low-frequency training noise and one without it (docs/demo-model-experiments.md).

    python tools/average_demo_weights.py /tmp/runA /tmp/runB --out /tmp/soup

OUT is a full diffusers folder: a copy of the first run (VAE, tokenizer, scheduler, model card)
with the averaged UNet and text encoder, and a training.json that records every run's own.
The runs must share their VAE weights; its latent scale, measured on each run's own images,
is averaged too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AVERAGED = {"unet": "diffusion_pytorch_model.safetensors", "text_encoder": "model.safetensors"}
SAME = ("unet/config.json", "text_encoder/config.json", "scheduler/scheduler_config.json", "vae/config.json")
VAE_WEIGHTS = "vae/diffusion_pytorch_model.safetensors"
# The VAE's latent scale is measured on each run's own training images (1 / std of their
# latents), so runs with different --seed record slightly different values for the same VAE.
# The average uses their mean; a larger spread means the runs did not share a VAE.
SCALE_TOLERANCE = 0.02


def _scaling_factor(folder: Path) -> float:
    return float(json.loads((folder / "vae/config.json").read_text()).get("scaling_factor", 1.0))


def _config(folder: Path, name: str) -> dict:
    config = json.loads((folder / name).read_text())
    config.pop("_name_or_path", None)
    if name == "vae/config.json":
        config.pop("scaling_factor", None)
    return config


def average_runs(runs: list[Path], out: Path) -> dict:
    """Write the average of ``runs`` to ``out``; returns what was recorded in its training.json.

    Raises:
        ValueError: fewer than two runs, a missing weights file, or runs whose configs differ
            (weights of different architectures or noise schedules cannot be averaged).
    """
    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ValueError(f"runs: need at least two folders to average, got {len(runs)}")
    for run in runs:
        for component, filename in AVERAGED.items():
            if not (run / component / filename).is_file():
                raise ValueError(f"runs: {run} has no {component}/{filename}; is it a demo-model folder?")
    for name in SAME:
        first = _config(runs[0], name)
        for run in runs[1:]:
            if _config(run, name) != first:
                raise ValueError(f"runs: {name} of {run} differs from {runs[0]}'s; only runs of the same "
                                 "architecture and noise schedule can be averaged")
    first_vae = load_file(runs[0] / VAE_WEIGHTS)
    for run in runs[1:]:
        vae = load_file(run / VAE_WEIGHTS)
        if vae.keys() != first_vae.keys() or not all(torch.equal(vae[k], first_vae[k]) for k in vae):
            raise ValueError(f"runs: the VAE weights of {run} differ from {runs[0]}'s; its UNet learned other "
                             "latents (train every run with the same --vae-from)")
    scales = [_scaling_factor(run) for run in runs]
    if max(scales) > min(scales) * (1 + SCALE_TOLERANCE):
        raise ValueError(f"runs: their VAE scaling factors differ by more than {SCALE_TOLERANCE:.0%}: {scales}")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(runs[0], out)
    for component, filename in AVERAGED.items():
        states = [load_file(run / component / filename) for run in runs]
        mean = {}
        for key, tensor in states[0].items():
            if tensor.is_floating_point():
                mean[key] = (sum(s[key].double() for s in states) / len(states)).to(tensor.dtype)
            else:
                mean[key] = tensor
        save_file(mean, out / component / filename, metadata={"format": "pt"})
    vae_config = json.loads((out / "vae/config.json").read_text())
    vae_config["scaling_factor"] = sum(scales) / len(scales)
    (out / "vae/config.json").write_text(json.dumps(vae_config, indent=2, sort_keys=True) + "\n")
    record = {"averaged": [str(r) for r in runs], "vae_scaling_factors": scales,
              "runs": [json.loads((r / "training.json").read_text()) if (r / "training.json").is_file() else None
                       for r in runs]}
    (out / "training.json").write_text(json.dumps(record, indent=2, default=str))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="demo-model folders written by tools/train_demo_model.py")
    p.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    args = p.parse_args(argv)
    try:
        average_runs([Path(r) for r in args.runs], Path(args.out))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the average of {len(args.runs)} runs to {args.out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
