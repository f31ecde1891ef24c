"""SD Studio: parse flags -> AppConfig -> PipelineManager -> ui.build_app -> launch.

    python app.py                 # the default model, or the bundled demo model offline
    python app.py --model demo    # the bundled demo model
    python app.py --help          # every flag
"""

from __future__ import annotations

import importlib.util
import logging
import sys

if importlib.util.find_spec("spaces") is not None:
    # On a Hugging Face ZeroGPU Space, `spaces` has to patch torch before anything imports it.
    import spaces  # noqa: F401

from pipelines.config import config_from_args
from pipelines.guard import SafetyCheckerUnavailable
from pipelines.loading import ModelLoadError
from pipelines.manager import PipelineManager


def main(argv: list[str] | None = None) -> int:
    config = config_from_args(argv)
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import ui

    manager = PipelineManager(config)
    try:
        manager.load()
    except (ModelLoadError, SafetyCheckerUnavailable) as exc:
        logging.getLogger("sdstudio").error("%s", exc)
        return 2
    app = ui.build_app(manager)
    try:
        ui.launch(app, config)
    except ValueError as exc:  # a bad --auth entry, a missing --auth-file, --mcp without its package
        logging.getLogger("sdstudio").error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
