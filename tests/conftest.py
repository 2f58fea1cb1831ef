import os
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
