"""``vlunet-leaderboard RESULT_DIR... --out DIR [--setting S]``: paper, released weights and retrained, side by side.

For one setting (NHR, NHRBL, CDD11, ...; read from the folders or given with ``--setting``) it
writes ``DIR/leaderboard.md``, ``DIR/leaderboard.csv`` and a self-contained ``DIR/leaderboard.html``
(styles inline, charts as inline SVG, nothing fetched from the network):

* one table of averages and one table per task; each method one row with three column groups:
  what the paper prints (from the method's card, :class:`vlunet.archs.card.PublishedResults`), what
  its released weights give (result folders of ``vlunet-remeasure``) and what retraining it in
  vlunet gives (result folders of a ``vlunet-train`` run), and the measured-minus-paper differences;
  parameters and GMACs at 256x256;
* every published number with its source, and how other papers quote the method; each average is
  recomputed from its per-task values and a printed average more than 0.01 dB (or 0.001 SSIM) off is
  flagged (†);
* under the tables: the protocol (folders measured under different protocols are refused, exit
  status 3, as ``vlunet-compare`` does), the test sets' fingerprints with every folder measured on
  a set that differs from the canonical one or from the others marked (‡, naming the files), the
  environment, and which folders were used and how each was classified.

Which column a folder fills is decided from what was recorded at test time, never from its name:
``weights.json`` written by ``vlunet-remeasure`` (released weights, with the file's SHA-256) when
``model.json`` loaded the file it names; ``model.json``'s ``pretrain_network_g`` inside a vlunet
training run (``experiments/<name>/models/net_g_*.pth``: retrained); otherwise ``--released DIR`` /
``--retrained DIR`` say it, and a folder nobody classified is left out and named.
"""
import argparse
import csv
import glob
import html
import json
import math
import os
import re
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import vlunet  # noqa: F401  (registries, BasicSR fixes)  # isort: skip
from vlunet.archs.card import MethodCard, PublishedResults, Variant, card_for, list_methods
from vlunet.compare import (GMAC_SIZE, ProtocolMismatch, ResultError, build_table, check_protocols, check_test_sets,
                            count_gmacs, describe_environments, describe_protocols, describe_test_sets, load_result)
from vlunet.utils.atomic import write_atomic, write_text_atomic

PROG = 'vlunet-leaderboard'
MARKER = 'weights.json'          # written by vlunet-remeasure into results/<name>/
ORIGINS = ('released', 'retrained')
PSNR_TOLERANCE, SSIM_TOLERANCE = 0.01, 0.001   # a printed average further off its per-task mean is flagged
ARCHIVED = re.compile(r'_archived_\d{8}_\d{6}$')   # BasicSR's mkdir_and_rename suffix
TRAINING_OUTPUT = re.compile(r'(^|[\\/])experiments[\\/][^\\/]+[\\/]models[\\/]net_g_[^\\/]+\.pth$')
DAGGER, DDAGGER, SECTION = '†', '‡', '§'
RED_OUTLINE = ' stroke="#c00" stroke-width="2"'   # a bar or point measured on a test set that differs
COLOURS = {'paper': '#7f7f7f', 'released': '#1f77b4', 'retrained': '#e8710a'}
DEFAULT_METRICS = {'psnr': 'float', 'ssim': 'float_uniform7'}
REPO_OPTIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'options', 'test')


class LeaderboardError(ValueError):
    """The leaderboard cannot be made from these folders (the message says why)."""


# ------------------------------------------------------------------------------------------------
# settings and their tasks
# ------------------------------------------------------------------------------------------------
def option_dirs(extra=None):
    return [d for d in ([extra] if extra else []) + [os.path.join('options', 'test'), REPO_OPTIONS] if d]


def known_settings(options_dir=None) -> List[str]:
    """Settings the package knows: those of the cards' published results, of their variants and of the
    test option files of their variants (``<stem>_<SETTING>.yml``)."""
    found = []
    for card in list_methods():
        for name in [r.setting for r in card.results] + [s for v in card.variants for s in v.settings]:
            if name not in found:
                found.append(name)
    stems = {v.options for card in list_methods() for v in card.variants if v.options}
    for folder in option_dirs(options_dir):
        for path in sorted(glob.glob(os.path.join(folder, '*.yml'))):
            base = os.path.basename(path)[:-4]
            for stem in stems:
                rest = base[len(stem) + 1:] if base.startswith(stem + '_') else ''
                if rest and re.fullmatch(r'[A-Z0-9]+', rest) and rest not in found:
                    found.append(rest)
    return found


def _val_set_names(path):
    import yaml
    try:
        with open(path) as f:
            opt = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return []
    datasets = (opt or {}).get('datasets') or {}
    keys = sorted((k for k in datasets if k.startswith('test')), key=lambda k: int(re.sub(r'\D', '', k) or 0))
    return [datasets[k].get('name') for k in keys if isinstance(datasets[k], dict) and datasets[k].get('name')]


def setting_tasks(setting, options_dir=None) -> List[str]:
    """The validation sets of ``setting`` in the order of its test option files (else of the cards' results)."""
    for folder in option_dirs(options_dir):
        for card in list_methods():
            for v in card.variants:
                if v.options:
                    names = _val_set_names(os.path.join(folder, f'{v.options}_{setting}.yml'))
                    if names:
                        return names
    order = []
    for card in list_methods():
        for r in card.results:
            if r.setting == setting:
                order += [t for t in r.tasks if t not in order]
    return order


def published_tasks(setting) -> List[str]:
    """The tasks a published average of ``setting`` runs over: the task set most of its published rows print."""
    sets = Counter(tuple(r.tasks) for card in list_methods() for r in card.results if r.setting == setting and r.tasks)
    if not sets:
        return []
    return list(sets.most_common(1)[0][0])


# ------------------------------------------------------------------------------------------------
# published numbers
# ------------------------------------------------------------------------------------------------
@dataclass
class Published:
    """One :class:`PublishedResults` with its recomputed average and whether the printed one is off."""
    card: MethodCard
    results: PublishedResults
    recomputed: Tuple[Optional[float], Optional[float]] = (None, None)
    flags: List[str] = field(default_factory=list)

    @property
    def printed(self):
        return self.results.average or (None, None)

    @property
    def own(self):
        return self.results.quoted_in is None

    @property
    def best_average(self):
        """The recomputed average where per-task values exist, else the printed one."""
        return self.recomputed if self.recomputed[0] is not None else self.printed


def recompute(results: PublishedResults) -> Published:
    """The mean of the per-task values and the flags of a printed average that differs from it."""
    tasks = results.tasks
    if not tasks:
        return Published(None, results, (None, None),
                         ['per-task values not printed in any source read; the average is as printed'])
    psnr = sum(v[0] for v in tasks.values()) / len(tasks)
    ssims = [v[1] for v in tasks.values()]
    ssim = sum(ssims) / len(ssims) if all(s is not None for s in ssims) else None
    flags = []
    printed = results.average
    if printed and printed[0] is not None and abs(printed[0] - psnr) > PSNR_TOLERANCE + 1e-9:
        flags.append(f'{DAGGER} printed average PSNR {printed[0]:.2f} is not the mean of its per-task values '
                     f'({psnr:.3f}, {printed[0] - psnr:+.3f} dB)')
    if printed and len(printed) > 1 and printed[1] is not None and ssim is not None \
            and abs(printed[1] - ssim) > SSIM_TOLERANCE + 1e-9:
        flags.append(f'{DAGGER} printed average SSIM {printed[1]:.4f} is not the mean of its per-task values '
                     f'({ssim:.4f}, {printed[1] - ssim:+.4f})')
    return Published(None, results, (psnr, ssim), flags)


def published_for(card, setting, variant_name=None) -> List[Published]:
    """Every published row of ``card`` for ``setting`` (and variant), own paper first, each recomputed."""
    rows = []
    for r in card.results:
        if r.setting == setting and (variant_name is None or r.variant == variant_name):
            p = recompute(r)
            p.card = card
            rows.append(p)
    return sorted(rows, key=lambda p: not p.own)


# ------------------------------------------------------------------------------------------------
# result folders: setting, method, variant, origin
# ------------------------------------------------------------------------------------------------
@dataclass
class Folder:
    """A results/<name>/ folder and how the leaderboard placed it."""
    result: dict
    card: Optional[MethodCard] = None
    variant: Optional[Variant] = None
    setting: Optional[str] = None
    origin: Optional[str] = None
    how: Dict[str, str] = field(default_factory=dict)
    marker: Optional[dict] = None
    problem: Optional[str] = None

    @property
    def dir(self):
        return self.result['dir']

    @property
    def name(self):
        return self.result['name']

    @property
    def method(self):
        return self.variant.name if self.variant else (self.card.name if self.card else self.name)


def _read_marker(result_dir):
    path = os.path.join(result_dir, MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError) as err:
        return {'error': f'{path}: cannot be read as JSON ({err})'}
    return marker if isinstance(marker, dict) else {'error': f'{path}: expected a JSON object'}


def _same_path(a, b, base):
    if not a or not b:
        return False
    a = a if os.path.isabs(a) else os.path.join(base, a)
    b = b if os.path.isabs(b) else os.path.join(base, b)
    return os.path.normpath(os.path.abspath(a)) == os.path.normpath(os.path.abspath(b))


def classify_origin(folder: Folder, overrides: Dict[str, str]) -> Tuple[Optional[str], str]:
    """(origin, how it was decided) of a folder; origin None when it cannot be told (``how`` says why)."""
    key = os.path.normpath(os.path.abspath(folder.dir))
    if key in overrides:
        return overrides[key], f'--{overrides[key]} on the command line'
    marker = folder.marker
    pretrain = folder.result['model'].get('pretrain_network_g')
    if marker and marker.get('error'):
        return None, marker['error']
    if marker and marker.get('origin') in ORIGINS:
        base = marker.get('cwd') or os.getcwd()
        if marker.get('converted') and not _same_path(marker['converted'], pretrain, base):
            return None, (f'{MARKER} names {marker["converted"]} but model.json loaded {pretrain}: the marker is not '
                          'about these numbers; re-run vlunet-remeasure, or pass --released/--retrained')
        sha = str(marker.get('sha256') or '')[:12]
        return marker['origin'], (f'{MARKER} of vlunet-remeasure: {marker.get("file", "?")} '
                                  f'(sha256 {sha}...), {marker.get("source_format", "?")}')
    if pretrain and TRAINING_OUTPUT.search(str(pretrain)):
        return 'retrained', f'model.json: pretrain_network_g {pretrain} is the output of a vlunet training run'
    # a relative path is relative to where vlunet-test ran: the folder above results/, or here
    published = _published_format(pretrain, os.path.dirname(os.path.dirname(os.path.abspath(folder.dir)))) \
        or _published_format(pretrain, os.getcwd())
    if published:
        return 'released', (f'model.json: pretrain_network_g {pretrain} is in a format the authors distribute '
                            f'({published}), not a vlunet training output')
    return None, (f'cannot tell released from retrained: model.json loads {pretrain or "no weights"} (no {MARKER} '
                  'of vlunet-remeasure, not an experiments/<name>/models/net_g_*.pth of a training run); pass '
                  '--released DIR or --retrained DIR')


# formats only the published trainings write (BasicSR's {'params'} is also what vlunet writes: it does not tell)
PUBLISHED_FORMATS = ('lightning', 'lightning-vlunet', 'state_dict', 'pickled-modules')


def _published_format(path, base=None):
    """The published format of the weights file a folder was measured with, when it still exists and is one only
    the authors' trainings write; else None."""
    if not path:
        return None
    full = path if os.path.isabs(path) else os.path.join(base or os.getcwd(), path)
    if not os.path.isfile(full):
        return None
    from vlunet.utils.checkpoint import CheckpointError, load_published_state_dict
    try:
        fmt = load_published_state_dict(full).source_format
    except (CheckpointError, OSError, ValueError):
        return None
    return fmt if fmt in PUBLISHED_FORMATS else None


def _settings_by_length(settings):
    return sorted(settings, key=len, reverse=True)


def classify_setting(folder: Folder, settings, options_dir=None) -> Tuple[Optional[str], str]:
    marker = folder.marker or {}
    if marker.get('setting'):
        return marker['setting'], f'{MARKER}'
    for label, name in (('model.json name', folder.result['model'].get('name')), ('folder name', folder.name)):
        for s in _settings_by_length(settings):
            if name and re.search(rf'_{re.escape(s)}(_|$)', str(name)):
                return s, f'{label} {name}'
    measured = set(folder.result['metrics'])
    fits = []
    for s in settings:
        tasks = set(setting_tasks(s, options_dir))
        if tasks and measured <= tasks:
            fits.append((len(tasks - measured), s))   # the setting whose test files hold them with the fewest others
    if fits:
        fits.sort()
        if len(fits) > 1 and fits[0][0] == fits[1][0]:
            return None, f'its validation sets fit {fits[0][1]} and {fits[1][1]} alike'
        return fits[0][1], ('its validation sets are those of this setting\'s test files' if fits[0][0] == 0 else
                            'its validation sets are among this setting\'s test files (no other setting fits better)')
    return None, 'neither a weights.json, the name (<method>_<SETTING>) nor the validation sets tell the setting'


def classify_variant(folder: Folder) -> Tuple[Optional[Variant], str]:
    card, setting = folder.card, folder.setting
    if card is None or not card.variants:
        return None, 'no method card'
    marker = folder.marker or {}
    if marker.get('variant'):
        try:
            return card.variant(marker['variant']), MARKER
        except KeyError:
            pass
    candidates = card.variants_for(setting) if setting else list(card.variants)
    candidates = candidates or list(card.variants)
    for name in (folder.result['model'].get('name'), folder.name):
        stems = sorted((v for v in candidates if v.options and name and str(name).startswith(f'{v.options}_{setting}')),
                       key=lambda v: len(v.options), reverse=True)
        if stems:
            return stems[0], f'name {name}'
    network = folder.result['model'].get('network_g') or {}
    fits = [v for v in candidates if v.kwargs and all(network.get(k) == val for k, val in v.kwargs.items())]
    if len(fits) == 1:
        return fits[0], 'network_g has its released kwargs'
    params = folder.result['model'].get('params')
    fits = [v for v in candidates if v.params and v.params == params]
    if len(fits) == 1:
        return fits[0], 'parameter count'
    with_options = [v for v in candidates if v.options]
    if len(with_options) == 1:
        return with_options[0], f'the only configuration with {setting} option files'
    return candidates[0], f'assumed (first of {", ".join(v.name for v in candidates)})'


# ------------------------------------------------------------------------------------------------
# the rows
# ------------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One method (variant) of the leaderboard: the paper, its quotes and the measured folders."""
    method: str
    card: Optional[MethodCard]
    variant: Optional[Variant]
    paper: Optional[Published] = None
    quotes: List[Published] = field(default_factory=list)
    folders: Dict[str, Folder] = field(default_factory=dict)     # origin -> folder
    params_M: Optional[float] = None
    gmacs: Optional[float] = None
    notes: List[str] = field(default_factory=list)


def _variant_name(card, variant):
    return variant.name if variant else (card.name if card else '?')


def build_rows(folders: List[Folder], setting: str) -> List[Row]:
    rows = OrderedDict()

    def row_for(card, variant, suffix=''):
        key = (card.name if card else '?', _variant_name(card, variant), suffix)
        if key not in rows:
            rows[key] = Row(_variant_name(card, variant) + suffix, card, variant)
            if card is not None:   # a second folder of the same method and column: its own row, the same paper
                published = published_for(card, setting, variant.name if variant else None)
                if published:
                    rows[key].paper, rows[key].quotes = published[0], ([] if suffix else published[1:])
        return rows[key]

    for card in list_methods():  # every method with published numbers for the setting, in card order
        for variant in (card.variants or (None,)):
            if variant is not None and any(r.setting == setting and r.variant == variant.name for r in card.results):
                row_for(card, variant)
    for f in folders:
        row = row_for(f.card, f.variant)
        if f.origin in row.folders:
            row = row_for(f.card, f.variant, f' ({f.name})')
        row.folders[f.origin] = f
    return list(rows.values())


def measured_protocol_metrics(protocol):
    """``{'psnr': variant, 'ssim': variant, 'crop': rule}`` of a recorded protocol."""
    out = {}
    for name, opt in ((protocol or {}).get('metrics') or {}).items():
        kind = 'ssim' if 'ssim' in name.lower() or 'ssim' in str(opt.get('type', '')).lower() else \
            'psnr' if 'psnr' in name.lower() or 'psnr' in str(opt.get('type', '')).lower() else None
        if kind is None:
            continue
        if str(opt.get('type', '')).endswith('_skimage'):
            out[kind] = opt.get('variant') or DEFAULT_METRICS[kind]
        else:
            out[kind] = f'{opt.get("type")} (8-bit, BasicSR)'
    out['crop'] = (protocol or {}).get('crop')
    return out


def _measurement_note(paper: Published, measured: dict) -> Optional[str]:
    wanted = paper.results.measurement
    if not wanted:
        return None
    diffs = []
    for key in ('psnr', 'ssim'):
        if key in wanted and measured.get(key) and wanted[key] != measured[key]:
            diffs.append(f'{key.upper()} {wanted[key]} (measured here: {measured[key]})')
    if 'crop' in wanted and measured.get('crop') and wanted['crop'] != measured['crop']:
        diffs.append(f'crop: {wanted["crop"]} (here: {measured["crop"]})')
    if not diffs:
        return None
    return f'{SECTION} the paper\'s numbers were measured differently: ' + '; '.join(diffs)


# ------------------------------------------------------------------------------------------------
# the leaderboard
# ------------------------------------------------------------------------------------------------
@dataclass
class Leaderboard:
    setting: str
    tasks: List[str]
    average_tasks: List[str]
    rows: List[Row]
    cells: Dict[str, Dict[str, Tuple]]        # folder dir -> {task: (psnr, ssim)}, 'average' -> over average_tasks
    notes_by_dir: Dict[str, Dict[str, List[str]]]   # folder dir -> {'test_set': [...], 'unaveraged': [...]}
    input_row: Dict[str, Tuple]
    protocol_lines: List[str]
    test_set_lines: List[str]
    environment_lines: List[str]
    used: List[Folder]
    left_out: List[Tuple[str, str]]
    measured_metrics: dict


def _result_folders(paths):
    results, left_out = [], []
    for d in paths:
        if not os.path.isfile(os.path.join(d, 'metrics.json')):
            left_out.append((d, 'no metrics.json (not a results/<name>/ folder of vlunet-test)'))
            continue
        try:
            results.append(load_result(d))
        except (ResultError, FileNotFoundError) as err:
            left_out.append((d, str(err)))
    return results, left_out


def make_leaderboard(paths, setting=None, released=(), retrained=(), with_gmacs=True, options_dir=None,
                     log=print) -> Leaderboard:
    """Read, classify and check the folders; raise :class:`ProtocolMismatch` for mixed protocols and
    :class:`LeaderboardError` when the setting cannot be told."""
    results, left_out = _result_folders(paths)
    names = {r['name'] for r in results}
    archived = [r for r in results if ARCHIVED.search(r['name']) and ARCHIVED.sub('', r['name']) in names]
    left_out += [(r['dir'], f'an earlier run of {ARCHIVED.sub("", r["name"])} that BasicSR archived (the newer one '
                            'is used; give this folder without it to use it)') for r in archived]
    results = [r for r in results if r not in archived]
    overrides = {os.path.normpath(os.path.abspath(d)): 'released' for d in released}
    overrides.update({os.path.normpath(os.path.abspath(d)): 'retrained' for d in retrained})
    settings = known_settings(options_dir)
    if setting and setting not in settings:
        settings.append(setting)
    folders = []
    for r in results:
        f = Folder(r, marker=_read_marker(r['dir']))
        f.setting, f.how['setting'] = classify_setting(f, settings, options_dir)
        network = r['model'].get('network_g')
        f.card = card_for(network) if network else None
        if f.card is None:
            left_out.append((f.dir, 'model.json names no network_g (cannot tell the method)'))
            continue
        folders.append(f)
    seen = sorted({f.setting for f in folders if f.setting})
    if setting is None:
        if len(seen) > 1:
            listing = '; '.join(f'{s}: ' + ', '.join(f.name for f in folders if f.setting == s) for s in seen)
            raise LeaderboardError(f'the folders are of several settings ({listing}); pass --setting to choose one')
        if not seen:
            raise LeaderboardError('no folder tells its setting (' + '; '.join(f'{f.name}: {f.how["setting"]}'
                                                                                for f in folders) +
                                   '); pass --setting')
        setting = seen[0]
    of_setting = []
    for f in folders:
        if f.setting is None:
            f.setting, f.how['setting'] = setting, f'--setting {setting} (the folder does not tell: {f.how["setting"]})'
        if f.setting != setting:
            left_out.append((f.dir, f'measured for {f.setting} ({f.how["setting"]}), not {setting}'))
            continue
        of_setting.append(f)
    # one protocol for every folder of the setting, whether or not it gets a column (as vlunet-compare)
    protocols = check_protocols([f.result for f in of_setting]) if of_setting else {}
    used = []
    for f in of_setting:
        f.origin, f.how['origin'] = classify_origin(f, overrides)
        if f.origin is None:
            left_out.append((f.dir, f.how['origin']))
            continue
        f.variant, f.how['variant'] = classify_variant(f)
        used.append(f)
    results = [f.result for f in used]
    average_tasks = published_tasks(setting) or list(setting_tasks(setting, options_dir))
    printed = {t for card in list_methods() for r in card.results if r.setting == setting for t in r.tasks}
    measured = {s for r in results for s in r['metrics']}
    # the tasks of the setting's test files that anything was printed or measured for, then any other measured set
    tasks = [t for t in setting_tasks(setting, options_dir) if t in printed or t in measured]
    tasks += [t for t in average_tasks if t not in tasks]
    tasks += sorted(s for s in measured if s not in tasks)
    test_sets = check_test_sets(results)
    cells, notes_by_dir, input_row = {}, {}, {}
    gmacs = {}
    if results:
        table_rows, _ = build_table(results, with_gmacs=with_gmacs, sets=tasks, test_sets=test_sets)
        average_rows, _ = build_table(results, with_gmacs=False, sets=average_tasks, test_sets=test_sets)
        input_row = {t: table_rows[0][t] for t in tasks}
        input_row['average'] = average_rows[0]['average']
        for full, avg in zip(table_rows[1:], average_rows[1:]):
            cells[full['dir']] = dict({t: full[t] for t in tasks}, average=avg['average'])
            notes_by_dir[full['dir']] = {'test_set': full['test_set'], 'unaveraged': avg['unaveraged'],
                                         'missing': full['missing']}
            gmacs[full['dir']] = (full['params_M'], full['gmacs'])
    rows = build_rows(used, setting)
    measured_as = measured_protocol_metrics(next(iter(protocols.values()), None)) if protocols else {}
    gmac_cache = {}
    for row in rows:
        folder = row.folders.get('released') or row.folders.get('retrained')
        if folder is not None:
            row.params_M, row.gmacs = gmacs.get(folder.dir, (None, None))
            published = row.variant.params if row.variant else None
            for f in row.folders.values():
                p = f.result['model'].get('params')
                if published and p and p != published:
                    row.notes.append(f'{f.origin}: the network is not the released configuration ({p / 1e6:.2f}M '
                                     f'parameters, published {published / 1e6:.2f}M)')
        elif row.variant is not None:
            row.params_M = row.variant.params / 1e6 if row.variant.params else None
            if with_gmacs and row.card is not None:
                opt = row.card.network_opt(row.variant.name)
                key = json.dumps(opt, sort_keys=True)
                if key not in gmac_cache:
                    try:
                        gmac_cache[key] = count_gmacs(opt)
                    except Exception as err:  # noqa: BLE001  (an arch that cannot be counted: leave it empty)
                        log(f'warning: GMACs of {row.method} not counted ({err})')
                        gmac_cache[key] = None
                row.gmacs = gmac_cache[key]
        for p in ([row.paper] if row.paper else []) + row.quotes:
            note = _measurement_note(p, measured_as) if measured_as else None
            if note and note not in row.notes:
                row.notes.append(note)
    test_set_lines = describe_test_sets(results, tasks, test_sets) if results else []
    return Leaderboard(setting, tasks, average_tasks, rows, cells, notes_by_dir, input_row,
                       describe_protocols(protocols) if results else ['No measured folders: published numbers only.'],
                       test_set_lines, describe_environments(results) if results else [], used, left_out, measured_as)


# ------------------------------------------------------------------------------------------------
# cells
# ------------------------------------------------------------------------------------------------
def _pair(value, digits=2, ssim_digits=None):
    if value is None or value[0] is None:
        return '-'
    ssim_digits = ssim_digits or (4 if value[1] is not None and round(value[1], 3) != value[1] else 3)
    ssim = '-' if len(value) < 2 or value[1] is None else f'{value[1]:.{ssim_digits}f}'
    return f'{value[0]:.{digits}f} / {ssim}'


def _delta(measured, paper):
    if not measured or not paper or measured[0] is None or paper[0] is None:
        return None
    ssim = measured[1] - paper[1] if measured[1] is not None and paper[1] is not None else None
    return measured[0] - paper[0], ssim


def _delta_text(delta):
    if delta is None:
        return '-'
    return f'{delta[0]:+.2f} / ' + ('-' if delta[1] is None else f'{delta[1]:+.4f}')


def _paper_task(row: Row, task):
    if row.paper is None:
        return None
    return row.paper.results.tasks.get(task)


def _measured(board: Leaderboard, row: Row, origin, task):
    f = row.folders.get(origin)
    if f is None:
        return None
    return board.cells.get(f.dir, {}).get(task)


def _differs(board, row, origin, task=None):
    f = row.folders.get(origin)
    if f is None:
        return []
    lines = board.notes_by_dir.get(f.dir, {}).get('test_set', [])
    return [line for line in lines if task is None or line.startswith(f'{task}:')]


def _measured_cell(board, row, origin, task):
    f = row.folders.get(origin)
    if f is None:
        return ''
    if task != 'average' and task in board.notes_by_dir.get(f.dir, {}).get('missing', []):
        return 'not measured'
    value = _measured(board, row, origin, task)
    if task == 'average' and (value is None or value[0] is None):
        return 'not averaged (incomplete)'
    text = _pair(value, ssim_digits=4)
    if task == 'average' and _differs(board, row, origin) or task != 'average' and _differs(board, row, origin, task):
        text += f' {DDAGGER}'
    return text


def _quote_cell(row: Row, task):
    own = (row.paper.printed if row.paper else None) if task == 'average' else _paper_task(row, task)
    parts = []
    for q in row.quotes:
        value = q.results.tasks.get(task) if task != 'average' else q.printed
        if value is None:
            continue
        if own is None or tuple(value) != tuple(own):
            where = q.results.quoted_in or 'own paper'
            parts.append(f'{_pair(value)} ({where})')
    return '; '.join(parts)


# ------------------------------------------------------------------------------------------------
# Markdown and CSV
# ------------------------------------------------------------------------------------------------
def _md_table(head, rows):
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    lines += ['| ' + ' | '.join(str(c).replace('|', '/') for c in r) + ' |' for r in rows]
    return '\n'.join(lines)


def average_table(board: Leaderboard):
    head = ['Method', 'Params (M)', f'GMACs@{GMAC_SIZE}', 'Paper (printed)', 'Paper (recomputed)',
            'Released', 'Retrained', 'Released - paper', 'Retrained - paper', 'Other quotes (printed)', 'Notes']
    rows = []
    for row in board.rows:
        paper = row.paper
        notes = list(paper.flags if paper else []) + row.notes
        for q in row.quotes:
            notes += [f'{flag} ({q.results.quoted_in})' for flag in q.flags if flag.startswith(DAGGER)]
        for origin in ORIGINS:
            f = row.folders.get(origin)
            unaveraged = board.notes_by_dir.get(f.dir, {}).get('unaveraged') if f else None
            if unaveraged:
                notes.append(f'{origin} not averaged: {"; ".join(unaveraged)}')
            if _differs(board, row, origin):
                notes.append(f'{DDAGGER} {origin}: test set differs')
        reference = paper.best_average if paper else None
        rows.append([row.method, '-' if row.params_M is None else f'{row.params_M:.2f}',
                     '-' if row.gmacs is None else f'{row.gmacs:.2f}',
                     _pair(paper.printed) if paper else '-', _pair(paper.recomputed, 3, 4) if paper else '-',
                     _measured_cell(board, row, 'released', 'average'),
                     _measured_cell(board, row, 'retrained', 'average'),
                     _delta_text(_delta(_measured(board, row, 'released', 'average'), reference)),
                     _delta_text(_delta(_measured(board, row, 'retrained', 'average'), reference)),
                     _quote_cell(row, 'average'), '; '.join(notes)])
    return head, rows


def _short(line, limit=110):
    """The first difference of a test-set line ('SET: a; b; c'), cut to ``limit`` characters."""
    text = line.split(': ', 1)[-1].split('; ')[0]
    return text if len(text) <= limit else text[:limit - 3] + '...'


def task_table(board: Leaderboard, task):
    head = ['Method', 'Paper', 'Released', 'Retrained', 'Released - paper', 'Retrained - paper',
            'Other quotes', 'Notes']
    rows = []
    for row in board.rows:
        paper = _paper_task(row, task)
        notes = [f'{origin}: {_short(line)}' for origin in ORIGINS for line in _differs(board, row, origin, task)]
        rows.append([row.method, _pair(paper), _measured_cell(board, row, 'released', task),
                     _measured_cell(board, row, 'retrained', task),
                     _delta_text(_delta(_measured(board, row, 'released', task), paper)),
                     _delta_text(_delta(_measured(board, row, 'retrained', task), paper)),
                     _quote_cell(row, task), '; '.join(f'{DDAGGER} {n}' for n in notes)])
    return head, rows


def published_table(board: Leaderboard):
    head = ['Method', 'Quoted in', 'Source'] + board.average_tasks + ['Printed average', 'Recomputed', 'Flag']
    rows = []
    for row in board.rows:
        for p in ([row.paper] if row.paper else []) + row.quotes:
            r = p.results
            extra = [t for t in r.tasks if t not in board.average_tasks]
            source = r.source + (f' (also: {", ".join(extra)})' if extra else '')
            if r.measurement:
                source += ' [measured: ' + ', '.join(f'{k} {v}' for k, v in r.measurement.items()) + ']'
            rows.append([f'{row.method}', r.quoted_in or 'own paper', source]
                        + [_pair(r.tasks.get(t)) for t in board.average_tasks]
                        + [_pair(p.printed), _pair(p.recomputed, 3, 4), '; '.join(p.flags)])
    return head, rows


def _folder_lines(board):
    lines = []
    for f in board.used:
        lines.append(f'{f.dir}: {f.method}, {f.origin} ({f.how.get("origin")}); setting {f.setting} '
                     f'({f.how.get("setting")}); configuration {f.method} ({f.how.get("variant")})')
    return lines


READING = [
    'Differences are measured minus paper (PSNR dB / SSIM); the paper average is the one recomputed from its '
    'per-task values where it has them.',
    'Below about 0.01 dB: rounding (the papers print two decimals; a mean of rounded values moves by up to 0.005 '
    'dB, the printed average by another 0.005).',
    'About 0.01 dB on the noise tasks: a different noise draw (the published scripts draw unseeded noise; vlunet '
    'seeds it per image).',
    'Up to a few hundredths of a dB, or a few thousandths of SSIM: another device, precision (bf16/fp16 autocast), '
    'tiling or software version (see the environment); compare within one environment.',
    'Tenths of a dB and more: a different test set (marked ‡), a different metric (Y instead of RGB adds about '
    '1.4 dB on Rain100L inputs; 8-bit vs float, the SSIM window: marked §), other weights than the ones the '
    'paper measured, or a training that differs from the paper\'s recipe.',
]


def to_markdown(board: Leaderboard) -> str:
    parts = [f'# Leaderboard: {board.setting}', '',
             f'Tasks: {", ".join(board.tasks)}. Averages over the published tasks: {", ".join(board.average_tasks)}. '
             'PSNR (dB) / SSIM. Columns: what the paper prints (from the method cards), what the released weights give '
             '(vlunet-remeasure) and what retraining in vlunet gives, under one protocol.', '',
             '## Averages', '', _md_table(*average_table(board)), '']
    if board.input_row:
        parts += [f'Degraded input: {_pair(board.input_row.get("average"), ssim_digits=4)} (average over the '
                  'published tasks).', '']
    for task in board.tasks:
        parts += [f'## {task}', '', _md_table(*task_table(board, task)), '']
        if board.input_row.get(task):
            parts += [f'Degraded input: {_pair(board.input_row[task], ssim_digits=4)}.', '']
    parts += ['## Published numbers and how other papers quote them', '', _md_table(*published_table(board)), '',
              f'{DAGGER}: a printed average more than {PSNR_TOLERANCE} dB (or {SSIM_TOLERANCE} SSIM) from the mean of '
              f'its per-task values. {DDAGGER}: measured on a test set that differs (see Test sets). {SECTION}: the '
              'paper measured differently from this table\'s protocol.', '',
              '## Protocol', ''] + board.protocol_lines + ['', '## Test sets', '']
    parts += [line.replace('\n', ' ') for line in board.test_set_lines] or ['No fingerprints (no measured folders).']
    parts += ['', '## Environment', ''] + (board.environment_lines or ['No measured folders.'])
    parts += ['', '## Folders used', ''] + [f'- {line}' for line in _folder_lines(board)]
    if board.left_out:
        parts += ['', 'Not used:'] + [f'- {d}: {why}' for d, why in board.left_out]
    parts += ['', '## How to read the differences', ''] + [f'- {line}' for line in READING]
    return '\n'.join(parts) + '\n'


CSV_HEAD = ['setting', 'task', 'method', 'column', 'psnr', 'ssim', 'delta_psnr_vs_paper', 'delta_ssim_vs_paper',
            'printed_average_psnr', 'printed_average_ssim', 'params_M', 'gmacs_256', 'source', 'folder', 'flags']


def csv_rows(board: Leaderboard):
    out = []
    for row in board.rows:
        for task in board.tasks + ['average']:
            reference = (row.paper.best_average if row.paper else None) if task == 'average' else _paper_task(row, task)
            published = ([('paper', row.paper)] if row.paper else []) + [('quote', q) for q in row.quotes]
            for column, p in published:
                value = p.recomputed if task == 'average' else p.results.tasks.get(task)
                printed = p.printed if task == 'average' else (None, None)
                if value is None and printed[0] is None:
                    continue
                value = value or (None, None)
                out.append([board.setting, task, row.method, column, value[0], value[1], None, None, printed[0],
                            printed[1] if len(printed) > 1 else None, row.params_M, row.gmacs,
                            (p.results.quoted_in + ': ' if p.results.quoted_in else '') + p.results.source, '',
                            '; '.join(p.flags) if task == 'average' else ''])
            for origin in ORIGINS:
                f = row.folders.get(origin)
                if f is None:
                    continue
                value = _measured(board, row, origin, task) or (None, None)
                delta = _delta(value, reference) or (None, None)
                flags = _differs(board, row, origin, None if task == 'average' else task)
                if task == 'average' and board.notes_by_dir.get(f.dir, {}).get('unaveraged'):
                    flags = flags + board.notes_by_dir[f.dir]['unaveraged']
                out.append([board.setting, task, row.method, origin, value[0], value[1], delta[0], delta[1], None,
                            None, row.params_M, row.gmacs, '', f.dir, '; '.join(flags)])
    return out


def write_csv(path, board):
    def write(f):
        writer = csv.writer(f)
        writer.writerow(CSV_HEAD)
        for r in csv_rows(board):
            writer.writerow(['' if v is None else (round(v, 6) if isinstance(v, float) else v) for v in r])
    write_atomic(path, write, binary=False)


# ------------------------------------------------------------------------------------------------
# HTML with inline SVG charts
# ------------------------------------------------------------------------------------------------
def _esc(text):
    return html.escape(str(text), quote=True)


def nice_ticks(lo, hi, count=5):
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    start = math.floor(lo / step) * step
    ticks, value = [], start
    while value <= hi + step * 0.5:
        ticks.append(round(value, 10))
        value += step
    return ticks


def _series_values(board, row, task):
    """[(kind, (psnr, ssim), differs)] of a row for a task: paper, released, retrained."""
    values = []
    paper = (row.paper.best_average if row.paper else None) if task == 'average' else _paper_task(row, task)
    if paper and paper[0] is not None:
        values.append(('paper', paper, False))
    for origin in ORIGINS:
        v = _measured(board, row, origin, task)
        if v and v[0] is not None:
            values.append((origin, v, bool(_differs(board, row, origin, None if task == 'average' else task))))
    return values


def _legend(x, y, kinds):
    parts = []
    for i, kind in enumerate(kinds):
        parts.append(f'<rect x="{x + i * 110}" y="{y - 9}" width="10" height="10" fill="{COLOURS[kind]}"/>'
                     f'<text x="{x + i * 110 + 14}" y="{y}" class="legend">{_esc(kind)}</text>')
    return ''.join(parts)


def svg_task_bars(board: Leaderboard, task, width=560, height=240):
    """Grouped bars: per method, paper / released / retrained PSNR for one task (‡ on a differing test set)."""
    groups = [(row, _series_values(board, row, task)) for row in board.rows]
    groups = [(row, vals) for row, vals in groups if vals]
    title = 'average over the published tasks' if task == 'average' else task
    if not groups:
        return f'<svg class="chart" data-task="{_esc(task)}" width="{width}" height="40"><text x="8" y="24">' \
               f'{_esc(title)}: no numbers</text></svg>'
    values = [v[1][0] for _, vals in groups for v in vals]
    lo, hi = min(values), max(values)
    ticks = nice_ticks(lo - (hi - lo) * 0.15 - 0.2, hi + 0.1)
    y0, y1 = ticks[0], ticks[-1]
    left, right, top, bottom = 48, 10, 28, 58
    plot_w, plot_h = width - left - right, height - top - bottom

    def y(v):
        return top + plot_h * (1 - (v - y0) / (y1 - y0))

    out = [f'<svg class="chart task-bars" data-task="{_esc(task)}" '
           f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<title>PSNR per method: {_esc(title)}</title>',
           f'<text x="{left}" y="16" class="chart-title">{_esc(title)} (PSNR dB)</text>']
    for t in ticks:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(t):.1f}" y2="{y(t):.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{y(t) + 4:.1f}" class="tick" text-anchor="end">{t:g}</text>')
    group_w = plot_w / len(groups)
    for gi, (row, vals) in enumerate(groups):
        bar_w = min(18.0, (group_w - 6) / 3)
        x_start = left + gi * group_w + (group_w - bar_w * len(vals)) / 2
        for vi, (kind, v, differs) in enumerate(vals):
            x = x_start + vi * bar_w
            top_y = y(v[0])
            out.append(f'<rect class="bar" data-method="{_esc(row.method)}" data-kind="{kind}" '
                       f'data-value="{v[0]:.4f}" data-differs="{str(differs).lower()}" x="{x:.1f}" y="{top_y:.1f}" '
                       f'width="{bar_w - 1:.1f}" height="{max(0.5, y(y0) - top_y):.1f}" fill="{COLOURS[kind]}"'
                       f'{RED_OUTLINE if differs else ""}>'
                       f'<title>{_esc(row.method)} {kind}: {v[0]:.2f} dB{" (test set differs)" if differs else ""}'
                       '</title></rect>')
            if differs:
                out.append(f'<text x="{x + bar_w / 2:.1f}" y="{top_y - 3:.1f}" class="mark" '
                           f'text-anchor="middle">{DDAGGER}</text>')
        cx = left + gi * group_w + group_w / 2
        out.append(f'<text x="{cx:.1f}" y="{height - bottom + 14}" class="tick" text-anchor="end" '
                   f'transform="rotate(-30 {cx:.1f} {height - bottom + 14})">{_esc(row.method)}</text>')
    out.append(_legend(left, height - 6, ['paper', 'released', 'retrained']))
    out.append('</svg>')
    return ''.join(out)


def svg_average_vs_params(board: Leaderboard, width=560, height=320):
    """Average PSNR (published tasks) against parameters, one marker per column group."""
    points = []
    for row in board.rows:
        for kind, v, differs in _series_values(board, row, 'average'):
            params = row.params_M
            if kind == 'paper' and row.variant is not None and row.variant.params:
                params = row.variant.params / 1e6
            if params:
                points.append((row, kind, params, v[0], differs))
    if not points:
        return f'<svg class="chart" id="average-vs-params" width="{width}" height="40"><text x="8" y="24">' \
               'average PSNR against parameters: no numbers</text></svg>'
    left, right, top, bottom = 52, 20, 28, 44
    plot_w, plot_h = width - left - right, height - top - bottom
    xs = [p[2] for p in points]
    logx = max(xs) / min(xs) > 20
    fx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    pad = (x_hi - x_lo) * 0.1 or 0.5
    x_lo, x_hi = x_lo - pad, x_hi + pad
    ys = [p[3] for p in points]
    yt = nice_ticks(min(ys) - 0.2, max(ys) + 0.2)

    def X(v):
        return left + plot_w * (fx(v) - x_lo) / (x_hi - x_lo)

    def Y(v):
        return top + plot_h * (1 - (v - yt[0]) / (yt[-1] - yt[0]))

    out = [f'<svg class="chart" id="average-vs-params" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
           '<title>Average PSNR against parameters</title>',
           f'<text x="{left}" y="16" class="chart-title">Average PSNR (dB) against parameters '
           f'(M{", log scale" if logx else ""})</text>']
    for t in yt:
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{Y(t) + 4:.1f}" class="tick" text-anchor="end">{t:g}</text>')
    x_ticks = [10 ** e * m for e in range(-3, 4) for m in (1, 2, 5)] if logx else nice_ticks(min(xs), max(xs))
    for t in x_ticks:
        if x_lo <= fx(t) <= x_hi:
            out.append(f'<text x="{X(t):.1f}" y="{height - bottom + 16}" class="tick" text-anchor="middle">{t:g}</text>')
    by_row = {}
    for row, kind, px, py, differs in points:
        by_row.setdefault(row.method, []).append((X(px), Y(py)))
    for coords in by_row.values():
        if len(coords) > 1:
            path = ' '.join(f'{x:.1f},{y:.1f}' for x, y in coords)
            out.append(f'<polyline points="{path}" class="link"/>')
    for row, kind, px, py, differs in points:
        x, y = X(px), Y(py)
        shape = {'paper': f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="white" stroke="{COLOURS[kind]}" '
                          'stroke-width="2"',
                 'released': f'<rect x="{x - 4.5:.1f}" y="{y - 4.5:.1f}" width="9" height="9" fill="{COLOURS[kind]}"',
                 'retrained': f'<path d="M{x:.1f},{y - 6:.1f} L{x + 5.5:.1f},{y + 4:.1f} L{x - 5.5:.1f},{y + 4:.1f} Z" '
                              f'fill="{COLOURS[kind]}"'}[kind]
        out.append(f'{shape} class="point" data-method="{_esc(row.method)}" data-kind="{kind}" '
                   f'data-params="{px:.4f}" data-value="{py:.4f}"{RED_OUTLINE if differs else ""}>'
                   f'<title>{_esc(row.method)} {kind}: {py:.2f} dB, {px:.2f}M parameters</title>'
                   f'{"</circle>" if kind == "paper" else "</rect>" if kind == "released" else "</path>"}')
        if kind == 'paper' or not any(k == 'paper' for r, k, *_ in points if r is row):
            out.append(f'<text x="{x + 7:.1f}" y="{y - 6:.1f}" class="label">{_esc(row.method)}</text>')
    out.append(_legend(left, height - 6, ['paper', 'released', 'retrained']))
    out.append('</svg>')
    return ''.join(out)


def svg_differences(board: Leaderboard, width=560):
    """Measured minus paper PSNR per method and task (and average): diverging horizontal bars."""
    entries = []
    for row in board.rows:
        for task in board.tasks + ['average']:
            paper = (row.paper.best_average if row.paper else None) if task == 'average' else _paper_task(row, task)
            for origin in ORIGINS:
                d = _delta(_measured(board, row, origin, task), paper)
                if d is not None:
                    differs = bool(_differs(board, row, origin, None if task == 'average' else task))
                    entries.append((row, task, origin, d[0], differs))
    if not entries:
        return f'<svg class="chart" id="differences" width="{width}" height="40"><text x="8" y="24">measured minus ' \
               'paper: nothing measured that the papers print</text></svg>'
    bar_h, left, right, top = 14, 230, 20, 30
    height = top + bar_h * len(entries) + 34
    span = max(0.1, max(abs(e[3]) for e in entries))
    ticks = nice_ticks(-span, span, 4)
    lo, hi = min(ticks[0], -span), max(ticks[-1], span)
    plot_w = width - left - right

    def X(v):
        return left + plot_w * (v - lo) / (hi - lo)

    out = [f'<svg class="chart" id="differences" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" role="img">',
           '<title>Measured minus paper PSNR</title>',
           '<text x="8" y="16" class="chart-title">Measured minus paper (PSNR dB)</text>']
    for t in ticks:
        out.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{top - 4}" y2="{height - 30}" class="grid"/>'
                   f'<text x="{X(t):.1f}" y="{height - 18}" class="tick" text-anchor="middle">{t:+g}</text>')
    out.append(f'<line x1="{X(0):.1f}" x2="{X(0):.1f}" y1="{top - 4}" y2="{height - 30}" class="zero"/>')
    for i, (row, task, origin, d, differs) in enumerate(entries):
        yy = top + i * bar_h
        x0, x1 = sorted((X(0), X(d)))
        out.append(f'<text x="{left - 6}" y="{yy + bar_h - 4}" class="tick" text-anchor="end">'
                   f'{_esc(row.method)} · {_esc(task)} · {origin}{" " + DDAGGER if differs else ""}</text>'
                   f'<rect class="diff" data-method="{_esc(row.method)}" data-task="{_esc(task)}" data-kind="{origin}" '
                   f'data-value="{d:.4f}" data-differs="{str(differs).lower()}" x="{x0:.1f}" y="{yy + 2}" '
                   f'width="{max(1.0, x1 - x0):.1f}" height="{bar_h - 4}" fill="{COLOURS[origin]}">'
                   f'<title>{_esc(row.method)} {_esc(task)} {origin}: {d:+.3f} dB</title></rect>')
    out.append(_legend(left, height - 4, ['released', 'retrained']))
    out.append('</svg>')
    return ''.join(out)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:1.5em;margin:0 0 4px} h2{font-size:1.15em;margin:28px 0 8px;border-bottom:1px solid #ddd}
p.meta{color:#555;margin:0 0 12px} table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d6d6d6;padding:3px 7px;text-align:right;vertical-align:top}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left;white-space:nowrap}
td.note,td.src{text-align:left;max-width:420px;color:#444} td.differs{background:#fde8e8}
th.paper{border-top:3px solid #7f7f7f} th.released{border-top:3px solid #1f77b4} th.retrained{border-top:3px solid #e8710a}
.charts{display:flex;flex-wrap:wrap;gap:18px} figure{margin:0;border:1px solid #e2e2e2;padding:6px;background:#fff}
svg .grid{stroke:#e6e6e6} svg .zero{stroke:#444} svg .tick{font-size:10px;fill:#444} svg .label{font-size:10px}
svg .chart-title{font-size:12px;font-weight:600} svg .legend{font-size:11px} svg .mark{font-size:12px;fill:#c00}
svg .link{fill:none;stroke:#bbb;stroke-dasharray:3 2} ul.notes{font-size:13px;color:#333}
"""


def _html_table(head, rows, classes=None, cell_class=None):
    th = ''.join(f'<th class="{(classes or {}).get(h, "")}">{_esc(h)}</th>' for h in head)
    body = []
    for r in rows:
        tds = []
        for i, c in enumerate(r):
            cls = cell_class(head[i], c) if cell_class else ''
            tds.append(f'<td class="{cls}">{_esc(c)}</td>')
        body.append('<tr>' + ''.join(tds) + '</tr>')
    return f'<table><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _cell_class(head, cell):
    if head in ('Notes', 'Source', 'Other quotes', 'Other quotes (printed)', 'Flag'):
        return 'note'
    if isinstance(cell, str) and cell.endswith(DDAGGER):
        return 'differs'
    return ''


HEAD_CLASSES = {'Paper': 'paper', 'Paper (printed)': 'paper', 'Paper (recomputed)': 'paper', 'Released': 'released',
                'Retrained': 'retrained', 'Released - paper': 'released', 'Retrained - paper': 'retrained'}


def to_html(board: Leaderboard, title=None) -> str:
    title = title or f'Leaderboard: {board.setting}'
    parts = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
             f'<meta name="viewport" content="width=device-width"><title>{_esc(title)}</title>',
             f'<style>{CSS}</style></head><body>',
             f'<h1>{_esc(title)}</h1>',
             f'<p class="meta">Setting {_esc(board.setting)}: {_esc(", ".join(board.tasks))}. Averages over the published '
             f'tasks ({_esc(", ".join(board.average_tasks))}). PSNR (dB) / SSIM. {len(board.used)} result folder(s); '
             f'made by {PROG}, no network access needed.</p>',
             '<h2>Averages</h2>',
             _html_table(*average_table(board), HEAD_CLASSES, _cell_class)]
    if board.input_row:
        parts.append(f'<p class="meta">Degraded input: {_esc(_pair(board.input_row.get("average"), ssim_digits=4))}</p>')
    parts += ['<h2>Charts</h2><div class="charts">',
              f'<figure id="fig-average-vs-params">{svg_average_vs_params(board)}</figure>',
              f'<figure id="fig-differences">{svg_differences(board)}</figure>',
              f'<figure id="fig-average-bars">{svg_task_bars(board, "average")}</figure>']
    parts += [f'<figure class="fig-task">{svg_task_bars(board, task)}</figure>' for task in board.tasks]
    parts.append('</div>')
    for task in board.tasks:
        parts += [f'<h2 id="task-{_esc(task)}">{_esc(task)}</h2>',
                  _html_table(*task_table(board, task), HEAD_CLASSES, _cell_class)]
        if board.input_row.get(task):
            parts.append(f'<p class="meta">Degraded input: {_esc(_pair(board.input_row[task], ssim_digits=4))}</p>')
    parts += ['<h2>Published numbers and how other papers quote them</h2>',
              _html_table(*published_table(board), None, _cell_class),
              f'<p class="meta">{DAGGER}: printed average more than {PSNR_TOLERANCE} dB (or {SSIM_TOLERANCE} SSIM) from '
              f'the mean of its per-task values. {DDAGGER}: measured on a test set that differs. {SECTION}: the paper '
              'measured differently from this table\'s protocol.</p>']

    def listing(title_, lines):
        return [f'<h2>{_esc(title_)}</h2><ul class="notes">'] + [f'<li>{_esc(line)}</li>' for line in lines] + ['</ul>']

    parts += listing('Protocol', board.protocol_lines)
    parts += listing('Test sets', [line.replace('\n', ' ') for line in board.test_set_lines] or ['No fingerprints.'])
    parts += listing('Environment', board.environment_lines or ['No measured folders.'])
    parts += listing('Folders used', _folder_lines(board) or ['None: published numbers only.'])
    if board.left_out:
        parts += listing('Folders not used', [f'{d}: {why}' for d, why in board.left_out])
    parts += listing('How to read the differences', READING)
    parts.append('</body></html>\n')
    return '\n'.join(parts)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_parser():
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog='Exit status: 0 written; 2 bad arguments or nothing to tabulate; 3 the '
                                            'folders were measured under different protocols.')
    parser.add_argument('results', nargs='*', help='results/<name>/ folders of vlunet-test / vlunet-remeasure')
    parser.add_argument('--out', default='leaderboard', help='folder for leaderboard.md/.csv/.html')
    parser.add_argument('--setting', help='the setting to tabulate (default: read from the folders)')
    parser.add_argument('--released', nargs='+', default=[], metavar='DIR',
                        help='folders measured with released weights (when no weights.json says so)')
    parser.add_argument('--retrained', nargs='+', default=[], metavar='DIR',
                        help='folders measured with weights retrained in vlunet (when model.json does not say so)')
    parser.add_argument('--no-gmacs', action='store_true', help='do not count GMACs (faster)')
    parser.add_argument('--options', metavar='DIR', help='test option files (default: options/test)')
    parser.add_argument('--title', help='title of the HTML page')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.results and not args.setting:
        print(f'{PROG}: error: give result folders, or --setting for the published numbers alone', file=sys.stderr)
        return 2
    try:
        board = make_leaderboard(args.results, args.setting, args.released, args.retrained, not args.no_gmacs,
                                 args.options, log=lambda m: print(m, file=sys.stderr))
    except ProtocolMismatch as err:
        print(f'{PROG}: error: {err}', file=sys.stderr)
        print(f'{PROG}: nothing written', file=sys.stderr)
        return 3
    except LeaderboardError as err:
        print(f'{PROG}: error: {err}', file=sys.stderr)
        return 2
    for d, why in board.left_out:
        print(f'warning: not used: {d}: {why}', file=sys.stderr)
    if args.results and not board.used:
        print(f'{PROG}: error: none of the folders could be used (see the warnings)', file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    markdown = to_markdown(board)
    write_text_atomic(os.path.join(args.out, 'leaderboard.md'), markdown)
    write_csv(os.path.join(args.out, 'leaderboard.csv'), board)
    write_text_atomic(os.path.join(args.out, 'leaderboard.html'), to_html(board, args.title))
    head, rows = average_table(board)
    print(f'Leaderboard {board.setting} (averages over {", ".join(board.average_tasks)}):\n'
          + _md_table(head, rows))
    print('\nFolders used:\n' + '\n'.join(f'  {line}' for line in _folder_lines(board)))
    print(f'\nwrote {os.path.join(args.out, "leaderboard.md")}, leaderboard.csv and leaderboard.html')
    return 0


if __name__ == '__main__':
    sys.exit(main())
