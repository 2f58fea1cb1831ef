"""Compatibility fixes that make basicsr 1.4.2 work on torch 2.x / torchvision >= 0.17 / numpy 2.

Imported first by ``import vlunet``. (Work in progress: more fixes follow.)
"""
import sys
import types


def _shim_functional_tensor():
    """Symptom: ``import basicsr`` fails with ``No module named 'torchvision.transforms.functional_tensor'``.

    torchvision 0.17 removed that private module; basicsr.data.degradations imports
    ``rgb_to_grayscale`` from it. Provide the module, backed by the public function.
    """
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401
        return
    except ImportError:
        pass
    from torchvision.transforms import functional as F
    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = F.rgb_to_grayscale
    sys.modules[name] = shim


_shim_functional_tensor()
