"""Compatibility shims for third-party packages, in one documented place.

basicsr 1.4.2 (which ``realesrgan`` 0.3.0 imports) does

    from torchvision.transforms.functional_tensor import rgb_to_grayscale

in ``basicsr/data/degradations.py``. torchvision 0.15 deprecated that private module and
0.17 removed it; the function itself lives on as ``torchvision.transforms.functional.
rgb_to_grayscale`` with the same signature. So ``import realesrgan`` fails with
``ModuleNotFoundError`` on every torchvision this project pins.

:func:`import_realesrgan` registers a stand-in module that re-exports the public function
(only when the real module is missing) and then imports realesrgan. It is called
lazily by the code that needs Real-ESRGAN, never at import time of this module, and is
idempotent. Remove it once a basicsr release no longer imports the private module.
"""

from __future__ import annotations

import importlib
import sys
import types

LEGACY_MODULE = "torchvision.transforms.functional_tensor"


def install_functional_tensor_shim() -> bool:
    """Make ``torchvision.transforms.functional_tensor`` importable; True if a shim was installed.

    Does nothing when the module exists (torchvision < 0.17) or a shim is already registered.
    """
    if LEGACY_MODULE in sys.modules:
        return False
    try:
        importlib.import_module(LEGACY_MODULE)
        return False
    except ModuleNotFoundError:
        pass
    from torchvision.transforms import functional

    shim = types.ModuleType(LEGACY_MODULE)
    shim.__doc__ = "SD Studio shim (pipelines/compat.py): torchvision removed this module in 0.17."
    shim.rgb_to_grayscale = functional.rgb_to_grayscale
    sys.modules[LEGACY_MODULE] = shim
    return True


def import_realesrgan() -> types.ModuleType:
    """``import realesrgan`` with the torchvision shim in place; returns the module."""
    install_functional_tensor_shim()
    return importlib.import_module("realesrgan")
