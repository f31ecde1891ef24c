"""The Large canvas tab (placeholder until the canvas capability lands)."""

from __future__ import annotations


def build_canvas_tab_section(ctx, tabs, t2i) -> None:
    return None
