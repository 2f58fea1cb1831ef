import os
import subprocess
import sys

import pytest
import yaml

MAX_WORKERS = 4  # several tests hold 2-3 GB each (full-size budgets, exports): four at once fit a 24 GB machine

if os.environ.get('PYTEST_XDIST_WORKER'):
    # the suite runs in one worker per core (pytest.ini): each computes on one thread, as the command-line
    # tests' subprocesses do, instead of all of them competing for every core
    os.environ.setdefault('OMP_NUM_THREADS', '1')


def pytest_xdist_auto_num_workers(config):
    """``-n auto`` (pytest.ini): one worker per core this process may use, at most MAX_WORKERS."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, 'tests', 'fixtures')  # copies of the published reference data (../shared/reference)
DEMO_TRAIN = os.path.join(REPO, 'options', 'train', 'VLUNet_demo.yml')

# tiny overrides that keep the demo option file's structure but make a run take seconds
TINY_DEMO = ['datasets:train:gt_size=32', 'datasets:train:batch_size_per_gpu=2', 'network_g:dim=10',
             'logger:use_tb_logger=false', 'logger:print_freq=1']


def run_cli(args, cwd, timeout=600, env=None):
    """Run a console entry point as ``python -m`` in ``cwd``; returns CompletedProcess (text)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


def write_yaml(path, data):
    with open(path, 'w') as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return str(path)


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


@pytest.fixture
def demo_images(tmp_path):
    """A folder of a few small clean PNGs (taken from the package's demo data)."""
    import shutil
    src = os.path.join(REPO, 'vlunet', 'demo_data', 'train')
    dst = tmp_path / 'clean'
    shutil.copytree(src, dst)
    return dst


# --- the published reference fixtures and full-size key listings -----------------------------------
def load_fixture(name):
    """A parity fixture: config, state_dict, inputs and the published float64 output."""
    import torch
    return torch.load(os.path.join(FIXTURES, name), weights_only=True, map_location='cpu')


def read_listing(name):
    """A published full-size listing ``keys_*.tsv``: ``[(key, shape as written, e.g. '[48, 3, 3, 3]')]``."""
    with open(os.path.join(FIXTURES, name), encoding='utf-8') as f:
        return [tuple(line.split('\t')) for line in f.read().splitlines()]


def state_dict_listing(net):
    """``net``'s state_dict written like a listing, to compare with :func:`read_listing`."""
    return [(k, str(list(v.shape))) for k, v in net.state_dict().items()]


def listing_state_dict(name):
    """A listing as a state_dict of meta tensors (keys and shapes only, e.g. for guess_arch)."""
    import json
    from collections import OrderedDict

    import torch
    return OrderedDict((k, torch.empty(json.loads(shape), device='meta')) for k, shape in read_listing(name))
