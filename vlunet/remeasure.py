"""``vlunet-remeasure --weights DIR [--setting S]``: measure a folder of downloaded released checkpoints.

Every file under DIR (sub-folders included, hidden files skipped) is read in any format
``vlunet-convert`` reads, plus files of pickled modules (read without running their code), and
recognised from its contents: the method and its constructor arguments from the keys and shapes
(the method cards, :func:`vlunet.archs.card.identify`), the released configuration, and the setting:

* from the contents where they tell it (a configuration released for one setting only, e.g. one
  whose number of degradation types belongs to one setting);
* from the file's path as the authors distribute it (``3task``, ``3d``, ``3deg``, ``AIO3``, ``three``
  -> NHR; ``5task``, ``5d``, ``AIO5`` ... -> NHRBL; ``cdd11`` -> CDD11);
* else from ``--setting``. Where the contents or the name say another setting than ``--setting``, or
  they contradict each other, the file is not measured and the listing says why; ``--setting-of
  FILE=SETTING`` decides it. A network of a size no released configuration has, of a method with
  several (small and large), needs ``--variant FILE=NAME``.

Each recognised file is converted (BasicSR ``{'params'}``, strict load verified, into ``--work``),
the setting's test option file of its method (``options/test/<stem>_<SETTING>.yml``) is run through
the normal ``vlunet-test`` pipeline under its published protocol, with the network built as the file
defines it, and ``results/<stem>_<SETTING>_released/`` is written as by ``vlunet-test``
(``metrics.json`` with fingerprints and environment, ``model.json``), plus ``weights.json``: the marker
by which ``vlunet-leaderboard`` knows these are released weights (file, SHA-256, format, method,
configuration, setting and how each was told).

Files that are not checkpoints of a known method are listed with the reason. Nothing is written
over an existing results folder without ``--overwrite`` (and then BasicSR keeps the old one as
``<name>_archived_<time>``). A run can be stopped and started again: a folder already measured from
the same file (same SHA-256, every test set present) is skipped, and one this command started but
did not finish is measured again.

Exit status: 0 every network file measured (now or before); 1 a measurement failed; 4 some network
files need an answer (``--setting``, ``--setting-of``, ``--variant``; listed); 2 bad arguments.
"""
import argparse
import contextlib
import hashlib
import io
import logging
import json
import os
import re
import sys
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import yaml

import vlunet  # noqa: F401  (registries, BasicSR fixes)  # isort: skip
from vlunet.archs.card import AmbiguousCheckpoint, identify
from vlunet.utils.atomic import write_json_atomic, write_text_atomic
from vlunet.utils.checkpoint import MODULE_PREFIX, NET_PREFIX, CheckpointError, load_published_state_dict

PROG = 'vlunet-remeasure'
MARKER = 'weights.json'
SUFFIX = 'released'
# how authors name the files of a setting (regular expressions on the lower-case path below --weights)
SETTING_WORDS = OrderedDict([
    ('NHRBL', (r'(?<![0-9])5[-_ ]?(task|tasks|d|deg|degs|degradation|degradations)(?![a-z])', r'aio[-_]?5(?![0-9])',
               r'five[-_ ]?(task|deg)', r'(?<![a-z])nhrbl(?![a-z])')),
    ('NHR', (r'(?<![0-9])3[-_ ]?(task|tasks|d|deg|degs|degradation|degradations)(?![a-z])', r'aio[-_]?3(?![0-9])',
             r'three[-_ ]?(task|deg)', r'(?<![a-z])nhr(?![a-z])')),
    ('CDD11', (r'cdd[-_]?11', )),
])
WRAPPER_PREFIXES = (NET_PREFIX, MODULE_PREFIX, 'model.')


class RemeasureError(ValueError):
    """Bad arguments (the message says which)."""


@dataclass
class Entry:
    """One file under --weights and what was found in it."""
    path: str
    rel: str
    status: str = 'unrecognised'        # unrecognised | adapters | ask | measure
    reason: str = ''
    card: object = None
    variant: object = None
    kwargs: dict = field(default_factory=dict)
    released_size: bool = False
    setting: Optional[str] = None
    how: Dict[str, str] = field(default_factory=dict)
    source_format: str = ''
    has_adapters: bool = False
    name: str = ''
    options: str = ''
    sha256: str = ''


# ------------------------------------------------------------------------------------------------
# reading a file
# ------------------------------------------------------------------------------------------------
def _strip_prefix(params):
    for prefix in WRAPPER_PREFIXES:
        if params and all(k.startswith(prefix) for k in params):
            return OrderedDict((k[len(prefix):], v) for k, v in params.items())
    net = OrderedDict((k[len(NET_PREFIX):], v) for k, v in params.items() if k.startswith(NET_PREFIX))
    return net or OrderedDict(params)


def _tensor_dicts(obj, where='', depth=0):
    """``(where, dict of tensors)`` found in a loaded file (nested dicts/lists, a few levels deep)."""
    if depth > 4:
        return
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= max(1, len(obj) // 2):
            yield where or 'the file', OrderedDict(tensors)
        for k, v in obj.items():
            if isinstance(v, (dict, list, tuple)):
                yield from _tensor_dicts(v, f'{where}[{k!r}]', depth + 1)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensor_dicts(v, f'{where}[{i}]', depth + 1)


def read_network(path, trust_pickle=False):
    """``(params, clip_adapters, format)`` of a checkpoint; raises CheckpointError naming why not.

    The published formats first (:func:`load_published_state_dict`); else the file is read as pickled
    modules (:mod:`vlunet.utils.pickled_modules`, no code of the file runs) and the state_dict a
    method recognises exactly is taken from it."""
    try:
        ckpt = load_published_state_dict(path, trust_pickle=trust_pickle)
        if ckpt.params:
            return ckpt.params, ckpt.clip_adapters, ckpt.source_format
        if ckpt.clip_adapters:
            return OrderedDict(), ckpt.clip_adapters, ckpt.source_format
        first_error = f'{path}: holds no network weights'
    except CheckpointError as err:
        first_error = str(err)
    from vlunet.utils.pickled_modules import PickledModuleError, load_pickled_modules
    try:
        entries = load_pickled_modules(path)
    except (PickledModuleError, Exception) as err:  # noqa: BLE001  (not a pickle at all: the first reason stands)
        raise CheckpointError(first_error) from err
    candidates = []
    for where, params in _tensor_dicts(entries):
        params = _strip_prefix(params)
        try:
            found = identify(params)
        except AmbiguousCheckpoint:
            found = None
        if found is not None and found.exact:
            candidates.append((where, params))
    if len(candidates) == 1:
        where, params = candidates[0]
        return params, None, f'pickled modules, entry {where}'
    if len(candidates) > 1:
        raise CheckpointError(f'{path}: several entries hold networks ({", ".join(w for w, _ in candidates)})')
    raise CheckpointError(f'{first_error} (read as pickled modules too: no entry is the state_dict of a known method)')


# ------------------------------------------------------------------------------------------------
# recognising method, configuration and setting
# ------------------------------------------------------------------------------------------------
def _shapes_fit(card, variant, params):
    """Whether the full-size network of ``variant`` has exactly the keys and shapes of ``params``."""
    try:
        with torch.device('meta'):
            built = card.arch_class(**dict(variant.kwargs)).state_dict()
    except Exception:  # noqa: BLE001
        return False
    return set(built) == set(params) and all(tuple(built[k].shape) == tuple(params[k].shape) for k in built)


def setting_from_name(rel, settings):
    """Settings the file's path names (as authors name their files), in the order of SETTING_WORDS."""
    text = rel.lower()
    found = []
    for setting, patterns in SETTING_WORDS.items():
        if setting in settings and any(re.search(p, text) for p in patterns):
            found.append(setting)
    if 'NHRBL' in found and 'NHR' in found and re.search(r'nhrbl', text) and not re.search(r'(?<![a-z])nhr(?![a-z])',
                                                                                      text.replace('nhrbl', '')):
        found.remove('NHR')
    return found


def _option_file(options_dir, variant, setting):
    return os.path.join(options_dir, f'{variant.options}_{setting}.yml') if variant and variant.options else None


def recognise(entry: Entry, params, args, settings):
    """Fill ``entry`` with the method, configuration and setting of ``params`` (or the reason it cannot)."""
    try:
        found = identify(params)
    except AmbiguousCheckpoint as err:
        entry.reason = str(err)
        return
    if found is None:
        first = ', '.join(list(params)[:4])
        entry.reason = f'no known method has these keys (first keys: {first}; {len(params)} tensors)'
        return
    if not found.exact:
        diff = (found.missing[:2] + found.unexpected[:2] + found.mismatched[:2])
        entry.reason = (f'closest method {found.card.name}, but the keys/shapes differ ({len(found.missing)} missing, '
                        f'{len(found.unexpected)} unexpected, {len(found.mismatched)} other shapes; e.g. '
                        f'{", ".join(diff)})')
        return
    card = entry.card = found.card
    entry.kwargs = dict(found.kwargs)
    exact = [v for v in card.variants if v.kwargs and _shapes_fit(card, v, params)]
    entry.released_size = bool(exact)
    # the setting: explicit answer > contents (a configuration released for one setting) > name > --setting
    content = sorted({s for v in exact for s in v.settings}) if exact and all(v.settings for v in exact) else []
    named = setting_from_name(entry.rel, settings)
    given = args.setting_of.get(entry.rel) or args.setting_of.get(os.path.basename(entry.rel))
    if given:
        entry.setting, entry.how['setting'] = given, f'--setting-of {entry.rel}={given}'
    elif len(content) > 1 or len(named) > 1:
        entry.status, entry.reason = 'ask', (f'the file could be any of {", ".join(content or named)} ('
                                             f'{"contents" if len(content) > 1 else "name"}); pass --setting-of '
                                             f'{entry.rel}=SETTING')
        return
    elif content and named and content != named:
        entry.status, entry.reason = 'ask', (f'its contents say {content[0]} ({exact[0].name}, released for '
                                             f'{content[0]}) but its name says {named[0]}; pass --setting-of '
                                             f'{entry.rel}=SETTING')
        return
    elif content or named:
        told = (content or named)[0]
        how = (f'contents: the {exact[0].name} configuration, released for {told}' if content
               else f'file name {entry.rel!r}')
        if args.setting and told != args.setting:
            entry.status, entry.reason = 'ask', (f'a {told} model ({how}), not {args.setting}; not measured (pass '
                                                 f'--setting-of {entry.rel}={args.setting} to measure it anyway)')
            return
        entry.setting, entry.how['setting'] = told, how
    elif args.setting:
        entry.setting, entry.how['setting'] = args.setting, f'--setting {args.setting} (the file does not tell)'
    else:
        entry.status, entry.reason = 'ask', ('neither its contents nor its name tell the setting; pass --setting or '
                                             f'--setting-of {entry.rel}=SETTING')
        return
    # the configuration (variant): explicit > released size > the only one with this setting's option files
    wanted = args.variant.get(entry.rel) or args.variant.get(os.path.basename(entry.rel))
    with_files = [v for v in card.variants_for(entry.setting)
                  if os.path.isfile(_option_file(args.options, v, entry.setting) or '')]
    if wanted:
        try:
            entry.variant = card.variant(wanted)
        except KeyError as err:
            entry.status, entry.reason = 'ask', str(err.args[0])
            return
        entry.how['variant'] = f'--variant {entry.rel}={wanted}'
    elif exact:
        entry.variant, entry.how['variant'] = exact[0], 'the released configuration\'s keys and shapes'
    elif len(with_files) == 1:
        entry.variant = with_files[0]
        entry.how['variant'] = f'the only {card.name} configuration with {entry.setting} test files'
    elif with_files:
        entry.status, entry.reason = 'ask', (f'a {card.name} network of a size no released configuration has; which '
                                             f'one do its numbers belong to ({", ".join(v.name for v in with_files)})? '
                                             f'pass --variant {entry.rel}=NAME')
        return
    else:
        entry.status, entry.reason = 'ask', (f'{card.name}: no test option file for {entry.setting} in {args.options} '
                                             f'(options/test/<stem>_{entry.setting}.yml)')
        return
    option_file = _option_file(args.options, entry.variant, entry.setting)
    if not option_file or not os.path.isfile(option_file):
        entry.status, entry.reason = 'ask', (f'{entry.variant.name}: no test option file {option_file} for '
                                             f'{entry.setting}')
        return
    entry.options = option_file
    entry.status = 'measure'


def scan(weights_dir):
    """Every non-hidden file below ``weights_dir``, sorted by relative path."""
    found = []
    for folder, dirs, files in os.walk(weights_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in files:
            if not name.startswith('.'):
                path = os.path.join(folder, name)
                found.append((os.path.relpath(path, weights_dir), path))
    return sorted(found)


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# measuring
# ------------------------------------------------------------------------------------------------
def _load_options(path):
    with open(path) as f:
        return yaml.safe_load(f)


def _val_sets(opt):
    return [d.get('name') for k, d in (opt.get('datasets') or {}).items() if k.startswith('test') and isinstance(d, dict)]


def _complete(result_dir, opt):
    path = os.path.join(result_dir, 'metrics.json')
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(metrics, dict) and all(s in metrics for s in _val_sets(opt))


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def convert_entry(entry: Entry, work, trust_pickle, network_kwargs):
    """``(weights path, clip adapters path or None)`` in ``work``: the file converted to ``{'params'}`` with a
    strict load into the network as it will be built (reused when already converted from the same file)."""
    from vlunet.convert import build_and_verify, write_atomically
    dst = os.path.join(work, f'{entry.name}.pth')
    clip = os.path.join(work, f'{entry.name}_clip_adapters.pth') if entry.has_adapters else None
    sidecar = os.path.join(work, f'{entry.name}.json')
    previous = _read_json(sidecar) or {}
    arch = entry.card.arch
    if (previous.get('sha256') == entry.sha256 and previous.get('network_g') == network_kwargs
            and os.path.isfile(dst) and (clip is None or os.path.isfile(clip))):
        return dst, clip
    params, adapters, _ = read_network(entry.path, trust_pickle)
    order = build_and_verify(params, arch, network_kwargs)
    outputs = [({'params': OrderedDict((k, params[k].detach().contiguous()) for k in order)}, dst)]
    if clip:
        outputs.append(({'learnable_params': dict(adapters)}, clip))
    write_atomically(outputs)
    write_json_atomic(sidecar, {'source': entry.path, 'sha256': entry.sha256, 'network_g': network_kwargs,
                                'status': 'converted'}, indent=1)
    return dst, clip


def derived_options(entry: Entry, args, weights, clip, shared_adapters):
    """The test option dict of ``entry``: the setting's test file of its method, its name, the network as
    the file defines it, the converted weights, the device and the optional tiling/precision."""
    opt = _load_options(entry.options)
    opt['name'] = entry.name
    network = dict(opt.get('network_g') or {'type': entry.card.arch})
    network.update(entry.kwargs)
    network['type'] = entry.card.arch
    opt['network_g'] = network
    path = dict(opt.get('path') or {})
    path.update(pretrain_network_g=weights, strict_load_g=True, param_key_g='params')
    opt['path'] = path
    if opt.get('network_clip'):
        adapters = clip or shared_adapters
        if adapters is None:
            raise RemeasureError(f'{entry.rel}: its method needs the CLIP adapters (network_clip) but the file holds '
                                 f'none and {args.weights} has no adapter file ({{"learnable_params": ...}})')
        opt['network_clip'] = dict(opt['network_clip'], load_path=adapters)
    opt['num_gpu'] = 0 if args.device == 'cpu' else 'auto'
    val = dict(opt.get('val') or {})
    if args.tile is not None:
        val['tile'] = args.tile or None
    if args.precision:
        val['amp'] = args.precision
    if args.no_save_img:
        val['save_img'] = False
    opt['val'] = val
    return opt


class _Progress(io.TextIOBase):
    """The console of one test run: everything goes to its log file; the console shows the validation
    progress bars and warnings only (``--verbose``: everything)."""

    def __init__(self, log_file, console, verbose):
        self.log_file, self.console, self.verbose = log_file, console, verbose
        self.open_line = False   # a progress bar is on the console's last line

    def writable(self):
        return True

    def write(self, text):
        self.log_file.write(text)
        shown = None
        if self.verbose:
            shown = text
        elif text.lstrip('\r').startswith('Val '):
            shown, self.open_line = text, True
        elif 'WARNING' in text or 'ERROR' in text:
            line = ' '.join(text.split())
            line = line if len(line) <= 220 else line[:217] + '...'
            shown, self.open_line = ('\n' if self.open_line else '') + line + '\n', False
        elif text.startswith('\n') and self.open_line:
            shown, self.open_line = '\n', False
        if shown:
            self.console.write(shown)
            self.console.flush()
        return len(text)

    def flush(self):
        self.log_file.flush()


def _fresh_basicsr_logger():
    """Forget BasicSR's logger, so that each test run of this process logs to its own results folder."""
    from basicsr.utils import logger as basicsr_logger
    log = logging.getLogger('basicsr')
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    basicsr_logger.initialized_logger.pop('basicsr', None)


def run_test(option_path, log_path, verbose=False):
    """Run ``vlunet-test -opt option_path`` in this process (its output in ``log_path``); returns None or
    the error text."""
    from vlunet.test import main as vlunet_test
    saved = list(sys.argv)
    _fresh_basicsr_logger()
    with open(log_path, 'w') as log_file:
        stream = _Progress(log_file, sys.__stdout__ if sys.stdout is None else sys.stdout, verbose)
        try:
            with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
                vlunet_test(['-opt', option_path])
        except SystemExit as err:
            log_file.flush()
            if err.code not in (0, None):
                return f'vlunet-test stopped (exit status {err.code}): {_tail(log_path)}'
        except Exception as err:  # noqa: BLE001  (one file's failure must not stop the others)
            log_file.write(traceback.format_exc())
            return f'{type(err).__name__}: {err} (log: {log_path})'
        finally:
            sys.argv[:] = saved
            _fresh_basicsr_logger()
    return None


def _tail(path, lines=6):
    try:
        with open(path) as f:
            kept = [line.rstrip() for line in f if line.strip()][-lines:]
    except OSError:
        return path
    return ' | '.join(kept) + f' (log: {path})'


def _summary(metrics, sets):
    parts = []
    for s in sets:
        e = metrics.get(s) or {}
        if 'psnr' in e:
            parts.append(f'{s} {e["psnr"]:.2f}' + (f'/{e["ssim"]:.4f}' if 'ssim' in e else ''))
    return ', '.join(parts)


def measure(entry: Entry, args, shared_adapters, log):
    """Convert, test and mark one file; returns 'measured', 'skipped: ...' or 'failed: ...'."""
    result_dir = os.path.join('results', entry.name)
    opt_file = _load_options(entry.options)
    marker = _read_json(os.path.join(result_dir, MARKER)) or {}
    state_path = os.path.join(args.work, f'{entry.name}.json')
    state = _read_json(state_path) or {}
    if os.path.isdir(result_dir) and not args.overwrite:
        if marker.get('sha256') == entry.sha256 and _complete(result_dir, opt_file):
            return 'skipped: already measured from this file (pass --overwrite to measure again)'
        ours = state.get('sha256') == entry.sha256 and state.get('status') in ('measuring', 'converted')
        if not ours:
            return (f'skipped: {result_dir} exists and was not written by {PROG} from this file; pass --overwrite '
                    '(the old folder is kept as <name>_archived_<time>)')
        log(f'      {result_dir} is an unfinished run of {PROG} from this file: measuring it again')
    network = dict(_load_options(entry.options).get('network_g') or {})
    network.update(entry.kwargs)
    network.pop('type', None)
    try:
        weights, clip = convert_entry(entry, args.work, args.trust_pickle, network)
        opt = derived_options(entry, args, weights, clip, shared_adapters)
    except Exception as err:  # noqa: BLE001  (conversion errors name the file and the keys)
        return f'failed: {err}'
    option_path = os.path.join(args.work, f'{entry.name}.yml')
    header = (f'# written by {PROG} for {entry.path} (sha256 {entry.sha256}): {entry.options} with the network as the '
              'file defines it and the converted weights\n')
    write_text_atomic(option_path, header + yaml.safe_dump(opt, sort_keys=False))
    write_json_atomic(state_path, dict(_read_json(state_path) or {}, status='measuring', sha256=entry.sha256),
                      indent=1)
    started = time.perf_counter()
    error = run_test(option_path, os.path.join(args.work, f'{entry.name}.log'), args.verbose)
    if error is None and not _complete(result_dir, opt):
        error = f'{result_dir}/metrics.json lacks test sets of {entry.options}'
    if error:
        return f'failed: {error}'
    marker = {'origin': SUFFIX, 'file': os.path.abspath(entry.path), 'file_name': entry.rel, 'sha256': entry.sha256,
              'bytes': os.path.getsize(entry.path), 'source_format': entry.source_format, 'method': entry.card.name,
              'arch': entry.card.arch, 'variant': entry.variant.name, 'released_size': entry.released_size,
              'setting': entry.setting, 'how': entry.how, 'options': entry.options, 'converted': weights,
              'cwd': os.getcwd(), 'network_g': opt['network_g'], 'written_by': PROG}
    write_json_atomic(os.path.join(result_dir, MARKER), marker, indent=1, sort_keys=True)
    write_json_atomic(state_path, dict(_read_json(state_path) or {}, status='done'), indent=1)
    metrics = _read_json(os.path.join(result_dir, 'metrics.json')) or {}
    return f'measured in {time.perf_counter() - started:.1f} s: {_summary(metrics, _val_sets(opt))}'


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def _pairs(items, what):
    out = {}
    for item in items or []:
        key, sep, value = item.rpartition('=')
        if not sep or not key or not value:
            raise RemeasureError(f'--{what} {item!r}: expected FILE=VALUE (FILE as listed, relative to --weights)')
        out[key] = value
    return out


def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    parser.add_argument('--weights', required=True, metavar='DIR', help='folder of downloaded released checkpoints')
    parser.add_argument('--setting', help='the setting to measure (NHR, NHRBL, CDD11, ...): for files that do not tell '
                                          'theirs; files of another setting are listed, not measured')
    parser.add_argument('--setting-of', action='append', default=[], metavar='FILE=SETTING',
                        help='the setting of one file (overrides what its name or contents say)')
    parser.add_argument('--variant', action='append', default=[], metavar='FILE=NAME',
                        help='the released configuration of one file (a variant name of its method card) when its size '
                             'does not tell')
    parser.add_argument('--options', default=None, metavar='DIR',
                        help='test option files (default: options/test, else the package checkout\'s)')
    parser.add_argument('--work', default='released_weights', metavar='DIR',
                        help='where converted weights and derived option files go (default: released_weights/)')
    parser.add_argument('--overwrite', action='store_true',
                        help='measure again over existing results folders (BasicSR archives the old ones)')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto', help='where the networks run')
    parser.add_argument('--tile', type=int, default=None, help='val.tile: tiled inference (recorded; 0: off)')
    parser.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'), help='val.amp (recorded)')
    parser.add_argument('--no-save-img', action='store_true', help='do not save the restored images')
    parser.add_argument('--trust-pickle', action='store_true',
                        help='allow full unpickling of files that need it (runs code stored in them)')
    parser.add_argument('--dry-run', action='store_true', help='recognise and list only; measure nothing')
    parser.add_argument('--verbose', action='store_true', help="show vlunet-test's whole log (always in --work)")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    log = lambda message: print(message, flush=True)  # noqa: E731
    try:
        args.setting_of, args.variant = _pairs(args.setting_of, 'setting-of'), _pairs(args.variant, 'variant')
    except RemeasureError as err:
        parser.error(str(err))
    if not os.path.isdir(args.weights):
        parser.error(f'--weights {args.weights}: not a folder')
    from vlunet.leaderboard import REPO_OPTIONS, known_settings
    if args.options is None:
        args.options = os.path.join('options', 'test') if os.path.isdir(os.path.join('options', 'test')) \
            else REPO_OPTIONS
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    settings = known_settings(args.options)
    for given in [args.setting] + list(args.setting_of.values()):
        if given and given not in settings:
            parser.error(f'setting {given!r} is not known (known: {", ".join(settings)})')
    files = scan(args.weights)
    log(f'{PROG}: {len(files)} file(s) in {args.weights}' + (f', setting {args.setting}' if args.setting else ''))
    entries, shared_adapters = [], []
    for i, (rel, path) in enumerate(files, 1):
        entry = Entry(path, rel)
        try:
            params, adapters, entry.source_format = read_network(path, args.trust_pickle)
        except CheckpointError as err:
            entry.reason = str(err).replace(f'{path}: ', '').split('; expected a published checkpoint')[0]
        else:
            entry.has_adapters = bool(adapters)
            if not params:
                entry.status, entry.reason = 'adapters', f'CLIP adapters only ({entry.source_format}), no network'
                shared_adapters.append(path)
            else:
                recognise(entry, params, args, settings)
            del params
        what = (f'{entry.card.name}' if entry.card else '') + (f' ({entry.variant.name}, {entry.setting})'
                                                               if entry.status == 'measure' else '')
        log(f'  [{i}/{len(files)}] {rel}: {what or entry.status}' + (f' - {entry.reason}' if entry.reason else ''))
        entries.append(entry)
    adapters = shared_adapters[0] if len(shared_adapters) == 1 else None
    to_measure = [e for e in entries if e.status == 'measure']
    groups = {}
    for e in to_measure:
        groups.setdefault((e.variant.options, e.setting), []).append(e)
    for (stem, setting), group in groups.items():
        for e in group:
            e.name = f'{stem}_{setting}_{SUFFIX}'
            if len(group) > 1:
                e.name += '_' + re.sub(r'[^A-Za-z0-9]+', '_', os.path.splitext(e.rel)[0]).strip('_')
    unrecognised = [e for e in entries if e.status == 'unrecognised']
    asks = [e for e in entries if e.status == 'ask']
    if unrecognised:
        log('\nNot recognised (not measured):')
        for e in unrecognised:
            log(f'  {e.rel}: {e.reason}')
    if asks:
        log('\nRecognised but not measured (your answer is needed):')
        for e in asks:
            log(f'  {e.rel}: {e.card.name if e.card else "?"}: {e.reason}')
    if args.dry_run:
        log(f'\n--dry-run: {len(to_measure)} file(s) would be measured: '
            + ', '.join(f'{e.rel} -> results/{e.name}' for e in to_measure))
        return 4 if asks else 0
    os.makedirs(args.work, exist_ok=True)
    outcomes = []
    log(f'\nMeasuring {len(to_measure)} file(s) (results under ./results, converted weights in {args.work}/):')
    for i, e in enumerate(to_measure, 1):
        e.sha256 = file_sha256(e.path)
        log(f'  [{i}/{len(to_measure)}] {e.rel} -> results/{e.name} ({e.card.name} {e.variant.name}, {e.setting}: '
            f'{e.how.get("setting")}; {"released size" if e.released_size else "size from the file"}) ...')
        outcome = measure(e, args, adapters, log)
        log(f'  [{i}/{len(to_measure)}] {e.name}: {outcome}')
        outcomes.append((e, outcome))
    failed = [(e, o) for e, o in outcomes if o.startswith('failed')]
    log(f'\n{PROG}: {sum(o.startswith("measured") for _, o in outcomes)} measured, '
        f'{sum(o.startswith("skipped") for _, o in outcomes)} skipped, {len(failed)} failed, '
        f'{len(asks)} need an answer, {len(unrecognised)} not recognised.')
    if to_measure:
        log('Next: vlunet-leaderboard ' + ' '.join(f'results/{e.name}' for e in to_measure) + ' --out leaderboard')
    if failed:
        return 1
    return 4 if asks else 0


if __name__ == '__main__':
    sys.exit(main())
