"""Make basicsr 1.4.2 (the latest release, 2022) work on today's stack, without forking it.

Imported first by ``import vlunet``. Each fix below is one small function whose docstring names
the symptom it removes; ``apply()`` runs them all once. Every fix only *adds* behaviour: BasicSR's
own option files, models and tests keep working (tests/test_compat.py checks each symptom).

Stack this was measured on: torch 2.14, torchvision 0.29, numpy 2, PyYAML 6, Python 3.11/3.12,
py-lmdb 2.x. This module knows BasicSR, torch and the stack; nothing of vlunet. vlunet's own
behaviour lives where a reader expects it: checkpoints, optimizers and schedulers in
:mod:`vlunet.models.base_model`, the resume policy, ``--force_yml`` and gradient accumulation in
:mod:`vlunet.pipeline` (installed by vlunet-train / vlunet-test).
"""
import collections
import os
import sys
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


# ---------------------------------------------------------------------------------------------
# 4. resuming on CPU-only machines, weights-only
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


def fix_resume_state_loading():
    """Symptoms: resuming (``--auto_resume`` or ``path.resume_state``) crashes on CPU-only machines
    (BasicSR maps the state to ``torch.cuda.current_device()``), and states holding a Counter no longer
    load under torch >= 2.6's ``weights_only=True`` default.

    Load the state BasicSR chose (the same choice as BasicSR's) on the CPU (``optimizer.load_state_dict``
    moves it to the parameters' device), weights-only with :data:`RESUME_STATE_SAFE_GLOBALS` allowed.
    ``vlunet-train`` chooses among the states by its own policy (:mod:`vlunet.pipeline`).
    """
    import basicsr.train as basicsr_train
    from basicsr.utils import check_resume, scandir

    def load_resume_state(opt):
        path = None
        if opt['auto_resume']:
            state_dir = os.path.join('experiments', opt['name'], 'training_states')
            if os.path.isdir(state_dir):
                states = [v[:-len('.state')] for v in scandir(state_dir, suffix='state', recursive=False,
                                                                full_path=False)]
                if states:
                    path = os.path.join(state_dir, f'{max(float(v) for v in states):.0f}.state')
                    opt['path']['resume_state'] = path
        else:
            path = opt['path'].get('resume_state')
        if path is None:
            return None
        state = load_training_state(path)
        check_resume(opt, state['iter'])
        return state

    basicsr_train.load_resume_state = load_resume_state


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
    fix_distributed_init()
    fix_slurm_init()
    fix_ddp_device_ids()
    fix_resume_state_loading()
    fix_lmdb_double_open()
    _APPLIED = True


apply()
