"""Importing this package registers the metrics of vlunet in BasicSR's METRIC_REGISTRY."""
from vlunet.utils.misc import import_sibling_modules

_modules = import_sibling_modules(__name__, __file__, '_metric')
