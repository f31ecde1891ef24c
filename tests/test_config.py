"""AppConfig from flags, environment defaults, and --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.config import AppConfig, build_parser, config_from_args

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_local_and_safe():
    config = config_from_args([])
    assert config.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert config.server_name == "127.0.0.1"
    assert config.safety_checker is True and config.save is True
    assert config.max_queue == 16 and config.max_file_size == "20mb"


def test_flags_parse_into_config(tmp_path):
    config = config_from_args([
        "--model", "demo", "--device", "cpu", "--dtype", "bf16", "--memory", "low", "--port", "9000",
        "--listen", "--share", "--output-dir", str(tmp_path), "--no-save", "--auth", "a:b", "--auth", "c:d",
    ])
    assert (config.model, config.device, config.dtype, config.memory, config.port) == ("demo", "cpu", "bf16", "low", 9000)
    assert config.server_name == "0.0.0.0" and config.share and not config.save
    assert config.output_dir == tmp_path and config.auth == ("a:b", "c:d")
    assert config.low_memory


def test_environment_gives_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("SDSTUDIO_MODEL", "demo")
    monkeypatch.setenv("SDSTUDIO_PORT", "7999")
    monkeypatch.setenv("SDSTUDIO_NO_SAFETY_CHECKER", "1")
    monkeypatch.setenv("SDSTUDIO_OUTPUT_DIR", str(tmp_path))
    config = config_from_args([])
    assert (config.model, config.port, config.safety_checker, config.output_dir) == ("demo", 7999, False, tmp_path)
    # A flag still wins over the environment.
    assert config_from_args(["--port", "7001"]).port == 7001


def test_dtype_auto_is_fp32_on_cpu():
    import torch

    config = AppConfig(device="cpu")
    assert config.resolve_device() == "cpu"
    assert config.resolve_dtype("cpu") == torch.float32
    assert config.resolve_dtype("cuda") == torch.float16
    assert AppConfig(dtype="bf16").resolve_dtype("cpu") == torch.bfloat16


@pytest.mark.parametrize("field,value", [("device", "tpu"), ("dtype", "int8"), ("memory", "tiny"), ("port", 70000)])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AppConfig(**{field: value})


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in out
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
    for flag in ("--model", "--device", "--dtype", "--memory", "--host", "--port", "--share", "--output-dir"):
        assert flag in out
