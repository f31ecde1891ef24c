"""The bundled demo model: its world, its grading, its training script and its prompt adherence."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from pipelines.config import AppConfig, DEMO_MODEL_DIR
from pipelines.manager import PipelineManager
from pipelines.requests import Txt2ImgRequest
from tools.demo_world import COLORS, POSITIONS, SHAPES, Scene, analyze, render


def test_grader_reads_rendered_scenes_exactly():
    """The evaluation is only as good as its image analysis: check it on ground truth."""
    rng = random.Random(0)
    for i in range(120):
        color, background = rng.sample(sorted(COLORS), 2)
        position = sorted(POSITIONS)[i % 5] if i % 2 else None
        scene = Scene(color, SHAPES[i % 3], background, position)
        got = analyze(render(scene, 256, rng))
        assert (got.color, got.background, got.shape) == (color, background, scene.shape), (scene, got)
        if position:
            assert got.position == position, (scene, got)


def test_smoke_training_writes_a_model_the_studio_loads(tmp_path):
    from tools.train_demo_model import main as train

    out = train(["--smoke", "--quiet", "--out", str(tmp_path / "demo")])
    assert (out / "README.md").read_text().count("parameters") >= 1
    assert not (out / "vae-stage1").exists()
    manager = PipelineManager(AppConfig(model=str(out), output_dir=tmp_path / "o", device="cpu", safety_checker=False))
    assert manager.info.source.kind == "folder" and manager.native_size == 64
    result = manager.txt2img(Txt2ImgRequest(prompt="a red circle on a blue background", steps=2, seed=1))
    assert np.asarray(result.images[0]).shape == (64, 64, 3)


def test_shipped_demo_model_is_small_and_loads_like_stable_diffusion():
    files = [p for p in DEMO_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 1024 * 1024
    assert all(p.suffix != ".bin" for p in files)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (DEMO_MODEL_DIR / sub).is_dir()
