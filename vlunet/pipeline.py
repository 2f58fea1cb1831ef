"""vlunet's policies for BasicSR's training and test pipelines, installed by ``vlunet-train`` and
``vlunet-test`` (:func:`install`), not by ``import vlunet``.

BasicSR's ``train_pipeline`` / ``test_pipeline`` run as they are; these replace a few of the
functions they call, each for one behaviour of ours (the compatibility fixes that make BasicSR run
on today's stack are in :mod:`vlunet.compat`):

* ``--auto_resume`` resumes from the newest iteration whose training state AND networks all load
  (:func:`iteration_problems`); newer unusable ones are named in a warning and left as they are;
  with no usable checkpoint at all, training starts from iteration 0 in the same folder (nothing is
  archived); the temporaries of interrupted saves are removed. ``path.resume_state`` naming a file
  that does not load is an error that names it;
* ``--force_yml manual_seed=N`` takes effect (BasicSR seeds before it applies ``--force_yml``) and
  ``--force_yml`` numbers such as ``lr=1e10`` or ``-1`` are numbers, not strings;
* flags kept under ``path:`` (``widen_degradation_types: true``, ``trust_pickle: true``) are options,
  not folders to create;
* ``train.accumulate_grad_batches: N``: the training loader reads ``batch_size_per_gpu x N`` samples per
  iteration, which the model splits into N micro-batches, so BasicSR's epoch and iteration counts stay
  counts of optimizer steps.
"""
import glob
import os
import re
import sys

from vlunet.compat import RESUME_STATE_SAFE_GLOBALS, load_training_state
from vlunet.utils.atomic import remove_stale_temporaries

_INSTALLED = set()


def _once(name):
    if name in _INSTALLED:
        return False
    _INSTALLED.add(name)
    return True


def _replace(name, function, modules):
    """Set ``name`` to ``function`` in every one of ``modules`` (imported ones) that holds the name."""
    for module_name in modules:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, name):
            setattr(module, name, function)


# ---------------------------------------------------------------------------------------------
# --force_yml
# ---------------------------------------------------------------------------------------------
_NUMBER = re.compile(r'[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?')


def parse_force_yml_value(value, original):
    """``--force_yml`` values as BasicSR reads them, except that every number Python reads (signs,
    exponents) is a number: whole numbers int, the rest float."""
    result = original(value)
    if isinstance(result, str) and _NUMBER.fullmatch(result.strip()):
        text = result.strip()
        return int(text) if re.fullmatch(r'[+-]?\d+', text) else float(text)
    return result


def install_force_yml():
    """``--force_yml`` numbers are numbers, and ``--force_yml manual_seed=N`` seeds the run (once the
    options are final, with ``manual_seed + rank``; nothing draws random numbers in between, so runs
    without the override are unchanged)."""
    if not _once('force_yml'):
        return
    from basicsr.utils import options, set_random_seed
    original_value = options._postprocess_yml_value
    options._postprocess_yml_value = lambda value: parse_force_yml_value(value, original_value)
    original_parse = options.parse_options

    def parse_options(root_path, is_train=True):
        opt, args = original_parse(root_path, is_train=is_train)
        if opt.get('manual_seed') is not None:
            set_random_seed(int(opt['manual_seed']) + int(opt.get('rank', 0)))
        return opt, args

    options.parse_options = parse_options
    _replace('parse_options', parse_options, ('basicsr.train', 'basicsr.test'))


# ---------------------------------------------------------------------------------------------
# flags under path:
# ---------------------------------------------------------------------------------------------
def install_flags_under_path():
    """BasicSR creates a folder for every ``path`` entry it does not know by name; entries whose value
    is not a path (booleans, numbers, None) are options: skip them."""
    if not _once('flags_under_path'):
        return
    from basicsr.utils import misc
    original = misc.make_exp_dirs

    def make_exp_dirs(opt):
        paths = {k: v for k, v in opt['path'].items() if isinstance(v, (str, os.PathLike))}
        return original(dict(opt, path=paths))

    _replace('make_exp_dirs', make_exp_dirs, ('basicsr.utils.misc', 'basicsr.utils', 'basicsr.train',
                                              'basicsr.test'))


# ---------------------------------------------------------------------------------------------
# resuming
# ---------------------------------------------------------------------------------------------
def _load_problem(path, what):
    """None if ``path`` loads weights-only, else a short reason (missing, truncated, not a checkpoint)."""
    import torch
    if not os.path.isfile(path):
        return f'{path}: missing'
    try:
        with torch.serialization.safe_globals(RESUME_STATE_SAFE_GLOBALS):
            torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  (truncated zip, EOF, foreign file: all mean "not usable")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f'{path}: {what} cannot be loaded ({type(err).__name__}: {first[:160]})'
    return None


def iteration_problems(models_dir, states_dir, it):
    """What keeps iteration ``it`` from being resumed: its training state and every network saved
    for it (``models/*_<it>.pth``; ``net_g_<it>.pth`` must exist) have to load. [] when usable."""
    problems = [p for p in [_load_problem(os.path.join(states_dir, f'{it}.state'), 'training state')] if p]
    networks = sorted(glob.glob(os.path.join(glob.escape(models_dir), f'*_{it}.pth')))
    net_g = os.path.join(models_dir, f'net_g_{it}.pth')
    if net_g not in networks:
        networks.insert(0, net_g)
    problems += [p for p in (_load_problem(path, 'network') for path in networks) if p]
    return problems


_RESTART_IN_PLACE = {'active': False}


def choose_resume_state(opt):
    """The training state to resume (its path, also set as ``opt['path']['resume_state']``), or None;
    see the module docstring. Raises ValueError for an unusable ``path.resume_state``."""
    _RESTART_IN_PLACE['active'] = False
    if not opt['auto_resume']:
        path = opt['path'].get('resume_state')
        problem = _load_problem(path, 'training state') if path else None
        if problem:
            raise ValueError(f'path.resume_state: {problem} (expected a training state written by vlunet-train / '
                             'BasicSR; use --auto_resume to pick the newest usable one)')
        return path
    from basicsr.utils import scandir
    root = os.path.join(opt.get('root_path', '.'), 'experiments', opt['name'])
    state_dir = opt['path'].get('training_states') or os.path.join(root, 'training_states')
    models_dir = opt['path'].get('models') or os.path.join(root, 'models')
    if os.path.isdir(state_dir):
        if opt.get('rank', 0) == 0:
            for path in remove_stale_temporaries(state_dir) + remove_stale_temporaries(models_dir):
                print(f'Removed the temporary file of an interrupted save: {path}', flush=True)
        names = [v[:-len('.state')] for v in scandir(state_dir, suffix='.state', recursive=False, full_path=False)]
        for it in sorted((int(v) for v in names if v.isdigit()), reverse=True):
            problems = iteration_problems(models_dir, state_dir, it)
            if not problems:
                path = os.path.join(state_dir, f'{it}.state')
                opt['path']['resume_state'] = path
                return path
            sys.stderr.write(f'WARNING: --auto_resume: iteration {it} cannot be resumed, trying an older '
                             'checkpoint (these files are left as they are):\n' + ''.join(f'  {p}\n' for p in problems))
            sys.stderr.flush()
    if os.path.isdir(root):
        _RESTART_IN_PLACE['active'] = True
        print(f'--auto_resume: no complete checkpoint in {root}; training starts from iteration 0 in the same '
              'folder (nothing archived).', flush=True)
    return None


def install_resume_policy():
    """``basicsr.train.load_resume_state`` with :func:`choose_resume_state`, and no archiving of the
    experiment folder when ``--auto_resume`` restarts in place."""
    if not _once('resume'):
        return
    import basicsr.train as basicsr_train
    from basicsr.utils import check_resume, misc

    def load_resume_state(opt):
        path = choose_resume_state(opt)
        if path is None:
            return None
        state = load_training_state(path)
        check_resume(opt, state['iter'])
        print(f'Resume state: {path}', flush=True)  # the root logger is configured later, by train_pipeline
        return state

    basicsr_train.load_resume_state = load_resume_state
    original = misc.mkdir_and_rename

    def mkdir_and_rename(path):
        if _RESTART_IN_PLACE['active']:
            os.makedirs(path, exist_ok=True)
        else:
            original(path)

    _replace('mkdir_and_rename', mkdir_and_rename, ('basicsr.utils.misc', 'basicsr.train', 'basicsr.utils'))


# ---------------------------------------------------------------------------------------------
# gradient accumulation
# ---------------------------------------------------------------------------------------------
def install_accumulating_loaders():
    """With ``train.accumulate_grad_batches: N`` the training loader yields ``batch_size_per_gpu x N``
    samples per iteration, which the model splits into N micro-batches (vlunet.models.train_step)."""
    if not _once('accumulation'):
        return
    import basicsr.train as basicsr_train
    original = basicsr_train.create_train_val_dataloader

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

    basicsr_train.create_train_val_dataloader = create_train_val_dataloader


def install(train=True):
    """Install the policies of ``vlunet-train`` (``train=True``) or ``vlunet-test``; idempotent."""
    import vlunet  # noqa: F401  (compatibility fixes first)
    install_force_yml()
    install_flags_under_path()
    if train:
        install_resume_policy()
        install_accumulating_loaders()
