"""PipelineManager: loads the checkpoint once and serves every capability from it.

- Loading is lazy and thread-safe (double-checked under a lock), and happens once.
- One lock serialises all device work, so two tabs never fight over the GPU.
- Samplers are switched by building a scheduler from the checkpoint's config; the UNet,
  VAE and text encoder are never reloaded.
- Other capabilities get pipelines made with ``from_pipe``: the same module objects,
  never a second copy of the weights.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass

import torch

from .config import AppConfig, cpu_has_fast_bf16
from .guard import Blocklist, OutputGuard, SafetyCheckerUnavailable, SafetyFilter, Watermarker, SAFETY_CHECKER_ID
from .loading import (DEFAULT_MODEL, ModelLoadError, ModelSource, _fallback, load_pipeline, model_hash, own_weights,
                      resolve_model_source)
from .progress import JobControl
from .requests import MAX_SEED, Txt2ImgRequest
from .results import GenerationResult
from .samplers import make_scheduler
from .txt2img import dropped_token_warning, run_txt2img

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """What the page and the metadata say about the loaded model."""

    source: ModelSource
    hash: str
    native_size: int
    device: str
    dtype: str


def resolve_seeds(seed: int, count: int) -> list[int]:
    """Seed -1 draws a random base; image ``i`` gets ``base + i`` (wrapping at 2**32)."""
    base = secrets.randbelow(MAX_SEED + 1) if seed == -1 else seed
    return [(base + i) % (MAX_SEED + 1) for i in range(count)]


def apply_speed_options(pipe, config: AppConfig, device: str) -> None:
    """Move ``pipe`` to ``device`` with the memory and speed options of ``config``."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    # PyTorch's scaled_dot_product_attention (flash / memory-efficient kernels on GPU).
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if config.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    low = config.low_memory
    if low or config.attention_slicing:
        pipe.enable_attention_slicing()
    if low or config.vae_tiling:
        pipe.vae.enable_tiling()
    if device == "cuda" and (config.cpu_offload or low):
        pipe.enable_model_cpu_offload()
    else:
        pipe.to(device)
    own_cpu_weights(pipe)
    if config.compile:
        if device != "cuda":
            log.warning("--compile is for CUDA; skipped on %s", device)
        else:
            pipe.unet = torch.compile(pipe.unet, mode="max-autotune-no-cudagraphs", fullgraph=True)
    pipe.set_progress_bar_config(disable=True)


def own_cpu_weights(pipe) -> None:
    """Copy the weights every component left on the CPU into the process's own memory.

    A file rewritten in place while the studio runs (a plain ``cp`` of new weights into the
    model folder) would otherwise change the weights under a running job, and every later
    image's metadata would name a model hash that no longer describes them. With a private
    copy the studio keeps serving the model it loaded, and reloading takes a restart.
    """
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            own_weights(component)


class PipelineManager:
    """The studio's one owner of model weights. Build once and pass to the UI.

    Example:
        >>> manager = PipelineManager(AppConfig(model="demo"))
        >>> result = manager.txt2img(Txt2ImgRequest(prompt="a red circle on a blue background", seed=1))
        >>> result.images[0].save("out.png")
    """

    def __init__(self, config: AppConfig):
        self.config = config
        self.device_lock = threading.Lock()
        self._load_lock = threading.Lock()
        self._pipe = None
        self._info: ModelInfo | None = None
        self._guard: OutputGuard | None = None
        self._derived: dict[str, object] = {}
        self._upscaler = None
        self.load_count = 0
        self.blocklist = Blocklist.from_file(config.blocklist)

    # ------------------------------------------------------------------ loading

    def load(self):
        """Load the checkpoint if it is not loaded yet; return the base pipeline."""
        if self._pipe is None:
            with self._load_lock:
                if self._pipe is None:
                    self._load()
        return self._pipe

    def _load(self) -> None:
        config = self.config
        device = config.resolve_device()
        dtype = config.resolve_dtype(device)
        if device == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
            log.warning("--dtype bf16: this CPU has no bfloat16 path in oneDNN (it needs AVX-512; torch reads "
                        "this one as %s), so bf16 is emulated and generation runs many times slower than in fp32 "
                        "(68x for the demo model on an AVX2 CPU); use --dtype auto or fp32 here",
                        torch.backends.cpu.get_cpu_capability())
        source = resolve_model_source(config.model, offline=config.offline)
        try:
            pipe = load_pipeline(source, torch_dtype=dtype, config_dir=config.model_config, offline=config.offline)
        except ModelLoadError as exc:
            if source.kind != "hub" or source.requested != DEFAULT_MODEL:
                raise
            source = _fallback(source.requested, f"the hub cannot be reached: {type(exc.__cause__).__name__}")
            pipe = load_pipeline(source, torch_dtype=dtype)
        self.load_count += 1
        native = int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
        apply_speed_options(pipe, config, device)
        info = ModelInfo(source, model_hash(source), native, device, str(dtype).replace("torch.", ""))
        self._guard = self._build_guard(info, device)
        self._info = info
        self._pipe = pipe
        log.info("loaded %s (%s) on %s as %s, native size %d", source.location, source.kind, device, info.dtype, native)

    def _build_guard(self, info: ModelInfo, device: str) -> OutputGuard:
        config = self.config
        safety, status = None, "on"
        if info.source.is_demo:
            status = "not applicable (bundled synthetic demo model)"
        elif not config.safety_checker:
            status = "off (--no-safety-checker)"
        else:
            safety = self._load_safety(info, device)
        return OutputGuard(
            output_dir=config.output_dir,
            model_id=info.source.requested if not info.source.is_demo else "demo",
            model_name=info.source.name,
            model_hash=info.hash,
            watermarker=Watermarker(config.watermark_text),
            safety=safety,
            safety_status=status,
            blocklist=self.blocklist,
            save=config.save,
        )

    def _load_safety(self, info: ModelInfo, device: str) -> SafetyFilter:
        """The checkpoint's own checker, else the one named by --safety-checker, else CompVis'."""
        from pathlib import Path

        candidates = []
        if self.config.safety_checker_path:
            candidates.append(self.config.safety_checker_path)
        if info.source.kind == "folder" and (Path(info.source.location) / "safety_checker").is_dir():
            candidates.append(str(Path(info.source.location) / "safety_checker"))
        candidates.append(SAFETY_CHECKER_ID)
        errors = []
        for location in candidates:
            try:
                return SafetyFilter.load(location, adjustment=self.config.safety_adjustment, device=device,
                                         local_only=self.config.offline or Path(location).exists())
            except Exception as exc:  # any failure means "not this one"; all are reported below
                errors.append(f"{location}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise SafetyCheckerUnavailable(
            "no safety checker could be loaded for model "
            f"'{info.source.requested}' ({'; '.join(errors)}). Put one in the model's safety_checker/ folder, "
            "pass --safety-checker PATH, or start with --no-safety-checker to run without the filter "
            "(every page will then say so)."
        )

    @property
    def pipe(self):
        return self.load()

    @property
    def info(self) -> ModelInfo:
        self.load()
        return self._info

    @property
    def guard(self) -> OutputGuard:
        self.load()
        return self._guard

    @property
    def native_size(self) -> int:
        return self.info.native_size

    @property
    def default_sampler(self) -> str:
        """The sampler the page starts on: DDIM on a zero-terminal-SNR checkpoint, else Euler a.

        Euler a, the usual default, is weaker on such a schedule: on the bundled demo model it put
        the right object colour in 8 of 10 eval prompts against DDIM's 10 (docs/demo-model-experiments.md),
        and zero-SNR models are sampled with DDIM's trailing timesteps in their paper (Lin et al., arXiv 2305.08891).
        """
        return "DDIM" if self.pipe.scheduler.config.get("rescale_betas_zero_snr") else "Euler a"

    def scheduler(self, sampler: str):
        """A fresh scheduler for ``sampler`` built from the checkpoint's scheduler config."""
        return make_scheduler(sampler, self.pipe.scheduler.config)

    def derived_pipeline(self, cls):
        """A pipeline of class ``cls`` sharing the loaded components (``from_pipe``), made once."""
        key = cls.__name__
        if key not in self._derived:
            self._derived[key] = cls.from_pipe(self.pipe)
        return self._derived[key]

    def notices(self) -> list[str]:
        """Lines the page shows under its title: demo model, safety filter state."""
        info, guard = self.info, self.guard
        lines = []
        if info.source.note:
            lines.append(info.source.note)
        if info.source.is_demo:
            lines.append(
                "This is the bundled demo model: a small model trained by this project that draws one coloured "
                "circle, square or triangle on a plain background (try 'a red circle in the top left on a blue "
                "background'). Load Stable Diffusion with `python app.py --model stable-diffusion-v1-5/stable-diffusion-v1-5` "
                "(or a local folder / .safetensors file). The safety filter is not applicable to this synthetic model."
            )
        elif guard.safety is None:
            lines.append("The safety filter is OFF (--no-safety-checker): images are not checked.")
        return lines

    # ------------------------------------------------------------------ capabilities

    def txt2img(self, req: Txt2ImgRequest, control: JobControl | None = None) -> GenerationResult:
        """Generate ``req.batch_count * req.batch_size`` guarded images.

        Raises:
            ValueError: a field of ``req`` is invalid (the message names it).
            PromptRefused: the prompt matched the blocklist (nothing was computed).
            GenerationCancelled: the user cancelled.
        """
        control = control or JobControl()
        req.check()
        self.blocklist.check(prompt=req.prompt, negative_prompt=req.negative_prompt)
        pipe = self.load()
        width = req.width or self.native_size
        height = req.height or self.native_size
        seeds = resolve_seeds(req.seed, req.batch_size * req.batch_count)
        warnings = [w for w in (dropped_token_warning(pipe.tokenizer, req.prompt),
                                dropped_token_warning(pipe.tokenizer, req.negative_prompt, "negative_prompt")) if w]
        with self.device_lock:
            images = run_txt2img(pipe, req, seeds=seeds, width=width, height=height,
                                 scheduler_factory=lambda: self.scheduler(req.sampler), control=control)
            records = [
                dict(prompt=req.prompt, negative_prompt=req.negative_prompt, sampler=req.sampler, steps=req.steps,
                     guidance_scale=req.guidance_scale, width=width, height=height, seed=s,
                     batch_size=req.batch_size, batch_count=req.batch_count)
                for s in seeds
            ]
            guarded = self.guard.deliver(images, records, tab="txt2img", client=control.client)
        return self._result(guarded, seeds, warnings)

    @staticmethod
    def _result(guarded, seeds, warnings) -> GenerationResult:
        result = GenerationResult(warnings=list(warnings))
        for g, seed in zip(guarded, seeds):
            result.images.append(g.image)
            result.seeds.append(seed)
            result.nsfw.append(g.nsfw)
            result.metadata.append(g.metadata)
            result.files.append(g.path)
            result.infotexts.append(g.infotext)
        if any(m.get("watermark", "").startswith("skipped") for m in result.metadata):
            result.warnings.append("images under 256x256 pixels are delivered without the invisible watermark")
        return result

    def upscale(self, req, control: JobControl | None = None) -> GenerationResult:
        """Upscale ``req.image`` 2x with Real-ESRGAN; see pipelines/upscale.py."""
        from .upscale import run_upscale

        return run_upscale(self, req, control or JobControl())

    def canvas(self, req, control: JobControl | None = None) -> GenerationResult:
        """Generate a large canvas from overlapping tiles (MultiDiffusion); see pipelines/canvas.py."""
        from .canvas import run_canvas

        return run_canvas(self, req, control or JobControl())
