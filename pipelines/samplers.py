"""Sampler names users know (AUTOMATIC1111's) mapped to diffusers schedulers.

A scheduler holds no weights, so switching sampler is building a new scheduler from the
checkpoint's scheduler config: the UNet and everything else stay loaded.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
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
    if base_config.get("rescale_betas_zero_snr") and "rescale_betas_zero_snr" not in inspect.signature(
            cls.__init__).parameters:
        # LMS and PLMS have no zero-terminal-SNR option and would silently sample on the
        # un-rescaled schedule the model was not trained on: give them the rescaled one.
        overrides = {**overrides, "trained_betas": zero_snr_betas(base_config)}
    return cls.from_config(base_config, **overrides)


def zero_snr_betas(base_config: dict) -> list[float]:
    """The checkpoint's betas rescaled to zero terminal SNR (as DDIM computes them), with the
    last cumulative alpha raised to 2**-24 as diffusers' Euler does, so sigma stays finite."""
    alphas_cumprod = DDIMScheduler.from_config(base_config).alphas_cumprod.double().clone()
    alphas_cumprod[-1] = max(float(alphas_cumprod[-1]), 2.0**-24)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return (1 - alphas_cumprod / previous).tolist()
