"""The Upscale 2x tab (placeholder until the upscale capability lands)."""

from __future__ import annotations


def build_upscale_tab_section(ctx, tabs, t2i) -> None:
    return None
