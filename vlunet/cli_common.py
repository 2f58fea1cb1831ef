"""What `vlunet-train` and `vlunet-test` share: BasicSR's own argument list, checked up front.

Before BasicSR creates (or archives) any ``experiments/`` or ``results/`` folder, the option file
is read as BasicSR will see it (``--force_yml`` applied) and checked: YAML syntax, the keys BasicSR
needs, registered types (network, model, dataset, degradation, loss, metric, optimizer,
scheduler), constructor arguments of networks and losses, and numbers that are numbers. All
problems found are one message naming the file, each key, its value and what was expected.
"""
import argparse
import difflib
import inspect
import os
import re
import sys


def check_option_file(argv):
    """Exit with a one-line error when ``-opt`` is missing or names no readable file.

    BasicSR would otherwise fail deep inside with a traceback. Arguments are BasicSR's own:
    ``-opt``, ``--launcher``, ``--auto_resume``, ``--debug``, ``--local_rank``, ``--force_yml``.
    """
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', type=str)
    known, _ = parser.parse_known_args(argv)
    if known.opt is None:
        return  # let BasicSR print its usage message
    if not os.path.isfile(known.opt):
        sys.stderr.write(f'error: option file not found: {known.opt!r} '
                         f'(expected a YAML file; working directory: {os.getcwd()})\n')
        raise SystemExit(2)


class OptionFileError(ValueError):
    """The option file cannot be used; ``problems`` lists ``'key: what is wrong'`` lines."""

    def __init__(self, path, problems):
        self.path, self.problems = path, list(problems)
        super().__init__(f'{path}: ' + '; '.join(self.problems))


def _yaml_problem(err):
    mark = getattr(err, 'problem_mark', None)
    where = f'line {mark.line + 1}, column {mark.column + 1}: ' if mark is not None else ''
    problem = getattr(err, 'problem', None) or str(err)
    context = getattr(err, 'context', None)
    return f'not valid YAML ({where}{problem}{f", {context}" if context else ""})'


def _options_as_run(opt_path, force_yml, problems=None):
    """The option dict BasicSR will see: the file (safe YAML) with ``--force_yml`` applied its way.

    With ``problems`` (a list), an unreadable file or a ``--force_yml`` entry BasicSR would fail on
    is appended there (and None returned for an unreadable file) instead of raised."""
    import yaml
    from basicsr.utils.options import _postprocess_yml_value
    from basicsr.utils.options import ordered_yaml  # a safe loader (vlunet.compat)
    try:
        with open(opt_path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except yaml.YAMLError as err:
        if problems is None:
            raise
        problems.append(_yaml_problem(err))
        return None
    except (OSError, UnicodeDecodeError) as err:
        if problems is None:
            raise
        problems.append(f'cannot be read ({err})')
        return None
    for entry in force_yml or []:
        keys, sep, value = entry.partition('=')
        *parents, last = keys.strip().split(':')
        if problems is not None and (not sep or '=' in value or not all(parents + [last])):
            problems.append(f'--force_yml {entry}: expected KEY:SUBKEY=VALUE with one "=" (e.g. train:total_iter=1000)')
            continue
        node, path = opt, []
        for key in parents:
            path.append(key)
            if not (isinstance(node, dict) and isinstance(node.get(key), dict)):
                node = None
                if problems is not None:
                    problems.append(f'--force_yml {entry}: the option file has no section {":".join(path)} '
                                    '(--force_yml changes options, it cannot add sections)')
                break
            node = node[key]
        if isinstance(node, dict):
            try:
                node[last] = _postprocess_yml_value(value.strip())
            except Exception as err:  # noqa: BLE001  (BasicSR eval()s values that start with '[')
                if problems is None:
                    raise
                problems.append(f'--force_yml {entry}: cannot read the value {value.strip()!r} ({err})')
    return opt


# -------------------------------------------------------------------------- option checks
_SCIENTIFIC = re.compile(r'[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+')
SCHEDULERS = ('MultiStepLR', 'MultiStepRestartLR', 'CosineAnnealingRestartLR', 'LinearWarmupCosineLR')


def _close(name, names, n=2):
    """Names close to ``name`` (case-insensitive; an exact match in another case first)."""
    lower = {}
    for key in names:
        lower.setdefault(key.lower(), key)
    text = str(name).lower()
    if text in lower:
        return [lower[text]]
    return [lower[k] for k in difflib.get_close_matches(text, list(lower), n=n, cutoff=0.6)]


def _registered(registry, name, where, what):
    """None, or the problem when ``name`` is not registered in ``registry`` (with close names)."""
    names = sorted(key for key, _ in registry)
    if isinstance(name, str) and name in names:
        return None
    ours = sorted(key for key, obj in registry if getattr(obj, '__module__', '').startswith('vlunet'))
    close = _close(name, names)
    hint = f'; did you mean {" or ".join(map(repr, close))}?' if close else ''
    listed = ', '.join(ours) + (f' and BasicSR\'s {", ".join(n for n in names if n not in ours)}'
                                if len(names) > len(ours) else '')
    return f'{where}: {name!r} is not a registered {what}{hint} (registered: {listed})'


def _argument_problems(obj, params, where, ignore=()):
    """Problems of calling ``obj(**params)`` (unknown or missing keyword arguments); [] when the
    signature cannot be read or takes ``**kwargs``."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return []
    accepted = {n for n, p in signature.parameters.items() if p.kind in kinds}
    name = getattr(obj, '__name__', str(obj))
    problems = [f'{where}.{key}: {name} has no argument {key!r} (its arguments: {", ".join(sorted(accepted))})'
                for key in params if key not in accepted and key != 'type' and key not in ignore]
    problems += [f'{where}: {name} needs the argument {n!r}' for n, p in signature.parameters.items()
                 if p.kind in kinds and p.default is inspect.Parameter.empty and n not in params]
    return problems


def _whole(value, where, what, minimum=0):
    """None, or the problem when ``value`` is not a whole number >= ``minimum``."""
    ok = not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))
    if ok and value >= minimum:
        return None
    return f'{where}: {value!r}; expected {what} (a whole number >= {minimum})'


def _number(value, where, what):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return None
    return f'{where}: {value!r}; expected {what} (a number)'


def _text_numbers(node, where, found):
    """Strings such as '2e-4' that YAML 1.1 reads as text (no dot before the exponent)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        here = f'{where}[{key}]' if isinstance(key, int) else (f'{where}.{key}' if where else str(key))
        if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
            found.append(f'{here}: {value!r} is text, not a number (YAML reads an exponent without a dot as a '
                         f'string); expected a number: write {float(value):g} with a dot, e.g. '
                         f'{_with_dot(value)}, or !!float {value}')
        else:
            _text_numbers(value, here, found)


def _with_dot(value):
    mantissa, _, exponent = value.strip().lower().partition('e')
    return f'{mantissa if "." in mantissa else mantissa + ".0"}e{exponent}'


def option_problems(opt, is_train):
    """``['key: value; expected ...', ...]``: what BasicSR would fail on, after making folders."""
    import torch
    from basicsr.utils.registry import (ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY,
                                        MODEL_REGISTRY)
    if not isinstance(opt, dict):
        return [f'expected a mapping of options (name, model_type, network_g, datasets, ...), got '
                f'{type(opt).__name__}: {opt!r}'[:300]]
    problems = []
    required = ['name', 'model_type', 'num_gpu', 'datasets', 'path', 'network_g'] + (['train', 'logger'] if is_train
                                                                                      else [])
    for key in required:
        if key not in opt:
            problems.append(f'{key}: missing (a {"training" if is_train else "test"} option file needs '
                            f'{", ".join(required)})')
    if 'name' in opt and not (isinstance(opt['name'], str) and opt['name'].strip()):
        problems.append(f'name: {opt["name"]!r}; expected the run\'s name (text: experiments/<name>, results/<name>)')
    if 'model_type' in opt:
        problems.append(_registered(MODEL_REGISTRY, opt['model_type'], 'model_type', 'model'))
    if 'num_gpu' in opt and opt['num_gpu'] != 'auto':
        problems.append(_whole(opt['num_gpu'], 'num_gpu', 'the number of GPUs or auto'))
    if opt.get('manual_seed') is not None:
        problems.append(_whole(opt['manual_seed'], 'manual_seed', 'a random seed'))
    for key in ('path', 'train', 'logger', 'val'):
        if key in opt and opt[key] is not None and not isinstance(opt[key], dict):
            problems.append(f'{key}: {opt[key]!r}; expected a section (a mapping of options)')
        elif key in ('path', 'train', 'logger') and key in opt and opt[key] is None and key in required:
            problems.append(f'{key}: empty; expected a section (a mapping of options)')

    for key, value in opt.items():  # networks
        if not key.startswith('network_') or value is None:
            continue
        if not isinstance(value, dict) or 'type' not in value:
            problems.append(f'{key}: {value!r}; expected a mapping with "type" (a registered architecture)')
            continue
        problem = _registered(ARCH_REGISTRY, value['type'], f'{key}.type', 'architecture')
        problems.append(problem)
        if problem is None:
            problems += _argument_problems(ARCH_REGISTRY.get(value['type']), value, key, ignore=('load_path', ))

    datasets = opt.get('datasets')
    if 'datasets' in opt and not (isinstance(datasets, dict) and datasets):
        problems.append(f'datasets: {datasets!r}; expected a mapping of phases (train, val, test_1, ...) to datasets')
        datasets = {}
    for phase, dataset in (datasets or {}).items():
        where = f'datasets.{phase}'
        if not isinstance(dataset, dict) or 'type' not in dataset:
            problems.append(f'{where}: {dataset!r}; expected a mapping with "type" (a registered dataset)'[:300])
            continue
        problems.append(_registered(DATASET_REGISTRY, dataset['type'], f'{where}.type', 'dataset'))
        if is_train and phase != 'train' and phase.split('_')[0] != 'val':
            problems.append(f'{where}: a training file takes the phases train and val, val_1, ... (BasicSR does '
                            f'not recognise {phase!r})')
        if is_train and phase == 'train':
            problems.append(_whole(dataset.get('batch_size_per_gpu'), f'{where}.batch_size_per_gpu',
                                   'the batch size per GPU', 1))
            problems.append(_whole(dataset.get('num_worker_per_gpu'), f'{where}.num_worker_per_gpu',
                                   'data loader workers per GPU', 0))
        problems += _degradation_problems(dataset, where)
    if is_train and isinstance(datasets, dict) and datasets and 'train' not in datasets:
        problems.append('datasets.train: missing (training needs a train dataset)')

    train = opt.get('train') if isinstance(opt.get('train'), dict) else None
    if is_train and train is not None:
        problems.append(_whole(train.get('total_iter'), 'train.total_iter', 'the number of iterations', 1))
        if train.get('warmup_iter') is not None:
            problems.append(_whole(train['warmup_iter'], 'train.warmup_iter', 'warm-up iterations (-1: none)', -1))
    for key, value in (train or {}).items():
        where = f'train.{key}'
        if key.startswith('optim_') and value is not None:
            if not isinstance(value, dict):
                problems.append(f'{where}: {value!r}; expected {{type: <torch.optim optimizer>, lr: ...}}')
                continue
            cls = getattr(torch.optim, str(value.get('type')), None)
            if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
                names = sorted(n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                               and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != 'Optimizer')
                close = _close(value.get('type'), names)
                problems.append(f'{where}.type: {value.get("type")!r} is not a torch.optim optimizer'
                                + (f'; did you mean {" or ".join(map(repr, close))}?' if close else '')
                                + f' (e.g. {", ".join(names[:8])})')
            elif 'lr' in value:
                problems.append(_number(value['lr'], f'{where}.lr', 'the learning rate'))
        elif key == 'scheduler' and value is not None:
            kind = value.get('type') if isinstance(value, dict) else None
            if kind not in SCHEDULERS:
                problems.append(f'{where}.type: {kind!r}; expected one of {", ".join(SCHEDULERS)}')
        elif key.endswith('_opt') and isinstance(value, dict) and value.get('type') is not None:
            problem = _registered(LOSS_REGISTRY, value['type'], f'{where}.type', 'loss')
            problems.append(problem)
            if problem is None:
                problems += _argument_problems(LOSS_REGISTRY.get(value['type']), value, where)

    logger = opt.get('logger') if isinstance(opt.get('logger'), dict) else None
    if is_train and logger is not None:
        for key in ('print_freq', 'save_checkpoint_freq'):
            problems.append(_whole(logger.get(key), f'logger.{key}', 'a number of iterations', 1))
    val = opt.get('val') if isinstance(opt.get('val'), dict) else None
    if val is not None:
        if is_train and 'val_freq' in val:
            problems.append(_number(val['val_freq'], 'val.val_freq', 'how often to validate (iterations)'))
        metrics = val.get('metrics')
        if metrics is not None and not isinstance(metrics, dict):
            problems.append(f'val.metrics: {metrics!r}; expected a mapping {{name: {{type: <metric>, ...}}}}')
        for name, metric in (metrics if isinstance(metrics, dict) else {}).items():
            if isinstance(metric, dict) and metric.get('type') is not None:  # some models name their own metrics
                problems.append(_registered(METRIC_REGISTRY, metric['type'], f'val.metrics.{name}.type', 'metric'))
    _text_numbers(opt, '', problems)
    return [p for p in problems if p]


def _degradation_problems(node, where):
    """Every ``degradation: {type: ...}`` under a dataset, checked by the degradation registry."""
    try:
        from vlunet.data.degradations import check_degradation
    except ImportError:  # an older degradation module: the dataset checks them when it is built
        return []
    found = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        here = f'{where}[{key}]' if isinstance(key, int) else f'{where}.{key}'
        if key == 'degradation' and value is not None:
            try:
                check_degradation(value, here)
            except (KeyError, ValueError) as err:
                found.append(str(err.args[0] if err.args else err))
        else:
            found += _degradation_problems(value, here)
    return found


def check_options(argv, is_train):
    """Exit with one clear message, before BasicSR creates any folder, when the option file (with
    ``--force_yml`` applied) is not valid YAML or has options BasicSR would fail on."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', type=str)
    parser.add_argument('--force_yml', nargs='+', default=None)
    known, _ = parser.parse_known_args(argv)
    if known.opt is None:
        return
    problems = []
    opt = _options_as_run(known.opt, known.force_yml, problems)
    if opt is not None or not problems:
        problems += option_problems(opt, is_train)
    if problems:
        lines = ''.join(f'  {p}\n' for p in problems)
        sys.stderr.write(f'error: {known.opt}: {len(problems)} problem{"s" * (len(problems) != 1)} in the options '
                         f'(nothing was created):\n{lines}')
        raise SystemExit(2)


def _missing_inputs(opt, is_train, resuming):
    """``[(option key, path)]`` of the files/folders the options read that do not exist."""
    from vlunet.data.all_in_one_dataset import resolve_dataroot
    missing = []

    def check(key, value, want_file):
        if isinstance(value, str) and value:
            path = resolve_dataroot(value)
            if not (os.path.isfile(path) if want_file else os.path.exists(path)):
                missing.append((key, value))

    def walk(prefix, node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            where = f'{prefix}[{key}]' if isinstance(key, int) else f'{prefix}.{key}'
            if isinstance(key, str) and key.startswith('dataroot'):
                check(where, value, want_file=False)
            elif key in ('meta_info_file', 'meta_info'):
                check(where, value, want_file=True)
            else:
                walk(where, value)

    for name, dataset in (opt.get('datasets') or {}).items():
        walk(f'datasets.{name}', dataset)
    for name, value in opt.items():
        if name.startswith('network_') and isinstance(value, dict):
            check(f'{name}.load_path', value.get('load_path'), want_file=True)
    if not (is_train and resuming):  # resuming, BasicSR replaces the pretrain paths by the run's own
        for key, value in (opt.get('path') or {}).items():
            if key.startswith('pretrain_network_'):
                check(f'path.{key}', value, want_file=True)
    return missing


def check_inputs_exist(argv, is_train):
    """Exit with a clear error, before BasicSR creates experiments/ or results/ folders, when the
    options name a dataset root, meta_info file, ``network_*.load_path`` or ``path.pretrain_network_*``
    that does not exist. Unreadable option files are left to BasicSR's own (tested) errors."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt', type=str)
    parser.add_argument('--auto_resume', action='store_true')
    parser.add_argument('--force_yml', nargs='+', default=None)
    known, _ = parser.parse_known_args(argv)
    if known.opt is None:
        return
    try:
        opt = _options_as_run(known.opt, known.force_yml)
    except Exception:  # noqa: BLE001  (BasicSR reports it, as it always did)
        return
    if not isinstance(opt, dict):
        return
    resuming = known.auto_resume or bool((opt.get('path') or {}).get('resume_state'))
    missing = _missing_inputs(opt, is_train, resuming)
    if missing:
        lines = '\n'.join(f'  {key}: {value}' for key, value in missing)
        hints = []
        if any('.dataroot' in key or key.endswith('meta_info_file') for key, _ in missing):
            hints.append('Datasets: see "Preparing data" in the README (vlunet-prepare).')
        if any(key == 'network_clip.load_path' for key, _ in missing):
            hints.append("network_clip.load_path is the CLIP stage's output: train it first with a CLIPAdapterModel "
                         'option file (e.g. options/train/CLIPAdapter_demo.yml, CLIPAdapter_NHR.yml), or point it '
                         'at the published clip_tuned.pth.')
        sys.stderr.write(f'error: {known.opt}: these inputs do not exist (working directory: {os.getcwd()}):\n'
                         f'{lines}\n' + ''.join(h + '\n' for h in hints) + 'Nothing was created.\n')
        raise SystemExit(2)


def inference_options(argv):
    """vlunet-test's ``--precision fp32|bf16|fp16`` and ``--max-memory SIZE`` as BasicSR options: ``val.amp`` and
    ``val.max_memory`` (bytes) appended to ``--force_yml`` (after any the user gave). Both are checked first
    (a precision the device cannot compute in, a size that is not one, an option file without ``val``):
    one clear message, exit 2. Returns the argument list BasicSR parses."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument('-opt', type=str)
    parser.add_argument('--precision', choices=('fp32', 'bf16', 'fp16'))
    parser.add_argument('--max-memory', '--max_memory', dest='max_memory')
    parser.add_argument('--force_yml', nargs='+', default=None)
    known, rest = parser.parse_known_args(argv)
    if known.precision is None and known.max_memory is None:
        return list(argv)

    def fail(message):
        sys.stderr.write(f'error: {message}\n')
        raise SystemExit(2)

    import torch

    from vlunet.inference import parse_memory, precision_problem
    try:
        budget = parse_memory(known.max_memory)
    except ValueError as err:
        fail(err.args[0])
    opt = None
    if known.opt:
        try:
            opt = _options_as_run(known.opt, known.force_yml)
        except Exception:  # noqa: BLE001  (check_options names what is wrong with the file)
            opt = None
    if isinstance(opt, dict) and not isinstance(opt.get('val'), dict):
        fail(f'{known.opt}: --precision/--max-memory set val.amp/val.max_memory, but the file has no val section '
             '(vlunet-test restores and measures through it)')
    gpus = opt.get('num_gpu', 'auto') if isinstance(opt, dict) else 'auto'
    device = 'cuda' if torch.cuda.is_available() and gpus != 0 else 'cpu'
    problem = precision_problem(known.precision or 'fp32', device)
    if problem:
        fail(problem)
    force = list(known.force_yml or [])
    if known.precision:
        force.append(f'val:amp={"false" if known.precision == "fp32" else known.precision}')
    if budget:
        force.append(f'val:max_memory={budget}')
    opt_args = ['-opt', known.opt] if known.opt is not None else []
    return opt_args + rest + ['--force_yml', *force]


def run_pipeline(pipeline_name, argv=None):
    """Run ``basicsr.{train,test}.{pipeline_name}`` with experiments/ and results/ under the cwd."""
    argv = list(sys.argv[1:] if argv is None else argv)
    check_option_file(argv)
    is_train = pipeline_name == 'train_pipeline'
    from vlunet import pipeline as policies  # compat fixes + registries, then our pipeline policies
    policies.install(train=is_train)
    if not is_train:
        argv = inference_options(argv)
    check_options(argv, is_train=is_train)
    check_inputs_exist(argv, is_train=is_train)
    sys.argv[1:] = argv
    if is_train:
        from basicsr.train import train_pipeline as pipeline
    else:
        from basicsr.test import test_pipeline as pipeline
    pipeline(os.getcwd())
