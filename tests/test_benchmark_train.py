"""scripts/benchmark_train.py: a --quick smoke run (tiny VLUNet, two configurations) and its helpers.

Speed and memory figures are the script's business; these tests only check that it measures and
reports them (positive numbers, one row per configuration), not how large they are.
"""
import csv
import os
import subprocess
import sys

import pytest

from conftest import REPO

SCRIPTS = os.path.join(REPO, 'scripts')
sys.path.insert(0, SCRIPTS)
import benchmark_train  # noqa: E402


def test_quick_run_prints_a_row_per_configuration(tmp_path):
    out_csv = tmp_path / 'train.csv'
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'benchmark_train.py'), '--quick', '--archs',
                           'VLUNet', '--configs', 'fp32', 'checkpoint', '--devices', 'cpu', '--threads', '1',
                           '--gpu-memory', '24', '--csv', str(out_csv)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith('| VLUNet | cpu |')]
    assert [line.split(' | ')[2] for line in table] == ['fp32', 'checkpoint', 'fp32', 'checkpoint']  # + estimates
    rows = list(csv.DictReader(open(out_csv)))
    assert [r['config'] for r in rows] == ['fp32', 'checkpoint']
    for r in rows:
        assert r['arch'] == 'VLUNet' and r['batch'] == '2' and r['micro_batch'] == '2'
        assert float(r['samples_per_s']) > 0 and float(r['step_s']) > 0 and float(r['peak_mb']) > 0
        assert int(r['params']) > 0 and r['note'] == ''
    assert 'torch ' in proc.stdout and '1 threads' in proc.stdout  # where the numbers come from


def test_configurations_and_checkpointing_support():
    assert benchmark_train.parse_config('bf16+checkpoint') == {'bf16', 'checkpoint'}
    with pytest.raises(ValueError, match='unknown'):
        benchmark_train.parse_config('fp8')
    with pytest.raises(ValueError, match='exclude'):
        benchmark_train.parse_config('fp16+bf16')
    assert benchmark_train.supports_checkpointing('VLUNet')
    assert not benchmark_train.supports_checkpointing('Restormer')  # reported as n/a, not measured


def test_estimated_batch_is_linear_in_the_measured_activation_memory():
    mb = 2**20
    # 1M parameters: 12 MB of gradient/AdamW state inside the peak; 100 MB of activations per sample
    row = {'params': mb, 'peak_mb': 12 + 2 * 100, 'micro_batch': 2}
    usable = 24 * 1024 * benchmark_train.GPU_USABLE_FRACTION - 16 - benchmark_train.GPU_RESERVE_MB
    assert benchmark_train.estimate_batch(row, 24) == int(usable // 100)
    assert benchmark_train.estimate_batch(dict(row, peak_mb=5), 24) is None  # nothing measured above the state


