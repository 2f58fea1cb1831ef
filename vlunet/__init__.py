"""vlunet: VLU-Net and its peers as a BasicSR plugin.

``import vlunet`` first applies the BasicSR compatibility fixes (:mod:`vlunet.compat`), then
registers every architecture, dataset, loss and model of the package in BasicSR's registries, and
bounds PyTorch's CPU cache of oneDNN computations (:func:`vlunet.inference.memory.bound_kernel_cache`;
``LRU_CACHE_CAPACITY`` set by the user wins).
"""
# isort: off
from . import compat  # noqa: F401  (must run before anything imports basicsr)
from . import archs, data, losses, metrics, models  # noqa: F401
from .version import __version__  # noqa: F401
from .inference.memory import bound_kernel_cache

bound_kernel_cache()
