"""One loader for the published checkpoint formats of VLU-Net and its peers.

:func:`load_published_state_dict` reads any of

==========================  ==================================================================
format (``source_format``)  layout
==========================  ==================================================================
``lightning-vlunet``        VLU-Net Lightning ``.ckpt``: ``{'state_dict': {'net.<key>': ...,
                            'model_degradation.<CLIP and adapter keys>': ...}, ...}``
``lightning``               PromptIR, AdaIR and MoCE-IR Lightning ``.ckpt``: ``{'state_dict':
                            {'net.<key>': ...}}``
``state_dict``              DGUNet ``.pth``: ``{'state_dict': {'module.<key>': ...}, 'epoch', ...}``;
                            DFPIR ``.pth.tar``: ``{'epoch', 'state_dict', 'optimizer', 'scheduler'}``
``params`` / ``params_ema`` Restormer ``.pth`` and BasicSR's own files: ``{'params': ...}``
                            (optionally also ``'params_ema'``)
``learnable_params``        VLU-Net's ``clip_tuned.pth`` (CLIP adapters only, no network)
``bare``                    a plain state_dict ``{'<key>': tensor}``
``pickled-modules``         ``{'epoch': ..., '<name>': <a pickled nn.Module>, ...}``: read without importing or
                            running the modules' classes (:mod:`vlunet.utils.pickled_modules`)
==========================  ==================================================================

and returns the network's state_dict with the wrapper prefixes (``net.``, ``module.``)
removed, plus the 24 CLIP adapter tensors of a VLU-Net checkpoint under their published
names (``ad_imageEncoder.adapter.*``, ``ad_textEncoder.adapter.*``), the ``learnable_params``
format of ``clip_tuned.pth``. Which method a state_dict belongs to is told by the method cards
(:func:`vlunet.archs.card.identify`): this module knows the wrappers, not the networks.

Files are opened with ``torch.load(weights_only=True)``, which cannot run code. A file that
needs full unpickling (e.g. a Lightning checkpoint whose hyper-parameters are Python
objects) is refused unless the caller passes ``trust_pickle=True``.
"""
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

NET_PREFIX = 'net.'
CLIP_PREFIX = 'model_degradation.'
MODULE_PREFIX = 'module.'
# The published names of DegradationCLIP's two adapters (clip_tuned.pth 'learnable_params', and the
# 'model_degradation.' entries of a VLU-Net Lightning checkpoint) -> our attribute names.
PUBLISHED_ADAPTER_PREFIXES = OrderedDict([('ad_imageEncoder.adapter.', 'image_adapter.'),
                                          ('ad_textEncoder.adapter.', 'text_adapter.')])
ADAPTER_PREFIXES = tuple(PUBLISHED_ADAPTER_PREFIXES)
# Names of the 24 published adapter tensors (two Sequential(Linear, LayerNorm, act) x 3 stacks).
ADAPTER_KEYS = tuple(f'{prefix}{i}.{p}' for prefix in ADAPTER_PREFIXES for i in (0, 1, 3, 4, 6, 7)
                     for p in ('weight', 'bias'))

EXPECTED = ("a published checkpoint: a Lightning .ckpt ({'state_dict': {'net.*': ...}}), "
            "{'params': ...} / {'params_ema': ...} (BasicSR), {'state_dict': ...}, "
            "{'learnable_params': ...} (clip_tuned.pth) or a bare state_dict of tensors")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or has an unexpected layout (the message names the file)."""


@dataclass
class PublishedCheckpoint:
    """What :func:`load_published_state_dict` found in a file.

    params: the network's state_dict (prefixes removed, file order); empty for a CLIP-adapter file.
    clip_adapters: published adapter tensors (``ad_*Encoder.adapter.*``) or None if the file has none.
    source_format: one of the formats in this module's docstring.
    ignored: keys that were neither network nor adapter entries (e.g. the CLIP backbone copies of
        a VLU-Net Lightning checkpoint), reported so that nothing is dropped silently.
    entries: for a file of several pickled modules, every module's state_dict by entry name (``params``
        is one of them: see :func:`load_published_state_dict`).
    """
    params: 'OrderedDict[str, torch.Tensor]'
    clip_adapters: Optional[Dict[str, torch.Tensor]]
    source_format: str
    ignored: List[str] = field(default_factory=list)
    entries: Dict[str, 'OrderedDict[str, torch.Tensor]'] = field(default_factory=dict)


def _unsafe_globals(path: str, message: str) -> List[str]:
    """Python globals (classes, functions) that ``path`` needs beyond what weights-only loading allows."""
    found = re.findall(r'Unsupported global: GLOBAL ([\w.]+)', message)
    finder = getattr(torch.serialization, 'get_unsafe_globals_in_checkpoint', None)  # torch >= 2.5
    if finder is not None:
        try:
            found += [g for g in finder(path) if g not in found]
        except Exception:  # noqa: BLE001  (not a zip checkpoint: rely on the message)
            pass
    return found


def _torch_load(path: str, trust_pickle: bool):
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such file (expected {EXPECTED})')
    try:
        return torch.load(path, map_location='cpu', weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        needed = [] if trust_pickle else _unsafe_globals(path, str(err))
        if needed:
            modules = _read_pickled_modules(path)  # whole pickled modules: read without running their code
            if modules is not None:
                return modules
            raise CheckpointError(
                f'{path}: this file holds Python objects besides tensors and plain containers (it references '
                f'{", ".join(needed)}), so it can only be opened by full unpickling, which executes code stored '
                'in the file. If you trust where it came from, pass trust_pickle=True (command line: '
                '--trust-pickle).') from None
        raise CheckpointError(f'{path}: not a PyTorch checkpoint ({_first_line(err)}); expected {EXPECTED}') from None
    except Exception as err:  # noqa: BLE001  (zip/EOF/runtime errors of a damaged or foreign file)
        raise CheckpointError(f'{path}: not a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)}); '
                              f'expected {EXPECTED}') from None


def _read_pickled_modules(path: str):
    """The entries of a file of pickled ``nn.Module`` objects, modules as state_dicts, read without importing
    or running their classes (:mod:`vlunet.utils.pickled_modules`); None when it holds no module."""
    from vlunet.utils.pickled_modules import PickledModuleError, is_pickled_module, load_pickled_modules, read_pickled
    try:
        obj = read_pickled(path)
        values = obj.values() if isinstance(obj, dict) else [obj]
        if not any(is_pickled_module(v) for v in values):
            return None  # other Python objects (e.g. hyper-parameters): only full unpickling, on request
        return load_pickled_modules(path)
    except (PickledModuleError, pickle.UnpicklingError, RuntimeError, ValueError, EOFError):
        return None


def _module_entries(ckpt) -> Dict[str, 'OrderedDict[str, torch.Tensor]']:
    """Entries of a loaded file that are networks: module objects (full unpickling) or the state_dicts the
    pickled-module reader made of them."""
    found = OrderedDict()
    for key, value in ckpt.items():
        if isinstance(value, torch.nn.Module):
            value = value.state_dict()
        if (isinstance(value, dict) and value and all(isinstance(k, str) for k in value)
                and all(isinstance(v, torch.Tensor) for v in value.values())):
            found[key] = OrderedDict(value)
    return found


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # torch's weights-only errors put the useful part ("Unsupported operand 0") near the end.
    detail = next((line for line in lines if line.startswith('Unsupported')), lines[0] if lines else '')
    return detail[:200]


def _check_tensors(path: str, where: str, mapping) -> None:
    if not isinstance(mapping, dict) or not mapping:
        raise CheckpointError(f'{path}: {where} should be a non-empty dict of tensors, got {type(mapping).__name__}'
                              f'{" (empty)" if isinstance(mapping, dict) else ""}; expected {EXPECTED}')
    bad = [k for k, v in mapping.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        shown = ', '.join(repr(k) for k in bad[:5]) + (' ...' if len(bad) > 5 else '')
        raise CheckpointError(f'{path}: {where} has {len(bad)} entries that are not tensors under string keys '
                              f'({shown}); expected {EXPECTED}')


def _strip_common_prefix(params: Dict[str, torch.Tensor], prefix: str) -> 'OrderedDict[str, torch.Tensor]':
    """Remove ``prefix`` from every key when all keys carry it (DataParallel's ``module.``)."""
    if params and all(k.startswith(prefix) for k in params):
        return OrderedDict((k[len(prefix):], v) for k, v in params.items())
    return OrderedDict(params)


def _split_lightning(state_dict) -> Tuple['OrderedDict[str, torch.Tensor]', Dict[str, torch.Tensor], List[str]]:
    params, adapters, ignored = OrderedDict(), {}, []
    for key, value in state_dict.items():
        if key.startswith(NET_PREFIX):
            params[key[len(NET_PREFIX):]] = value
        elif key.startswith(CLIP_PREFIX) and key[len(CLIP_PREFIX):].startswith(ADAPTER_PREFIXES):
            adapters[key[len(CLIP_PREFIX):]] = value
        else:
            ignored.append(key)
    return params, adapters, ignored


def load_published_state_dict(path: str, trust_pickle: bool = False, param_key: Optional[str] = None,
                              expect_keys=None) -> PublishedCheckpoint:
    """Read a published (or BasicSR) checkpoint; see the module docstring for the formats.

    Args:
        path: the file.
        trust_pickle: allow full unpickling (runs code from the file) when weights-only loading fails.
        param_key: for files with both ``params`` and ``params_ema``, which one to return
            (default: ``params``, as BasicSR's ``load_network``; falls back to the other one).
        expect_keys: for a file of several pickled modules (``{'epoch', 'net': <module>, 'aux': <module>}``),
            the keys of the network wanted: the entry with exactly these keys is ``params`` (default: the
            largest entry; every entry is in ``entries``, the others are listed in ``ignored``).

    Raises:
        CheckpointError: the file is missing, not a checkpoint, needs unpickling without
            ``trust_pickle``, or its layout is none of the known formats.
    """
    ckpt = _torch_load(path, trust_pickle)
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: holds a {type(ckpt).__name__}, expected {EXPECTED}')
    if not ckpt:
        raise CheckpointError(f"{path}: the checkpoint is empty ({{}}). Some published trainings write an empty "
                              "file for every evaluation that was not the best so far (vlunet-convert --help lists "
                              "the formats); use one that holds 'state_dict'")

    if 'state_dict' in ckpt:
        state_dict = ckpt['state_dict']
        _check_tensors(path, "'state_dict'", state_dict)
        if any(k.startswith(NET_PREFIX) for k in state_dict):
            params, adapters, ignored = _split_lightning(state_dict)
            vlunet = any(k.startswith(CLIP_PREFIX) for k in state_dict)
            return PublishedCheckpoint(params, adapters or None, 'lightning-vlunet' if vlunet else 'lightning',
                                       ignored)
        return PublishedCheckpoint(_strip_common_prefix(state_dict, MODULE_PREFIX), None, 'state_dict')

    param_keys = [k for k in ('params', 'params_ema') if k in ckpt]
    if param_keys:
        if param_key is not None and param_key not in ('params', 'params_ema'):
            raise CheckpointError(f"{path}: param_key must be 'params' or 'params_ema', got {param_key!r}")
        key = param_key if param_key in param_keys else param_keys[0]
        _check_tensors(path, repr(key), ckpt[key])
        return PublishedCheckpoint(_strip_common_prefix(ckpt[key], MODULE_PREFIX), None, key)

    if 'learnable_params' in ckpt:
        adapters = ckpt['learnable_params']
        _check_tensors(path, "'learnable_params'", adapters)
        return PublishedCheckpoint(OrderedDict(), dict(adapters), 'learnable_params')

    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        _check_tensors(path, 'the state_dict', ckpt)
        return PublishedCheckpoint(_strip_common_prefix(ckpt, MODULE_PREFIX), None, 'bare')

    entries = _module_entries(ckpt)
    if entries:  # whole modules saved by the trainer (e.g. {'epoch', 'net': <module>, ...})
        entries = OrderedDict((k, _strip_common_prefix(v, MODULE_PREFIX)) for k, v in entries.items())
        wanted = set(expect_keys) if expect_keys is not None else None
        key = next((k for k, v in entries.items() if wanted is not None and set(v) == wanted), None)
        if key is None:
            key = max(entries, key=lambda k: sum(v.numel() for v in entries[k].values()))
        return PublishedCheckpoint(entries[key], None, 'pickled-modules', [k for k in ckpt if k != key], entries)

    keys = ', '.join(repr(k) for k in list(ckpt)[:8]) + (' ...' if len(ckpt) > 8 else '')
    raise CheckpointError(f'{path}: unknown checkpoint layout (top-level keys: {keys or "none"}); expected {EXPECTED}')


def adapters_to_our_names(state: Dict[str, torch.Tensor]) -> 'OrderedDict[str, torch.Tensor]':
    """Rename published adapter keys (``ad_imageEncoder.adapter.*``) to ours (``image_adapter.*``);
    other keys are kept as they are."""
    out = OrderedDict()
    for key, value in state.items():
        for theirs, ours in PUBLISHED_ADAPTER_PREFIXES.items():
            if key.startswith(theirs):
                key = ours + key[len(theirs):]
                break
        out[key] = value
    return out


def check_clip_adapters(adapters: Dict[str, torch.Tensor]) -> Tuple[List[str], List[str]]:
    """(missing, unexpected) adapter names compared with the 24 published ones."""
    return ([k for k in ADAPTER_KEYS if k not in adapters], [k for k in adapters if k not in ADAPTER_KEYS])
