"""Sampler names users know (AUTOMATIC1111's) mapped to diffusers schedulers.

A scheduler holds no weights, so switching sampler is building a new scheduler from the
checkpoint's scheduler config: the UNet and everything else stay loaded.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from .requests import SAMPLERS

# name -> (scheduler class, config overrides)
SAMPLER_TABLE: dict[str, tuple[type, dict[str, Any]]] = {
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M Karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "DDIM": (DDIMScheduler, {}),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
    "UniPC": (UniPCMultistepScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {}),
}
assert tuple(SAMPLER_TABLE) == SAMPLERS


def make_scheduler(name: str, base_config: dict):
    """A fresh scheduler for sampler ``name`` from the checkpoint's scheduler config."""
    if name not in SAMPLER_TABLE:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {name!r}")
    cls, overrides = SAMPLER_TABLE[name]
    return cls.from_config(base_config, **overrides)
