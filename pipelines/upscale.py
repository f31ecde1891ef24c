"""Upscale 2x: Real-ESRGAN super-resolution of any image a user brings.

Real-ESRGAN (Wang et al. 2021, arXiv 2107.10833) through the ``realesrgan`` package's
``RealESRGANer``, wrapping basicsr's ``RRDBNet`` in the RealESRGAN_x2plus configuration
(23 blocks, 64 features, 32 growth channels, scale 2) for the official or user weights,
or the bundled demo upscaler (a small ``SRVGGNetCompact``) when no other weights exist.

``run_upscale`` is written like a diffusers ``__call__``:

    1. Check inputs     decode the file safely: format, pixel limit before decoding,
                        decompression bombs, truncated or corrupt data, EXIF orientation
    2. Prepare engine   weights: --sr-weights, else the cache, else a download, else the demo;
                        loaded weights-only, once per manager
    3. Upscale          RealESRGANer's pre-pad and crop around our tiled forward pass, which
                        retries with half the tile on out-of-memory; alpha goes through the
                        network too
    4. Deliver          through the output guard, like every image of the studio

Why our own tile loop instead of ``RealESRGANer.tile_process``: the upstream loop prints,
swallows ``RuntimeError`` (an out-of-memory tile then reuses the previous tile's pixels) and
cannot report progress or be cancelled. Ours names every coordinate like upstream's, returns
a new tensor, and raises.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import pickle
import re
import struct
import tempfile
import urllib.request
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .config import ASSETS, AppConfig
from .progress import JobControl
from .requests import UpscaleRequest
from .results import GenerationResult

log = logging.getLogger(__name__)

SCALE = 2
MIN_TILE = 64  # the out-of-memory retry halves the tile down to this size, then gives up
PRE_PAD = 10  # RealESRGANer's reflect pre-padding of the right and bottom edges
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")
OFFICIAL_X2PLUS_NAME = "RealESRGAN_x2plus.pth"
OFFICIAL_X2PLUS_URL = "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth"
DOWNLOAD_TIMEOUT_S = 30
DEMO_UPSCALER = ASSETS / "demo-upscaler" / "demo-upscaler-x2.safetensors"
ARCH_METADATA_KEY = "sdstudio_arch"
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors")
# Automatic tiles: the whole image when it fits the memory budget, else the largest of these.
TILE_LADDER = (2048, 1536, 1024, 768, 512, 384, 256, 192, 128, 64)
CPU_BUDGET_MAX = 2 << 30
CUDA_BUDGET_FRACTION = 0.5
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as cv2's RGB2GRAY


class UpscalerWeightsError(ValueError):
    """The upscaler weights are missing, unreadable, unsafe or not an x2 network."""


class UpscaleOutOfMemory(RuntimeError):
    """Out of memory even with the smallest tile; the message says so (the UI maps it)."""


# ----------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class SRArchitecture:
    """Which basicsr/realesrgan network a weights file holds, and its constructor arguments.

    ``kind`` is ``RRDBNet`` (basicsr; ESRGAN's generator, Wang et al. 2018, arXiv 1809.00219)
    or ``SRVGGNetCompact`` (realesrgan's compact VGG-style network).
    """

    kind: str
    options: dict = field(default_factory=dict, hash=False)

    @property
    def scale(self) -> int:
        return int(self.options["scale"] if self.kind == "RRDBNet" else self.options["upscale"])

    def build(self) -> torch.nn.Module:
        """A freshly initialised network of this architecture."""
        if self.kind not in ("RRDBNet", "SRVGGNetCompact"):
            raise UpscalerWeightsError(f"unknown upscaler architecture {self.kind!r} (known: RRDBNet, SRVGGNetCompact)")
        from .compat import install_functional_tensor_shim

        install_functional_tensor_shim()  # basicsr's package import needs it (pipelines/compat.py)
        if self.kind == "RRDBNet":
            from basicsr.archs.rrdbnet_arch import RRDBNet

            return RRDBNet(**self.options)
        from realesrgan.archs.srvgg_arch import SRVGGNetCompact

        return SRVGGNetCompact(**self.options)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "options": self.options}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SRArchitecture":
        data = json.loads(text)
        return cls(str(data["kind"]), dict(data["options"]))

    def describe(self) -> str:
        o = self.options
        if self.kind == "RRDBNet":
            return f"RRDBNet x{o['scale']}, {o['num_block']} blocks, {o['num_feat']} features"
        return f"SRVGGNetCompact x{o['upscale']}, {o['num_conv']} convs, {o['num_feat']} features"

    def activation_bytes_per_pixel(self, element_size: int) -> int:
        """Rough peak activation memory per input pixel, for choosing an automatic tile.

        RRDBNet x2 runs its body at half resolution but its last three convolutions on
        ``num_feat`` channels at the output resolution (4 pixels per input pixel); the
        compact network stays at the input resolution. 1.5x headroom for the allocator.
        """
        o = self.options
        if self.kind == "RRDBNet":
            output_res = 3 * o["num_feat"] * o["scale"] ** 2
            body = (3 * o["num_feat"] + 4 * o["num_grow_ch"]) // {2: 4, 1: 16}.get(o["scale"], 1)
            elements = max(output_res, body)
        else:
            elements = 3 * o["num_feat"] + 4 * 3 * o["upscale"] ** 2
        return int(elements * element_size * 1.5)


# The official RealESRGAN_x2plus generator.
X2PLUS = SRArchitecture("RRDBNet", dict(num_in_ch=3, num_out_ch=3, scale=2, num_feat=64, num_block=23, num_grow_ch=32))


def _conv_shape(state: dict, key: str) -> tuple[int, ...]:
    tensor = state.get(key)
    if tensor is None or tensor.ndim != 4:
        raise UpscalerWeightsError(f"expected a convolution weight '{key}' in the upscaler weights")
    return tuple(tensor.shape)


def infer_architecture(state: dict) -> SRArchitecture:
    """The architecture of a state dict, read from its tensor shapes.

    Raises:
        UpscalerWeightsError: the keys match neither RRDBNet nor SRVGGNetCompact.
    """
    if "conv_first.weight" in state and "conv_last.weight" in state:
        num_feat, in_channels = _conv_shape(state, "conv_first.weight")[:2]
        num_out_ch = _conv_shape(state, "conv_last.weight")[0]
        # RRDBNet pixel-unshuffles its input: x2 sees 4x the channels, x1 16x, x4 none.
        scales = {num_out_ch * 4: 2, num_out_ch * 16: 1, num_out_ch: 4}
        if in_channels not in scales:
            raise UpscalerWeightsError(f"RRDBNet weights with {in_channels} input channels are not supported")
        blocks = {int(k.split(".")[1]) for k in state if k.startswith("body.") and ".rdb1." in k}
        num_grow_ch = _conv_shape(state, "body.0.rdb1.conv1.weight")[0] if blocks else 32
        return SRArchitecture("RRDBNet", dict(num_in_ch=num_out_ch, num_out_ch=num_out_ch, scale=scales[in_channels],
                                              num_feat=num_feat, num_block=len(blocks), num_grow_ch=num_grow_ch))
    if "body.0.weight" in state:
        convs = sorted(int(k.split(".")[1]) for k, v in state.items()
                       if k.startswith("body.") and k.endswith(".weight") and v.ndim == 4)
        num_feat, num_in_ch = _conv_shape(state, "body.0.weight")[:2]
        last_out = _conv_shape(state, f"body.{convs[-1]}.weight")[0]
        upscale = math.isqrt(last_out // num_in_ch)
        if upscale * upscale * num_in_ch != last_out:
            raise UpscalerWeightsError(f"SRVGGNetCompact weights end in {last_out} channels, not a square scale")
        if "body.1.weight" not in state:
            raise UpscalerWeightsError(
                "SRVGGNetCompact weights without PReLU parameters: the activation cannot be read from the shapes; "
                f"save them as .safetensors with '{ARCH_METADATA_KEY}' metadata"
            )
        return SRArchitecture("SRVGGNetCompact", dict(num_in_ch=num_in_ch, num_out_ch=num_in_ch, num_feat=num_feat,
                                                      num_conv=len(convs) - 2, upscale=upscale, act_type="prelu"))
    raise UpscalerWeightsError("the weights are neither a Real-ESRGAN RRDBNet nor an SRVGGNetCompact state dict")


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class SRWeights:
    """A weights file and where it came from (``--sr-weights``, cache, download, bundled demo)."""

    path: Path
    origin: str

    @property
    def is_demo(self) -> bool:
        return self.origin == "bundled demo"

    @property
    def name(self) -> str:
        if self.is_demo:
            return "SD Studio demo upscaler"
        return self.path.stem


def sr_cache_dir(config: AppConfig) -> Path:
    """``--sr-cache-dir``, else ``~/.cache/sdstudio``."""
    return Path(config.sr_cache_dir).expanduser() if config.sr_cache_dir else Path.home() / ".cache" / "sdstudio"


def is_offline(config: AppConfig) -> bool:
    """--offline, or HF_HUB_OFFLINE=1 as the model loader reads it."""
    return config.offline or os.environ.get("HF_HUB_OFFLINE") == "1"


def download_official_x2plus(target: Path, url: str = OFFICIAL_X2PLUS_URL) -> None:
    """Download the official RealESRGAN_x2plus release file to ``target`` (atomically: a failed
    download leaves nothing behind)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_sr_weights(config: AppConfig,
                       download: Callable[[Path], None] = download_official_x2plus) -> SRWeights:
    """Which weights Upscale 2x uses, in this order:

    1. ``--sr-weights PATH`` (``.pth`` / ``.pt`` / ``.safetensors``); an error if it is missing;
    2. ``RealESRGAN_x2plus.pth`` in the cache directory;
    3. when online, a download of the official release file into that cache;
    4. the bundled demo upscaler.
    """
    if config.sr_weights is not None:
        path = Path(config.sr_weights).expanduser()
        if not path.is_file():
            raise UpscalerWeightsError(f"sr_weights file '{path}' does not exist")
        if path.suffix.lower() not in WEIGHT_SUFFIXES:
            raise UpscalerWeightsError(
                f"sr_weights must be a {', '.join(WEIGHT_SUFFIXES)} file, got '{path.name}'"
            )
        return SRWeights(path, "--sr-weights")
    cached = sr_cache_dir(config) / OFFICIAL_X2PLUS_NAME
    if cached.is_file():
        return SRWeights(cached, "cache")
    if not is_offline(config):
        try:
            download(cached)
            return SRWeights(cached, "download")
        except OSError as exc:  # URLError, timeouts and disk errors are all OSError
            log.warning("could not download %s (%s); using the bundled demo upscaler", OFFICIAL_X2PLUS_NAME, exc)
    if not DEMO_UPSCALER.is_file():
        raise UpscalerWeightsError(
            f"no upscaler weights: pass --sr-weights PATH or put {OFFICIAL_X2PLUS_NAME} in {cached.parent}"
        )
    return SRWeights(DEMO_UPSCALER, "bundled demo")


def describe_weight_choice(config: AppConfig) -> str:
    """What :func:`resolve_sr_weights` will pick, without downloading or loading anything."""
    if config.sr_weights is not None:
        return f"your weights `{Path(config.sr_weights).name}` (--sr-weights)"
    cached = sr_cache_dir(config) / OFFICIAL_X2PLUS_NAME
    if cached.is_file():
        return f"the official RealESRGAN_x2plus weights from `{cached}`"
    demo = ("the bundled **demo upscaler** (a small network trained by this project on a few sample "
            "images; pass --sr-weights RealESRGAN_x2plus.pth for the real one)")
    if is_offline(config):
        return demo
    return (f"the official RealESRGAN_x2plus weights, downloaded into `{cached.parent}` on first use "
            f"(if that fails: {demo})")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_sr_state(path: Path) -> tuple[dict, SRArchitecture]:
    """Read a weights file without running any code from it.

    ``.safetensors``: tensors plus the architecture from the ``sdstudio_arch`` metadata when
    present; ``.pth``: ``torch.load(weights_only=True)`` of ``params_ema``, else ``params``,
    else a bare state dict. Otherwise the architecture is read from the tensor shapes.
    """
    path = Path(path)
    arch = None
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            state = {}
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                for key in f.keys():
                    state[key] = f.get_tensor(key)
            if ARCH_METADATA_KEY in metadata:
                arch = SRArchitecture.from_json(metadata[ARCH_METADATA_KEY])
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise UpscalerWeightsError(f"sr_weights '{path}' holds a {type(loaded).__name__}, not a state dict")
            state = loaded.get("params_ema") or loaded.get("params") or loaded
    except UpscalerWeightsError:
        raise
    except pickle.UnpicklingError as exc:
        # torch.load(weights_only=True) refuses any pickle that would import or call code.
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        raise UpscalerWeightsError(
            f"sr_weights '{path}' could not be read: it needs to run code to load "
            f"({'it refers to ' + found.group(1) if found else type(exc).__name__}); only plain tensors are "
            "accepted: convert it to .safetensors from a trusted source"
        ) from None
    except Exception as exc:  # safetensors, zip and I/O errors have no common base; all mean "unreadable"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UpscalerWeightsError(f"sr_weights '{path}' could not be read: {first}") from None
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UpscalerWeightsError(f"sr_weights '{path}' is not a state dict of tensors")
    return state, arch or infer_architecture(state)


def save_sr_weights(path: Path, network: torch.nn.Module, arch: SRArchitecture, metadata: dict | None = None) -> Path:
    """Write ``network``'s weights as ``.safetensors`` with the architecture in the metadata."""
    from safetensors.torch import save_file

    meta = {ARCH_METADATA_KEY: arch.to_json(), **{k: str(v) for k, v in (metadata or {}).items()}}
    state = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    return path


# ----------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class TileBox:
    """One tile: where it reads the input (with padding) and where its output goes.

    Names follow Real-ESRGAN's ``tile_process``: ``input_*`` on the input image, ``*_pad``
    including the context padding, ``output_*`` on the output image and ``output_*_tile``
    inside the tile's own output.
    """

    input_start_x: int
    input_end_x: int
    input_start_y: int
    input_end_y: int
    input_start_x_pad: int
    input_end_x_pad: int
    input_start_y_pad: int
    input_end_y_pad: int
    output_start_x: int
    output_end_x: int
    output_start_y: int
    output_end_y: int
    output_start_x_tile: int
    output_end_x_tile: int
    output_start_y_tile: int
    output_end_y_tile: int


def tile_boxes(height: int, width: int, tile: int, pad: int, scale: int = SCALE, align: int = 2) -> list[TileBox]:
    """Cover a ``height`` x ``width`` image with ``tile`` x ``tile`` tiles, each read with ``pad``
    pixels of context (0 = one tile). The padded window is widened to multiples of ``align``
    (RRDBNet x2 pixel-unshuffles its input) without leaving the image."""
    if tile <= 0:
        tile = max(height, width)
    boxes = []
    for y in range(math.ceil(height / tile)):
        for x in range(math.ceil(width / tile)):
            input_start_x = x * tile
            input_end_x = min(input_start_x + tile, width)
            input_start_y = y * tile
            input_end_y = min(input_start_y + tile, height)
            input_start_x_pad = max(input_start_x - pad, 0) // align * align
            input_end_x_pad = min(-(-min(input_end_x + pad, width) // align) * align, width)
            input_start_y_pad = max(input_start_y - pad, 0) // align * align
            input_end_y_pad = min(-(-min(input_end_y + pad, height) // align) * align, height)
            output_start_x_tile = (input_start_x - input_start_x_pad) * scale
            output_start_y_tile = (input_start_y - input_start_y_pad) * scale
            boxes.append(TileBox(
                input_start_x, input_end_x, input_start_y, input_end_y,
                input_start_x_pad, input_end_x_pad, input_start_y_pad, input_end_y_pad,
                input_start_x * scale, input_end_x * scale, input_start_y * scale, input_end_y * scale,
                output_start_x_tile, output_start_x_tile + (input_end_x - input_start_x) * scale,
                output_start_y_tile, output_start_y_tile + (input_end_y - input_start_y) * scale,
            ))
    return boxes


def choose_tile_size(height: int, width: int, tile_pad: int, bytes_per_pixel: int, budget_bytes: int) -> int:
    """0 (no tiling) when the whole image fits ``budget_bytes``, else the largest ladder tile that
    does, else the smallest tile (:data:`MIN_TILE`)."""
    if height * width * bytes_per_pixel <= budget_bytes:
        return 0
    for tile in TILE_LADDER:
        if tile < max(height, width) and (tile + 2 * tile_pad) ** 2 * bytes_per_pixel <= budget_bytes:
            return tile
    return MIN_TILE


def memory_budget_bytes(device: str) -> int:
    """Activation memory an automatic tile may use: half the free GPU memory, or a quarter
    of the available RAM (at most 2 GiB) on the CPU."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info()
        return int(free * CUDA_BUDGET_FRACTION)
    import psutil

    return int(min(CPU_BUDGET_MAX, psutil.virtual_memory().available // 4))


def tile_forward(model: torch.nn.Module, image: torch.Tensor, tile: int, tile_pad: int,
                 on_tile: Callable[[int, int], None] | None = None, scale: int = SCALE) -> torch.Tensor:
    """Run ``model`` on ``image`` (N, C, H, W) tile by tile; returns a new (N, C, sH, sW) tensor.

    Each tile is read with ``tile_pad`` pixels of context on every side and only its
    centre is kept, so a network whose receptive field is within the padding gives the
    same pixels as one untiled pass. ``on_tile(i, n)`` runs before tile ``i`` of ``n``
    (progress and cancel).
    """
    _, _, height, width = image.shape
    boxes = tile_boxes(height, width, tile, tile_pad, scale)
    output = None
    for index, box in enumerate(boxes):
        if on_tile is not None:
            on_tile(index, len(boxes))
        input_tile = image[:, :, box.input_start_y_pad:box.input_end_y_pad, box.input_start_x_pad:box.input_end_x_pad]
        with torch.no_grad():
            output_tile = model(input_tile)
        if output is None:
            output = image.new_zeros((image.shape[0], output_tile.shape[1], height * scale, width * scale))
        tile_centre = output_tile[:, :, box.output_start_y_tile:box.output_end_y_tile,
                                  box.output_start_x_tile:box.output_end_x_tile]
        output[:, :, box.output_start_y:box.output_end_y, box.output_start_x:box.output_end_x] = tile_centre
    return output


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS out-of-memory errors and failed CPU allocations."""
    text = str(exc).lower()
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text


def free_device_memory(device: str) -> None:
    """Return cached GPU blocks after an out-of-memory error (nothing to do on the CPU)."""
    if device.startswith("cuda"):
        import gc

        gc.collect()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- input images


@dataclass
class SourceImage:
    """A decoded input: float32 pixels in [0, 1], shape (H, W, C) with C = 1 (L), 3 (RGB) or 4 (RGBA)."""

    pixels: np.ndarray
    mode: str
    bit_depth: int
    name: str
    format: str
    parameters: str | None = None

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


def png_header(data: bytes) -> tuple[int, int, int, int] | None:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk, or None if not a PNG."""
    if len(data) < 29 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return None
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    return width, height, bit_depth, color_type


def apply_exif_orientation(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Turn (H, W, C) pixels upright for EXIF orientation 1-8, as ``PIL.ImageOps.exif_transpose``."""
    transforms = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirrored
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1],  # flipped
        5: lambda a: np.swapaxes(a, 0, 1),  # transposed
        6: lambda a: np.rot90(a, -1),  # rotated 90 clockwise
        7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],  # transversed
        8: lambda a: np.rot90(a, 1),  # rotated 90 counter-clockwise
    }
    return np.ascontiguousarray(transforms.get(orientation, transforms[1])(pixels))


def pil_to_pixels(im: Image.Image) -> tuple[np.ndarray, str, int]:
    """(float32 (H, W, C) pixels in [0, 1], mode L/RGB/RGBA, bit depth) of a loaded PIL image."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(im).astype(np.float32)
        return (np.clip(values, 0, 65535) / 65535.0)[..., None], "L", 16
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    elif mode == "1":
        im = im.convert("L")
    elif mode not in ("L", "RGB", "RGBA"):
        im = im.convert("RGB")
    pixels = np.asarray(im).astype(np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return pixels, im.mode, 8


def _decode_png16(data: bytes) -> np.ndarray:
    """A 16-bit PNG at full precision via OpenCV (PIL reduces 16-bit colour to 8 bits)."""
    import cv2

    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise OSError("OpenCV could not decode the 16-bit PNG")
    pixels = array.astype(np.float32) / (65535.0 if array.dtype == np.uint16 else 255.0)
    if pixels.ndim == 2:
        return pixels[..., None]
    if pixels.shape[2] == 2:  # grey + alpha
        grey, alpha = pixels[..., :1], pixels[..., 1:]
        return np.concatenate([grey, grey, grey, alpha], axis=2)
    order = [2, 1, 0, 3][: pixels.shape[2]]  # BGR(A) -> RGB(A)
    return pixels[..., order]


def _check_pixel_limit(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ValueError(
            f"image '{name}' is {width}x{height} = {width * height:,} pixels; the limit is "
            f"{max_pixels:,} pixels ({max_pixels / 1e6:g} megapixels, --max-upscale-pixels)"
        )


# Everything Pillow and OpenCV raise on truncated or corrupt data.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)


def load_input_image(image: Any, *, max_pixels: int) -> SourceImage:
    """Decode a PNG, JPEG or WebP file (path) or a PIL image for Upscale 2x.

    The pixel limit is checked from the header before any pixel is decoded, so a
    decompression bomb costs nothing. EXIF orientation is applied; 16-bit PNGs keep their
    precision; palette and grey+alpha images become RGB/RGBA.

    Raises:
        ValueError: naming the image when it is missing, not an accepted format, over the
            limit, or truncated/corrupt.
    """
    if isinstance(image, Image.Image):
        _check_pixel_limit("image", image.width, image.height, max_pixels)
        pixels, mode, depth = pil_to_pixels(image)
        orientation = image.getexif().get(0x0112, 1)
        return SourceImage(apply_exif_orientation(pixels, orientation), mode, depth, "image",
                           image.format or "PIL", image.info.get("parameters"))
    if not isinstance(image, (str, os.PathLike)):
        raise ValueError(f"image must be a PIL image or a file path, got {type(image).__name__}")
    path = Path(image)
    name = path.name
    if not path.is_file():
        raise ValueError(f"image file '{path}' does not exist")
    data = path.read_bytes()
    header = png_header(data)
    if header is not None:
        _check_pixel_limit(name, header[0], header[1], max_pixels)
    with warnings.catch_warnings():
        # Our own limit (checked next) is the one that applies; PIL's is module-global state.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise ValueError(
                f"image '{name}' declares more pixels than any image this studio accepts (a decompression bomb?); "
                f"the limit is {max_pixels:,} pixels"
            ) from None
        except UnidentifiedImageError:
            raise ValueError(
                f"image '{name}' is not a PNG, JPEG or WebP image (its contents are not an image)"
            ) from None
        if im.format not in INPUT_FORMATS:
            raise ValueError(f"image '{name}' must be PNG, JPEG or WebP, got {im.format}")
        _check_pixel_limit(name, im.width, im.height, max_pixels)
        try:
            im.load()
            if header is not None and header[2] == 16:
                pixels, depth = _decode_png16(data), 16
                mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[2]]
            else:
                pixels, mode, depth = pil_to_pixels(im)
        except DECODE_ERRORS as exc:
            raise ValueError(f"image '{name}' could not be decoded: the file is truncated or corrupt ({exc})") from None
    orientation = im.getexif().get(0x0112, 1)
    return SourceImage(apply_exif_orientation(pixels, orientation), mode, depth, name, im.format,
                       im.info.get("parameters"))


def pixels_to_image(pixels: np.ndarray, mode: str) -> Image.Image:
    """float (H, W, C) in [0, 1] -> an 8-bit PIL image of ``mode`` (L, RGB or RGBA)."""
    array = (np.clip(pixels, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if mode == "L":
        array = array[..., 0]
    return Image.fromarray(np.ascontiguousarray(array), mode)


def enlarged_original(image: Any, *, max_pixels: int) -> Image.Image:
    """The input enlarged 2x by pixel repetition: the "before" side of a before/after view."""
    source = load_input_image(image, max_pixels=max_pixels)
    size = (source.width * SCALE, source.height * SCALE)
    return pixels_to_image(source.pixels, source.mode).resize(size, Image.Resampling.NEAREST)


# ----------------------------------------------------------------------------- engine


def build_esrganer(network: torch.nn.Module, *, device: str, half: bool):
    """``RealESRGANer`` around an already-loaded network.

    Upstream's constructor reads the weights itself with ``torch.load`` from a path and
    cannot read ``.safetensors``; ours are loaded weights-only by :func:`load_sr_state`,
    so only the constructor is replaced. Pre-padding, mod-padding and cropping stay upstream's.
    """
    from .compat import import_realesrgan

    real_esrganer = import_realesrgan().RealESRGANer

    class LoadedESRGANer(real_esrganer):
        def __init__(self, model: torch.nn.Module):  # sets the attributes RealESRGANer.__init__ sets
            self.scale = SCALE
            self.tile_size = 0
            self.tile_pad = 0
            self.pre_pad = PRE_PAD
            self.mod_scale = None
            self.half = half
            self.device = torch.device(device)
            self.model = model.eval().to(self.device)
            if half:
                self.model = self.model.half()

    return LoadedESRGANer(network)


@dataclass
class UpscaleOutput:
    image: Image.Image
    tile_size_used: int
    warnings: list[str]


@dataclass
class Upscaler:
    """The loaded engine: a ``RealESRGANer``, its architecture and the weights it came from."""

    engine: Any
    arch: SRArchitecture
    weights: SRWeights
    weights_sha256: str
    device: str

    @property
    def half(self) -> bool:
        return bool(self.engine.half)

    @property
    def dtype(self) -> str:
        return "fp16" if self.half else "fp32"

    def describe(self) -> str:
        return f"{self.weights.name} ({self.arch.describe()}; {self.weights.origin}; {self.device} {self.dtype})"

    def _forward(self, pixels: np.ndarray, tile: int, tile_pad: int, on_tile) -> np.ndarray:
        """One RGB pass: RealESRGANer pre-pad -> tiled forward -> RealESRGANer crop."""
        engine = self.engine
        height, width = pixels.shape[:2]
        # Reflect padding needs the image larger than the pad; edge-extend tiny inputs first.
        grow_y, grow_x = max(0, PRE_PAD + 1 - height), max(0, PRE_PAD + 1 - width)
        if grow_y or grow_x:
            pixels = np.pad(pixels, ((0, grow_y), (0, grow_x), (0, 0)), mode="edge")
        engine.pre_process(pixels)
        engine.output = tile_forward(engine.model, engine.img, tile, tile_pad, on_tile)
        output = engine.post_process()
        engine.img = engine.output = None  # free device memory between passes
        output = output[0, :, : height * SCALE, : width * SCALE].float().clamp_(0, 1).cpu().numpy()
        return np.transpose(output, (1, 2, 0))

    def upscale_rgb(self, passes: list[np.ndarray], *, tile_size: int, tile_pad: int,
                    control: JobControl) -> tuple[list[np.ndarray], int, list[str]]:
        """Upscale each (H, W, 3) array of ``passes``; on out-of-memory retry with half the tile.

        Returns:
            (outputs, tile size used (0 = untiled), warnings for the user)
        """
        height, width = passes[0].shape[:2]
        tile = tile_size
        if tile == 0:
            element = 2 if self.half else 4
            tile = choose_tile_size(height + PRE_PAD, width + PRE_PAD, tile_pad,
                                    self.arch.activation_bytes_per_pixel(element), memory_budget_bytes(self.device))
        notes: list[str] = []
        while True:
            failed = None
            try:
                return self._run_passes(passes, tile, tile_pad, control), tile, notes
            except Exception as exc:  # only out-of-memory is handled; everything else propagates
                if not is_out_of_memory(exc):
                    raise
                failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            # Outside the except block, so the traceback's tensors can be freed.
            self.engine.img = self.engine.output = None
            free_device_memory(self.device)
            current = tile or max(height, width) + PRE_PAD
            if current <= MIN_TILE:
                raise UpscaleOutOfMemory(
                    f"out of memory even with {MIN_TILE} px tiles ({failed}); try a smaller image or another device"
                )
            smaller = max(MIN_TILE, current // 2)
            message = (f"ran out of memory with {'tile ' + str(tile) + ' px' if tile else 'the untiled image'}; "
                       f"retried with tile {smaller} px")
            log.warning("%s (%s)", message, failed)
            notes.append(message)
            tile = smaller

    def _run_passes(self, passes: list[np.ndarray], tile: int, tile_pad: int, control: JobControl) -> list[np.ndarray]:
        outputs, tiles = [], [1]
        for index, pixels in enumerate(passes):
            def on_tile(i, n, index=index):
                control.check_cancelled()
                tiles[0] = n
                control.report(index * n + i, len(passes) * n, f"upscaling tile {i + 1}/{n}")

            outputs.append(self._forward(pixels, tile, tile_pad, on_tile))
        control.report(len(passes) * tiles[0], len(passes) * tiles[0], "upscaled")
        return outputs

    def upscale(self, source: SourceImage, *, tile_size: int, tile_pad: int, control: JobControl) -> UpscaleOutput:
        """2x ``source``: colour through the network, alpha too (unless it is constant), grey as RGB."""
        pixels = source.pixels
        color = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels[..., :3]
        passes = [np.ascontiguousarray(color)]
        alpha = pixels[..., 3:4] if pixels.shape[2] == 4 else None
        alpha_constant = alpha is not None and float(alpha.min()) == float(alpha.max())
        if alpha is not None and not alpha_constant:
            passes.append(np.ascontiguousarray(np.repeat(alpha, 3, axis=2)))
        outputs, tile_used, notes = self.upscale_rgb(passes, tile_size=tile_size, tile_pad=tile_pad, control=control)
        out = outputs[0]
        if source.mode == "L":
            out = (out @ LUMA)[..., None]
        if alpha is not None:
            if alpha_constant:
                alpha_out = np.full(out.shape[:2] + (1,), float(alpha.flat[0]), np.float32)
            else:
                alpha_out = (outputs[1] @ LUMA)[..., None]
            out = np.concatenate([out, alpha_out], axis=2)
        return UpscaleOutput(pixels_to_image(out, source.mode), tile_used, notes)


def load_upscaler(weights: SRWeights, device: str) -> Upscaler:
    """Build the network the weights describe, load them strictly and wrap it in RealESRGANer.

    fp16 on CUDA, fp32 elsewhere.

    Raises:
        UpscalerWeightsError: unreadable weights, or a network that is not x2.
    """
    state, arch = load_sr_state(weights.path)
    if arch.scale != SCALE:
        raise UpscalerWeightsError(
            f"sr_weights '{weights.path}' is an x{arch.scale} {arch.kind}; Upscale 2x needs x2 weights "
            f"such as {OFFICIAL_X2PLUS_NAME}"
        )
    network = arch.build()
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UpscalerWeightsError(
            f"sr_weights '{weights.path}' do not fit {arch.describe()}: {str(exc).splitlines()[0]}"
        ) from None
    engine = build_esrganer(network, device=device, half=device.startswith("cuda"))
    upscaler = Upscaler(engine, arch, weights, _file_sha256(weights.path), device)
    log.info("upscaler: %s", upscaler.describe())
    return upscaler


def loaded_upscaler(manager) -> Upscaler | None:
    """The manager's upscaler if it has been loaded, else None (nothing is loaded here)."""
    return manager._upscaler


def get_upscaler(manager) -> Upscaler:
    """The manager's upscaler, loaded on first use and kept on ``manager._upscaler``."""
    if manager._upscaler is None:
        weights = resolve_sr_weights(manager.config)
        manager._upscaler = load_upscaler(weights, manager.info.device)
    return manager._upscaler


# ----------------------------------------------------------------------------- the capability


def run_upscale(manager, req: UpscaleRequest, control: JobControl) -> GenerationResult:
    """Upscale ``req.image`` 2x and deliver it through the output guard.

    Raises:
        ValueError: a bad field, or an image that is missing, too large, or corrupt.
        UpscalerWeightsError: the configured weights cannot be used.
        UpscaleOutOfMemory: out of memory even with the smallest tile.
        GenerationCancelled: the user cancelled between tiles.
    """
    # 1. Check inputs (before touching the device)
    req.check()
    source = load_input_image(req.image, max_pixels=manager.config.max_upscale_pixels)
    control.check_cancelled()

    with manager.device_lock:
        # 2. Prepare the engine (weights load once per manager)
        upscaler = get_upscaler(manager)

        # 3. Upscale
        output = upscaler.upscale(source, tile_size=req.tile_size, tile_pad=req.tile_pad, control=control)

        # 4. Deliver through the guard
        record = dict(
            prompt="",
            width=output.image.width,
            height=output.image.height,
            source_width=source.width,
            source_height=source.height,
            source_mode=source.mode,
            source_bit_depth=source.bit_depth,
            source_format=source.format,
            source_parameters=source.parameters,
            upscaler=upscaler.weights.name,
            upscaler_architecture=upscaler.arch.describe(),
            upscaler_weights=upscaler.weights.origin,
            upscaler_weights_sha256=upscaler.weights_sha256,
            tile_size=req.tile_size,
            tile_size_used=output.tile_size_used,
            tile_pad=req.tile_pad,
            dtype=upscaler.dtype,
            extra_parameters={"Postprocess upscale by": SCALE, "Postprocess upscaler": upscaler.weights.name},
        )
        guarded = manager.guard.deliver([output.image], [record], tab="upscale", client=control.client)
    return manager._result(guarded, [None] * len(guarded), output.warnings)
