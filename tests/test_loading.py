"""Model sources through the loader users hit: folder, single file, .ckpt, bad paths, hub ids."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch

from pipelines.config import AppConfig
from pipelines.loading import ModelLoadError, resolve_model_source
from pipelines.manager import PipelineManager
from pipelines.requests import Txt2ImgRequest

REQ = Txt2ImgRequest(prompt="a red circle on a blue background", steps=2, seed=7, sampler="DDIM")


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.int16)


def test_folder_and_single_file_give_the_same_pixels(tiny_config, tiny_single_file):
    ckpt, config_dir = tiny_single_file
    from_folder = PipelineManager(tiny_config)
    from_file = PipelineManager(dataclasses.replace(tiny_config, model=str(ckpt), model_config=str(config_dir)))
    assert from_file.info.source.kind == "single_file"
    a, b = pixels(from_folder.txt2img(REQ)), pixels(from_file.txt2img(REQ))
    assert a.std() > 1.0  # a real picture, not a constant
    assert np.array_equal(a, b)
    # The A1111 short hash of a single file is its sha256 prefix.
    import hashlib

    assert from_file.info.hash == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]


def test_weights_rewritten_in_place_do_not_change_a_loaded_model(tiny_config, tmp_path):
    """A plain `cp` of other weights over a loaded model's files (same shapes, so same file size,
    rewritten in place) must not change what the running studio draws or the hash it records."""
    import shutil

    from pipelines.tiny import save_tiny_pipeline

    folder = tmp_path / "model"
    other = save_tiny_pipeline(tmp_path / "other", seed=1)
    shutil.copytree(tiny_config.model, folder)
    running = PipelineManager(dataclasses.replace(tiny_config, model=str(folder)))
    before, hash_before = pixels(running.txt2img(REQ)), running.info.hash
    for weights in sorted(other.rglob("*.safetensors")):
        target = folder / weights.relative_to(other)
        assert target.stat().st_size == weights.stat().st_size
        with open(target, "r+b") as fh:  # what `cp` does: same inode, new bytes
            fh.write(weights.read_bytes())
    reloaded = PipelineManager(dataclasses.replace(tiny_config, model=str(folder)))
    assert not np.array_equal(pixels(reloaded.txt2img(REQ)), before)  # the files did change
    assert np.array_equal(pixels(running.txt2img(REQ)), before)
    assert running.info.hash == hash_before


def test_ckpt_loads_through_weights_only_unpickling(tiny_config, tiny_single_file, tmp_path):
    from safetensors.torch import load_file

    ckpt, config_dir = tiny_single_file
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(ckpt))}, path)
    manager = PipelineManager(dataclasses.replace(tiny_config, model=str(path), model_config=str(config_dir)))
    reference = PipelineManager(tiny_config)
    assert np.array_equal(pixels(manager.txt2img(REQ)), pixels(reference.txt2img(REQ)))


class _RunsCode:
    """Unpickling this calls os.getcwd: a stand-in for a checkpoint that runs code."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_ckpt_needing_code_is_refused_with_reason(tiny_config, tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode()}, path)
    manager = PipelineManager(dataclasses.replace(tiny_config, model=str(path)))
    with pytest.raises(ModelLoadError, match=r"evil\.ckpt.*refused.*weights-only"):
        manager.load()


def test_legacy_pickle_needing_code_is_refused(tiny_config, tmp_path):
    import pickle

    path = tmp_path / "old.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "payload": _RunsCode()}))
    with pytest.raises(ModelLoadError, match=r"old\.ckpt.*refused"):
        PipelineManager(dataclasses.replace(tiny_config, model=str(path))).load()


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(ModelLoadError, match=f"'{missing}' does not exist"):
        resolve_model_source(str(missing))


def test_folder_that_is_not_a_pipeline_is_named(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=f"'{tmp_path}' is not a diffusers pipeline"):
        resolve_model_source(str(tmp_path))


def test_non_checkpoint_file_is_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hi")
    with pytest.raises(ModelLoadError, match="notes.txt' is not a checkpoint"):
        resolve_model_source(str(f))


def test_unreachable_hub_id_is_named(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="'someone/not-a-model' cannot be used"):
        resolve_model_source("someone/not-a-model")


def test_default_model_falls_back_to_the_demo_model_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = PipelineManager(AppConfig(output_dir=tmp_path, device="cpu"))
    assert manager.info.source.is_demo
    assert "could not be loaded" in manager.info.source.note
    assert any("bundled demo model" in line for line in manager.notices())


def test_bf16_on_a_cpu_that_only_emulates_it_warns_with_the_fix(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """--dtype bf16 made the demo model 68x slower on an AVX2 CPU (tools/bench.py, speed section):
    the log says why and what to pass instead; the model still loads as asked."""
    import logging

    import pipelines.manager as manager_module

    for fast, dtype, warned in ((False, "bf16", True), (True, "bf16", False), (False, "fp32", False)):
        monkeypatch.setattr(manager_module, "cpu_has_fast_bf16", lambda fast=fast: fast)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipelines.manager"):
            manager = PipelineManager(AppConfig(model=str(tiny_model_dir), output_dir=tmp_path, device="cpu",
                                                dtype=dtype, safety_checker=False))
            unet_dtype = manager.pipe.unet.dtype
        text = " ".join(r.getMessage() for r in caplog.records)
        assert ("--dtype bf16: this CPU has no bfloat16 path" in text and "use --dtype auto or fp32" in text) == warned, (
            fast, dtype, text)
        assert unet_dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
