"""The output guard: safety checker, watermark, metadata and audit log on every image."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import AppConfig
from pipelines.guard import PromptRefused, SafetyCheckerUnavailable, SafetyFilter, Watermarker, verify
from pipelines.manager import PipelineManager
from pipelines.metadata import parse_parameters, read_png_metadata
from pipelines.requests import Txt2ImgRequest

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red circle on a blue background"


def build_safety_checker(folder: Path, blocked: Image.Image, other: Image.Image) -> Path:
    """A small random-CLIP safety checker whose first concept is the embedding of ``blocked``.

    Its threshold sits halfway between the cosine of ``blocked`` with itself (1) and with
    ``other``, so ``blocked`` is flagged and ``other`` passes.
    """
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=4),
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    probe = SafetyFilter(checker, processor)
    with torch.no_grad():
        pixels = processor(images=[blocked, other], return_tensors="pt").pixel_values
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        similarity = torch.nn.functional.cosine_similarity(embeds[0:1], embeds[1:2]).item()
        assert similarity < 0.99999, "precondition: the two images must embed differently"
        embed, threshold = embeds[0], (1.0 + similarity) / 2
        checker.concept_embeds.zero_()
        checker.concept_embeds[0] = embed
        checker.concept_embeds_weights.fill_(2.0)  # cosine never exceeds 1: only concept 0 can fire
        checker.concept_embeds_weights[0] = threshold
        checker.special_care_embeds_weights.fill_(2.0)
    assert probe.flags([blocked, other]) == [True, False]
    checker.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture
def guarded_setup(tiny_config, tmp_path):
    """(manager with the checker, blocked image pixels): seed 11's image is the blocked concept."""
    reference = PipelineManager(dataclasses.replace(tiny_config, output_dir=tmp_path / "reference"))
    blocked = reference.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=11)).images[0]
    other = reference.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=12)).images[0]
    checker_dir = build_safety_checker(tmp_path / "checker", blocked, other)
    config = dataclasses.replace(tiny_config, safety_checker=True, safety_checker_path=str(checker_dir),
                                 output_dir=tmp_path / "outputs")
    manager = PipelineManager(config)
    return manager, np.asarray(blocked)


def all_pngs(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.rglob("*") if p.suffix.lower() in (".png", ".webp", ".jpg")]


def test_flagged_image_is_replaced_and_never_written(guarded_setup):
    manager, blocked_pixels = guarded_setup
    result = manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=11, batch_size=2))
    assert result.nsfw == [True, False]
    assert result.metadata[0]["nsfw"] is True
    assert not np.array_equal(np.asarray(result.images[0]), blocked_pixels)
    for path in all_pngs(manager.config.output_dir):
        with Image.open(path) as im:
            assert not np.array_equal(np.asarray(im.convert("RGB")), blocked_pixels), path
    lines = [json.loads(line) for line in (manager.config.output_dir / "audit.jsonl").read_text().splitlines()]
    assert [line["nsfw"] for line in lines] == [True, False]


def test_adjustment_sets_strictness(guarded_setup, tiny_config):
    manager, blocked_pixels = guarded_setup
    blocked = Image.fromarray(blocked_pixels)
    other = manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=12)).images[0]
    assert manager.guard.safety.flags([blocked, other]) == [True, False]
    stricter = PipelineManager(dataclasses.replace(manager.config, safety_adjustment=0.01))
    assert stricter.guard.safety.flags([blocked, other]) == [True, True]
    lenient = PipelineManager(dataclasses.replace(manager.config, safety_adjustment=-0.01))
    assert lenient.guard.safety.flags([blocked, other]) == [False, False]


def test_missing_safety_checker_refuses_to_start(tiny_config):
    config = dataclasses.replace(tiny_config, safety_checker=True, safety_checker_path="/nonexistent/checker", offline=True)
    with pytest.raises(SafetyCheckerUnavailable, match="--no-safety-checker"):
        PipelineManager(config).load()


def test_safety_off_is_stated(tiny_manager):
    assert "off" in tiny_manager.guard.safety_status
    assert any("safety filter is OFF" in n for n in tiny_manager.notices())


def test_watermark_round_trip_and_verify_command(tiny_manager, tmp_path):
    result = tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=5, width=512, height=512))
    assert result.metadata[0]["watermark"] == "applied"
    with Image.open(result.files[0]) as im:
        assert Watermarker("SDStudio").read(im.convert("RGB")) == b"SDStudio"
    unmarked = tmp_path / "plain.png"
    Image.fromarray(np.asarray(Image.open(result.files[0]).convert("RGB"))[:, ::-1].copy()).save(unmarked)
    assert verify([str(result.files[0]), str(unmarked)]) == {str(result.files[0]): True, str(unmarked): False}
    proc = subprocess.run([sys.executable, "-m", "pipelines.guard", "verify", str(result.files[0]), str(unmarked)],
                          cwd=ROOT, capture_output=True, text=True)
    assert f"{result.files[0]}: watermark found" in proc.stdout
    assert f"{unmarked}: no watermark" in proc.stdout
    assert proc.returncode == 1


def test_watermark_decodes_on_flat_demo_images():
    """Flat colours defeated imwatermark's plain dwtDct; the guard's method must decode them."""
    import io
    import random

    from tools.demo_world import random_scene, render

    rng = random.Random(3)
    marker = Watermarker("SDStudio")
    for _ in range(3):
        marked, status = marker.apply(Image.fromarray(render(random_scene(rng), 256, rng)))
        assert status == "applied"
        buffer = io.BytesIO()
        marked.save(buffer, format="PNG")
        assert marker.found(Image.open(io.BytesIO(buffer.getvalue())))


@pytest.mark.parametrize("size", [(512, 512), (300, 260), (1024, 264)])
def test_batched_watermark_embedding_matches_the_package_encoder(size):
    """The guard's batched dwtDctSvd embedding gives the invisible-watermark package's pixels."""
    from imwatermark import WatermarkEncoder

    rng = np.random.default_rng(size[0])
    small = rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", b"TeamX")
    reference = encoder.encode(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]), "dwtDctSvd")[:, :, ::-1]
    ours = np.asarray(Watermarker("TeamX").apply(image)[0])
    assert ours.shape == reference.shape
    assert int(np.abs(ours.astype(int) - reference.astype(int)).max()) <= 1
    assert float(np.mean(ours != reference)) < 1e-3
    assert not np.array_equal(ours, np.asarray(image))  # something was embedded


def test_small_image_is_delivered_with_watermark_skipped(tiny_manager):
    result = tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=2, seed=5, width=128, height=128))
    assert result.metadata[0]["watermark"] == "skipped (too small)"
    _, record = read_png_metadata(result.files[0])
    assert record["watermark"] == "skipped (too small)"
    assert any("without the invisible watermark" in w for w in result.warnings)


def test_custom_watermark_text(tiny_config):
    manager = PipelineManager(dataclasses.replace(tiny_config, watermark_text="TeamX"))
    result = manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=1, seed=5, width=256, height=256))
    assert Watermarker("TeamX").found(Image.open(result.files[0]))


def test_parameters_chunk_parses_back_to_the_request(tiny_manager):
    req = Txt2ImgRequest(prompt="a green square, photo", negative_prompt="blue", steps=3, seed=42,
                         sampler="DPM++ 2M Karras", guidance_scale=6.5, width=96, height=64)
    result = tiny_manager.txt2img(req)
    text, record = read_png_metadata(result.files[0])
    parsed = parse_parameters(text)
    assert parsed["prompt"] == req.prompt and parsed["negative_prompt"] == req.negative_prompt
    assert parsed["Steps"] == "3" and parsed["Seed"] == "42" and parsed["Sampler"] == "DPM++ 2M Karras"
    assert parsed["CFG scale"] == "6.5" and parsed["Size"] == "96x64"
    assert parsed["Model hash"] == tiny_manager.info.hash
    assert record["seed"] == 42 and record["model_hash"] == tiny_manager.info.hash
    assert "diffusers" in record["versions"] and "torch" in record["versions"]


def test_eight_threads_write_eight_audit_lines_matching_files(tiny_manager):
    errors = []

    def work(i):
        try:
            tiny_manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=1, seed=100 + i))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    lines = (tiny_manager.config.output_dir / "audit.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 8
    assert sorted(e["seed"] for e in entries) == list(range(100, 108))
    for e in entries:
        assert hashlib.sha256(Path(e["file"]).read_bytes()).hexdigest() == e["sha256"]
        assert e["tab"] == "txt2img" and e["model_hash"] == tiny_manager.info.hash
        assert {"time", "prompt", "negative_prompt", "parameters", "nsfw", "watermark", "client"} <= e.keys()


def test_no_save_keeps_the_audit(tiny_config):
    manager = PipelineManager(dataclasses.replace(tiny_config, save=False))
    result = manager.txt2img(Txt2ImgRequest(prompt=PROMPT, steps=1, seed=1))
    assert not any(manager.config.output_dir.rglob("*.png"))
    entry = json.loads((manager.config.output_dir / "audit.jsonl").read_text())
    assert entry["file"] is None and entry["sha256"] == hashlib.sha256(result.files[0].read_bytes()).hexdigest()


def test_blocklisted_prompt_is_refused_before_the_unet_runs(tiny_config, tmp_path):
    blocklist = tmp_path / "blocklist.txt"
    blocklist.write_text("# words and /regexes/\nforbidden\n/bad\\w+/\n")
    manager = PipelineManager(dataclasses.replace(tiny_config, blocklist=blocklist))
    calls = []
    manager.pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(PromptRefused, match="prompt was refused by the blocklist"):
        manager.txt2img(Txt2ImgRequest(prompt="a Forbidden circle", steps=2))
    with pytest.raises(PromptRefused, match="negative_prompt was refused by the blocklist"):
        manager.txt2img(Txt2ImgRequest(prompt="a circle", negative_prompt="badness", steps=2))
    assert calls == []
    manager.txt2img(Txt2ImgRequest(prompt="a circle", steps=1, seed=1))
    assert calls  # the same manager still generates


def test_bad_blocklist_file_is_named(tmp_path):
    bad = tmp_path / "bl.txt"
    bad.write_text("/([/\n")
    with pytest.raises(ValueError, match="line 1: bad regular expression"):
        PipelineManager(AppConfig(model="demo", blocklist=bad))
