"""Find and load a Stable Diffusion 1.x checkpoint: hub id, diffusers folder or single file.

Every source ends in diffusers' own loaders (``from_pretrained`` / ``from_single_file``),
so the bundled demo model, a test's tiny model and Stable Diffusion take the same path.
Errors name the thing that could not be loaded and say what to do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DEFAULT_MODEL, DEMO_MODEL, DEMO_MODEL_DIR, SD15_CONFIG_DIR

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
CLIP_TOKENIZER_ID = "openai/clip-vit-large-patch14"


def own_weights(module: torch.nn.Module) -> torch.nn.Module:
    """Copy ``module``'s CPU parameters and buffers out of the files they were loaded from.

    diffusers and transformers memory-map .safetensors files, so until a weight is copied (to a
    GPU, or to another dtype) it is read from the file itself, and a file rewritten in place
    (a plain ``cp``) changes the weights of every process that loaded it. Returns ``module``.
    """
    for sub in module.modules():
        for param in sub._parameters.values():
            if param is not None and param.device.type == "cpu":
                param.data = param.data.clone()
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device.type == "cpu":
                sub._buffers[name] = buf.clone()
    return module


class ModelLoadError(ValueError):
    """The model named by the user cannot be found or loaded; the message says which and why."""


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from. ``kind`` is one of demo, folder, single_file, hub."""

    kind: str
    location: str
    name: str
    requested: str
    note: str = ""

    @property
    def is_demo(self) -> bool:
        return self.kind == "demo"


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith((".", "/", "~"))
        or model.lower().endswith(SINGLE_FILE_SUFFIXES)
        or model.count("/") > 1
        or os.sep in model and os.sep != "/"
    )


def hub_cached(repo_id: str) -> bool:
    """Whether ``repo_id``'s pipeline index is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "model_index.json")
    return isinstance(found, str)


def demo_source(requested: str, note: str = "") -> ModelSource:
    if not (DEMO_MODEL_DIR / "model_index.json").is_file():
        raise ModelLoadError(
            f"the bundled demo model is missing from {DEMO_MODEL_DIR}; rebuild it with "
            "`python tools/train_demo_model.py`"
        )
    return ModelSource("demo", str(DEMO_MODEL_DIR), "sdstudio-demo", requested, note)


def resolve_model_source(model: str, *, offline: bool = False) -> ModelSource:
    """Decide what ``--model`` names, without loading weights.

    Raises:
        ModelLoadError: the path does not exist, the folder is not a diffusers pipeline,
            the file type is not a checkpoint, or a hub id other than the default
            cannot be reached and is not cached.
    """
    if model == DEMO_MODEL:
        return demo_source(model)
    path = Path(model).expanduser()
    if path.exists():
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(
                    f"model folder '{model}' is not a diffusers pipeline: it has no model_index.json "
                    "(give the folder that save_pretrained wrote, or a single .safetensors file)"
                )
            return ModelSource("folder", str(path), path.name, model)
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"model file '{model}' is not a checkpoint: expected one of {', '.join(SINGLE_FILE_SUFFIXES)}"
            )
        return ModelSource("single_file", str(path), path.stem, model)
    if _looks_like_path(model):
        raise ModelLoadError(f"model path '{model}' does not exist")
    if hub_cached(model):
        return ModelSource("hub", model, model.split("/")[-1], model)
    if offline or os.environ.get("HF_HUB_OFFLINE") == "1":
        reason = "offline mode is on and it is not in the local Hugging Face cache"
        if model == DEFAULT_MODEL:
            return _fallback(model, reason)
        raise ModelLoadError(f"hub model '{model}' cannot be used: {reason}")
    return ModelSource("hub", model, model.split("/")[-1], model)


def _fallback(model: str, reason: str) -> ModelSource:
    note = (
        f"The default model '{model}' could not be loaded ({reason}); running the bundled demo model "
        "instead. Load Stable Diffusion with --model <hub id, folder or .safetensors file>."
    )
    log.warning(note)
    return demo_source(model, note)


def check_weights_only(path: str | Path) -> None:
    """Refuse a pickled checkpoint that needs code to load; safe tensors-only pickles pass.

    torch's weights-only unpickler allows tensors, dicts and plain values and nothing that
    imports or calls code, so a malicious .ckpt fails here before anything runs.
    """
    import zipfile

    try:
        # mmap avoids reading a multi-GB file into memory just to check it (zip format only).
        torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"checkpoint '{path}' was refused: it cannot be loaded with weights-only unpickling "
            f"because it needs to run code ({first}). Convert it to .safetensors from a trusted source."
        ) from exc
    except (RuntimeError, OSError, EOFError) as exc:
        raise ModelLoadError(f"checkpoint '{path}' could not be read: {exc}") from exc


def _single_file_tokenizer(config_dir: Path, local_only: bool):
    """The CLIP tokenizer for a single-file checkpoint (it holds no tokenizer itself)."""
    from transformers import CLIPTokenizer

    if (config_dir / "tokenizer" / "vocab.json").is_file():
        return CLIPTokenizer.from_pretrained(config_dir / "tokenizer")
    try:
        return CLIPTokenizer.from_pretrained(CLIP_TOKENIZER_ID, local_files_only=local_only)
    except OSError as exc:
        raise ModelLoadError(
            f"a single-file checkpoint needs the CLIP tokenizer '{CLIP_TOKENIZER_ID}', which is neither in "
            f"{config_dir / 'tokenizer'} nor in the local Hugging Face cache, and the hub cannot be reached"
        ) from exc


def load_pipeline(source: ModelSource, *, torch_dtype=torch.float32, config_dir: str | Path | None = None,
                  offline: bool = False):
    """Load ``source`` as a ``StableDiffusionPipeline`` on the CPU, without its safety checker.

    The safety checker is run by the output guard (pipelines/guard.py), not by the pipeline.
    """
    from diffusers import StableDiffusionPipeline

    common = dict(dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    if source.kind == "single_file":
        config = Path(config_dir) if config_dir else SD15_CONFIG_DIR
        if not (config / "model_index.json").is_file():
            raise ModelLoadError(f"model config folder '{config}' has no model_index.json")
        if Path(source.location).suffix.lower() != ".safetensors":
            check_weights_only(source.location)
        extra = {}
        if not (config / "tokenizer").is_dir():
            extra["tokenizer"] = _single_file_tokenizer(config, local_only=offline)
        try:
            return StableDiffusionPipeline.from_single_file(
                source.location, config=str(config), local_files_only=True, **common, **extra
            )
        except ModelLoadError:
            raise
        except Exception as exc:  # diffusers raises many types here; keep the cause
            raise ModelLoadError(
                f"checkpoint '{source.location}' could not be loaded as Stable Diffusion 1.x with config "
                f"'{config}': {exc}"
            ) from exc
    local_only = source.kind != "hub" or offline or hub_cached(source.location)
    try:
        return StableDiffusionPipeline.from_pretrained(source.location, local_files_only=local_only, **common)
    except Exception as exc:
        if source.kind == "hub":
            raise ModelLoadError(
                f"hub model '{source.location}' cannot be reached or loaded ({type(exc).__name__}: {exc}); "
                "check the id and the network, or pass a local folder or .safetensors file"
            ) from exc
        raise ModelLoadError(f"model folder '{source.location}' could not be loaded: {exc}") from exc


def model_hash(source: ModelSource) -> str:
    """The AUTOMATIC1111-style short hash: first 10 hex digits of the weights' sha256.

    For a single file this is the file's sha256 (what other tools print); for a diffusers
    folder it is the sha256 of the UNet's weight files, read in sorted order.
    """
    if source.kind == "single_file":
        files = [Path(source.location)]
    else:
        root = Path(source.location)
        if source.kind == "hub":
            from huggingface_hub import snapshot_download

            root = Path(snapshot_download(source.location, local_files_only=True, allow_patterns=["unet/*"]))
        files = sorted(p for p in (root / "unet").glob("*") if p.suffix in (".safetensors", ".bin"))
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()[:10]
