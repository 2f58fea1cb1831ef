"""Importing this package registers every `*_loss.py` in it with BasicSR."""
from vlunet.utils.misc import import_sibling_modules

_modules = import_sibling_modules(__name__, __file__, '_loss')
