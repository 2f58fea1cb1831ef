"""Make basicsr 1.4.2 (the latest release, 2022) work on today's stack, without forking it.

Imported first by ``import vlunet``. Each fix below is one small function whose docstring names
the symptom it removes; ``apply()`` runs them all once. Every fix only *adds* behaviour: BasicSR's
own option files, models and tests keep working (tests/test_compat.py checks each symptom).

Stack this was measured on: torch 2.14, torchvision 0.29, numpy 2, Python 3.11/3.12, py-lmdb 2.x.
This module knows BasicSR and torch; of vlunet it uses only the leaf modules ``vlunet.utils.atomic``
(the one atomic writer) and ``vlunet.models.lr_scheduler`` (imported when needed).
"""
import collections
import glob
import os
import sys
import time
import types
import warnings

import torch

_APPLIED = False


# ---------------------------------------------------------------------------------------------
# 1. import basicsr
# ---------------------------------------------------------------------------------------------
def fix_functional_tensor_import():
    """Symptom: ``import basicsr`` fails: No module named 'torchvision.transforms.functional_tensor'.

    torchvision 0.17 removed that private module; basicsr.data.degradations imports
    ``rgb_to_grayscale`` from it. Provide the module, backed by the public function.
    """
    name = 'torchvision.transforms.functional_tensor'
    if name in sys.modules:
        return
    try:
        import torchvision.transforms.functional_tensor  # noqa: F401
        return
    except ImportError:
        pass
    from torchvision.transforms import functional as F
    shim = types.ModuleType(name)
    shim.rgb_to_grayscale = F.rgb_to_grayscale
    sys.modules[name] = shim


# ---------------------------------------------------------------------------------------------
# 2. option files: safe YAML, torchrun's --local-rank
# ---------------------------------------------------------------------------------------------
def _ordered_safe_yaml():
    """(Loader, Dumper) like basicsr's ``ordered_yaml`` but the Loader is a SafeLoader."""
    import yaml

    class OrderedSafeLoader(yaml.SafeLoader):
        pass

    class OrderedDumper(yaml.SafeDumper):
        pass

    def construct_ordered(loader, node):
        loader.flatten_mapping(node)  # YAML merge keys (<<: *anchor)
        return collections.OrderedDict(loader.construct_pairs(node))

    def represent_ordered(dumper, data):
        return dumper.represent_dict(data.items())

    OrderedSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_ordered)
    OrderedDumper.add_representer(collections.OrderedDict, represent_ordered)
    return OrderedSafeLoader, OrderedDumper


def fix_unsafe_yaml():
    """Symptom: an option file with ``!!python/object/apply:os.system [...]`` runs that command.

    basicsr's ``ordered_yaml()`` returns PyYAML's full (C)Loader, which constructs arbitrary
    Python objects. Option files are data: parse them with a SafeLoader (ordered mappings kept).
    A python tag now raises ``yaml.constructor.ConstructorError`` naming the tag.
    """
    from basicsr.utils import options
    options.ordered_yaml = _ordered_safe_yaml


def _normalise_local_rank_argv(argv):
    """``--local-rank=N`` / ``--local-rank N`` (torch.distributed.launch since torch 2.0) -> ``--local_rank``."""
    out = []
    for arg in argv:
        if arg == '--local-rank':
            arg = '--local_rank'
        elif arg.startswith('--local-rank='):
            arg = '--local_rank=' + arg.split('=', 1)[1]
        out.append(arg)
    return out


def _wrap_parse_options(marker, make_wrapper):
    """Replace BasicSR's ``parse_options`` (also where basicsr.train / basicsr.test imported the
    name) by ``make_wrapper(original)``, once per ``marker``."""
    from basicsr.utils import options
    original = options.parse_options
    if getattr(original, marker, False):
        return
    wrapped = make_wrapper(original)
    for name in ('_vlunet_local_rank', '_vlunet_seeded'):
        setattr(wrapped, name, getattr(original, name, False))
    setattr(wrapped, marker, True)
    options.parse_options = wrapped
    for module_name in ('basicsr.train', 'basicsr.test'):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, 'parse_options'):
            module.parse_options = wrapped


def fix_local_rank_argument():
    """Symptom: ``error: unrecognized arguments: --local-rank=0`` under torch's distributed launchers.

    BasicSR's parser knows ``--local_rank`` only. Accept the hyphenated spelling as well.
    """
    def make_wrapper(original):
        def parse_options(root_path, is_train=True):
            sys.argv[1:] = _normalise_local_rank_argv(sys.argv[1:])
            return original(root_path, is_train=is_train)
        return parse_options

    _wrap_parse_options('_vlunet_local_rank', make_wrapper)


def fix_force_yml_seed():
    """Symptom: ``--force_yml manual_seed=N`` changes the logged option but not the run: BasicSR
    seeds the random generators before it applies ``--force_yml``.

    Seed again, with ``manual_seed + rank``, once the options are final (nothing draws random
    numbers in between, so runs without the override are unchanged).
    """
    from basicsr.utils import set_random_seed

    def make_wrapper(original):
        def parse_options(root_path, is_train=True):
            opt, args = original(root_path, is_train=is_train)
            if opt.get('manual_seed') is not None:
                set_random_seed(int(opt['manual_seed']) + int(opt.get('rank', 0)))
            return opt, args
        return parse_options

    _wrap_parse_options('_vlunet_seeded', make_wrapper)


def fix_force_yml_numbers():
    """Symptom: ``--force_yml train:optim_g:lr=1e10`` (also ``=2e-4``, ``=-1``) sets the string
    ``'1e10'``, and training fails on it only after the experiment folder was made.

    BasicSR's ``_postprocess_yml_value`` knows digits and ``x.y`` only. Read every number Python
    reads (signs, exponents): whole numbers as int, the rest as float; other values as before.
    """
    import re

    from basicsr.utils import options
    original = options._postprocess_yml_value
    if getattr(original, '_vlunet_wrapped', False):
        return
    number = re.compile(r'[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?')

    def _postprocess_yml_value(value):
        result = original(value)
        if isinstance(result, str) and number.fullmatch(result.strip()):
            text = result.strip()
            return int(text) if re.fullmatch(r'[+-]?\d+', text) else float(text)
        return result

    _postprocess_yml_value._vlunet_wrapped = True
    options._postprocess_yml_value = _postprocess_yml_value


# ---------------------------------------------------------------------------------------------
# 3. distributed training on CPU (gloo) and GPU (nccl), LOCAL_RANK respected
# ---------------------------------------------------------------------------------------------
def fix_distributed_init():
    """Symptom: ``--launcher pytorch`` on a CPU machine dies with ZeroDivisionError / NCCL errors.

    basicsr always asks for NCCL and picks the GPU as ``RANK % device_count()``. Use gloo when
    CUDA is unavailable, nccl otherwise, and take the device from ``LOCAL_RANK`` (set by torchrun),
    which is right on several nodes where RANK is not.
    """
    import torch.distributed as dist
    from basicsr.utils import dist_util

    def _init_dist_pytorch(backend='nccl', **kwargs):
        if torch.cuda.is_available():
            local_rank = int(os.environ.get('LOCAL_RANK', int(os.environ['RANK']) % torch.cuda.device_count()))
            torch.cuda.set_device(local_rank)
        else:
            backend = 'gloo'
        dist.init_process_group(backend=backend, **kwargs)

    dist_util._init_dist_pytorch = _init_dist_pytorch


def _slurm_master_addr(node_list):
    """The job's first host, as ``scontrol show hostnames NODE_LIST`` expands ``node[01-04]``.

    ``MASTER_ADDR``, when already set (e.g. exported by the sbatch script, or where the compute
    nodes have no ``scontrol``), wins. scontrol runs without a shell, so brackets in the node list
    are not glob patterns.
    """
    import subprocess
    if os.environ.get('MASTER_ADDR'):
        return os.environ['MASTER_ADDR']
    try:
        proc = subprocess.run(['scontrol', 'show', 'hostnames', node_list], capture_output=True, text=True)
    except OSError as err:
        raise RuntimeError(f'--launcher slurm: cannot run scontrol ({err}) to find the first host of '
                           f'SLURM_NODELIST={node_list!r}; set MASTER_ADDR to it instead') from None
    hosts = proc.stdout.split()
    if proc.returncode != 0 or not hosts:
        raise RuntimeError(f'--launcher slurm: `scontrol show hostnames {node_list}` gave no host '
                           f'(exit status {proc.returncode}: {proc.stderr.strip()!r}); set MASTER_ADDR instead')
    return hosts[0]


def fix_slurm_init():
    """Symptom: ``--launcher slurm`` on a CPU machine dies with ZeroDivisionError
    (``SLURM_PROCID % device_count()``) or NCCL errors; on several GPU nodes every task after
    the first node asks for a GPU by its global rank.

    basicsr's ``_init_dist_slurm`` always asks for NCCL and picks the GPU as ``SLURM_PROCID %
    device_count()``. Use gloo when CUDA is unavailable, the given backend (nccl) otherwise, and
    take the device from ``SLURM_LOCALID`` (the task's rank on its node, set by srun; modulo the
    visible GPUs, so a task bound to one GPU uses device 0), as ``--launcher pytorch`` does with
    LOCAL_RANK. The rest is BasicSR's: ``RANK`` = SLURM_PROCID,
    ``WORLD_SIZE`` = SLURM_NTASKS, ``MASTER_ADDR`` = first host of SLURM_NODELIST, ``MASTER_PORT``
    = ``dist_params.port``, else the environment's MASTER_PORT, else 29500.
    """
    import torch.distributed as dist
    from basicsr.utils import dist_util

    def _init_dist_slurm(backend='nccl', port=None):
        proc_id = int(os.environ['SLURM_PROCID'])
        ntasks = int(os.environ['SLURM_NTASKS'])
        node_list = os.environ.get('SLURM_NODELIST') or os.environ['SLURM_JOB_NODELIST']
        local_rank = int(os.environ.get('SLURM_LOCALID', proc_id))
        if torch.cuda.is_available():
            # % : with --gpus-per-task=1 (or --gpu-bind) each task sees its own GPU as device 0
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        else:
            backend = 'gloo'
        if port is not None:
            os.environ['MASTER_PORT'] = str(port)
        else:
            os.environ.setdefault('MASTER_PORT', '29500')
        os.environ['MASTER_ADDR'] = _slurm_master_addr(node_list)
        os.environ['WORLD_SIZE'] = str(ntasks)
        os.environ['RANK'] = str(proc_id)
        os.environ['LOCAL_RANK'] = str(local_rank)
        dist.init_process_group(backend=backend)

    dist_util._init_dist_slurm = _init_dist_slurm


def fix_ddp_device_ids():
    """Symptom: with ``--launcher pytorch`` on CPU, DistributedDataParallel fails on CUDA device ids.

    basicsr wraps every network with ``device_ids=[torch.cuda.current_device()]``. On CPU the
    wrapper must get no device ids.
    """
    from basicsr.models.base_model import BaseModel

    def model_to_device(self, net):
        net = net.to(self.device)
        if self.opt['dist']:
            find_unused = self.opt.get('find_unused_parameters', False)
            device_ids = [torch.cuda.current_device()] if self.device.type == 'cuda' else None
            net = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=device_ids, find_unused_parameters=find_unused)
        elif self.opt['num_gpu'] > 1:
            net = torch.nn.parallel.DataParallel(net)
        return net

    BaseModel.model_to_device = model_to_device


def fix_flags_under_path():
    """Symptom: a flag under ``path:`` (e.g. ``widen_degradation_types: true``) makes training
    die in ``make_exp_dirs`` with ``TypeError: expected str, bytes or os.PathLike object, not bool``.

    BasicSR creates a folder for every ``path`` entry it does not recognise by name. Entries whose
    value is not a path (booleans, numbers, None) are options, not folders: skip them.
    """
    from basicsr.utils import misc
    original = misc.make_exp_dirs
    if getattr(original, '_vlunet_wrapped', False):
        return

    def make_exp_dirs(opt):
        paths = {k: v for k, v in opt['path'].items() if isinstance(v, (str, os.PathLike))}
        return original(dict(opt, path=paths))

    make_exp_dirs._vlunet_wrapped = True
    for module_name in ('basicsr.utils.misc', 'basicsr.utils', 'basicsr.train', 'basicsr.test'):
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, 'make_exp_dirs'):
            module.make_exp_dirs = make_exp_dirs


# ---------------------------------------------------------------------------------------------
# 4. resuming: CPU map_location, experiments/ under root_path, weights_only loading
# ---------------------------------------------------------------------------------------------
# What is trusted when a resume state is loaded with weights_only=True: the states are the ones
# BaseModel.save_training_state wrote (epoch, iter, optimizer and scheduler state_dicts). Besides
# tensors and builtin containers they hold collections.Counter (MultiStepRestartLR milestones);
# that one class is allowlisted, nothing that could execute code.
RESUME_STATE_SAFE_GLOBALS = [collections.Counter]


def load_training_state(path, map_location='cpu'):
    """Load a BasicSR training state with ``weights_only=True`` (see RESUME_STATE_SAFE_GLOBALS)."""
    with torch.serialization.safe_globals(RESUME_STATE_SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def _load_problem(path, what):
    """None if ``path`` loads weights-only, else a short reason (missing, truncated, not a checkpoint)."""
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


def _remove_stale_temporaries(*folders):
    """Delete the temporary files of atomic writes that a killed process left (``.<name>.<hex>.tmp``)."""
    removed = []
    for folder in folders:
        for path in glob.glob(os.path.join(glob.escape(folder), '.*.tmp')):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


_RESTART_IN_PLACE = {'active': False}


def fix_resume_state_loading():
    """Symptoms: ``--auto_resume`` crashes on CPU-only machines (states are mapped with
    ``torch.cuda.current_device()``); it looks in a cwd-relative ``experiments/`` and, started
    from another directory, silently restarts at iter 0 and archives the run; states holding a
    Counter no longer load under torch >= 2.6's ``weights_only=True`` default; and a job killed
    while saving leaves a truncated newest state (or network) that makes every later resume crash,
    although an older complete checkpoint is right there.

    Find states in ``opt['path']['training_states']`` (under root_path) and resume from the newest
    iteration whose state AND networks all load (:func:`iteration_problems`); newer unusable ones
    are named in a warning and left where they are. With ``--auto_resume`` and no usable
    checkpoint at all, training starts from iteration 0 in the same folders (nothing is
    archived). States are mapped to the CPU (optimizer.load_state_dict moves them to the
    parameters' device) and loaded weights-only. ``path.resume_state`` naming an unusable file is
    an error that names it.
    """
    import basicsr.train as basicsr_train
    from basicsr.utils import check_resume, scandir

    def load_resume_state(opt):
        resume_state_path = None
        _RESTART_IN_PLACE['active'] = False
        if opt['auto_resume']:
            root = os.path.join(opt.get('root_path', '.'), 'experiments', opt['name'])
            state_dir = opt['path'].get('training_states') or os.path.join(root, 'training_states')
            models_dir = opt['path'].get('models') or os.path.join(root, 'models')
            if os.path.isdir(state_dir):
                if opt.get('rank', 0) == 0:
                    for path in _remove_stale_temporaries(state_dir, models_dir):
                        print(f'Removed the temporary file of an interrupted save: {path}', flush=True)
                states = [v for v in scandir(state_dir, suffix='.state', recursive=False, full_path=False)]
                iters = sorted((int(v[:-len('.state')]) for v in states if v[:-len('.state')].isdigit()),
                               reverse=True)
                for it in iters:
                    problems = iteration_problems(models_dir, state_dir, it)
                    if not problems:
                        resume_state_path = os.path.join(state_dir, f'{it}.state')
                        opt['path']['resume_state'] = resume_state_path
                        break
                    sys.stderr.write(f'WARNING: --auto_resume: iteration {it} cannot be resumed, trying an older '
                                     'checkpoint (these files are left as they are):\n' +
                                     ''.join(f'  {p}\n' for p in problems))
                    sys.stderr.flush()
            if resume_state_path is None and os.path.isdir(root):
                _RESTART_IN_PLACE['active'] = True
                print(f'--auto_resume: no complete checkpoint in {root}; training starts from iteration 0 in the '
                      'same folder (nothing archived).', flush=True)
        elif opt['path'].get('resume_state'):
            resume_state_path = opt['path']['resume_state']
            problem = _load_problem(resume_state_path, 'training state')
            if problem:
                raise ValueError(f'path.resume_state: {problem} (expected a training state written by '
                                 'vlunet-train / BasicSR; use --auto_resume to pick the newest usable one)')
        if resume_state_path is None:
            return None
        resume_state = load_training_state(resume_state_path)
        check_resume(opt, resume_state['iter'])
        # no logging here: the root logger is configured later, by train_pipeline
        print(f'Resume state: {resume_state_path}', flush=True)
        return resume_state

    basicsr_train.load_resume_state = load_resume_state

    from basicsr.utils import misc
    original = misc.mkdir_and_rename
    if getattr(original, '_vlunet_wrapped', False):
        return

    def mkdir_and_rename(path):
        if _RESTART_IN_PLACE['active']:
            os.makedirs(path, exist_ok=True)
        else:
            original(path)

    mkdir_and_rename._vlunet_wrapped = True
    for module in (misc, basicsr_train, sys.modules.get('basicsr.utils')):
        if module is not None and hasattr(module, 'mkdir_and_rename'):
            module.mkdir_and_rename = mkdir_and_rename


def _save_with_retries(obj, path, what):
    from vlunet.utils.atomic import torch_save_atomic  # the one atomic writer (a leaf module)
    for attempt in range(3):
        try:
            torch_save_atomic(obj, path)
            return
        except OSError as err:
            if attempt == 2:
                raise OSError(f'cannot save the {what} {path}: {err} (is the disk or quota full?); the previous '
                              'checkpoints are intact, resume from them with --auto_resume') from err
            sys.stderr.write(f'WARNING: saving {path} failed ({err}); retrying\n')
            time.sleep(1)


def fix_atomic_checkpoints():
    """Symptom: a job killed while BasicSR writes ``models/net_g_<iter>.pth`` or
    ``training_states/<iter>.state`` leaves a truncated file (both are written in place with
    ``torch.save``), and a save that fails three times is ignored, so a full quota silently loses
    every later checkpoint.

    Write both atomically (``vlunet.utils.atomic``: the complete new file or none), retry three
    times, then raise naming the file. Models save their networks before the state (the state is
    the "iteration complete" mark that ``--auto_resume`` looks for). A model may add entries to the
    state with a method ``training_state_extras()`` and read them back in ``resume_training``.
    """
    from basicsr.models.base_model import BaseModel
    from basicsr.utils.dist_util import master_only

    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        label = 'latest' if current_iter == -1 else current_iter
        save_path = os.path.join(self.opt['path']['models'], f'{net_label}_{label}.pth')
        nets = net if isinstance(net, list) else [net]
        keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(keys):
            raise ValueError(f'save_network: {len(nets)} networks but {len(keys)} param keys')
        save_dict = {}
        for net_, key in zip(nets, keys):
            state_dict = self.get_bare_model(net_).state_dict()
            save_dict[key] = {(k[len('module.'):] if k.startswith('module.') else k): v.cpu()
                              for k, v in state_dict.items()}
        _save_with_retries(save_dict, save_path, 'network')

    @master_only
    def save_training_state(self, epoch, current_iter):
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers]}
        extras = getattr(self, 'training_state_extras', None)
        if callable(extras):
            state.update(extras())
        path = os.path.join(self.opt['path']['training_states'], f'{current_iter}.state')
        _save_with_retries(state, path, 'training state')

    BaseModel.save_network = save_network
    BaseModel.save_training_state = save_training_state


# ---------------------------------------------------------------------------------------------
# 5. LMDB opened twice in one process (train and val on one database)
# ---------------------------------------------------------------------------------------------
_LMDB_ENVS = {}


def _open_lmdb_shared(path, **kwargs):
    """One read-only environment per (process, database): py-lmdb >= 2 refuses a second open."""
    import lmdb
    key = (os.getpid(), os.path.realpath(path))
    env = _LMDB_ENVS.get(key)
    if env is None:
        env = lmdb.open(path, **kwargs)
        _LMDB_ENVS[key] = env
    return env


def fix_lmdb_double_open():
    """Symptom: training and validating on one LMDB fails after the first validation with
    ``lmdb.Error: ... The environment is already open in this process``.

    Every BasicSR dataset opens its own LmdbBackend; share one environment per process and path.
    """
    from basicsr.utils.file_client import LmdbBackend

    def __init__(self, db_paths, client_keys='default', readonly=True, lock=False, readahead=False, **kwargs):
        client_keys = [client_keys] if isinstance(client_keys, str) else list(client_keys)
        self.db_paths = [str(v) for v in db_paths] if isinstance(db_paths, (list, tuple)) else [str(db_paths)]
        if len(client_keys) != len(self.db_paths):
            raise ValueError('client_keys and db_paths should have the same length, '
                             f'but received {len(client_keys)} and {len(self.db_paths)}.')
        self._client = {
            key: _open_lmdb_shared(path, readonly=readonly, lock=lock, readahead=readahead, **kwargs)
            for key, path in zip(client_keys, self.db_paths)
        }

    LmdbBackend.__init__ = __init__


# ---------------------------------------------------------------------------------------------
# 6. optimizers and schedulers
# ---------------------------------------------------------------------------------------------
def fix_optimizers_and_schedulers():
    """Symptom: ``NotImplementedError: optimizer AdamW is not supperted yet`` and
    ``Scheduler LinearWarmupCosineLR is not implemented yet``.

    basicsr 1.4.2's BaseModel knows only Adam, MultiStepLR and CosineAnnealingRestartLR. Accept
    every ``torch.optim`` optimizer by name (Adam, AdamW, SGD, ...) and add LinearWarmupCosineLR;
    the original schedulers behave as before.
    """
    from basicsr.models.base_model import BaseModel
    original_setup_schedulers = BaseModel.setup_schedulers

    def get_optimizer(self, optim_type, params, lr, **kwargs):
        optimizer_cls = getattr(torch.optim, optim_type, None)
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, torch.optim.Optimizer)):
            raise NotImplementedError(f'optimizer {optim_type!r} is not a torch.optim optimizer '
                                      '(expected e.g. Adam, AdamW, SGD)')
        return optimizer_cls(params, lr, **kwargs)

    def setup_schedulers(self):
        scheduler_opt = self.opt['train']['scheduler']
        if scheduler_opt.get('type') == 'LinearWarmupCosineLR':
            from vlunet.models.lr_scheduler import LinearWarmupCosineLR  # our scheduler (see its module)
            kwargs = {k: v for k, v in scheduler_opt.items() if k != 'type'}
            total = int(self.opt['train']['total_iter'])
            kwargs.setdefault('total_iter', total)
            if int(kwargs['total_iter']) < total and not float(kwargs.get('eta_min', 0)) > 0:
                raise ValueError(
                    f'train.scheduler.total_iter ({kwargs["total_iter"]}) is smaller than train.total_iter ({total}): '
                    f'iterations {kwargs["total_iter"]}..{total} would train at lr eta_min = 0. Remove '
                    'scheduler.total_iter (it then follows train.total_iter) or make the two equal.')
            for optimizer in self.optimizers:
                self.schedulers.append(LinearWarmupCosineLR(optimizer, **kwargs))
        else:
            original_setup_schedulers(self)

    original_resume_training = BaseModel.resume_training

    def resume_training(self, resume_state):
        original_resume_training(self, resume_state)
        from basicsr.utils import get_root_logger
        for scheduler in self.schedulers:
            message = scheduler.describe_resume() if hasattr(scheduler, 'describe_resume') else None
            if message:
                get_root_logger().warning(message)

    BaseModel.get_optimizer = get_optimizer
    BaseModel.setup_schedulers = setup_schedulers
    BaseModel.resume_training = resume_training


# ---------------------------------------------------------------------------------------------
def apply():
    """Apply every fix once (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    fix_functional_tensor_import()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # basicsr's own import-time deprecation noise
        import basicsr  # noqa: F401
    fix_unsafe_yaml()
    fix_local_rank_argument()
    fix_force_yml_seed()
    fix_force_yml_numbers()
    fix_distributed_init()
    fix_slurm_init()
    fix_ddp_device_ids()
    fix_resume_state_loading()
    fix_atomic_checkpoints()
    fix_flags_under_path()
    fix_lmdb_double_open()
    fix_optimizers_and_schedulers()
    _APPLIED = True


apply()
