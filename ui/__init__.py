"""Gradio Blocks for SD Studio: one builder per tab, no model logic.

``build_app(manager)`` returns the Blocks; ``launch(app, config)`` serves it.
"""

from __future__ import annotations

from .app import build_app, launch, launch_kwargs

__all__ = ["build_app", "launch", "launch_kwargs"]
