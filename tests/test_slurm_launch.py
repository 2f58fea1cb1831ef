"""--launcher slurm (vlunet/compat.py: fix_slurm_init): the environment it sets up, and a real
2-process CPU run started the way srun starts one (SLURM_* variables, scontrol on PATH)."""
import glob
import os
import socket
import subprocess
import sys

import pytest

import vlunet  # noqa: F401  (applies the fixes)
from vlunet import compat
from conftest import DEMO_TRAIN, TINY_DEMO, load_yaml, write_yaml

# what srun/torchrun would have set; a stale one must not leak into these tests
LAUNCH_VARIABLES = ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE',
                    'SLURM_PROCID', 'SLURM_LOCALID', 'SLURM_NTASKS', 'SLURM_NODELIST', 'SLURM_JOB_NODELIST')


def _fake_scontrol(folder, host='127.0.0.1'):
    """An ``scontrol`` that answers ``show hostname(s) LIST`` with ``host`` (and logs its arguments)."""
    folder.mkdir(exist_ok=True)
    script = folder / 'scontrol'
    script.write_text('#!/bin/sh\n'
                      f'echo "$@" >> "{folder}/scontrol_calls"\n'
                      'if [ "$1" = show ] && { [ "$2" = hostname ] || [ "$2" = hostnames ]; }; then\n'
                      f'  echo {host}\n  echo otherhost\n  exit 0\n'
                      'fi\n'
                      'echo "fake scontrol: unsupported $*" >&2\nexit 1\n')
    script.chmod(0o755)
    return folder


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def clean_launch_env(monkeypatch):
    from basicsr.utils import dist_util
    for name in LAUNCH_VARIABLES:  # recorded (set, then removed), so what the launcher sets is undone afterwards
        monkeypatch.setenv(name, '')
        monkeypatch.delenv(name)
    monkeypatch.setattr(dist_util.mp, 'set_start_method', lambda method: None)  # init_dist: not for this process
    return monkeypatch


def test_slurm_environment_on_cpu(tmp_path, clean_launch_env):
    """gloo on CPU, RANK/WORLD_SIZE/LOCAL_RANK from SLURM_*, first host from scontrol, dist_params.port."""
    import torch
    import torch.distributed as dist
    from basicsr.utils import dist_util
    if torch.cuda.is_available():
        pytest.skip('checks the CPU path (gloo, no device set)')
    monkeypatch = clean_launch_env
    bin_dir = _fake_scontrol(tmp_path / 'bin')
    monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('SLURM_PROCID', '3')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    monkeypatch.setenv('SLURM_NTASKS', '4')
    monkeypatch.setenv('SLURM_NODELIST', 'gpu[01-02]')
    seen = {}
    monkeypatch.setattr(dist, 'init_process_group', lambda **kwargs: seen.update(kwargs))

    dist_util.init_dist('slurm', backend='nccl', port=29577)  # what parse_options calls with dist_params

    assert seen == {'backend': 'gloo'}
    env = {k: os.environ[k] for k in ('MASTER_ADDR', 'MASTER_PORT', 'RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    assert env == {'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': '29577', 'RANK': '3', 'WORLD_SIZE': '4',
                   'LOCAL_RANK': '1'}
    assert (bin_dir / 'scontrol_calls').read_text().split() == ['show', 'hostnames', 'gpu[01-02]']

    # no dist_params.port: the environment's MASTER_PORT, else 29500; an exported MASTER_ADDR wins
    monkeypatch.setenv('MASTER_PORT', '29601')
    monkeypatch.setenv('MASTER_ADDR', 'head-node')
    dist_util._init_dist_slurm('nccl')
    assert (os.environ['MASTER_PORT'], os.environ['MASTER_ADDR']) == ('29601', 'head-node')
    monkeypatch.delenv('MASTER_PORT')
    dist_util._init_dist_slurm('nccl')
    assert os.environ['MASTER_PORT'] == '29500'


@pytest.mark.parametrize('visible, localid, device', [(4, '1', 1), (4, '3', 3), (1, '3', 0)])
def test_slurm_gpu_per_local_rank(tmp_path, clean_launch_env, visible, localid, device):
    """On GPU: the given backend and the device of SLURM_LOCALID (not SLURM_PROCID), modulo the visible
    GPUs (a task bound to one GPU sees it as device 0). CUDA is faked: only the choice is checked."""
    import torch
    import torch.distributed as dist
    from basicsr.utils import dist_util
    monkeypatch = clean_launch_env
    chosen, seen = [], {}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: visible)
    monkeypatch.setattr(torch.cuda, 'set_device', chosen.append)
    monkeypatch.setattr(dist, 'init_process_group', lambda **kwargs: seen.update(kwargs))
    monkeypatch.setenv('MASTER_ADDR', 'node01')
    for name, value in (('SLURM_PROCID', '6'), ('SLURM_LOCALID', localid), ('SLURM_NTASKS', '8'),
                        ('SLURM_NODELIST', 'node[01-02]')):
        monkeypatch.setenv(name, value)
    dist_util.init_dist('slurm', backend='nccl', port=29578)
    assert chosen == [device] and seen == {'backend': 'nccl'}
    assert (os.environ['RANK'], os.environ['LOCAL_RANK'], os.environ['WORLD_SIZE']) == ('6', localid, '8')


def test_slurm_without_scontrol_names_the_way_out(tmp_path, clean_launch_env):
    clean_launch_env.setenv('PATH', str(tmp_path))  # no scontrol anywhere
    with pytest.raises(RuntimeError, match='set MASTER_ADDR'):
        compat._slurm_master_addr('node[1-2]')
    _fake_scontrol(tmp_path)
    assert compat._slurm_master_addr('node[1-2]') == '127.0.0.1'


def test_srun_two_cpu_tasks_train_with_world_size_2(tmp_path):
    """Two tasks as srun starts them (vlunet-train and python -m vlunet.train): both finish, world size 2."""
    bin_dir = _fake_scontrol(tmp_path / 'bin')
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(PATH=f'{bin_dir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{env["PATH"]}',
               OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', SLURM_NTASKS='2', SLURM_NODELIST='somehost')
    opt = load_yaml(DEMO_TRAIN)
    opt['dist_params']['port'] = _free_port()  # read before --force_yml is applied, so set in the file
    args = ['-opt', write_yaml(tmp_path / 'demo.yml', opt), '--launcher', 'slurm', '--force_yml',
            'train:total_iter=3', *TINY_DEMO]
    entry_points = [[os.path.join(os.path.dirname(sys.executable), 'vlunet-train')],
                    [sys.executable, '-m', 'vlunet.train']]
    procs = []
    for rank, entry in enumerate(entry_points):
        procs.append(subprocess.Popen([*entry, *args], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT,
                                      env=dict(env, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank))))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=600)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f'task {rank}:\n{out[-3000:]}'
    logs = glob.glob(str(tmp_path / 'experiments' / 'VLUNet_demo' / 'train_*.log'))
    assert len(logs) == 1  # written by rank 0 only
    log = open(logs[0]).read()
    assert '  world_size: 2\n' in log and '  rank: 0\n' in log  # the logged options
    assert 'World size (gpu number): 2' in log
    assert 'End of training' in log
    assert (tmp_path / 'experiments' / 'VLUNet_demo' / 'models' / 'net_g_latest.pth').is_file()
