"""Read ``torch.save`` files of whole pickled ``nn.Module`` objects without the classes that made them.

Some published trainers save ``torch.save({'epoch': e, 'net': model, ...})`` with the model object
itself rather than its state_dict. ``torch.load`` then has to import the authors' classes and, with
``weights_only=False``, runs whatever the pickle asks for. This reader never does either:

* a restricted :class:`pickle.Unpickler` resolves only an allowlist of globals (torch's tensor and
  parameter rebuild functions with their arguments checked, dtypes, ``torch.Size``/``torch.device``,
  ``OrderedDict``, plain builtin containers and numbers); every other class (numpy's included)
  or function becomes an inert :class:`PickledObject` subclass that records its constructor
  arguments and its pickled state and does nothing else;
* storages are read by torch's own loader (``torch.serialization._load`` for the zip format of
  torch >= 1.6, ``_legacy_load`` for older files) with this unpickler as its ``pickle_module``;
* a pickled module is recognised by its state (``_parameters``, ``_buffers``, ``_modules``) and
  turned into the state_dict that ``module.state_dict()`` would give: the module's parameters,
  then its persistent buffers, then its children's entries under ``<child>.``, recursively.

Usage::

    from vlunet.utils.pickled_modules import load_pickled_modules
    entries = load_pickled_modules('model.pth')   # {'epoch': 3, 'net': OrderedDict(state_dict), ...}

Objects that are not modules keep their values (numbers, strings, dicts of tensors such as an
optimizer state); other objects stay :class:`PickledObject` stand-ins (``.pickled_class``,
``.args``, ``.state``).
"""
import builtins
import os
import pickle
import types
import warnings
from collections import OrderedDict

import torch

__all__ = ['PickledModuleError', 'PickledObject', 'load_pickled_modules', 'read_pickled', 'module_state_dict',
           'is_pickled_module']


class PickledModuleError(ValueError):
    """The file cannot be read as pickled modules (the message names the file and what was found)."""


class PickledObject:
    """An inert stand-in for an object of a class the reader did not import.

    ``pickled_class``: ``'module.QualName'`` as written in the file; ``args``/``kwargs``: what the pickle
    passed to the class (or function); ``state``: what it passed to ``__setstate__`` (for a module, its
    ``__dict__``). No method of the original class ever runs.
    """
    pickled_module = ''
    pickled_name = ''

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args, **kwargs):  # the original __init__ is never called
        pass

    def __setstate__(self, state):
        self.state = state

    @classmethod
    def class_name(cls):
        return f'{cls.pickled_module}.{cls.pickled_name}'

    @property
    def pickled_class(self):
        return self.class_name()

    def __repr__(self):
        return f'<pickled {self.pickled_class}>'


# ------------------------------------------------------------------------------------------------
# the allowlist: safe versions of what torch.save writes for tensors and parameters
# ------------------------------------------------------------------------------------------------
def _storage(storage):
    if not isinstance(storage, torch.storage.TypedStorage):  # what torch's persistent_load gives
        raise pickle.UnpicklingError(f'a tensor is rebuilt from {type(storage).__name__}, not a torch storage')
    return storage


def _metadata(metadata):
    """Tensor metadata (conj/neg bits) only when it is a plain dict of bools."""
    if isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, bool) for k, v in metadata.items()):
        return metadata
    return None


def _rebuild_tensor(storage, storage_offset, size, stride):
    return torch._utils._rebuild_tensor(_storage(storage), int(storage_offset), tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    # hooks are never restored (they would be pickled callables)
    return torch._utils._rebuild_tensor_v2(_storage(storage), int(storage_offset), tuple(size), tuple(stride),
                                           bool(requires_grad), OrderedDict(), _metadata(metadata))


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f'a tensor is rebuilt with dtype {dtype!r}')
    return torch._utils._rebuild_tensor_v3(_storage(storage), int(storage_offset), tuple(size), tuple(stride),
                                           bool(requires_grad), OrderedDict(), dtype, _metadata(metadata))


def _rebuild_meta_tensor_no_storage(dtype, size, stride, requires_grad):
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError(f'a meta tensor is rebuilt with dtype {dtype!r}')
    return torch._utils._rebuild_meta_tensor_no_storage(dtype, tuple(size), tuple(stride), bool(requires_grad))


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, torch.Tensor):
        return data  # a stand-in: reported when the state_dict is built
    return torch.nn.Parameter(data, bool(requires_grad))


def _rebuild_from_type_v2(func, new_type, args, state):
    """Tensor subclasses and tensors with attributes: the plain tensor (a Parameter stays one); the
    subclass and the attributes are not restored."""
    ret = func(*args)
    if new_type is torch.nn.Parameter and isinstance(ret, torch.Tensor) and not isinstance(ret, torch.nn.Parameter):
        ret = torch.nn.Parameter(ret, ret.requires_grad)
    return ret


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (pickle protocols 0 and 1): only for stand-ins and plain containers."""
    if isinstance(cls, type) and issubclass(cls, PickledObject):
        return cls()
    if cls in (OrderedDict, dict, list, set, object) and base is object:
        return cls()
    raise pickle.UnpicklingError(f'refusing to reconstruct {cls!r} from base {base!r}')


def _encode(text, encoding='latin1'):
    """``_codecs.encode``, which pickle protocol 2 uses for bytes."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1', 'utf-8', 'utf8', 'ascii'):
        raise pickle.UnpicklingError(f'refusing _codecs.encode({type(text).__name__}, {encoding!r})')
    return text.encode(encoding)


_TORCH_REBUILD = {'_rebuild_tensor': _rebuild_tensor, '_rebuild_tensor_v2': _rebuild_tensor_v2,
                  '_rebuild_tensor_v3': _rebuild_tensor_v3, '_rebuild_parameter': _rebuild_parameter,
                  '_rebuild_parameter_with_state': _rebuild_parameter,
                  '_rebuild_meta_tensor_no_storage': _rebuild_meta_tensor_no_storage}
_BUILTINS = {name: getattr(builtins, name) for name in ('set', 'frozenset', 'list', 'dict', 'tuple', 'bytearray',
                                                       'bytes', 'str', 'int', 'float', 'complex', 'bool', 'slice',
                                                       'range', 'object')}
_ALLOWED = {
    ('collections', 'OrderedDict'): OrderedDict,
    ('copyreg', '_reconstructor'): _reconstructor,
    ('_codecs', 'encode'): _encode,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch._tensor', 'Tensor'): torch.Tensor,
    ('torch', 'Tensor'): torch.Tensor,
    ('torch.nn.parameter', 'Parameter'): torch.nn.Parameter,
    ('torch', 'Size'): torch.Size,
    ('torch', 'device'): torch.device,
    **{('builtins', name): value for name, value in _BUILTINS.items()},
    **{('__builtin__', name): value for name, value in _BUILTINS.items()},  # Python 2 pickles
    **{('torch._utils', name): value for name, value in _TORCH_REBUILD.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allowlist; every other global becomes a :class:`PickledObject` subclass."""

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is not None:
            return found
        if module == 'torch' and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        stand_ins = self.__dict__.setdefault('_stand_ins', {})
        key = (module, name)
        if key not in stand_ins:
            stand_ins[key] = type(str(name).split('.')[-1], (PickledObject,),
                                  {'pickled_module': module, 'pickled_name': name, '__module__': __name__})
        return stand_ins[key]


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


# torch.serialization takes a "pickle module": anything with Unpickler and load
RESTRICTED_PICKLE = types.ModuleType('vlunet_restricted_pickle')
RESTRICTED_PICKLE.Unpickler = RestrictedUnpickler
RESTRICTED_PICKLE.load = _restricted_load
RESTRICTED_PICKLE.__version__ = pickle.format_version


# ------------------------------------------------------------------------------------------------
# reading a file
# ------------------------------------------------------------------------------------------------
def read_pickled(path, map_location='cpu'):
    """The object ``torch.save`` wrote to ``path``, unpickled with :class:`RestrictedUnpickler`:
    tensors are real tensors, other class instances :class:`PickledObject` stand-ins."""
    from torch import serialization as ser

    if not os.path.isfile(path):
        raise PickledModuleError(f'{path}: no such file')
    try:
        with open(path, 'rb') as f:
            if ser._is_zipfile(f):
                with ser._open_zipfile_reader(f) as zip_file:
                    if ser._is_torchscript_zip(zip_file):
                        raise PickledModuleError(f'{path}: a TorchScript archive (torch.jit.save), not torch.save')
                    return ser._load(zip_file, map_location, RESTRICTED_PICKLE, encoding='utf-8')
            with warnings.catch_warnings():  # the pre-1.6 format compares each module's saved source with its
                warnings.simplefilter('ignore')  # class; the stand-ins have none, and nothing is run anyway
                return ser._legacy_load(f, map_location, RESTRICTED_PICKLE, encoding='utf-8')
    except PickledModuleError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise PickledModuleError(f'{path}: not a readable torch.save file ({type(e).__name__}: {e})') from e


def is_pickled_module(obj):
    """True for the stand-in of a pickled ``nn.Module`` (its state holds _parameters, _buffers, _modules)."""
    return isinstance(obj, PickledObject) and isinstance(obj.state, dict) \
        and {'_parameters', '_buffers', '_modules'} <= set(obj.state)


def _tensor_entry(value, where):
    if not isinstance(value, torch.Tensor):
        found = value.pickled_class if isinstance(value, PickledObject) else type(value).__name__
        raise PickledModuleError(f'{where} was pickled as {found}, which this reader does not rebuild into a tensor')
    return value.detach()


def module_state_dict(module, prefix='', where='module', destination=None):
    """The state_dict of a pickled module stand-in, in ``nn.Module.state_dict`` order (parameters, persistent
    buffers, then each child's entries)."""
    if not is_pickled_module(module):
        raise PickledModuleError(f'{where} is not a pickled module')
    out = OrderedDict() if destination is None else destination
    state = module.state
    for name, value in (state['_parameters'] or {}).items():
        if value is not None:
            out[prefix + name] = _tensor_entry(value, f'{where}: parameter {prefix + name}')
    non_persistent = state.get('_non_persistent_buffers_set') or set()
    for name, value in (state['_buffers'] or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = _tensor_entry(value, f'{where}: buffer {prefix + name}')
    for name, child in (state['_modules'] or {}).items():
        if child is not None:
            module_state_dict(child, f'{prefix}{name}.', where, out)
    return out


def _convert(value, where):
    if is_pickled_module(value):
        return module_state_dict(value, where=where)
    if isinstance(value, dict):
        return type(value)((k, _convert(v, f'{where}[{k!r}]')) for k, v in value.items()) \
            if type(value) in (dict, OrderedDict) else value
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_convert(v, f'{where}[{i}]') for i, v in enumerate(value))
    return value


def load_pickled_modules(path, map_location='cpu'):
    """``{entry: value}`` of a ``torch.save`` file, every pickled ``nn.Module`` replaced by its state_dict.

    A file holding a dict gives its entries (``{'epoch': 12, 'net': OrderedDict(state_dict), ...}``;
    modules nested in dicts/lists are converted too); a file holding one module gives ``{'': state_dict}``.
    Nothing of the file's own classes is imported or run (see the module docstring). Raises
    :class:`PickledModuleError` naming the file when it cannot be read or holds neither a module nor a dict.
    """
    obj = read_pickled(path, map_location)
    where = os.path.basename(str(path))
    if is_pickled_module(obj):
        return OrderedDict([('', module_state_dict(obj, where=where))])
    if not isinstance(obj, dict):
        found = obj.pickled_class if isinstance(obj, PickledObject) else type(obj).__name__
        raise PickledModuleError(f'{path}: holds {found}; expected a pickled module or a dict of entries')
    return OrderedDict((k, _convert(v, f'{where}[{k!r}]')) for k, v in obj.items())

