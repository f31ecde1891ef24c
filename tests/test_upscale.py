"""Upscale 2x: geometry, weights loading, input decoding, tiling, OOM retry, the manager path and the tab.

Real code paths on small real networks: tiny RRDBNet weights are written to a temp folder as
``.pth`` and ``.safetensors`` and loaded through the loader ``--sr-weights`` uses; quality checks
use the bundled demo upscaler.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pipelines.config import AppConfig
from pipelines.manager import PipelineManager
from pipelines.metadata import read_png_metadata
from pipelines.progress import JobControl
from pipelines.requests import UpscaleRequest
from pipelines.results import GenerationCancelled
from pipelines.upscale import (
    DEMO_UPSCALER,
    MIN_TILE,
    OFFICIAL_X2PLUS_NAME,
    X2PLUS,
    SRArchitecture,
    SRWeights,
    TileBox,
    UpscaleOutOfMemory,
    UpscalerWeightsError,
    apply_exif_orientation,
    choose_tile_size,
    describe_weight_choice,
    get_upscaler,
    infer_architecture,
    load_input_image,
    load_sr_state,
    load_upscaler,
    png_header,
    resolve_sr_weights,
    save_sr_weights,
    tile_boxes,
)

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers


def tiny_rrdb(scale: int = 2, seed: int = 0) -> tuple[SRArchitecture, torch.nn.Module]:
    """A 1-block, 8-feature RRDBNet: the RealESRGAN_x2plus layout at toy size."""
    torch.manual_seed(seed)
    arch = SRArchitecture("RRDBNet", dict(num_in_ch=3, num_out_ch=3, scale=scale, num_feat=8, num_block=1,
                                          num_grow_ch=4))
    return arch, arch.build()


def noise(height: int, width: int, channels: int = 3, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    high = 65536 if dtype == np.uint16 else 256
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, high, shape).astype(dtype)


def save(path: Path, array_or_image, **kwargs) -> Path:
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
    image.save(path, **kwargs)
    return path


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(path: Path, width: int, height: int) -> Path:
    """A ~100-byte PNG whose header declares ``width`` x ``height`` RGB pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 4096))
    path.write_bytes(data + png_chunk(b"IEND", b""))
    return path


def output_files(manager) -> list[Path]:
    return sorted(Path(manager.config.output_dir).rglob("*.png"))


_EXECUTED: list[int] = []


def _side_effect():
    _EXECUTED.append(1)


class CodeOnLoad:
    """Pickles to a call of ``_side_effect``: a .pth that runs code when unpickled."""

    def __reduce__(self):
        return (_side_effect, ())


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny convolutions on tiles of changing shapes run far slower with several intra-op
    threads on a busy CPU; one thread keeps this file fast. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rrdb_files(tmp_path_factory):
    """(arch, state, .pth with params_ema, .safetensors without metadata) of one tiny RRDBNet."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("sr-weights")
    arch, network = tiny_rrdb()
    state = {k: v.contiguous() for k, v in network.state_dict().items()}
    pth = root / "tiny_x2.pth"
    torch.save({"params_ema": state}, pth)
    safetensors = root / "tiny_x2.safetensors"
    save_file(state, str(safetensors))
    return arch, state, pth, safetensors


@pytest.fixture
def sr_manager(tiny_config, rrdb_files):
    """The tiny SD manager with the tiny RRDBNet as --sr-weights (.pth)."""
    return PipelineManager(replace(tiny_config, sr_weights=rrdb_files[2]))


@pytest.fixture(scope="module")
def demo_upscaler():
    return load_upscaler(SRWeights(DEMO_UPSCALER, "bundled demo"), "cpu")


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A natural 300x200 RGB test image (only used to check tiling, not quality)."""
    import skimage.data

    return np.ascontiguousarray(skimage.data.astronaut()[40:240, 100:400])


# ----------------------------------------------------------------------------- pure geometry


@pytest.mark.parametrize("height,width,tile,pad", [(210, 310, 64, 10), (11, 13, 4, 3), (200, 300, 0, 10),
                                                   (65, 64, 64, 7), (31, 17, 5, 0)])
def test_tile_boxes_cover_every_output_pixel_once(height, width, tile, pad):
    coverage = np.zeros((2 * height, 2 * width), int)
    for box in tile_boxes(height, width, tile, pad):
        coverage[box.output_start_y:box.output_end_y, box.output_start_x:box.output_end_x] += 1
        assert 0 <= box.input_start_x_pad <= box.input_start_x < box.input_end_x <= box.input_end_x_pad <= width
        assert 0 <= box.input_start_y_pad <= box.input_start_y < box.input_end_y <= box.input_end_y_pad <= height
        assert box.input_start_x - box.input_start_x_pad >= min(pad, box.input_start_x)
        assert box.input_end_x_pad - box.input_end_x >= min(pad, width - box.input_end_x)
        # RRDBNet x2 pixel-unshuffles its input: every padded window starts on an even pixel.
        assert box.input_start_x_pad % 2 == 0 and box.input_start_y_pad % 2 == 0
        assert box.output_end_x_tile <= 2 * (box.input_end_x_pad - box.input_start_x_pad)
        assert box.output_end_y_tile <= 2 * (box.input_end_y_pad - box.input_start_y_pad)
    assert (coverage == 1).all()


def test_tile_boxes_named_coordinates():
    box = tile_boxes(200, 300, 64, 10)[1]  # second tile of the first row
    assert box == TileBox(
        input_start_x=64, input_end_x=128, input_start_y=0, input_end_y=64,
        input_start_x_pad=54, input_end_x_pad=138, input_start_y_pad=0, input_end_y_pad=74,
        output_start_x=128, output_end_x=256, output_start_y=0, output_end_y=128,
        output_start_x_tile=20, output_end_x_tile=148, output_start_y_tile=0, output_end_y_tile=128,
    )
    assert len(tile_boxes(200, 300, 64, 10)) == 4 * 5
    assert len(tile_boxes(200, 300, 0, 10)) == 1


def test_choose_tile_size():
    assert choose_tile_size(100, 100, 10, 4, budget_bytes=100 * 100 * 4) == 0  # fits: untiled
    assert choose_tile_size(2000, 2000, 10, 1000, budget_bytes=(512 + 20) ** 2 * 1000) == 512
    assert choose_tile_size(2000, 2000, 10, 1000, budget_bytes=(512 + 20) ** 2 * 1000 - 1) == 384
    assert choose_tile_size(2000, 2000, 10, 1000, budget_bytes=10) == MIN_TILE


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    array = noise(5, 7)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / "o.png", array, exif=exif.tobytes())
    with Image.open(path) as im:
        expected = np.asarray(ImageOps.exif_transpose(im))
    assert np.array_equal(apply_exif_orientation(array, orientation), expected)
    decoded = load_input_image(path, max_pixels=100)
    assert np.array_equal((decoded.pixels * 255).round().astype(np.uint8), expected)


def test_png_header(tmp_path):
    path = save(tmp_path / "a.png", noise(3, 5))
    assert png_header(path.read_bytes()) == (5, 3, 8, 2)
    assert png_header(b"GIF89a" + b"\0" * 40) is None


# ----------------------------------------------------------------------------- architectures and weights


def test_official_x2plus_architecture_is_recognised():
    assert X2PLUS.kind == "RRDBNet"
    assert X2PLUS.options == dict(num_in_ch=3, num_out_ch=3, scale=2, num_feat=64, num_block=23, num_grow_ch=32)
    network = X2PLUS.build()  # built, never run
    assert len(network.body) == 23
    assert network.conv_first.in_channels == 12  # x2: pixel-unshuffled RGB
    assert infer_architecture(network.state_dict()) == X2PLUS


@pytest.mark.parametrize("scale", [1, 4])
def test_weights_that_are_not_x2_are_refused(tmp_path, scale):
    arch, network = tiny_rrdb(scale=scale)
    assert infer_architecture(network.state_dict()) == arch
    path = tmp_path / f"x{scale}.pth"
    torch.save({"params": network.state_dict()}, path)
    with pytest.raises(UpscalerWeightsError, match=f"is an x{scale} RRDBNet; Upscale 2x needs x2 weights"):
        load_upscaler(SRWeights(path, "--sr-weights"), "cpu")


def test_pth_and_safetensors_load_through_the_app_loader(tmp_path, rrdb_files):
    arch, state, pth, safetensors = rrdb_files
    outputs = []
    for path in (pth, safetensors):
        config = AppConfig(model="demo", sr_weights=path, output_dir=tmp_path)
        weights = resolve_sr_weights(config)
        assert weights == SRWeights(path, "--sr-weights")
        upscaler = load_upscaler(weights, "cpu")
        assert upscaler.arch == arch
        assert upscaler.dtype == "fp32" and not upscaler.engine.half  # fp16 only on CUDA
        assert type(upscaler.engine).__mro__[1].__name__ == "RealESRGANer"
        loaded = upscaler.engine.model.state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
        result, _, _ = upscaler.upscale_rgb([noise(20, 30).astype(np.float32) / 255], tile_size=0, tile_pad=10,
                                            control=JobControl())
        outputs.append(result[0])
    assert outputs[0].shape == (40, 60, 3)
    assert np.array_equal(outputs[0], outputs[1])


def test_pth_layouts_params_and_bare_state_dict(tmp_path, rrdb_files):
    arch, state, _, _ = rrdb_files
    for name, payload in (("params", {"params": state}), ("bare", dict(state))):
        path = tmp_path / f"{name}.pth"
        torch.save(payload, path)
        loaded, found = load_sr_state(path)
        assert found == arch and loaded.keys() == state.keys()


def test_safetensors_metadata_names_the_architecture(tmp_path):
    arch = SRArchitecture("SRVGGNetCompact", dict(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=2,
                                                  act_type="leakyrelu"))
    path = save_sr_weights(tmp_path / "compact.safetensors", arch.build(), arch)
    state, found = load_sr_state(path)
    assert found == arch  # leakyrelu has no parameters: only the metadata can say so
    with pytest.raises(UpscalerWeightsError, match="activation cannot be read"):
        infer_architecture(state)


def test_unusable_weights_are_refused_with_a_clear_message(tmp_path, rrdb_files):
    _, state, _, _ = rrdb_files
    with pytest.raises(UpscalerWeightsError, match="sr_weights file .* does not exist"):
        resolve_sr_weights(AppConfig(model="demo", sr_weights=tmp_path / "missing.pth"))
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(UpscalerWeightsError, match=r"sr_weights must be a \.pth"):
        resolve_sr_weights(AppConfig(model="demo", sr_weights=tmp_path / "w.bin"))

    # A pickle that runs code when loaded is refused, and the code never runs.
    evil = tmp_path / "evil.pth"
    torch.save({"params": dict(state), "payload": CodeOnLoad()}, evil)
    with pytest.raises(UpscalerWeightsError,
                       match=r"could not be read: it needs to run code to load \(it refers to .*_side_effect\)"):
        load_sr_state(evil)
    assert _EXECUTED == []

    fake = tmp_path / "fake.safetensors"
    fake.write_text("not tensors")
    with pytest.raises(UpscalerWeightsError, match="fake.safetensors' could not be read"):
        load_sr_state(fake)

    # Metadata that disagrees with the tensors.
    wrong = SRArchitecture("RRDBNet", dict(num_in_ch=3, num_out_ch=3, scale=2, num_feat=16, num_block=1, num_grow_ch=4))
    mismatched = tmp_path / "mismatched.safetensors"
    from safetensors.torch import save_file

    save_file(dict(state), str(mismatched), metadata={"sdstudio_arch": wrong.to_json()})
    with pytest.raises(UpscalerWeightsError, match="do not fit RRDBNet x2, 1 blocks, 16 features"):
        load_upscaler(SRWeights(mismatched, "--sr-weights"), "cpu")

    with pytest.raises(UpscalerWeightsError, match="neither a Real-ESRGAN RRDBNet nor an SRVGGNetCompact"):
        infer_architecture({"weight": torch.zeros(1)})


def _rrdb_state(**shapes) -> dict:
    state = dict(tiny_rrdb()[1].state_dict())
    state.update(shapes)
    return state


@pytest.mark.parametrize("payload,message", [
    (torch.zeros(3), "holds a Tensor, not a state dict"),
    ({"params": {"conv_first.weight": 1.0}}, "is not a state dict of tensors"),
    ({"params": _rrdb_state(**{"conv_first.weight": torch.zeros(8, 5, 3, 3)})},
     "RRDBNet weights with 5 input channels are not supported"),
    ({"params": _rrdb_state(**{"conv_last.weight": torch.zeros(3)})},
     "expected a convolution weight 'conv_last.weight'"),
    ({"params": {"body.0.weight": torch.zeros(8, 3, 3, 3), "body.1.weight": torch.zeros(8),
                 "body.2.weight": torch.zeros(20, 8, 3, 3)}}, "end in 20 channels, not a square scale"),
])
def test_malformed_state_dicts_are_refused(tmp_path, payload, message):
    path = tmp_path / "w.pth"
    torch.save(payload, path)
    with pytest.raises(UpscalerWeightsError, match=message):
        load_sr_state(path)


def test_unknown_architecture_in_metadata_and_missing_demo(tmp_path, monkeypatch):
    import pipelines.upscale as upscale

    arch = SRArchitecture("SRVGGNetCompact", dict(num_in_ch=3, num_out_ch=3, num_feat=4, num_conv=1, upscale=2,
                                                  act_type="prelu"))
    path = save_sr_weights(tmp_path / "w.safetensors", arch.build(), SRArchitecture("SwinIR", {"upscale": 2}))
    with pytest.raises(UpscalerWeightsError, match="unknown upscaler architecture 'SwinIR'"):
        load_upscaler(SRWeights(path, "--sr-weights"), "cpu")
    monkeypatch.setattr(upscale, "DEMO_UPSCALER", tmp_path / "gone.safetensors")
    with pytest.raises(UpscalerWeightsError, match="no upscaler weights: pass --sr-weights PATH or put "
                                                   "RealESRGAN_x2plus.pth in"):
        resolve_sr_weights(AppConfig(model="demo", offline=True, sr_cache_dir=tmp_path))


def test_download_is_atomic(tmp_path, rrdb_files):
    """The real downloader against a local HTTP server: the file arrives whole, or not at all."""
    import functools
    import http.server
    import threading

    from pipelines.upscale import download_official_x2plus

    served = tmp_path / "served"
    served.mkdir()
    (served / OFFICIAL_X2PLUS_NAME).write_bytes(rrdb_files[2].read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        target = tmp_path / "cache" / OFFICIAL_X2PLUS_NAME
        download_official_x2plus(target, base + OFFICIAL_X2PLUS_NAME)
        assert target.read_bytes() == rrdb_files[2].read_bytes()
        missing = tmp_path / "cache2" / OFFICIAL_X2PLUS_NAME
        with pytest.raises(OSError, match="404"):
            download_official_x2plus(missing, base + "nothing-here.pth")
        assert list(missing.parent.iterdir()) == []  # no partial file left behind
    finally:
        server.shutdown()
        server.server_close()


def test_weights_resolution_order(tmp_path, rrdb_files, monkeypatch, caplog):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    pth = rrdb_files[2]
    cache = tmp_path / "cache"
    config = AppConfig(model="demo", sr_cache_dir=cache, output_dir=tmp_path)

    def never(target):
        raise AssertionError("must not download")

    def network_down(target):
        raise OSError("network is unreachable")

    downloads = []

    def download(target):  # stands in for the release server: writes the file the URL would give
        downloads.append(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(pth.read_bytes())

    assert "downloaded into" in describe_weight_choice(config)
    with caplog.at_level(logging.WARNING, logger="pipelines.upscale"):
        assert resolve_sr_weights(config, download=network_down) == SRWeights(DEMO_UPSCALER, "bundled demo")
    assert "could not download RealESRGAN_x2plus.pth (network is unreachable)" in caplog.text
    assert resolve_sr_weights(replace(config, offline=True), download=never).is_demo
    assert "demo upscaler" in describe_weight_choice(replace(config, offline=True))

    assert resolve_sr_weights(config, download=download) == SRWeights(cache / OFFICIAL_X2PLUS_NAME, "download")
    assert downloads == [cache / OFFICIAL_X2PLUS_NAME]
    assert resolve_sr_weights(config, download=never) == SRWeights(cache / OFFICIAL_X2PLUS_NAME, "cache")
    assert "official RealESRGAN_x2plus weights from" in describe_weight_choice(config)
    assert load_upscaler(resolve_sr_weights(config, download=never), "cpu").weights.name == "RealESRGAN_x2plus"

    explicit = replace(config, sr_weights=pth)
    assert resolve_sr_weights(explicit, download=never) == SRWeights(pth, "--sr-weights")
    assert "tiny_x2.pth" in describe_weight_choice(explicit)


# ----------------------------------------------------------------------------- inputs


def test_sixteen_bit_pngs_keep_their_precision(tmp_path):
    import cv2

    rgb = noise(6, 9, 3, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb[..., ::-1])  # OpenCV writes BGR
    decoded = load_input_image(tmp_path / "rgb16.png", max_pixels=100)
    assert (decoded.mode, decoded.bit_depth) == ("RGB", 16)
    assert np.array_equal(decoded.pixels, rgb.astype(np.float32) / 65535)

    grey = noise(6, 9, 1, dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "grey16.png"), grey)
    decoded = load_input_image(tmp_path / "grey16.png", max_pixels=100)
    assert (decoded.mode, decoded.bit_depth) == ("L", 16)
    assert np.array_equal(decoded.pixels[..., 0], grey.astype(np.float32) / 65535)


def test_palette_and_grey_alpha_become_rgb_and_rgba(tmp_path):
    palette = Image.fromarray(noise(8, 8)).convert("P")
    assert load_input_image(save(tmp_path / "p.png", palette), max_pixels=100).mode == "RGB"
    grey_alpha = Image.fromarray(noise(8, 8, 2), "LA")
    assert load_input_image(save(tmp_path / "la.png", grey_alpha), max_pixels=100).mode == "RGBA"
    webp = load_input_image(save(tmp_path / "a.webp", noise(8, 8), lossless=True), max_pixels=100)
    assert (webp.format, webp.mode, webp.width) == ("WEBP", "RGB", 8)


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    array = np.full((20, 40, 3), 255, np.uint8)  # 40 wide, 20 high, stored sideways
    array[:6, :6] = (255, 0, 0)  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    path = save(tmp_path / "phone.jpg", array, exif=exif.tobytes(), quality=95)
    decoded = load_input_image(path, max_pixels=10_000)
    assert (decoded.width, decoded.height) == (20, 40)
    assert decoded.pixels[:4, -4:, 0].min() > 0.8 and decoded.pixels[:4, -4:, 1].max() < 0.2  # now top-right


def test_bad_inputs_are_refused_by_name(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("this is a text file, not an image")
    with pytest.raises(ValueError, match="image 'notes.png' is not a PNG, JPEG or WebP image"):
        load_input_image(text, max_pixels=10_000)

    good_png = save(tmp_path / "good.png", noise(40, 40)).read_bytes()
    (tmp_path / "cut.png").write_bytes(good_png[: len(good_png) // 2])
    with pytest.raises(ValueError, match="image 'cut.png' could not be decoded: the file is truncated or corrupt"):
        load_input_image(tmp_path / "cut.png", max_pixels=10_000)

    good_jpeg = save(tmp_path / "good.jpg", noise(40, 40)).read_bytes()
    (tmp_path / "cut.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    with pytest.raises(ValueError, match="image 'cut.jpg' could not be decoded: the file is truncated or corrupt"):
        load_input_image(tmp_path / "cut.jpg", max_pixels=10_000)

    import cv2

    cv2.imwrite(str(tmp_path / "good16.png"), noise(40, 40, 3, dtype=np.uint16))
    data = (tmp_path / "good16.png").read_bytes()
    (tmp_path / "cut16.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="image 'cut16.png' could not be decoded"):
        load_input_image(tmp_path / "cut16.png", max_pixels=10_000)

    with pytest.raises(ValueError, match="image 'a.gif' must be PNG, JPEG or WebP, got GIF"):
        load_input_image(save(tmp_path / "a.gif", noise(4, 4)), max_pixels=10_000)
    with pytest.raises(ValueError, match="image file '.*missing.png' does not exist"):
        load_input_image(tmp_path / "missing.png", max_pixels=10_000)
    with pytest.raises(ValueError, match="image must be a PIL image or a file path, got int"):
        load_input_image(123, max_pixels=10_000)


def test_pixel_limit_and_decompression_bombs(tmp_path):
    jpeg = save(tmp_path / "big.jpg", noise(30, 40))
    with pytest.raises(ValueError, match=r"image 'big.jpg' is 40x30 = 1,200 pixels; the limit is 1,000 pixels "
                                         r"\(0.001 megapixels, --max-upscale-pixels\)"):
        load_input_image(jpeg, max_pixels=1000)
    with pytest.raises(ValueError, match="the limit is 1,000 pixels"):
        load_input_image(Image.fromarray(noise(30, 40)), max_pixels=1000)

    # Declared 60000x60000 in a 100-byte file: refused from the header, nothing is decoded.
    bomb = bomb_png(tmp_path / "bomb.png", 60_000, 60_000)
    assert bomb.stat().st_size < 200
    with pytest.raises(ValueError, match=r"is 60000x60000 = 3,600,000,000 pixels; the limit is 4,000,000"):
        load_input_image(bomb, max_pixels=4_000_000)
    # Even with a limit above Pillow's own, Pillow's bomb check is reported clearly.
    with pytest.raises(ValueError, match="declares more pixels than any image this studio accepts"):
        load_input_image(bomb, max_pixels=10**12)


# ----------------------------------------------------------------------------- engine


def test_tiled_and_untiled_agree_within_2_of_255(demo_upscaler, photo):
    pixels = photo.astype(np.float32) / 255
    assert photo.shape == (200, 300, 3)
    (untiled,), tile0, _ = demo_upscaler.upscale_rgb([pixels], tile_size=0, tile_pad=10, control=JobControl())
    (tiled,), tile64, _ = demo_upscaler.upscale_rgb([pixels], tile_size=64, tile_pad=10, control=JobControl())
    assert (tile0, tile64) == (0, 64)
    assert untiled.shape == tiled.shape == (400, 600, 3)
    assert np.abs(untiled - tiled).max() <= 2 / 255
    as_uint8 = [(np.clip(a, 0, 1) * 255).round().astype(int) for a in (untiled, tiled)]
    assert np.abs(as_uint8[0] - as_uint8[1]).max() <= 2


def test_demo_upscaler_beats_bicubic_on_held_out_images(demo_upscaler):
    import skimage.data

    from tools.eval_upscaler import evaluate

    images = {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee()[:200, :300]}
    report = evaluate(demo_upscaler, images)
    for name, row in report["images"].items():
        assert row["model"]["psnr"] > row["bicubic"]["psnr"] + 0.3, name
        assert row["model"]["ssim"] > row["bicubic"]["ssim"], name


def test_eval_metric_is_luma_psnr():
    from tools.eval_upscaler import luma_psnr_ssim

    image = noise(32, 32, seed=3).clip(1, 254)
    psnr, ssim = luma_psnr_ssim(image, image)
    assert psnr == float("inf") and ssim == pytest.approx(1.0)
    # +1 on every channel moves BT.601 Y by 219/255.
    psnr, _ = luma_psnr_ssim(image, image + 1)
    assert psnr == pytest.approx(10 * np.log10(255**2 / (219 / 255) ** 2), abs=1e-6)


def test_bundled_demo_upscaler_asset():
    from safetensors import safe_open

    from tools.train_demo_upscaler import DEMO_ARCH

    assert DEMO_UPSCALER.is_file() and DEMO_UPSCALER.stat().st_size <= 10 * 1024 * 1024
    with safe_open(str(DEMO_UPSCALER), framework="pt") as f:
        assert SRArchitecture.from_json(f.metadata()["sdstudio_arch"]) == DEMO_ARCH
    card = (DEMO_UPSCALER.parent / "README.md").read_text()
    assert "scikit-image" in card and "never" in card


def test_train_smoke_run_writes_loadable_weights_without_reading_eval_images(tmp_path):
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['train_demo_upscaler.py', '--smoke', '--out', {str(tmp_path)!r}]\n"
        "try:\n"
        "    runpy.run_path('tools/train_demo_upscaler.py', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('skimage.data' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"  # scikit-image's images are never loaded
    weights = tmp_path / DEMO_UPSCALER.name
    upscaler = load_upscaler(resolve_sr_weights(AppConfig(model="demo", sr_weights=weights)), "cpu")
    assert upscaler.arch.kind == "SRVGGNetCompact"
    assert json.loads((tmp_path / "training.json").read_text())["summary"]["steps"] == 3


# ----------------------------------------------------------------------------- the manager path


def test_odd_sizes_grey_and_metadata(sr_manager, tmp_path):
    cases = [((23, 37, 3), "RGB"), ((3, 5, 3), "RGB"), ((9, 1, 3), "RGB"), ((17, 13, 1), "L")]
    for (height, width, channels), mode in cases:
        path = save(tmp_path / f"{width}x{height}.png", noise(height, width, channels))
        result = sr_manager.upscale(UpscaleRequest(image=str(path)))
        image = result.images[0]
        assert image.size == (2 * width, 2 * height) and image.mode == mode
        assert result.seeds == [None] and result.nsfw == [False]
        text, record = read_png_metadata(result.files[0])
        assert f"Size: {2 * width}x{2 * height}" in text
        assert "Postprocess upscale by: 2, Postprocess upscaler: tiny_x2" in text
        assert record["tab"] == "upscale" and record["source_width"] == width
        assert record["upscaler_weights"] == "--sr-weights" and record["tile_size_used"] == 0


def test_sixteen_bit_and_pil_inputs_through_the_manager(sr_manager, tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "grey16.png"), noise(11, 7, 1, dtype=np.uint16))
    result = sr_manager.upscale(UpscaleRequest(image=tmp_path / "grey16.png"))
    assert result.images[0].size == (14, 22)
    assert result.metadata[0]["source_bit_depth"] == 16
    result = sr_manager.upscale(UpscaleRequest(image=Image.fromarray(noise(10, 12))))
    assert result.images[0].size == (24, 20)


def test_rgba_alpha_is_upscaled_too(tiny_config, tmp_path):
    manager = PipelineManager(replace(tiny_config, offline=True))  # no --sr-weights: the bundled demo
    rgba = noise(32, 48, 4)
    rgba[..., 3] = np.linspace(0, 255, 48).astype(np.uint8)[None, :]  # horizontal alpha ramp
    result = manager.upscale(UpscaleRequest(image=save(tmp_path / "ramp.png", rgba)))
    image = result.images[0]
    assert image.mode == "RGBA" and image.size == (96, 64)
    assert result.metadata[0]["upscaler_weights"] == "bundled demo"
    alpha = np.asarray(image.getchannel("A"), float)
    expected = np.asarray(Image.fromarray(rgba[..., 3]).resize((96, 64), Image.Resampling.BICUBIC), float)
    assert np.abs(alpha - expected)[:, 4:-4].mean() < 3  # the ramp survives (edges are zero-padded)

    rgba[..., 3] = 200  # constant alpha stays exactly constant
    image = manager.upscale(UpscaleRequest(image=save(tmp_path / "flat.png", rgba))).images[0]
    assert set(np.unique(np.asarray(image.getchannel("A")))) == {200}


def test_limits_and_corrupt_files_through_the_manager(tiny_config, rrdb_files, tmp_path):
    manager = PipelineManager(replace(tiny_config, sr_weights=rrdb_files[2], max_upscale_pixels=1000))
    with pytest.raises(ValueError, match="the limit is 1,000 pixels"):
        manager.upscale(UpscaleRequest(image=save(tmp_path / "big.png", noise(30, 40))))
    with pytest.raises(ValueError, match="is 60000x60000"):
        manager.upscale(UpscaleRequest(image=bomb_png(tmp_path / "bomb.png", 60_000, 60_000)))
    data = save(tmp_path / "ok.png", noise(20, 20)).read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        manager.upscale(UpscaleRequest(image=tmp_path / "cut.png"))
    with pytest.raises(ValueError, match="tile_size must be 0 .automatic. or 32-4096 pixels, got 16"):
        manager.upscale(UpscaleRequest(image=tmp_path / "ok.png", tile_size=16))
    # ... and the next job is served.
    assert manager.upscale(UpscaleRequest(image=tmp_path / "ok.png")).images[0].size == (40, 40)


def test_out_of_memory_retries_with_half_the_tile(sr_manager, tmp_path, caplog):
    path = save(tmp_path / "in.png", noise(100, 150))
    upscaler = get_upscaler(sr_manager)
    shapes = []

    def fail_once(module, args, output):
        shapes.append(tuple(args[0].shape[-2:]))
        if len(shapes) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

    handle = upscaler.engine.model.register_forward_hook(fail_once)
    try:
        with caplog.at_level(logging.WARNING, logger="pipelines.upscale"):
            result = sr_manager.upscale(UpscaleRequest(image=path, tile_size=128, tile_pad=10))
    finally:
        handle.remove()
    assert result.warnings[0] == "ran out of memory with tile 128 px; retried with tile 64 px"
    assert "retried with tile 64 px (OutOfMemoryError: CUDA out of memory" in caplog.text
    assert result.metadata[0]["tile_size"] == 128 and result.metadata[0]["tile_size_used"] == 64
    assert max(shapes[0]) > 84 and all(max(s) <= 64 + 2 * 10 for s in shapes[1:])
    reference = sr_manager.upscale(UpscaleRequest(image=path, tile_size=64, tile_pad=10))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(reference.images[0]))


def test_out_of_memory_untiled_then_gives_up_at_the_smallest_tile(sr_manager, tmp_path):
    from ui.common import is_out_of_memory

    path = save(tmp_path / "in.png", noise(100, 150))
    upscaler = get_upscaler(sr_manager)
    shapes = []

    def always(module, args, output):
        shapes.append(tuple(args[0].shape[-2:]))
        raise RuntimeError("CUDA out of memory (injected by the test)")

    handle = upscaler.engine.model.register_forward_hook(always)
    try:
        with pytest.raises(UpscaleOutOfMemory, match="out of memory even with 64 px tiles") as info:
            sr_manager.upscale(UpscaleRequest(image=path, tile_size=0))
    finally:
        handle.remove()
    assert is_out_of_memory(info.value)  # the tab shows its out-of-memory message
    # untiled (160x110 after RealESRGANer's pre-pad), then 80, then 64: one failed forward each
    assert shapes == [(110, 160), (90, 90), (74, 74)]


def test_other_errors_are_not_retried(sr_manager, tmp_path):
    upscaler = get_upscaler(sr_manager)
    calls = []

    def broken(module, args, output):
        calls.append(1)
        raise RuntimeError("shape mismatch (injected by the test)")

    handle = upscaler.engine.model.register_forward_hook(broken)
    try:
        with pytest.raises(RuntimeError, match="shape mismatch"):
            sr_manager.upscale(UpscaleRequest(image=save(tmp_path / "in.png", noise(20, 20))))
    finally:
        handle.remove()
    assert calls == [1]


def test_progress_per_tile_and_cancel(sr_manager, tmp_path):
    path = save(tmp_path / "in.png", noise(100, 150))
    reports = []
    control = JobControl(progress=lambda done, total, desc: reports.append((done, total)))
    sr_manager.upscale(UpscaleRequest(image=path, tile_size=64, tile_pad=10), control)
    # 160x110 after the pre-pad: 3 x 2 tiles
    assert reports == [(0, 6), (1, 6), (2, 6), (3, 6), (4, 6), (5, 6), (6, 6)]

    before = output_files(sr_manager)
    cancelled = JobControl()
    cancelled.progress = lambda done, total, desc: cancelled.cancel() if done == 2 else None
    with pytest.raises(GenerationCancelled):
        sr_manager.upscale(UpscaleRequest(image=path, tile_size=64), cancelled)
    assert output_files(sr_manager) == before  # nothing delivered
    assert not sr_manager.device_lock.locked()


def test_upscaler_is_loaded_once_per_manager(sr_manager, tmp_path):
    path = save(tmp_path / "in.png", noise(8, 8))
    sr_manager.upscale(UpscaleRequest(image=path))
    first = sr_manager._upscaler
    sr_manager.upscale(UpscaleRequest(image=path))
    assert sr_manager._upscaler is first and first is get_upscaler(sr_manager)


# ----------------------------------------------------------------------------- the tab


def test_image_to_send():
    from ui.upscale_tab import image_to_send

    gallery = [("/cache/a/1.png", "seed 1"), ("/cache/a/2.png", "seed 2")]
    assert image_to_send("/cache/b/2.png", gallery) == "/cache/b/2.png"  # clicked, still shown
    assert image_to_send("/old/9.png", gallery) == "/cache/a/1.png"  # stale click: the first shown
    assert image_to_send(None, gallery) == "/cache/a/1.png"
    assert image_to_send("/x/3.png", None) == "/x/3.png"
    assert image_to_send(None, []) is None


def test_tab_layout_and_api(sr_manager):
    import gradio as gr

    import ui
    from ui.upscale_tab import SEND_LABEL, upscale_target

    app = ui.build_app(sr_manager)
    blocks = list(app.blocks.values())
    tab = next(b for b in blocks if isinstance(b, gr.Tab) and b.id == "upscale")
    assert tab.label == "Upscale 2x"
    send = next(b for b in blocks if isinstance(b, gr.Button) and b.value == SEND_LABEL)
    gallery = next(b for b in blocks if isinstance(b, gr.Gallery))
    assert send.parent is gallery.parent  # under the Text to image gallery
    assert isinstance(gallery.parent.parent, gr.Row)  # the Column's own parent is restored
    assert isinstance(upscale_target(app.sdstudio_context), gr.Image)
    config = app.get_config_file()
    layout_ids = json.dumps(config["layout"])
    assert str(send._id) in layout_ids  # the button is part of the rendered page
    info = app.get_api_info()
    params = [p["parameter_name"] for p in info["named_endpoints"]["/upscale"]["parameters"]]
    assert params == ["image", "tile_size", "tile_pad"]
    assert not any("send" in name for name in info["named_endpoints"])


def test_send_to_upscale_from_another_tab_gallery(sr_manager, tmp_path):
    """The helper another tab (Large canvas) uses: a button under its gallery, wired to the Upscale tab."""
    import gradio as gr

    from ui.common import UIContext
    from ui.txt2img_tab import gallery_with_selection
    from ui.upscale_tab import SEND_LABEL, add_send_to_upscale, build_upscale_tab_section

    ctx = UIContext(manager=sr_manager)
    with gr.Blocks() as app:
        with gr.Tabs() as tabs:
            with pytest.raises(RuntimeError, match="build the Upscale 2x tab before"):
                add_send_to_upscale(ctx, tabs, None)
            with gr.Tab("Text to image", id="txt2img"):
                with gr.Column():
                    t2i = gallery_with_selection("Images")
            target = build_upscale_tab_section(ctx, tabs, t2i)
            with gr.Tab("Large canvas", id="canvas") as canvas_tab:
                with gr.Column() as canvas_column:
                    canvas = gallery_with_selection("Canvas")
                    gr.Markdown("below the gallery")
            button = add_send_to_upscale(ctx, tabs, canvas)
    assert button.parent is canvas_column and canvas_column.children[-1] is button
    assert canvas_column.parent is canvas_tab  # the layout link is restored after re-entering
    sends = [b for b in app.blocks.values() if isinstance(b, gr.Button) and b.value == SEND_LABEL]
    assert len(sends) == 2
    dependency = next(d for d in app.fns.values() if d.targets and d.targets[0][0] == button._id)
    assert [c._id for c in dependency.inputs] == [canvas.selected._id, canvas.gallery._id]
    assert [c._id for c in dependency.outputs] == [target._id, tabs._id]
    shown = [(str(tmp_path / "1.png"), "seed 1")]
    path, tab_update = dependency.fn(str(tmp_path / "1.png"), shown)
    assert path == str(tmp_path / "1.png") and tab_update.selected == "upscale"
    with pytest.raises(gr.Error, match="no image to send yet"):
        dependency.fn(None, [])


def test_upscale_endpoint_with_gradio_client(sr_manager, tmp_path):
    from gradio_client import Client, handle_file

    import ui

    app = ui.build_app(sr_manager)
    app.queue(default_concurrency_limit=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, ssr_mode=False,
               allowed_paths=[str(Path(sr_manager.config.output_dir).resolve())], show_error=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        path = save(tmp_path / "in.png", noise(21, 33))
        (before, after), file, parameters, notice = client.predict(
            image=handle_file(str(path)), tile_size=0, tile_pad=10, api_name="/upscale")
        with Image.open(file) as im:
            assert im.size == (66, 42)
            assert "Postprocess upscale by: 2" in im.info["parameters"]  # the guarded PNG itself
        assert Image.open(before["path"] if isinstance(before, dict) else before).size == (66, 42)
        assert "33x21 → 66x42" in notice and "Postprocess upscaler: tiny_x2" in parameters

        data = path.read_bytes()
        (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
        with pytest.raises(Exception, match="truncated or corrupt"):
            client.predict(image=handle_file(str(tmp_path / "cut.png")), tile_size=0, tile_pad=10,
                           api_name="/upscale")
        with pytest.raises(Exception, match="tile_size must be a whole number, got 12.5"):
            client.predict(image=handle_file(str(path)), tile_size=12.5, tile_pad=10, api_name="/upscale")
        # still serving
        assert client.predict(image=handle_file(str(path)), tile_size=64, tile_pad=10, api_name="/upscale")[1]
    finally:
        app.close()


def test_env_offline_is_respected(monkeypatch):
    from pipelines.upscale import is_offline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_offline(AppConfig(model="demo"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert not is_offline(AppConfig(model="demo")) and is_offline(AppConfig(model="demo", offline=True))
    assert os.environ.get("HF_HUB_OFFLINE") is None
