"""Small helpers shared by the subpackages (no imports of our own modules)."""
import importlib
import os


def import_sibling_modules(package_name, package_file, suffix):
    """Import every ``*{suffix}.py`` beside ``package_file`` (BasicSR's plugin convention).

    Importing a module runs its ``@XXX_REGISTRY.register()`` decorators, so after
    ``import vlunet`` every arch, dataset, loss and model is known to BasicSR by name.
    """
    folder = os.path.dirname(os.path.abspath(package_file))
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(f'{suffix}.py'))
    return [importlib.import_module(f'{package_name}.{name}') for name in names]
