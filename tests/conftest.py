"""Shared fixtures: tiny real models saved to temp folders and loaded through the user's loader."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parent.parent
TEST_OUTPUT = ROOT / "test-output"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny SD 1.x pipeline written with save_pretrained (native size 64 px)."""
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "model")


@pytest.fixture(scope="session")
def tiny_single_file(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, config folder): the tiny pipeline as one original-layout .safetensors file,
    and its diffusers config (JSON and tokenizer, no weights) for --model-config."""
    from diffusers import StableDiffusionPipeline

    from pipelines.export import export_single_file

    root = tmp_path_factory.mktemp("tiny-single")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    ckpt = export_single_file(pipe, root / "tiny.safetensors")
    config = root / "config"
    shutil.copytree(tiny_model_dir, config, ignore=shutil.ignore_patterns("*.safetensors", "_tokenizer_src"))
    return ckpt, config


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    """An AppConfig for the tiny model with outputs in a temp folder."""
    from pipelines.config import AppConfig

    return AppConfig(model=str(tiny_model_dir), output_dir=tmp_path / "outputs", safety_checker=False, device="cpu")


@pytest.fixture
def tiny_manager(tiny_config):
    from pipelines.manager import PipelineManager

    return PipelineManager(tiny_config)


@pytest.fixture(scope="session")
def demo_manager(tmp_path_factory):
    """The bundled demo model, loaded once for the session."""
    from pipelines.config import AppConfig
    from pipelines.manager import PipelineManager

    out = tmp_path_factory.mktemp("demo-out")
    return PipelineManager(AppConfig(model="demo", output_dir=out, device="cpu"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
