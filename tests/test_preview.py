"""Live preview: the linear latent -> RGB projection on real VAE latents and in a real denoising loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipelines.preview import SD1_FACTORS, factors_for_model, latents_to_preview, load_factors, preview_callback


def test_projection_is_the_affine_map_upsampled():
    factors = {"matrix": [[0.5, 0, 0], [0, 0.5, 0], [0, 0, 0.5], [0, 0, 0]], "bias": [0.0, 0.5, -1.0]}
    latents = torch.zeros(1, 4, 2, 3)
    latents[0, 0, 1, 2] = 2.0  # red channel 2 * 0.5 = 1 -> 255 at one latent pixel
    image = latents_to_preview(latents, factors)
    assert image.size == (24, 16)
    arr = np.asarray(image)
    assert arr[8:16, 16:24, 0].min() == 255 and arr[:8, :8, 0].max() == 127  # (0+1)*127.5 truncates to 127
    assert (arr[..., 1] == 191).all()  # (0.5 + 1) * 127.5 = 191.25
    assert (arr[..., 2] == 0).all()  # bias -1 -> 0


def test_batch_is_laid_side_by_side_and_shapes_are_checked():
    image = latents_to_preview(torch.randn(3, 4, 8, 8), SD1_FACTORS, upscale=1)
    assert image.size == (24, 8)
    with pytest.raises(ValueError, match="latents must be"):
        latents_to_preview(torch.randn(1, 3, 8, 8), SD1_FACTORS)


def test_load_factors_refuses_wrong_shapes(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"matrix": [[1, 2, 3]] * 3, "bias": [0, 0, 0]}))
    with pytest.raises(ValueError, match="4x3 matrix"):
        load_factors(bad)
    assert factors_for_model(False) is SD1_FACTORS
    assert factors_for_model(True, demo_path=tmp_path / "missing.json") is SD1_FACTORS


def test_bundled_demo_factors_beat_a_flat_colour():
    """The shipped fit must explain the demo world's colours better than the mean colour does."""
    from pipelines.preview import DEMO_PREVIEW_FACTORS

    data = load_factors(DEMO_PREVIEW_FACTORS)
    assert data["rmse_levels_heldout"] < 0.75 * data["rmse_levels_heldout_mean_colour"]


def test_fit_recovers_a_known_affine_map():
    from tools.fit_latent_preview import fit

    rng = np.random.default_rng(0)
    latents = rng.normal(size=(500, 4))
    matrix, bias = rng.normal(size=(4, 3)), rng.normal(size=3)
    got_matrix, got_bias = fit(latents, latents @ matrix + bias)
    np.testing.assert_allclose(got_matrix, matrix, atol=1e-8)
    np.testing.assert_allclose(got_bias, bias, atol=1e-8)


def test_preview_hook_in_a_real_generation(tiny_manager):
    from pipelines.progress import JobControl
    from pipelines.requests import Txt2ImgRequest

    seen = []
    control = JobControl(preview=preview_callback(SD1_FACTORS, 2, lambda s, t, im: seen.append((s, t, im.size))))
    tiny_manager.txt2img(Txt2ImgRequest(prompt="a red circle", steps=5, seed=1, width=64, height=64), control)
    assert seen == [(2, 5, (64, 64)), (4, 5, (64, 64)), (5, 5, (64, 64))]
    with pytest.raises(ValueError, match="preview_every"):
        preview_callback(SD1_FACTORS, 0, print)
