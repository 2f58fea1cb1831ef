"""scripts/benchmark_train.py: a --quick smoke run (tiny VLU-Net, float32 and bf16) and its helpers.

Speed and memory figures are the script's business; these tests only check that it measures and
reports them (positive numbers, one row per configuration, the bf16/float32 ratios of the rows it
measured), not how large they are.
"""
import csv
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPTS = os.path.join(REPO, 'scripts')
sys.path.insert(0, SCRIPTS)
import benchmark_train  # noqa: E402


def test_quick_run_prints_a_row_per_configuration(tmp_path):
    out_csv = tmp_path / 'train.csv'
    proc = subprocess.run([sys.executable, os.path.join(SCRIPTS, 'benchmark_train.py'), '--quick', '--methods',
                           'VLU-Net', '--configs', 'fp32', 'bf16', '--devices', 'cpu', '--threads', '1',
                           '--saved-tensors', '--gpu-memory', '24', '--csv', str(out_csv)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith('| VLU-Net (tiny) | cpu |')]
    # the main table, the saved-tensor table, the estimates
    assert [line.split(' | ')[2] for line in table] == ['fp32', 'bf16'] * 3
    rows = list(csv.DictReader(open(out_csv)))
    assert [r['config'] for r in rows] == ['fp32', 'bf16']
    for r in rows:
        assert r['method'] == 'VLU-Net (tiny)' and r['batch'] == '2' and r['micro_batch'] == '2'
        assert float(r['samples_per_s']) > 0 and float(r['step_s']) > 0 and float(r['peak_mb']) > 0
        assert int(r['params']) > 0 and r['note'] == '' and float(r['saved_mb']) > 0
    fp32, bf16 = rows
    assert fp32['peak_vs_fp32'] == fp32['speed_vs_fp32'] == ''  # a ratio only where there is something to compare
    assert float(bf16['peak_vs_fp32']) == pytest.approx(float(bf16['peak_mb']) / float(fp32['peak_mb']), rel=1e-6)
    assert float(bf16['speed_vs_fp32']) == pytest.approx(float(bf16['samples_per_s']) / float(fp32['samples_per_s']),
                                                         rel=1e-6)
    assert 'torch ' in proc.stdout and '1 threads' in proc.stdout and 'load average' in proc.stdout


def test_configurations_and_checkpointing_support():
    assert benchmark_train.parse_config('bf16+checkpoint') == {'bf16', 'checkpoint'}
    with pytest.raises(ValueError, match='unknown'):
        benchmark_train.parse_config('fp8')
    with pytest.raises(ValueError, match='exclude'):
        benchmark_train.parse_config('fp16+bf16')
    assert benchmark_train.float32_counterpart('bf16') == {'fp32'}
    assert benchmark_train.float32_counterpart('fp16+checkpoint') == {'checkpoint'}
    assert benchmark_train.float32_counterpart('fp32+checkpoint') is None
    assert benchmark_train.supports_checkpointing('VLU-Net') and benchmark_train.supports_checkpointing('VLUNet')
    assert not benchmark_train.supports_checkpointing('Restormer')  # reported as n/a, not measured


def test_methods_come_from_the_cards():
    from vlunet.archs.card import find_variant, list_methods
    default = benchmark_train.select_methods()
    assert {method for _, method, _ in default} == {c.name for c in list_methods()}
    assert all(find_variant(variant)[1].name == label for label, _, variant in default)
    assert benchmark_train.select_methods(['MoCE-IR-S', 'moceir_s']) == [('MoCE-IR-S', 'MoCE-IR', 'MoCE-IR-S')]
    quick = benchmark_train.select_methods(['VLU-Net-7', 'VLUNet'], quick=True)  # one tiny network per method
    assert quick == [('VLU-Net (tiny)', 'VLU-Net', None)]
    assert benchmark_train.network_opt('VLU-Net', None, quick=True) == find_variant('VLU-Net')[0].tiny_opt()
    with pytest.raises(KeyError, match='known'):
        benchmark_train.select_methods(['no-such-method'])


def test_ratios_pair_each_reduced_precision_row_with_its_float32_row():
    def row(config, peak, speed, cpu, method='A'):
        return {'method': method, 'device': 'cpu', 'batch': 2, 'config': config, 'peak_mb': peak,
                'samples_per_s': speed, 'step_cpu_s': cpu}
    rows = benchmark_train.add_ratios([row('fp32', 1000, 1.0, 4.0), row('bf16', 550, 1.5, 2.0),
                                       row('checkpoint', 600, 0.8, 5.0), row('bf16+checkpoint', 420, 1.0, 4.0),
                                       row('bf16', 700, 2.0, 1.0, method='B')])  # B has no float32 row
    assert [r.get('peak_vs_fp32') for r in rows] == [None, 0.55, None, 0.7, None]
    assert rows[1]['speed_vs_fp32'] == 1.5 and rows[1]['cpu_speed_vs_fp32'] == 2.0
    assert rows[3]['speed_vs_fp32'] == 1.25 and rows[3]['cpu_speed_vs_fp32'] == 1.25


def test_saved_tensor_bytes_counts_each_storage_once_and_no_parameters():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(32, 8, requires_grad=True)
    counts, out = benchmark_train.saved_tensor_bytes(net, lambda: net(x))
    # Linear 1 saves its input x; Tanh its result (32 x 16), which Linear 2 saves too: once; weights not
    assert dict(counts) == {('Sequential/Linear', 'float32'): 32 * 8 * 4, ('Sequential/Tanh', 'float32'): 32 * 16 * 4}
    assert out.shape == (32, 4) and out.grad_fn is not None


def test_estimated_batch_is_linear_in_the_measured_activation_memory():
    mb = 2**20
    # 1M parameters: 12 MB of gradient/AdamW state inside the peak; 100 MB of activations per sample
    row = {'params': mb, 'peak_mb': 12 + 2 * 100, 'micro_batch': 2}
    usable = 24 * 1024 * benchmark_train.GPU_USABLE_FRACTION - 16 - benchmark_train.GPU_RESERVE_MB
    assert benchmark_train.estimate_batch(row, 24) == int(usable // 100)
    assert benchmark_train.estimate_batch(dict(row, peak_mb=5), 24) is None  # nothing measured above the state


