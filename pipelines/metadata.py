"""Generation parameters in PNG text chunks.

Two chunks per image:
- ``parameters``: the AUTOMATIC1111 text format other Stable Diffusion tools read
  (prompt line, ``Negative prompt:`` line, then ``Steps: 20, Sampler: Euler a, ...``);
- ``sdstudio``: JSON with every parameter, the model, library versions and the watermark status.
"""

from __future__ import annotations

import json
import re
from importlib import metadata as importlib_metadata

from PIL import PngImagePlugin

JSON_CHUNK = "sdstudio"
PARAMETERS_CHUNK = "parameters"
LIBRARIES = ("torch", "diffusers", "transformers", "gradio", "invisible-watermark", "realesrgan", "basicsr")

# A1111 key -> record key, in the order A1111 writes them.
A1111_KEYS = (
    ("Steps", "steps"),
    ("Sampler", "sampler"),
    ("CFG scale", "guidance_scale"),
    ("Seed", "seed"),
    ("Size", "size"),
    ("Model hash", "model_hash"),
    ("Model", "model"),
)


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return versions


def _fmt(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value)
    # A1111 quotes values that contain its separators.
    return json.dumps(text) if ("," in text or ":" in text) else text


def format_parameters(record: dict) -> str:
    """The A1111 ``parameters`` text for one image's record."""
    lines = [record.get("prompt", "")]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    fields = []
    for label, key in A1111_KEYS:
        if key == "size" and "width" in record:
            fields.append(f"Size: {record['width']}x{record['height']}")
        elif record.get(key) is not None:
            fields.append(f"{label}: {_fmt(record[key])}")
    for label, value in record.get("extra_parameters", {}).items():
        fields.append(f"{label}: {_fmt(value)}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w \-+/().]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict:
    """Parse an A1111 ``parameters`` text back into prompt, negative prompt and fields."""
    lines = text.strip().split("\n")
    fields_line = lines.pop() if lines and _FIELD.match(lines[-1]) and "Steps:" in lines[-1] else ""
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    out: dict = {"prompt": "\n".join(prompt_lines).strip(), "negative_prompt": "\n".join(negative_lines).strip()}
    for key, value in _FIELD.findall(fields_line):
        value = value.strip()
        if value.startswith('"'):
            value = json.loads(value)
        out[key.strip()] = value
    return out


def png_info(record_text: str, json_record: dict) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_CHUNK, record_text)
    info.add_text(JSON_CHUNK, json.dumps(json_record, sort_keys=True, default=str))
    return info


def read_png_metadata(path) -> tuple[str | None, dict | None]:
    """(parameters text, JSON record) from a PNG written by the guard; ``None`` where absent."""
    from PIL import Image

    with Image.open(path) as im:
        text = im.info.get(PARAMETERS_CHUNK)
        raw = im.info.get(JSON_CHUNK)
    return text, (json.loads(raw) if raw else None)
