"""The Large canvas' pure geometry: views, blend weights, resolved settings and the tile-grid picture."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipelines.canvas import (
    MAX_TILE_FACTOR,
    MAX_VIEWS,
    axis_starts,
    canvas_views,
    default_overlap,
    edge_ramp,
    resolve_tiling,
    view_weights,
)
from pipelines.requests import BLEND_MODES
from ui.canvas_tab import draw_tile_grid


def coverage(views, height, width) -> np.ndarray:
    count = np.zeros((height, width), dtype=int)
    for top, bottom, left, right in views:
        count[top:bottom, left:right] += 1
    return count


def assert_valid_views(views, height, width, tile, overlap):
    """Every latent pixel covered, all views in bounds and of one size, neighbours overlap enough."""
    assert (coverage(views, height, width) >= 1).all()
    sizes = {(b - t, r - l) for t, b, l, r in views}
    assert sizes == {(min(tile, height), min(tile, width))}
    assert all(0 <= t < b <= height and 0 <= l < r <= width for t, b, l, r in views)
    assert max(b for _, b, _, _ in views) == height and max(r for _, _, _, r in views) == width
    for starts in ({t for t, _, _, _ in views}, {l for _, _, l, _ in views}):
        starts = sorted(starts)
        for a, b in zip(starts, starts[1:]):
            assert 0 < b - a <= tile - overlap  # overlap at least the asked one (more for the clamped last)


def test_views_for_1000x520_pixels():
    # 1000x520 px is 125x65 latents: neither side a multiple of the stride (64 - 16 = 48).
    views = canvas_views(65, 125, 64, 16)
    assert sorted({t for t, *_ in views}) == [0, 1]
    assert sorted({l for _, _, l, _ in views}) == [0, 48, 61]
    assert len(views) == 6
    assert_valid_views(views, 65, 125, 64, 16)


def test_tile_larger_than_the_canvas_on_one_side():
    views = canvas_views(32, 200, 64, 16)
    assert {(t, b) for t, b, _, _ in views} == {(0, 32)}
    assert [l for _, _, l, _ in views] == [0, 48, 96, 136]
    assert_valid_views(views, 32, 200, 64, 16)


def test_tile_larger_than_the_whole_canvas_is_one_view():
    assert canvas_views(40, 50, 64, 16) == [(0, 40, 0, 50)]


def test_overlap_zero_tiles_exactly_when_the_size_divides():
    views = canvas_views(64, 128, 64, 0)
    assert views == [(0, 64, 0, 64), (0, 64, 64, 128)]
    assert (coverage(views, 64, 128) == 1).all()


def test_overlap_zero_clamps_the_last_column_when_the_size_does_not_divide():
    views = canvas_views(64, 100, 64, 0)
    assert [l for _, _, l, _ in views] == [0, 36]
    assert_valid_views(views, 64, 100, 64, 0)


def test_overlap_of_tile_minus_8_pixels_is_stride_one_latent():
    # tile 512 px, overlap 504 px -> 64 latents, stride 1
    views = canvas_views(64, 80, 64, 63)
    assert [l for _, _, l, _ in views] == list(range(0, 17))
    assert_valid_views(views, 64, 80, 64, 63)


def test_same_views_as_diffusers_panorama_at_window_64_stride_8():
    # StableDiffusionPanoramaPipeline.get_views(512, 2048): 25 windows of 64 latents every 8.
    views = canvas_views(64, 256, 64, 56)
    assert views == [(0, 64, 8 * i, 8 * i + 64) for i in range(25)]


@pytest.mark.parametrize("height,width,tile,overlap", [
    (h, w, t, o) for h, w, t, o in itertools.product((8, 33, 64, 65, 130), (8, 64, 97, 256), (8, 32, 64), (0, 4, 16, 31))
    if o < t
])
def test_views_cover_any_canvas(height, width, tile, overlap):
    assert_valid_views(canvas_views(height, width, tile, overlap), height, width, tile, overlap)


def test_axis_starts_end_at_the_border():
    assert axis_starts(128, 64, 48) == [0, 48, 64]
    assert axis_starts(64, 64, 48) == [0]
    assert axis_starts(10, 64, 48) == [0]


@pytest.mark.parametrize("overlap", [64, 70, -1])
def test_views_refuse_an_overlap_not_below_the_tile(overlap):
    with pytest.raises(ValueError, match=f"overlap must be from 0 to below the tile \\(64\\), got {overlap}"):
        canvas_views(64, 128, 64, overlap)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("blend", BLEND_MODES)
def test_weights_are_positive_everywhere_and_one_on_a_lone_view(blend):
    views = canvas_views(65, 125, 64, 16)
    for view in views:
        w = view_weights(view, 65, 125, 16, blend)
        assert w.shape == (64, 64)
        assert (w > 0).all()
        assert (w <= 1).all()
    lone = view_weights((0, 40, 0, 50), 40, 50, 16, blend)
    assert torch.equal(lone, torch.ones(40, 50))


@pytest.mark.parametrize("blend", ["cosine", "gaussian"])
def test_edges_on_the_canvas_border_are_not_feathered(blend):
    # A 3x3 grid: the top-left view is feathered only on its right and bottom edges.
    h, w = 160, 160
    views = canvas_views(h, w, 64, 16)
    first = view_weights(views[0], h, w, 16, blend)
    assert torch.equal(first[0, :48], torch.ones(48))  # top border row, left of the ramp
    assert torch.equal(first[:48, 0], torch.ones(48))  # left border column
    assert first[0, -1] < 0.1 and first[-1, 0] < 0.1  # inner edges fall towards 0
    middle = view_weights(views[4], h, w, 16, blend)
    assert middle[32, 0] < 0.1 and middle[32, -1] < 0.1 and middle[0, 32] < 0.1 and middle[-1, 32] < 0.1
    assert middle[32, 32] == 1


def test_cosine_ramps_of_neighbours_sum_to_one():
    # When the views overlap by exactly the ramp the raised-cosine weights are complementary.
    h, w = 64, 112  # stride 48: views at 0 and 48, overlap 16
    views = canvas_views(h, w, 64, 16)
    total = torch.zeros(h, w, dtype=torch.float64)
    for t, b, l, r in views:
        total[t:b, l:r] += view_weights((t, b, l, r), h, w, 16, "cosine").double()
    assert torch.allclose(total, torch.ones(h, w, dtype=torch.float64), atol=1e-6)


def test_uniform_weights_are_plain_multidiffusion_averaging():
    views = canvas_views(64, 160, 64, 16)
    assert all(torch.equal(view_weights(v, 64, 160, 16, "uniform"), torch.ones(64, 64)) for v in views)


def test_ramps_rise_monotonically_and_stay_above_zero():
    for blend in ("cosine", "gaussian"):
        ramp = edge_ramp(16, blend)
        assert (ramp > 0).all() and (ramp < 1).all()
        assert (ramp[1:] > ramp[:-1]).all()


def test_unknown_blend_is_named():
    with pytest.raises(ValueError, match="blend must be one of uniform, cosine, gaussian, got 'soft'"):
        edge_ramp(8, "soft")


# ----------------------------------------------------------------------------- settings


def test_defaults_are_the_native_tile_and_a_quarter_overlap():
    tiling = resolve_tiling(1024, 512, None, None, 512)
    assert (tiling.tile_size, tiling.tile_overlap) == (512, 128)
    assert tiling.views == ((0, 64, 0, 64), (0, 64, 48, 112), (0, 64, 64, 128))
    assert default_overlap(256) == 64 and default_overlap(72) == 16 and default_overlap(64) == 16


def test_tile_over_twice_the_native_size_is_refused():
    with pytest.raises(ValueError, match=r"tile_size must be a multiple of 8 from 64 to 1024 .* got 1032"):
        resolve_tiling(2048, 2048, 1032, None, 512)
    assert resolve_tiling(2048, 2048, MAX_TILE_FACTOR * 512, None, 512).tile_size == 1024


def test_overlap_not_below_the_default_tile_is_refused():
    with pytest.raises(ValueError, match=r"tile_overlap must be a multiple of 8 from 0 to below tile_size \(64\), got 64"):
        resolve_tiling(256, 64, None, 64, 64)


def test_too_many_views_are_refused_naming_the_overlap():
    with pytest.raises(ValueError, match=rf"tile_overlap 504 with tile_size 512 makes \d+ views .* limit of {MAX_VIEWS}"):
        resolve_tiling(4096, 1024, 512, 504, 512)


# ----------------------------------------------------------------------------- tile-grid picture


def test_tile_grid_picture_shades_the_overlaps():
    image = draw_tile_grid(1024, 256, 256, 64)
    assert image.size == (768, 192)
    arr = np.asarray(image)[..., 0].astype(int)
    # Views at 0, 192, 384, 576, 768 px: 192..256 px is covered twice, 100 px once (inside, off the outlines).
    once, twice = arr[96, round(100 * 0.75)], arr[96, round(224 * 0.75)]
    assert twice < once


def test_tile_grid_picture_keeps_a_small_canvas_at_its_size():
    image = draw_tile_grid(320, 64, 64, 0)
    assert image.size == (320, 64)
    gray = np.asarray(image)[32, 10:54, 0]
    assert len(set(gray.tolist())) == 1  # no overlap shading without overlap
