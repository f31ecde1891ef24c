"""AppConfig: everything the studio is told at start, from flags with environment defaults.

Every flag ``--some-flag`` takes its default from the environment variable
``SDSTUDIO_SOME_FLAG`` when set, so a Space or a container is configured without
editing a command line.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEMO_MODEL = "demo"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_MODEL_DIR = ASSETS / "demo-model"
SD15_CONFIG_DIR = ASSETS / "sd15-config"
DEFAULT_WATERMARK = "SDStudio"
ENV_PREFIX = "SDSTUDIO_"


@dataclass(frozen=True)
class AppConfig:
    """What the studio runs and how. Built by :func:`config_from_args` or directly in Python."""

    model: str = DEFAULT_MODEL
    model_config: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    memory: str = "normal"
    host: str = "127.0.0.1"
    listen: bool = False
    port: int = 7860
    share: bool = False
    output_dir: Path = Path("outputs")
    save: bool = True
    safety_checker: bool = True
    safety_checker_path: str | None = None
    safety_adjustment: float = 0.0
    blocklist: Path | None = None
    watermark_text: str = DEFAULT_WATERMARK
    sr_weights: Path | None = None
    sr_cache_dir: Path | None = None
    max_upscale_pixels: int = 4_000_000
    max_canvas_side: int = 4096
    max_canvas_pixels: int = 4096 * 1024
    auth: tuple[str, ...] = ()
    auth_file: Path | None = None
    rate_limit: str | None = None
    max_queue: int = 16
    max_file_size: str = "20mb"
    mcp: bool = False
    compile: bool = False
    channels_last: bool = False
    attention_slicing: bool = False
    vae_tiling: bool = False
    cpu_offload: bool = False
    preview_every: int = 5
    offline: bool = False
    log_level: str = "INFO"
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("device", ("auto", "cuda", "mps", "cpu")),
            ("dtype", ("auto", "fp16", "bf16", "fp32")),
            ("memory", ("normal", "low")),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer 0-65535, got {self.port!r}")
        if not math.isfinite(self.safety_adjustment):
            raise ValueError(f"safety_adjustment must be a finite number, got {self.safety_adjustment!r}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {self.max_queue!r}")
        object.__setattr__(self, "output_dir", Path(self.output_dir))

    @property
    def server_name(self) -> str:
        return "0.0.0.0" if self.listen else self.host

    def resolve_device(self) -> str:
        """The torch device to run on: ``auto`` picks CUDA, then Apple MPS, then the CPU."""
        import torch

        if self.device != "auto":
            if self.device == "cuda" and not torch.cuda.is_available():
                raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
            if self.device == "mps" and not torch.backends.mps.is_available():
                raise ValueError("device 'mps' was asked for but torch sees no Apple MPS device")
            return self.device
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"

    def resolve_dtype(self, device: str):
        """The weights' dtype: ``auto`` is fp16 on a GPU and fp32 on the CPU."""
        import torch

        table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        if self.dtype != "auto":
            return table[self.dtype]
        return torch.float16 if device in ("cuda", "mps") else torch.float32

    @property
    def low_memory(self) -> bool:
        return self.memory == "low"


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has a bfloat16 path on this CPU (on x86 it needs AVX-512, and runs bf16
    natively with AVX512-BF16 or AMX). Without one, bf16 on the CPU is emulated: on a 2-core
    AVX2 EPYC bf16 autocast made a demo VAE training step 11.9x and a UNet step 17.7x slower
    than float32 (tools/bench_train_precision.py; docs/demo-model-experiments.md, session 30)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the private check: read the flags
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16", "bf16"))


def _env(name: str, default):
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def _env_bool(name: str) -> bool:
    return str(_env(name, "")).strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``app.py``; each default comes from ``SDSTUDIO_<FLAG>`` if set."""
    p = argparse.ArgumentParser(
        prog="app.py",
        description="SD Studio: text to image, 2x upscaling and large canvases for Stable Diffusion 1.x.",
        epilog="Every flag also reads an environment variable: --output-dir from SDSTUDIO_OUTPUT_DIR, and so on.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default=_env("model", DEFAULT_MODEL),
                   help="hub id, local diffusers folder, single .safetensors/.ckpt checkpoint, or 'demo' "
                        f"for the bundled demo model (default: {DEFAULT_MODEL}, falling back to the demo model offline)")
    m.add_argument("--model-config", default=_env("model_config", None),
                   help="diffusers config folder used to load a single-file checkpoint (default: the bundled SD 1.x config)")
    m.add_argument("--device", choices=["auto", "cuda", "mps", "cpu"], default=_env("device", "auto"),
                   help="where to run (auto: CUDA, then MPS, then CPU)")
    m.add_argument("--dtype", choices=["auto", "fp16", "bf16", "fp32"], default=_env("dtype", "auto"),
                   help="weights dtype (auto: fp16 on CUDA/MPS, fp32 on CPU)")
    m.add_argument("--memory", choices=["normal", "low"], default=_env("memory", "normal"),
                   help="low: attention slicing, VAE tiling, and model CPU offload on CUDA")
    m.add_argument("--offline", action="store_true", default=_env_bool("offline"),
                   help="never contact the model hub; use only local files and the cache")
    s = p.add_argument_group("speed")
    s.add_argument("--compile", action="store_true", default=_env_bool("compile"),
                   help="torch.compile the UNet (CUDA; the first image is slow)")
    s.add_argument("--channels-last", action="store_true", default=_env_bool("channels_last"),
                   help="channels_last memory format for the UNet and VAE")
    s.add_argument("--attention-slicing", action="store_true", default=_env_bool("attention_slicing"),
                   help="compute attention in slices (less memory, a little slower)")
    s.add_argument("--vae-tiling", action="store_true", default=_env_bool("vae_tiling"),
                   help="decode large images in VAE tiles")
    s.add_argument("--cpu-offload", action="store_true", default=_env_bool("cpu_offload"),
                   help="keep models on the CPU and move each to the GPU only while it runs (CUDA)")
    s.add_argument("--preview-every", type=int, default=int(_env("preview_every", 5)),
                   help="show a live preview every N denoising steps (default 5; 0: off)")
    srv = p.add_argument_group("server")
    srv.add_argument("--host", default=_env("host", "127.0.0.1"), help="address to bind (default 127.0.0.1)")
    srv.add_argument("--listen", action="store_true", default=_env_bool("listen"), help="bind 0.0.0.0 (all interfaces)")
    srv.add_argument("--port", type=int, default=int(_env("port", 7860)), help="port (default 7860)")
    srv.add_argument("--share", action="store_true", default=_env_bool("share"),
                     help="create a public Gradio share link (anyone with the link can use it: add --auth)")
    srv.add_argument("--auth", action="append", default=[a for a in str(_env("auth", "")).split(",") if a],
                     metavar="USER:PASSWORD", help="require a login; repeat for more users")
    srv.add_argument("--auth-file", default=_env("auth_file", None),
                     help="file with one user:password per line")
    srv.add_argument("--rate-limit", default=_env("rate_limit", None), metavar="N/min",
                     help="per-user (or per-IP) limit on jobs, e.g. 10/min")
    srv.add_argument("--max-queue", type=int, default=int(_env("max_queue", 16)),
                     help="jobs waiting beyond this are refused with 'queue is full' (default 16)")
    srv.add_argument("--max-file-size", default=_env("max_file_size", "20mb"), help="upload limit (default 20mb)")
    srv.add_argument("--mcp", action="store_true", default=_env_bool("mcp"),
                     help="serve the three tools over Gradio's MCP server for agents")
    o = p.add_argument_group("outputs and safety")
    o.add_argument("--output-dir", default=_env("output_dir", "outputs"),
                   help="where images and audit.jsonl go (default ./outputs)")
    o.add_argument("--no-save", dest="save", action="store_false", default=not _env_bool("no_save"),
                   help="do not keep images under the output dir (the audit log is still written)")
    o.add_argument("--no-safety-checker", dest="safety_checker", action="store_false",
                   default=not _env_bool("no_safety_checker"),
                   help="run without the safety checker (every page then says the filter is off)")
    o.add_argument("--safety-checker", dest="safety_checker_path", default=_env("safety_checker", None),
                   help="safety checker folder or hub id (default: the checkpoint's own, else CompVis/stable-diffusion-safety-checker)")
    o.add_argument("--safety-adjustment", type=float, default=float(_env("safety_adjustment", 0.0)),
                   help="safety checker strictness added to every concept score: positive is stricter, negative more lenient (default 0)")
    o.add_argument("--blocklist", default=_env("blocklist", None),
                   help="file of words and /regular expressions/ refused in prompts")
    o.add_argument("--watermark-text", default=_env("watermark_text", DEFAULT_WATERMARK),
                   help=f"invisible watermark payload (default {DEFAULT_WATERMARK!r})")
    u = p.add_argument_group("upscale and canvas")
    u.add_argument("--sr-weights", default=_env("sr_weights", None),
                   help="Real-ESRGAN x2 weights (.pth or .safetensors); default: cache, download, then the bundled demo upscaler")
    u.add_argument("--sr-cache-dir", default=_env("sr_cache_dir", None),
                   help="where downloaded upscaler weights are kept (default ~/.cache/sdstudio)")
    u.add_argument("--max-upscale-pixels", type=int, default=int(_env("max_upscale_pixels", 4_000_000)),
                   help="largest input accepted by Upscale 2x, in pixels (default 4000000)")
    u.add_argument("--max-canvas-side", type=int, default=int(_env("max_canvas_side", 4096)),
                   help="largest Large canvas side in pixels (default 4096)")
    p.add_argument("--log-level", default=_env("log_level", "INFO"), help="logging level (default INFO)")
    return p


def config_from_args(argv: list[str] | None = None) -> AppConfig:
    """Parse ``argv`` (default ``sys.argv``) into an :class:`AppConfig`."""
    args = build_parser().parse_args(argv)
    values = vars(args)
    names = {f.name for f in fields(AppConfig)}
    kwargs = {k: v for k, v in values.items() if k in names}
    for key in ("output_dir", "blocklist", "sr_weights", "sr_cache_dir", "auth_file"):
        if kwargs.get(key):
            kwargs[key] = Path(kwargs[key])
    kwargs["auth"] = tuple(kwargs.get("auth") or ())
    return AppConfig(**kwargs)
