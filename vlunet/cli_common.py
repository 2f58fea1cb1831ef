"""What `vlunet-train` and `vlunet-test` share: BasicSR's own argument list, checked up front."""
import argparse
import os
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


def _options_as_run(opt_path, force_yml):
    """The option dict BasicSR will see: the file (safe YAML) with ``--force_yml`` applied its way."""
    import yaml
    from basicsr.utils.options import _postprocess_yml_value
    from vlunet.compat import _ordered_safe_yaml
    with open(opt_path) as f:
        opt = yaml.load(f, Loader=_ordered_safe_yaml()[0])
    for entry in force_yml or []:
        keys, _, value = entry.partition('=')
        *parents, last = keys.strip().split(':')
        node = opt
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node[last] = _postprocess_yml_value(value.strip())
    return opt


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
            hints.append('Datasets: see "Preparing data" in the README (scripts/prepare_all_in_one.py).')
        if any(key == 'network_clip.load_path' for key, _ in missing):
            hints.append("network_clip.load_path is the CLIP stage's output: train it first with a CLIPAdapterModel "
                         'option file (e.g. options/train/CLIPAdapter_demo.yml, CLIPAdapter_NHR.yml), or point it '
                         'at the published clip_tuned.pth.')
        sys.stderr.write(f'error: {known.opt}: these inputs do not exist (working directory: {os.getcwd()}):\n'
                         f'{lines}\n' + ''.join(h + '\n' for h in hints) + 'Nothing was created.\n')
        raise SystemExit(2)


def _accumulating_loaders():
    """With ``train.accumulate_grad_batches: N`` the training loader yields ``batch_size_per_gpu x N``
    samples per iteration, which the model splits into N micro-batches (vlunet.models.train_step),
    so BasicSR's epoch and iteration counts stay counts of optimizer steps."""
    import basicsr.train as basicsr_train
    original = basicsr_train.create_train_val_dataloader
    if getattr(original, '_vlunet_wrapped', False):
        return

    def create_train_val_dataloader(opt, logger):
        train_opt = opt['datasets'].get('train') if isinstance(opt.get('datasets'), dict) else None
        n = int((opt.get('train') or {}).get('accumulate_grad_batches') or 1)
        if train_opt is None or n == 1:
            return original(opt, logger)
        per_gpu = train_opt['batch_size_per_gpu']
        train_opt['batch_size_per_gpu'] = per_gpu * n
        try:
            result = original(opt, logger)
        finally:
            train_opt['batch_size_per_gpu'] = per_gpu
        logger.info(f'Gradient accumulation: the loader reads {per_gpu * n} samples per GPU and iteration, '
                    f'{n} micro-batches of {per_gpu}; iterations above count optimizer steps.')
        return result

    create_train_val_dataloader._vlunet_wrapped = True
    basicsr_train.create_train_val_dataloader = create_train_val_dataloader


def run_pipeline(pipeline_name, argv=None):
    """Run ``basicsr.{train,test}.{pipeline_name}`` with experiments/ and results/ under the cwd."""
    argv = list(sys.argv[1:] if argv is None else argv)
    check_option_file(argv)
    import vlunet  # noqa: F401  (compat fixes + registries)
    check_inputs_exist(argv, is_train=pipeline_name == 'train_pipeline')
    sys.argv[1:] = argv
    if pipeline_name == 'train_pipeline':
        from basicsr.train import train_pipeline as pipeline
        _accumulating_loaders()
    else:
        from basicsr.test import test_pipeline as pipeline
    pipeline(os.getcwd())
