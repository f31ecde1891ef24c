"""pipelines/compat.py: `import realesrgan` works on the pinned torchvision (basicsr 1.4.2 shim)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from pipelines.compat import LEGACY_MODULE, import_realesrgan, install_functional_tensor_shim


def test_import_realesrgan_and_basicsr_in_a_fresh_interpreter():
    # A fresh process: nothing imported before, exactly what the app does on first upscale.
    code = (
        "from pipelines.compat import import_realesrgan\n"
        "r = import_realesrgan()\n"
        "from basicsr.archs.rrdbnet_arch import RRDBNet\n"
        "from realesrgan.archs.srvgg_arch import SRVGGNetCompact\n"
        "import basicsr.data.degradations\n"
        "print(r.RealESRGANer.__name__, RRDBNet.__name__, SRVGGNetCompact.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["RealESRGANer", "RRDBNet", "SRVGGNetCompact"]


def test_shim_is_idempotent_and_reexports_torchvision():
    from torchvision.transforms.functional import rgb_to_grayscale

    install_functional_tensor_shim()
    assert install_functional_tensor_shim() is False  # already there: nothing is replaced
    module = sys.modules[LEGACY_MODULE]
    assert module.rgb_to_grayscale is rgb_to_grayscale
    image = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(module.rgb_to_grayscale(image), rgb_to_grayscale(image))


def test_import_realesrgan_returns_the_package():
    module = import_realesrgan()
    assert module.__name__ == "realesrgan"
    assert hasattr(module, "RealESRGANer")
